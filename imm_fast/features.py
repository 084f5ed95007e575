"""Feature networks behind one interface, and DINOv2 ViT-L/14 (the network of FD_DINOv2).

A feature network turns uint8 images (N, C, H, W), C in {1, 3}, into named float64 outputs (N, width):

    net = load_feature_net("inception", weights=None, device="cpu")
    net.outputs                 # {"inception": 2048, "inception_logits": 1008}
    net(images)                 # {"inception": (N, 2048), "inception_logits": (N, 1008)} float64 tensors
    net.weights, net.sha256     # the weights file and its sha256 (recorded with every result)

FEATURE_NETS maps a name to its loader; imm_fast.metrics' METRICS name the outputs they read. Weights are never
downloaded unless asked ("download"); a missing file is a FileNotFoundError saying where to put it.

DINOv2 as EDM2 and dgm-eval compute it: resize to 224 x 224 (bicubic with antialiasing on the 0..255 values),
/ 255, ImageNet mean and std, the ViT (LayerScale blocks, layer norm eps 1e-6, position embeddings resized
bicubically from the 37 x 37 grid of training with DINOv2's 0.1 offset), the CLS token after the final norm
(1024 wide). Weights: facebookresearch/dinov2's `dinov2_vitl14_pretrain.pth` state dict (its parameter names).

Shapes: N images, T = 1 + P tokens (P patches), C width, H heads, Dh = 64 head dim.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._files import file_sha256
from .inception import CLASSES, ENV_VAR, FEATURES, WEIGHTS_FILES, WEIGHTS_URL, load_inception

DINOV2_ENV = "IMM_FAST_DINOV2"
DINOV2_FILE = "dinov2_vitl14_pretrain.pth"
DINOV2_URL = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/{DINOV2_FILE}"
DINOV2_SIZE = 224
DINOV2_HEAD_DIM = 64  # every released DINOv2 (S, B, L, g) has 64-wide heads: the shapes then give the head count
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MAX_WEIGHTS_BYTES = 4 << 30  # ViT-L/14 is 1.2 GB in fp32: a file over 4 GiB is not the network FD_DINOv2 uses


def hub_file(name) -> Path:
    """Where torch.hub keeps a downloaded file (the cache other tools share)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def download(url, what, option) -> None:
    """Download into the torch hub cache (kept there for next time), with a one-line error that says what to do
    when it fails."""
    dst = hub_file(Path(url).name)
    if dst.is_file():
        return
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(dst), progress=True)  # to a temporary name, then moved in place
    except Exception as e:  # noqa: BLE001 - URLError, socket errors, HTTP errors: all mean "not from here"
        reason = " ".join(str(getattr(e, "reason", e)).split())[:200]
        raise FileNotFoundError(
            f"could not download the {what} from {url} ({type(e).__name__}: {reason}); this machine seems to be "
            f"offline: download that file on a machine with network access and pass {option} PATH, or copy it to "
            f"{hub_file(Path(url).name).parent}") from None


def find_file(spec, env, names, what, url, option) -> Path:
    """spec (a path, "download" or None) > $env > the torch hub cache; FileNotFoundError saying how to get one."""
    if spec == "download":
        download(url, what, option)
        spec = None
    if spec is not None:
        p = Path(spec).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{option.lstrip('-')}={str(spec)!r} is not a file; give the {what} ({names[0]})")
        return p
    if os.environ.get(env):
        p = Path(os.environ[env]).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"${env}={os.environ[env]!r} is not a file; point it at the {what} ({names[0]})")
        return p
    for name in names:
        if hub_file(name).is_file():
            return hub_file(name)
    raise FileNotFoundError(
        f"the {what} were not found. Pass {option} PATH (Python: {option.lstrip('-')}=PATH) or set {env}=PATH to a "
        f"copy of {names[0]} ({url}), or place it in {hub_file(names[0]).parent}, or pass {option} download on a "
        "machine with network access.")


# ----------------------------------------------------------------------------------------------------------------
# The interface
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class FeatureNet:
    """A loaded feature network: __call__(uint8 images) -> {output name: float64 (N, width) on the CPU}."""

    name: str
    outputs: dict        # output name -> width
    weights: Path        # the weights file
    forward: Callable    # uint8 (n, 3, H, W) on the device -> {output name: (n, width)}
    device: torch.device
    batch: int = 200

    @property
    def sha256(self) -> str:
        return _sha256(self.weights)

    @torch.no_grad()
    def __call__(self, images) -> dict:
        outs = {k: [] for k in self.outputs}
        for i in range(0, len(images), self.batch):
            x = torch.as_tensor(images[i:i + self.batch]).to(self.device)
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
                raise ValueError(f"images must be uint8 (N, 1 or 3, H, W), got {x.dtype} {tuple(x.shape)}")
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            for k, v in self.forward(x).items():
                outs[k].append(v.double().cpu())
        return {k: torch.cat(v) if v else torch.zeros(0, self.outputs[k], dtype=torch.float64)
                for k, v in outs.items()}


_SHA = {}


def _sha256(path) -> str:
    key = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns, Path(path).stat().st_size)
    if key not in _SHA:
        _SHA[key] = file_sha256(path)
    return _SHA[key]


def _inception(weights, device) -> FeatureNet:
    net, path = load_inception(weights, device)
    fwd = lambda x: dict(zip(("inception", "inception_logits"), net(x)))  # noqa: E731
    outputs = {"inception": FEATURES, "inception_logits": CLASSES}
    return FeatureNet("inception", outputs, path, fwd, torch.device(device))


def _dinov2(weights, device) -> FeatureNet:
    net, path = load_dinov2(weights, device)
    return FeatureNet("dinov2", {"dinov2": net.width}, path, lambda x: {"dinov2": net(x)}, torch.device(device),
                      batch=64)


def find_inception(spec=None) -> Path:
    """The FID Inception weights file: torch-fidelity's or pytorch-fid's TF-ported state dict."""
    return find_file(spec, ENV_VAR, WEIGHTS_FILES, "FID Inception-V3 weights (TF-ported)", WEIGHTS_URL, "--inception")


def find_dinov2(spec=None) -> Path:
    return find_file(spec, DINOV2_ENV, (DINOV2_FILE,), "DINOv2 ViT-L/14 weights", DINOV2_URL, "--dinov2")


# name -> (loader(weights spec, device) -> FeatureNet, find(weights spec) -> Path, {output: width})
FEATURE_NETS = {
    "inception": (_inception, find_inception, {"inception": FEATURES, "inception_logits": CLASSES}),
    "dinov2": (_dinov2, find_dinov2, {"dinov2": 1024}),
}
_LOADED = {}


def load_feature_net(name, weights=None, device="cpu") -> FeatureNet:
    """The feature network `name` (FEATURE_NETS) with its weights (a path, "download" or None: env / hub cache),
    kept in memory for the next call with the same file."""
    if name not in FEATURE_NETS:
        raise ValueError(f"feature network {name!r} is not one of {tuple(FEATURE_NETS)}")
    loader, find, _ = FEATURE_NETS[name]
    path = find(weights)
    key = (name, str(Path(path).resolve()), Path(path).stat().st_mtime_ns, str(device))
    if key not in _LOADED:
        _LOADED.pop(next((k for k in _LOADED if k[0] == name), None), None)  # one network of each kind in memory
        _LOADED[key] = loader(str(path), device)
    return _LOADED[key]


# ----------------------------------------------------------------------------------------------------------------
# DINOv2 ViT
# ----------------------------------------------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                                 # (N, T, C)
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # (N, H, T, Dh)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class _Block(nn.Module):
    """Pre-norm transformer block with LayerScale: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""

    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = _Attention(dim, heads), _Mlp(dim, hidden)
        self.ls1, self.ls2 = _LayerScale(dim), _LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)                    # (N, P, C)


class DINOv2(nn.Module):
    """DINOv2 ViT (parameter names of facebookresearch/dinov2): uint8 (N, 3, H, W) -> CLS token after the final
    norm, float32 (N, width). ViT-L/14: width 1024, depth 24, 16 heads, patch 14, a 37 x 37 position grid."""

    def __init__(self, width=1024, depth=24, patch=14, grid=37, mlp_hidden=4096, size=DINOV2_SIZE):
        super().__init__()
        self.width, self.patch, self.grid, self.size = width, patch, grid, size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, width))
        self.mask_token = nn.Parameter(torch.zeros(1, width))  # unused at inference; kept for strict loading
        self.patch_embed = _PatchEmbed(patch, width)
        self.blocks = nn.ModuleList(_Block(width, width // DINOV2_HEAD_DIM, mlp_hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def preprocess(self, images):
        """uint8 (N, 3, H, W) -> the normalized (N, 3, size, size) float32 input (EDM2's "torch" resize)."""
        x = F.interpolate(images.to(torch.float32), size=(self.size, self.size), mode="bicubic", antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).reshape(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).reshape(1, 3, 1, 1)
        return (x / 255 - mean) / std

    def position(self, g):
        """Position embeddings for a g x g patch grid: bicubic from the training grid, with DINOv2's scale factor
        (g + 0.1) / grid (the offset keeps floor(grid * scale) = g; the factor, not the size, sets the sampling)."""
        pos = self.pos_embed.float()
        if g == self.grid:
            return pos
        patch = pos[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        scale = (g + 0.1) / self.grid
        patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic", antialias=False)
        return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, g * g, -1)], 1)

    def forward(self, images):
        x = self.preprocess(images)
        tokens = self.patch_embed(x)                                      # (N, P, C)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], 1)
        tokens = tokens + self.position(x.shape[-1] // self.patch)        # (N, T, C)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]                                    # (N, C)


def dinov2_config(state_dict, source="the DINOv2 weights") -> dict:
    """DINOv2 constructor arguments from a state dict's shapes (the head count follows from 64-wide heads)."""
    try:
        width = state_dict["cls_token"].shape[-1]
        patch = state_dict["patch_embed.proj.weight"].shape[-1]
        tokens = state_dict["pos_embed"].shape[1] - 1
        hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"{source} is not a DINOv2 ViT state dict (facebookresearch/dinov2 parameter names): "
                         f"missing {e}") from None
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    grid = math.isqrt(tokens)
    if grid * grid != tokens or width % DINOV2_HEAD_DIM:
        raise ValueError(f"{source}: pos_embed holds {tokens} patch positions (not a square grid) or the width "
                         f"{width} is not a multiple of {DINOV2_HEAD_DIM}; not a DINOv2 ViT")
    return dict(width=width, depth=depth, patch=patch, grid=grid, mlp_hidden=hidden)


def _unchunk(state_dict):
    """Keys of a model saved with block_chunks > 0 (blocks.<chunk>.<i>.*) as blocks.<i>.*."""
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state_dict.items()}


def load_dinov2(weights=None, device="cpu"):
    """(DINOv2 in eval mode on `device`, the weights file) from a dinov2_vit*14_pretrain.pth state dict."""
    path = find_dinov2(weights)
    if path.stat().st_size > MAX_WEIGHTS_BYTES:
        raise ValueError(f"{str(path)!r} is {path.stat().st_size / 2**30:.1f} GiB, more than a DINOv2 ViT-L/14 "
                         f"state dict ({MAX_WEIGHTS_BYTES / 2**30:.0f} GiB at most)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"could not read the DINOv2 weights {str(path)!r}: {' '.join(str(e).split())[:200]}") from e
    if not isinstance(sd, dict):
        raise ValueError(f"{str(path)!r} holds a {type(sd).__name__}, not a DINOv2 state dict")
    sd = _unchunk(sd)
    net = DINOv2(**dinov2_config(sd, repr(str(path))))
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{str(path)!r} is not a DINOv2 ViT state dict: {str(e).splitlines()[1:2]}") from None
    return net.to(device).eval().requires_grad_(False), path
