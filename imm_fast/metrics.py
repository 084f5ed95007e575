"""Sample-quality metrics.

Digits: a small CNN trained once on the digits training split (cached under $IMM_FAST_CACHE or ~/.cache/imm_fast)
gives (1) the class accuracy of class-conditional samples and (2) the Frechet distance (FD) of its penultimate
features between samples and the held-out real digits, printed beside the real-vs-real floor (the FD between as
many real training digits and the same held-out digits).
Images: METRICS, one table that evaluate()'s record, its printed table and training-time evaluation all read.
Each Metric names the feature-network outputs it reads (imm_fast.features: "inception", "inception_logits",
"dinov2"), what it needs of the reference (statistics or features of one output) and its columns:

  fid        Frechet distance of Inception pool features (FID; float64, scipy sqrtm as the reference code)
  is         Inception Score (10 splits of the unbiased logits)
  pr         precision and recall (Kynkaenniemi et al. 2019, k = 3, on Inception pool features)
  fd_dinov2  Frechet distance of DINOv2 ViT-L/14 CLS features (FD_DINOv2, as EDM2 and dgm-eval)

Shapes: N samples, F feature width, (C, R, R) images.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import DIGITS_CLASSES, DIGITS_SHAPE, digits_to_model, load_digits_arrays
from .features import find_inception, load_feature_net

CLASSIFIER_VERSION = 1  # bump when the classifier or its training changes (invalidates the cache)


def cache_dir() -> Path:
    return Path(os.environ.get("IMM_FAST_CACHE") or Path.home() / ".cache" / "imm_fast")


class DigitsClassifier(nn.Module):
    """8x8x1 digits (model scale, std ~0.5) -> 10 logits; `features` is the 64-wide penultimate layer."""

    def __init__(self):
        super().__init__()
        c, r, _ = DIGITS_SHAPE
        self.conv1 = nn.Conv2d(c, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * (r // 2) ** 2, 64)
        self.fc2 = nn.Linear(64, DIGITS_CLASSES)

    def features(self, x):
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (N, 32, 4, 4)
        return F.relu(self.fc1(h.flatten(1)))      # (N, 64)

    def forward(self, x):
        return self.fc2(self.features(x))


def _train_digits_classifier(seed=0, epochs=30):
    x, y = load_digits_arrays("train")
    x = digits_to_model(torch.from_numpy(x))
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
    for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.isfinite(a).all():  # sqrtm of a matrix with NaN/inf runs for many minutes, then gives NaN
            raise ValueError(f"frechet_distance: {name} holds {int((~np.isfinite(a)).sum())} NaN/inf values "
                             f"(of {a.size}); the statistics are broken")
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
    net = classifier or digits_classifier()
    x = samples.detach().float().cpu()
    test_x, _ = load_digits_arrays("test")
    train_x, _ = load_digits_arrays("train")
    test_x = digits_to_model(torch.from_numpy(test_x))
    train_x = digits_to_model(torch.from_numpy(train_x[: len(x)]))
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
    labels = torch.arange(num_samples) % DIGITS_CLASSES
    noise = torch.randn((num_samples,) + DIGITS_SHAPE, generator=g) * model.sigma_data
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
# FID of two in-memory image sets (a quick check; imm_fast.evaluation has the full pipeline)
# ----------------------------------------------------------------------------------------------------------------
def fid_available(inception=None):
    """(True, "") when the FID Inception weights are on this machine, else (False, why and how to get them)."""
    try:
        find_inception(inception)
    except FileNotFoundError as e:
        return False, f"FID skipped: {e}"
    return True, ""


def fid(samples_uint8, reference_uint8, inception=None):
    """(FID, "") between two uint8 image sets (N, C, R, R), C in {1, 3}, or (None, message) without weights."""
    ok, msg = fid_available(inception)
    if not ok:
        return None, msg
    net = load_feature_net("inception", inception, "cuda" if torch.cuda.is_available() else "cpu")
    f1, f2 = net(samples_uint8)["inception"], net(reference_uint8)["inception"]
    return frechet_distance_features(f1.numpy(), f2.numpy()), ""


# ----------------------------------------------------------------------------------------------------------------
# Reference statistics: checked when loaded, before anything is sampled
# ----------------------------------------------------------------------------------------------------------------
def check_statistics(mu, sigma, width, source="the reference statistics"):
    """Raise ValueError unless mu (width,) and sigma (width, width) are finite, sigma symmetric and positive
    semi-definite (eigenvalues > -1e-6 of the largest entry: round-off of a rank-deficient covariance passes)."""
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if mu.shape != (width,) or sigma.shape != (width, width):
        raise ValueError(f"{source}: mu {mu.shape} and sigma {sigma.shape} do not fit the feature network's width "
                         f"{width} (mu ({width},), sigma ({width}, {width})); were they made with another network?")
    for name, a in (("mu", mu), ("sigma", sigma)):
        bad = int((~np.isfinite(a)).sum())
        if bad:
            raise ValueError(f"{source}: {name} holds {bad} NaN/inf values; the statistics are broken")
    scale = max(float(np.abs(sigma).max()), np.finfo(np.float64).tiny)
    asym = float(np.abs(sigma - sigma.T).max())
    if asym > 1e-5 * scale:
        raise ValueError(f"{source}: sigma is not symmetric (max |sigma - sigma^T| = {asym:.3g}, largest entry "
                         f"{scale:.3g}); not a covariance")
    sym = (sigma + sigma.T) / 2
    try:  # PSD up to tol <=> sym + tol I is positive definite: a Cholesky, 10-30x cheaper than the eigenvalues
        np.linalg.cholesky(sym + 1e-6 * scale * np.eye(width))
    except np.linalg.LinAlgError:
        eig = np.linalg.eigvalsh(sym)
        raise ValueError(f"{source}: sigma is not positive semi-definite (smallest eigenvalue {eig[0]:.3g}, largest "
                         f"{eig[-1]:.3g}); not a covariance")


# ----------------------------------------------------------------------------------------------------------------
# Precision and recall (Kynkaanniemi et al. 2019)
# ----------------------------------------------------------------------------------------------------------------
def _sq_dists(a, b):
    """Squared Euclidean distances (n, m) in float64, clamped at 0 (the expansion can round below it)."""
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * (a @ b.T)).clamp_min_(0)


def _knn_radii2(x, k, chunk):
    """Squared distance of each row to its k-th nearest other row (the row itself, at 0, is the first)."""
    return torch.cat([_sq_dists(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), chunk)])


def _covered(query, support, radii2, chunk):
    """For each query row: within the k-NN ball of some support row (distance <= that row's radius)."""
    return torch.cat([(_sq_dists(query[i:i + chunk], support) <= radii2[None]).any(1)
                      for i in range(0, len(query), chunk)])


def precision_recall(real, fake, k=3, chunk=1024, device="cpu"):
    """(precision, recall) of feature sets real (N, F) and fake (M, F): precision is the fraction of fake samples
    inside the real manifold (the union of balls around each real sample reaching its k-th nearest real
    neighbour), recall the fraction of real samples inside the fake manifold. Float64 throughout; both sets are
    centred on the real mean first, which leaves distances unchanged and keeps the |a|^2 + |b|^2 - 2 a.b expansion
    from cancelling digits."""
    real = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=device)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=device)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall needs features (N, F) and (M, F), got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"k={k!r} must be an int with 1 <= k < the number of samples in each set "
                         f"({len(real)}, {len(fake)})")
    for name, a in (("real", real), ("fake", fake)):
        if not torch.isfinite(a).all():
            raise ValueError(f"precision_recall: the {name} features hold NaN/inf values")
    center = real.mean(0)
    real, fake = real - center, fake - center
    precision = _covered(fake, real, _knn_radii2(real, k, chunk), chunk).double().mean().item()
    recall = _covered(real, fake, _knn_radii2(fake, k, chunk), chunk).double().mean().item()
    return precision, recall


# ----------------------------------------------------------------------------------------------------------------
# The metric table
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    key: str                            # the key in a result row (eval-<time>.json)
    header: str                         # the printed table's heading
    show: Callable[[dict], str]         # row -> the cell text
    train: Optional[str] = None         # training-time name (<train>_<n>step in metrics.jsonl); None: not logged


@dataclass(frozen=True)
class Metric:
    """One row of METRICS: compute(outputs, reference, options) -> {column key: value}.

    reads: the feature outputs of the samples it needs ({output: (N, width) float64 numpy}).
    reference: (output, "stats" | "features") it needs from the reference, or None.
    """
    name: str
    reads: tuple
    reference: Optional[tuple]
    compute: Callable
    columns: tuple
    doc: str = ""


def _fid(outs, ref, opts):
    mu, sigma = feature_statistics(outs["inception"])
    return {"fid": frechet_distance(mu, sigma, *ref.stats["inception"])}


def _is(outs, ref, opts):
    mean, std = inception_score(outs["inception_logits"], min(opts.get("is_splits", 10), len(outs["inception_logits"])))
    return {"is_mean": mean, "is_std": std}


def _pr(outs, ref, opts):
    p, r = precision_recall(ref.features["inception"], outs["inception"], k=opts.get("pr_k", 3),
                            device=opts.get("device", "cpu"))  # 50K x 50K float64 distances: the GPU when there
    return {"precision": p, "recall": r}


def _fd_dinov2(outs, ref, opts):
    mu, sigma = feature_statistics(outs["dinov2"])
    return {"fd_dinov2": frechet_distance(mu, sigma, *ref.stats["dinov2"])}


def _num(key, fmt):
    return lambda row: "-" if row.get(key) is None else format(row[key], fmt)


METRICS = {m.name: m for m in (
    Metric("fid", ("inception",), ("inception", "stats"), _fid,
           (Column("fid", "FID", _num("fid", ".3f"), "fid"),), "Frechet Inception distance"),
    Metric("is", ("inception_logits",), None, _is,
           (Column("is_mean", "IS", lambda r: f"{r['is_mean']:.2f} ± {r['is_std']:.2f}", "is"),), "Inception Score"),
    Metric("pr", ("inception",), ("inception", "features"), _pr,
           (Column("precision", "precision", _num("precision", ".4f"), "precision"),
            Column("recall", "recall", _num("recall", ".4f"), "recall")), "precision / recall, k = 3"),
    Metric("fd_dinov2", ("dinov2",), ("dinov2", "stats"), _fd_dinov2,
           (Column("fd_dinov2", "FD_DINOv2", _num("fd_dinov2", ".3f"), "fd_dinov2"),), "Frechet DINOv2 distance"),
)}
DEFAULT_METRICS = ("fid", "is")


def check_metrics(names) -> tuple:
    """The metric names as a tuple, each one of METRICS (ValueError otherwise)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise ValueError(f"metrics={list(names)!r}: each must be one of {tuple(METRICS)}")
    return names


def compute_metrics(names, outs, ref, opts=None) -> dict:
    """{column key: value} of every metric in `names` on the samples' feature outputs `outs`."""
    row = {}
    for name in names:
        row.update(METRICS[name].compute(outs, ref, opts or {}))
    return row


def metric_columns(names) -> list:
    return [c for n in names for c in METRICS[n].columns]
