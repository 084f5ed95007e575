"""Sample-quality metrics.

Digits: a small CNN trained once on the digits training split (cached under $IMM_FAST_CACHE or ~/.cache/imm_fast)
gives (1) the class accuracy of class-conditional samples and (2) the Frechet distance (FD) of its penultimate
features between samples and the held-out real digits, printed beside the real-vs-real floor (the FD between as
many real training digits and the same held-out digits).
Images: `frechet_distance(mu1, sigma1, mu2, sigma2)` (FID, float64, the reference sqrtm handling) and
`inception_score(logits)` on the FID Inception-V3 of imm_fast.inception; imm_fast.evaluation runs the pipeline.

Shapes: N samples, F feature width, (C, R, R) images.
"""
from __future__ import annotations

import os
import warnings
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


def feature_statistics(features):
    """(mu (F,), sigma (F, F)) of features (N, F) in float64; sigma is the unbiased covariance (as np.cov)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N, F) with N >= 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) in float64 (the FID formula).

    (S1 S2)^1/2 by scipy.linalg.sqrtm as the reference implementations do it: if it is not finite (near-singular
    covariances), eps is added to both diagonals and it is taken again; its imaginary part (round-off, the exact
    root is real) is dropped when the diagonal's is below 1e-3, else a ValueError reports it.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    n = mu1.shape[0]
    if mu1.shape != mu2.shape or s1.shape != (n, n) or s2.shape != (n, n):
        raise ValueError(f"frechet_distance needs mu (F,) and sigma (F, F) of one width F; got mu1 {mu1.shape}, "
                         f"sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}")
    with warnings.catch_warnings():  # "singular matrix" is expected (fewer samples than features) and handled here
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(n) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"frechet_distance: sqrtm(sigma1 sigma2) has an imaginary diagonal part of {imag:.3g} "
                             "(> 1e-3); the covariances are not valid (symmetric positive semi-definite)")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def frechet_distance_features(f1, f2) -> float:
    """The Frechet distance between two feature sets (N1, F), (N2, F)."""
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))


def inception_score(logits, splits=10):
    """(mean, std) over `splits` contiguous parts of exp(E_x KL(p(y|x) || p(y))), p = softmax(logits) in float64
    (the TF reference: logits (N, 1008) without the bias, 10 splits, no shuffling)."""
    lg = np.asarray(logits, dtype=np.float64)
    if lg.ndim != 2 or isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= len(lg):
        raise ValueError(f"inception_score needs logits (N, K) and 1 <= splits <= N; got shape {lg.shape}, "
                         f"splits={splits!r}")
    logp = lg - lg.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    scores = []
    for i in range(splits):
        part = logp[i * len(lg) // splits:(i + 1) * len(lg) // splits]
        log_py = np.log(np.exp(part).mean(0))
        scores.append(np.exp((np.exp(part) * (part - log_py)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


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
    out = {"fd": frechet_distance_features(_features(net, x), ft),
           "fd_floor": frechet_distance_features(_features(net, train_x), ft)}
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
# FID of two in-memory image sets (the train-time helper of training.py; imm_fast.evaluation has the full pipeline)
# ----------------------------------------------------------------------------------------------------------------
def fid_available(inception=None):
    """(True, "") when the FID Inception weights are on this machine, else (False, why and how to get them)."""
    from .inception import find_weights

    try:
        find_weights(inception)
    except FileNotFoundError as e:
        return False, f"FID skipped: {e}"
    return True, ""


def fid(samples_uint8, reference_uint8, inception=None):
    """(FID, "") between two uint8 image sets (N, C, R, R), C in {1, 3}, or (None, message) without weights."""
    ok, msg = fid_available(inception)
    if not ok:
        return None, msg
    from .inception import inception_outputs, load_inception

    net, _ = load_inception(inception, "cuda" if torch.cuda.is_available() else "cpu")
    f1, f2 = inception_outputs(net, samples_uint8)[0], inception_outputs(net, reference_uint8)[0]
    return frechet_distance_features(f1.numpy(), f2.numpy()), ""
