"""The FID Inception-V3: the 2015-12-05 TensorFlow graph that FID and IS are defined on, in PyTorch.

This is the network of the TF reference (TTUR / ADM's evaluator / EDM's detector): uint8 RGB in, a TF-1.x
bilinear resize to 299 (no half-pixel offset), (x - 128) / 128, batch-norm eps 1e-3, average pools that do not
count the padding, and a max pool in the last block's pool branch (a quirk of that graph). It returns the 2048
pool_3 features (FID) and the 1008 unbiased logits (pool_3 @ W, as the TF Inception Score reads them).

Weights: the TF-ported state dict that torch-fidelity (`weights-inception-2015-12-05-6726825d.pth`) and pytorch-fid
(`pt_inception-2015-12-05-6726825d.pth`) download; both use the parameter names of this module. Nothing is
downloaded unless asked for (`inception="download"`): see imm_fast.features.find_inception.

Shapes: N images, (3, H, W) uint8 pixels.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ENV_VAR = "IMM_FAST_INCEPTION"
WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
SIZE = 299
FEATURES = 2048
CLASSES = 1008


def resize_like_tf1(x, size=SIZE):
    """TF 1.x resize_bilinear(align_corners=False): source = dest * in/out (no half-pixel), lerp along W, then H."""
    def axis(n_in):
        scale = torch.tensor(n_in / size, dtype=torch.float32)  # TF computes the scale and positions in float32
        src = torch.arange(size, dtype=torch.float32) * scale
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo.to(x.device), hi.to(x.device), (src - lo.float()).to(x.device, x.dtype)

    (y0, y1, wy), (x0, x1, wx) = axis(x.shape[-2]), axis(x.shape[-1])
    left, right = x[..., x0], x[..., x1]                  # (N, C, H, size)
    rows = left + (right - left) * wx
    top, bottom = rows[..., y0, :], rows[..., y1, :]      # (N, C, size, size)
    return top + (bottom - top) * wy[:, None]


class BasicConv2d(nn.Module):
    """conv (no bias) + batch norm (eps 1e-3, TF's) + ReLU; attribute names follow the ported weights."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _pool(kind, x):
    if kind == "avg":  # TF's average pool ignores the zero padding
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.max_pool2d(x, 3, stride=2)  # "reduce": the grid-size reduction of Mixed_6a / Mixed_7a


class Mixed(nn.Module):
    """One Inception block: parallel branches concatenated over channels.

    branches: [(pool or None, [(name, cout, kernel, stride, padding), ...], split)] where `split`, if not None,
    lists two convs applied side by side to the chain's output (the 1x3 / 3x1 pairs of Mixed_7b/7c).
    """

    def __init__(self, cin, branches):
        super().__init__()
        self.branches = []
        for pool, chain, split in branches:
            c = cin
            for name, cout, k, s, p in chain:
                setattr(self, name, BasicConv2d(c, cout, k, s, p))
                c = cout
            for name, cout, k, s, p in split or ():
                setattr(self, name, BasicConv2d(c, cout, k, s, p))
            self.branches.append((pool, [n for n, *_ in chain], [n for n, *_ in split or ()]))

    def forward(self, x):
        outs = []
        for pool, chain, split in self.branches:
            h = x if pool is None else _pool(pool, x)
            for name in chain:
                h = getattr(self, name)(h)
            outs.extend([getattr(self, n)(h) for n in split] if split else [h])
        return torch.cat(outs, 1)


def _block_a(cin, pool_features):
    return Mixed(cin, [
        (None, [("branch1x1", 64, 1, 1, 0)], None),
        (None, [("branch5x5_1", 48, 1, 1, 0), ("branch5x5_2", 64, 5, 1, 2)], None),
        (None, [("branch3x3dbl_1", 64, 1, 1, 0), ("branch3x3dbl_2", 96, 3, 1, 1), ("branch3x3dbl_3", 96, 3, 1, 1)],
         None),
        ("avg", [("branch_pool", pool_features, 1, 1, 0)], None)])


def _block_b(cin):
    return Mixed(cin, [
        (None, [("branch3x3", 384, 3, 2, 0)], None),
        (None, [("branch3x3dbl_1", 64, 1, 1, 0), ("branch3x3dbl_2", 96, 3, 1, 1), ("branch3x3dbl_3", 96, 3, 2, 0)],
         None),
        ("reduce", [], None)])


def _block_c(cin, c7):
    h, v = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of the factorized 7x7 convs
    return Mixed(cin, [
        (None, [("branch1x1", 192, 1, 1, 0)], None),
        (None, [("branch7x7_1", c7, 1, 1, 0), ("branch7x7_2", c7, h[0], 1, h[1]), ("branch7x7_3", 192, v[0], 1, v[1])],
         None),
        (None, [("branch7x7dbl_1", c7, 1, 1, 0), ("branch7x7dbl_2", c7, v[0], 1, v[1]),
                ("branch7x7dbl_3", c7, h[0], 1, h[1]), ("branch7x7dbl_4", c7, v[0], 1, v[1]),
                ("branch7x7dbl_5", 192, h[0], 1, h[1])], None),
        ("avg", [("branch_pool", 192, 1, 1, 0)], None)])


def _block_d(cin):
    return Mixed(cin, [
        (None, [("branch3x3_1", 192, 1, 1, 0), ("branch3x3_2", 320, 3, 2, 0)], None),
        (None, [("branch7x7x3_1", 192, 1, 1, 0), ("branch7x7x3_2", 192, (1, 7), 1, (0, 3)),
                ("branch7x7x3_3", 192, (7, 1), 1, (3, 0)), ("branch7x7x3_4", 192, 3, 2, 0)], None),
        ("reduce", [], None)])


def _block_e(cin, pool):
    pair = lambda a, b: [(a, 384, (1, 3), 1, (0, 1)), (b, 384, (3, 1), 1, (1, 0))]  # noqa: E731
    return Mixed(cin, [
        (None, [("branch1x1", 320, 1, 1, 0)], None),
        (None, [("branch3x3_1", 384, 1, 1, 0)], pair("branch3x3_2a", "branch3x3_2b")),
        (None, [("branch3x3dbl_1", 448, 1, 1, 0), ("branch3x3dbl_2", 384, 3, 1, 1)],
         pair("branch3x3dbl_3a", "branch3x3dbl_3b")),
        (pool, [("branch_pool", 192, 1, 1, 0)], None)])


class InceptionV3(nn.Module):
    """uint8 (N, 3, H, W) -> (pool_3 features (N, 2048), unbiased logits (N, 1008)), both float32."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _block_a(192, 32), _block_a(256, 64), _block_a(288, 64)
        self.Mixed_6a = _block_b(288)
        self.Mixed_6b, self.Mixed_6c = _block_c(768, 128), _block_c(768, 160)
        self.Mixed_6d, self.Mixed_6e = _block_c(768, 160), _block_c(768, 192)
        self.Mixed_7a = _block_d(768)
        self.Mixed_7b, self.Mixed_7c = _block_e(1280, "avg"), _block_e(2048, "max")
        self.fc = nn.Linear(FEATURES, CLASSES)

    def forward(self, images):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
                or images.shape[1] != 3:
            raise ValueError(f"images must be a uint8 (N, 3, H, W) tensor, got {getattr(images, 'dtype', None)} "
                             f"{tuple(getattr(images, 'shape', ()))}")
        x = resize_like_tf1(images.float())
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        pool = x.mean((2, 3))                             # (N, 2048)
        return pool, pool @ self.fc.weight.T              # TF's IS reads the logits without the bias


def load_inception(path, device="cpu"):
    """(InceptionV3 in eval mode with the FID weights file `path` on `device`, the path). Finding the file (a path,
    $IMM_FAST_INCEPTION, the torch hub cache, "download") and keeping the network loaded: imm_fast.features."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"inception={str(path)!r} is not a file; give the TF-ported FID Inception weights "
                                f"({WEIGHTS_FILES[0]})")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read the Inception weights {str(path)!r}: {e}") from e
    net = InceptionV3()
    try:
        net.load_state_dict(sd)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{str(path)!r} is not the FID Inception-V3 state dict "
                         f"({WEIGHTS_FILES[0]}): {str(e).splitlines()[0]}") from None
    return net.to(device).eval().requires_grad_(False), path
