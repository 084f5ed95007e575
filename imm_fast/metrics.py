"""Sample-quality metrics.

Digits: a small CNN trained once on the digits training split (cached under $IMM_FAST_CACHE or ~/.cache/imm_fast)
gives (1) the class accuracy of class-conditional samples and (2) the Frechet distance (FD) of its penultimate
features between samples and the held-out real digits, printed beside the real-vs-real floor (the FD between as
many real training digits and the same held-out digits).
Images: FID through torch-fidelity when it is installed and its Inception weights are on disk; otherwise a clear
message and no number.

Shapes: N samples, F feature width, (C, R, R) images.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSIFIER_VERSION = 1  # bump when the classifier or its training changes (invalidates the cache)


def cache_dir() -> Path:
    return Path(os.environ.get("IMM_FAST_CACHE") or Path.home() / ".cache" / "imm_fast")


class DigitsClassifier(nn.Module):
    """8x8x1 digits (model scale, std ~0.5) -> 10 logits; `features` is the 64-wide penultimate layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def features(self, x):
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (N, 32, 4, 4)
        return F.relu(self.fc1(h.flatten(1)))      # (N, 64)

    def forward(self, x):
        return self.fc2(self.features(x))


def _train_digits_classifier(seed=0, epochs=30):
    from .data import load_digits_arrays

    x, y = load_digits_arrays("train")
    x = (torch.from_numpy(x) - 8.0) / 12.0
    y = torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            b = perm[i:i + 128]
            # Small shifts make the classifier judge shapes, not exact pixel positions.
            xb = torch.roll(x[b], shifts=tuple(torch.randint(-1, 2, (2,), generator=g).tolist()), dims=(2, 3))
            loss = F.cross_entropy(net(xb), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def digits_classifier(refresh=False) -> DigitsClassifier:
    """The cached digits classifier (trained on the training split on first use, a few seconds on a CPU)."""
    from safetensors.torch import load_file, save_file

    from ._files import atomic_write

    path = cache_dir() / f"digits_classifier_v{CLASSIFIER_VERSION}.safetensors"
    net = DigitsClassifier()
    if path.is_file() and not refresh:
        try:
            net.load_state_dict(load_file(str(path)))
            return net.eval().requires_grad_(False)
        except Exception:  # a corrupt cache is rebuilt
            pass
    with torch.random.fork_rng(), torch.enable_grad():  # leave the caller's RNG stream untouched
        net = _train_digits_classifier()
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp))
    return net.eval().requires_grad_(False)


def frechet_distance(f1, f2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) of two feature sets (N1, F), (N2, F), in float64."""
    f1 = np.asarray(f1, dtype=np.float64)
    f2 = np.asarray(f2, dtype=np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)

    def sqrtm_psd(a):
        w, v = np.linalg.eigh((a + a.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r1 = sqrtm_psd(s1)
    cross = sqrtm_psd(r1 @ s2 @ r1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross))


@torch.no_grad()
def _features(net, x, batch=500):
    return torch.cat([net.features(x[i:i + batch].float()) for i in range(0, len(x), batch)]).numpy()


@torch.no_grad()
def digits_eval(samples, labels=None, classifier=None):
    """Accuracy (if labels) and FD vs the held-out digits of model-scale samples (N, 1, 8, 8); + the floor.

    The floor uses the first N training digits (N = number of samples, at most the training split) so that both
    distances carry the same finite-sample bias.
    """
    from .data import load_digits_arrays

    net = classifier or digits_classifier()
    x = samples.detach().float().cpu()
    test_x, _ = load_digits_arrays("test")
    train_x, _ = load_digits_arrays("train")
    test_x = (torch.from_numpy(test_x) - 8.0) / 12.0
    train_x = (torch.from_numpy(train_x[: len(x)]) - 8.0) / 12.0
    ft = _features(net, test_x)
    out = {"fd": frechet_distance(_features(net, x), ft),
           "fd_floor": frechet_distance(_features(net, train_x), ft)}
    if labels is not None:
        pred = torch.cat([net(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
        out["accuracy"] = float((pred == labels.cpu()).float().mean())
    return out


@torch.no_grad()
def digits_report(model, steps=(1, 2, 4, 8), cfg_scale=2.0, num_samples=1000, seed=0, sampler="pushforward"):
    """A table {steps: {accuracy, fd (guided), fd_noguide, fd_floor}} for a class-conditional digits IMM model."""
    from .sampling import sample

    net = digits_classifier()
    model = model.eval()
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % 10
    noise = torch.randn((num_samples, 1, 8, 8), generator=g) * model.sigma_data
    table = {}
    for n in steps:
        row = {}
        guided = sample(model, noise.to(dev), n, sampler, class_labels=labels.to(dev), cfg_scale=cfg_scale)
        r = digits_eval(guided.float(), labels, net)
        row["accuracy"], row["fd"], row["fd_floor"] = r["accuracy"], r["fd"], r["fd_floor"]
        plain = sample(model, noise.to(dev), n, sampler, class_labels=labels.to(dev), cfg_scale=None)
        r2 = digits_eval(plain.float(), labels, net)
        row["accuracy_noguide"], row["fd_noguide"] = r2["accuracy"], r2["fd"]
        table[n] = row
    return table


def format_digits_table(table, cfg_scale) -> str:
    head = (f"| steps | accuracy (w={cfg_scale}) | FD (w={cfg_scale}) | accuracy (no guidance) | FD (no guidance) | "
            "FD real-vs-real |\n|---|---|---|---|---|---|")
    rows = [f"| {n} | {r['accuracy'] * 100:.1f}% | {r['fd']:.3f} | {r['accuracy_noguide'] * 100:.1f}% | "
            f"{r['fd_noguide']:.3f} | {r['fd_floor']:.3f} |" for n, r in table.items()]
    return "\n".join([head] + rows)


# ----------------------------------------------------------------------------------------------------------------
# FID through torch-fidelity
# ----------------------------------------------------------------------------------------------------------------
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def fid_available():
    """(True, "") when torch-fidelity and its Inception weights are on this machine, else (False, why)."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return False, "FID skipped: torch-fidelity is not installed (pip install torch-fidelity)"
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not hub.is_file():
        return False, (f"FID skipped: the Inception weights are not on disk ({hub}); torch-fidelity would download "
                       "them — fetch them once on a machine with network access and copy them there")
    return True, ""


class _UInt8Images(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x  # (N, 3, R, R) uint8

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def fid(samples_uint8, reference_uint8):
    """FID between two uint8 image sets (N, 3, R, R) with torch-fidelity, or (None, message) when unavailable."""
    ok, msg = fid_available()
    if not ok:
        return None, msg
    import torch_fidelity

    def rgb(x):
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]

    m = torch_fidelity.calculate_metrics(input1=_UInt8Images(rgb(samples_uint8)),
                                         input2=_UInt8Images(rgb(reference_uint8)), fid=True, verbose=False,
                                         cuda=torch.cuda.is_available())
    return float(m["frechet_inception_distance"]), ""
