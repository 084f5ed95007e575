"""Evaluation as the papers report it: FID-50K, Inception Score, precision / recall and FD_DINOv2, sharded over
ranks, resumable, from one call.

    evaluate(checkpoint, ref, num=50000, steps=(1, 2, 4, 8), metrics=("fid", "is"), ...) -> dict
    python -m imm_fast eval CHECKPOINT --ref REF [--metrics fid,is,pr,fd_dinov2]

- Metrics: imm_fast.metrics.METRICS, one table; each names the feature-network outputs it reads
  (imm_fast.features: Inception-V3 with the TF-ported weights, DINOv2 ViT-L/14) and what it needs of the reference.
- Reference (mu, sigma per output, + features for precision / recall): read from .npz (imm_fast's; EDM's and
  ADM's `mu`/`sigma` = Inception statistics; ADM's `arr_0` images are the fallback), or computed from a dataset
  (CIFAR-10 python pickles = the 50K training images, an image folder, ImageNet train at 256 with the ADM center
  crop, an .npz/.npy of images) and cached under <out>/eval-cache/reference-<key>.npz, the key holding the size,
  mtime and hash of the source. Every reference is checked when loaded, before any sample is drawn: the .npz
  headers (dimension against the network, size against what the file stores), finiteness, symmetry and positive
  semi-definiteness of sigma.
- Samples: image i always comes from the generator seeded with seed + i (prior noise, then any restart noise, drawn
  by imm_fast.sampling's sampler from that generator) and has class i % label_dim, so the set does not depend on
  world size or batch size. A batch holding NaN/inf samples stops the evaluation (nothing non-finite is scored).
  Work is cut into shards of `shard_size` images; shard k belongs to rank k % world. A finished shard (feature
  outputs, labels, + images with save_npz) is written atomically under <out>/eval-cache/<settings hash>/, which one
  evaluation at a time holds (a lock), and skipped when the same evaluation runs again, so an interrupted run
  resumes. The holder removes it after a complete evaluation unless keep_cache=True.
- Output: eval-<UTC time>.json next to the checkpoint (never overwriting another: -2, -3, ... on a clash; strict
  JSON, a non-finite number written as null with its reason under "nonfinite") and a printed table; with
  save_npz, eval-<time>-<N>step.npz holding uint8 NHWC `arr_0` and labels `arr_1` (ADM's TF evaluator).
- A digits run (config.json beside the checkpoint with data.source digits) needs no reference: evaluate(ck, None)
  prints the digits table of the training run (classifier accuracy and FD vs the held-out digits) for that
  checkpoint.

`train_time_fid(ema, cfg, device, step, ds)` is the small evaluation the training loop logs (one process).

Shapes: N images, (C, R, R) model samples, (3, H, W) uint8 pixels, F feature width.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import metrics as M
from ._dist import Progress, all_reduce_sum, any_rank, barrier, broadcast_object, init_distributed, resolve_device
from ._dist import sum_over_ranks, world
from ._files import atomic_write, fsync_dir
from .data import DIGITS_SHAPE, check_npz, list_image_folder, load_array, load_cifar10, pixel_kind, to_pixels
from .errors import UserError
from .features import FEATURE_NETS, load_feature_net
from .hub import is_hub_path
from .sampling import sample

CACHE_VERSION = 2  # bump when the content of a shard changes
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)]
MAX_CONFIG_BYTES = 1 << 20


class NonFiniteSamplesError(UserError, FloatingPointError):
    """Samples holding NaN/inf: the weights or the guidance are broken; nothing was scored."""


class EvalBusyError(UserError, RuntimeError):
    """Another evaluation holds the shard cache of the same settings."""


# ----------------------------------------------------------------------------------------------------------------
# Feature outputs and the reference
# ----------------------------------------------------------------------------------------------------------------
def output_widths() -> dict:
    """{feature output: width} over every feature network."""
    return {o: w for _, _, outs in FEATURE_NETS.values() for o, w in outs.items()}


def _network_of(output) -> str:
    return next(name for name, (_, _, outs) in FEATURE_NETS.items() if output in outs)


def _stats_keys(output):
    return ("mu", "sigma") if output == "inception" else (f"{output}_mu", f"{output}_sigma")


@dataclass
class Reference:
    stats: dict = field(default_factory=dict)     # output -> (mu (F,), sigma (F, F)) float64
    features: dict = field(default_factory=dict)  # output -> (N, F) float32 (precision / recall)
    info: dict = field(default_factory=dict)

    def has(self, need):
        output, kind = need
        return output in (self.stats if kind == "stats" else self.features)


def needs_of(metrics) -> set:
    """{(output, "stats" | "features")} the metrics need of the reference."""
    return {M.METRICS[m].reference for m in metrics if M.METRICS[m].reference is not None}


def save_statistics(path, mu, sigma, **info):
    """Write Inception reference statistics as .npz: mu (F,), sigma (F, F) float64 (+ `info` as JSON)."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"statistics need mu (F,) and sigma (F, F), got {mu.shape} and {sigma.shape}")
    return save_reference(path, Reference({"inception": (mu, sigma)}, {}, info))


def save_reference(path, ref: Reference):
    arrays = {"info": np.array(json.dumps(ref.info))}
    for output, (mu, sigma) in ref.stats.items():
        k_mu, k_sigma = _stats_keys(output)
        arrays[k_mu], arrays[k_sigma] = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    for output, f in ref.features.items():
        arrays[f"{output}_features"] = np.asarray(f, np.float32)
    return _savez(path, **arrays)


def _savez(path, **arrays):
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temporary name
            np.savez(f, **arrays)

    return atomic_write(path, write)


def _check_widths(path, members, widths):
    """Refuse statistics whose declared shapes do not fit the networks, from the headers (nothing inflated)."""
    for output, w in widths.items():
        k_mu, k_sigma = _stats_keys(output)
        for key, want in ((k_mu, (w,)), (k_sigma, (w, w))):
            if key in members and members[key][0] != want:
                raise ValueError(f"ref={str(path)!r}: {key!r} is {members[key][0]} but the {_network_of(output)} "
                                 f"network's features are {w} wide ({key} must be {want}); statistics of another "
                                 "network or a broken file")
        key = f"{output}_features"
        if key in members and (len(members[key][0]) != 2 or members[key][0][1] != w):
            raise ValueError(f"ref={str(path)!r}: {key!r} is {members[key][0]}, not (N, {w})")


def read_reference(path, widths=None):
    """A Reference of what an .npz holds (statistics and features by output), or None when it holds neither.
    With widths ({output: F}), shapes are checked against them from the headers before anything is read."""
    members = check_npz(path)
    if widths:
        _check_widths(path, members, widths)
    try:
        with np.load(path, allow_pickle=False) as z:
            ref = Reference()
            for output in set(output_widths()) | set(widths or {}):
                k_mu, k_sigma = _stats_keys(output)
                if k_mu in z.files and k_sigma in z.files:
                    ref.stats[output] = (np.asarray(z[k_mu], np.float64), np.asarray(z[k_sigma], np.float64))
                if f"{output}_features" in z.files:
                    ref.features[output] = np.asarray(z[f"{output}_features"], np.float32)
            info = json.loads(str(z["info"])) if "info" in z.files else {}
            fmt = "adm" if "arr_0" in z.files else ("imm_fast" if "info" in z.files else "edm")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"ref={str(path)!r} is not a readable .npz: {type(e).__name__}: {e}") from e
    if not ref.stats and not ref.features:
        return None
    ref.info = {**info, "format": fmt}
    return ref


def load_statistics(path):
    """(mu, sigma, info) of the Inception statistics in an .npz (imm_fast's, EDM's cifar10-32x32.npz, ADM's
    reference batch), or None when the file holds none. Raises for a file that is not an .npz."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ref={str(path)!r} does not exist")
    ref = read_reference(p)
    if ref is None or "inception" not in ref.stats:
        return None
    return (*ref.stats["inception"], ref.info)


def check_reference(ref: Reference, needs, widths, source):
    """Raise ValueError unless `ref` holds every need, each statistic a valid covariance of the right width and
    every feature set finite (imm_fast.metrics.check_statistics)."""
    missing = sorted(n for n in needs if not ref.has(n))
    if missing:
        raise ValueError(f"ref={source!r} holds no {', '.join(f'{o} {k}' for o, k in missing)}, which the metrics "
                         "need: give a dataset or images (--ref DATASET) to compute them from"
                         + ("; precision/recall needs reference features, not only statistics"
                            if any(k == "features" for _, k in missing) else ""))
    for output, kind in sorted(needs):
        if kind == "stats":
            M.check_statistics(*ref.stats[output], widths[output], f"ref={source!r} ({output} statistics)")
        else:
            f = ref.features[output]
            if f.ndim != 2 or f.shape[1] != widths[output] or len(f) < 4 or not np.isfinite(f).all():
                raise ValueError(f"ref={source!r}: the {output} features {f.shape} must be (N >= 4, "
                                 f"{widths[output]}) and finite")
    return ref


def adm_center_crop(image, size):
    """ADM's center crop of a PIL image: halve with a box filter while the short side is >= 2 size, resize the short
    side to `size` (bicubic), then crop the center. -> uint8 (3, size, size)."""
    from PIL import Image

    image = image.convert("RGB")
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size].transpose(2, 0, 1))


class _ImageSource:
    """Random access to the uint8 (3 or 1, R, R) images of a dataset without holding them all in memory."""

    def __init__(self, source, resolution=None):
        p = Path(source)
        self.files, self.array = None, None
        if p.is_dir() and (p / CIFAR10_FILES[0]).is_file():
            self.array, self.kind = load_cifar10(p, "train")[0], "cifar10"
        elif p.is_dir():
            items, _ = list_image_folder(p)
            self.files, self.kind, self.resolution = [f for f, _ in items], "folder", resolution
        elif p.is_file() and p.suffix in (".npz", ".npy"):
            x, _ = load_array(p)
            if x.dtype != np.uint8:
                raise ValueError(f"ref={str(source)!r} holds {x.dtype} arrays; reference images must be uint8")
            self.array, self.kind = x, "array"
        else:
            raise ValueError(f"ref={str(source)!r} is neither statistics (.npz with mu, sigma), an image array "
                             "(.npz/.npy), a CIFAR-10 python folder nor an image folder")

    def __len__(self):
        return len(self.files) if self.files is not None else len(self.array)

    def get(self, indices):
        if self.files is None:
            return np.asarray(self.array[np.asarray(indices)])
        from PIL import Image

        imgs = []
        for i in indices:
            with Image.open(self.files[i]) as im:
                if self.resolution is not None:
                    imgs.append(adm_center_crop(im, self.resolution))
                else:
                    imgs.append(np.asarray(im.convert("RGB")).transpose(2, 0, 1))
        if len({a.shape for a in imgs}) > 1:
            raise ValueError(f"images of different sizes {sorted({a.shape for a in imgs})[:3]}: pass a resolution "
                             "(--ref-resolution) to center-crop them (ImageNet: 256)")
        return np.stack(imgs)


class _Moments:
    """Running float64 sums of features and their outer products -> (mu, sigma), mergeable across ranks."""

    def __init__(self, width):
        self.n, self.s, self.ss = 0, np.zeros(width), np.zeros((width, width))

    def add(self, f):
        f = np.asarray(f, np.float64)
        self.n, self.s, self.ss = self.n + len(f), self.s + f.sum(0), self.ss + f.T @ f

    def all_reduce(self):
        if world()[1] > 1:
            w = len(self.s)
            t = all_reduce_sum(torch.from_numpy(np.concatenate([[self.n], self.s, self.ss.ravel()]))).numpy()
            self.n, self.s, self.ss = int(round(t[0])), t[1:1 + w], t[1 + w:].reshape(w, w)

    def stats(self):
        if self.n < 2:
            raise ValueError(f"statistics need at least 2 images, got {self.n}")
        mu = self.s / self.n
        return mu, (self.ss - self.n * np.outer(mu, mu)) / (self.n - 1)


def _gather_rows(parts, n):
    """Rows r, r + world, ... of every rank back in order 0..n-1 (reference features under torchrun)."""
    rank, w = world()
    if w == 1:
        return parts
    import torch.distributed as dist

    every = [None] * w
    dist.all_gather_object(every, parts)
    out = np.empty((n, parts.shape[1]), parts.dtype)
    for r, rows in enumerate(every):
        out[r::w] = rows
    return out


def _widths(nets) -> dict:
    """{output: width} of the loaded networks (their weights decide it, e.g. a smaller DINOv2)."""
    return {o: w for net in nets for o, w in net.outputs.items()}


def _features_of(nets, source, needs, batch=100, max_images=None, progress=True, label="reference"):
    """A Reference of a dataset's feature outputs: statistics and features per need; every rank reads its share."""
    rank, w = world()
    n = len(source) if max_images is None else min(len(source), int(max_images))
    mine = np.arange(rank, n, w)
    moments = {o: _Moments(_widths(nets)[o]) for o, k in needs if k == "stats"}
    feats = {o: [] for o, k in needs if k == "features"}
    bar = Progress(progress and rank == 0, n, label=label, unit="images")
    for i in range(0, len(mine), batch):
        images = torch.from_numpy(source.get(mine[i:i + batch]))
        outs = {}
        for net in nets:
            outs.update(net(images))
        for o, acc in moments.items():
            acc.add(outs[o].numpy())
        for o in feats:
            feats[o].append(outs[o].float().numpy())
        bar.update(min(n, (i + len(images)) * w))
    bar.close()
    ref = Reference()
    for o, acc in moments.items():
        acc.all_reduce()
        ref.stats[o] = acc.stats()
    for o, parts in feats.items():
        rows = np.concatenate(parts) if parts else np.zeros((0, _widths(nets)[o]), np.float32)
        ref.features[o] = _gather_rows(rows, n)
    return ref


def source_signature(path) -> dict:
    """What a cached reference is keyed by: size, mtime and sha256 of a file; of a folder, the sha256 of its
    listing (relative name, size, mtime of every file) and, up to 1 GiB, of the files' bytes."""
    p = Path(path).resolve()
    h = hashlib.sha256()
    if p.is_file():
        st = p.stat()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
    files = sorted(f for f in p.rglob("*") if f.is_file())
    stats = [(str(f.relative_to(p)), f.stat()) for f in files]
    total = sum(st.st_size for _, st in stats)
    for name, st in stats:
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if total <= 1 << 30:
        for f in files:
            h.update(f.read_bytes())
    return {"path": str(p), "size": total, "files": len(files), "sha256": h.hexdigest(),
            "content_hashed": total <= 1 << 30}


def _load_nets(metrics, specs, device) -> list:
    """The feature networks the metrics read, loaded (a missing weights file fails here, before any work)."""
    names = sorted({_network_of(o) for m in metrics for o in M.METRICS[m].reads}
                   | {_network_of(o) for o, _ in needs_of(metrics)})
    return [load_feature_net(name, specs.get(name), device) for name in names]


def reference_statistics(source, out=None, inception=None, device=None, resolution=None, batch=100,
                         max_images=None, progress=True, metrics=M.DEFAULT_METRICS, dinov2=None) -> Reference:
    """The Reference (statistics, + features for precision / recall) of a dataset's feature outputs, optionally
    saved to `out` (.npz).

    source: a CIFAR-10 python folder (its 50K training images, as EDM's cifar10-32x32.npz), an image folder
    (recursive; `resolution` center-crops them the ADM way: ImageNet train -> resolution=256), or an .npz/.npy of
    uint8 images (N, C, R, R) / (N, R, R, C). Under torchrun every rank reads its share.
    """
    init_distributed(device)
    dev = resolve_device(device)
    metrics = M.check_metrics(metrics)
    nets = _load_nets(metrics, {"inception": inception, "dinov2": dinov2}, dev)
    src = _ImageSource(source, resolution)
    ref = _features_of(nets, src, needs_of(metrics), batch, max_images, progress, f"reference {Path(source).name}")
    n = len(src) if max_images is None else min(len(src), int(max_images))
    ref.info = {"source": str(source), "kind": src.kind, "num_images": n, "resolution": resolution,
                "networks": {net.name: net.sha256 for net in nets}, "source_signature": source_signature(source)}
    if "inception" in ref.info["networks"]:
        ref.info["inception_sha256"] = ref.info["networks"]["inception"]
    if out is not None and world()[0] == 0:
        save_reference(out, ref)
    return ref


def _has_images(path):
    return any(k in check_npz(path) for k in ("x", "images", "arr_0"))


def load_reference(ref, nets, metrics=M.DEFAULT_METRICS, resolution=None, batch=100, cache_dir=None,
                   progress=True) -> Reference:
    """The checked Reference the metrics need: read from an .npz of statistics, else computed from the dataset
    `ref` names (then cached under cache_dir as reference-<key>.npz, the key holding the source's content
    signature, the networks' sha256 and what is needed). Every check runs here, before any sample is drawn."""
    p, needs, widths = Path(ref), needs_of(metrics), _widths(nets)
    if not p.exists():
        raise FileNotFoundError(f"ref={str(ref)!r} does not exist; give statistics (.npz with mu, sigma, e.g. EDM's "
                                "cifar10-32x32.npz or ADM's VIRTUAL_imagenet256_labeled.npz) or a dataset")
    if not needs:  # e.g. the Inception Score alone: nothing to read or compute
        return Reference(info={"source": str(ref), "path": str(p), "format": "unused"})
    if p.is_file() and p.suffix == ".npz":
        got = read_reference(p, widths)
        if got is not None and all(got.has(n) for n in needs):
            got.info["path"] = str(p)
            return check_reference(got, needs, widths, str(ref))
        if not _has_images(p):
            return check_reference(got or Reference(), needs, widths, str(ref))  # raises: says what is missing
    sig = source_signature(p)
    key_fields = dict(source=sig, resolution=resolution, needs=sorted(needs), nets={n.name: n.sha256 for n in nets})
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    cached = None if cache_dir is None else Path(cache_dir) / f"reference-{key}.npz"
    if cached is not None and cached.is_file():
        got = read_reference(cached, widths)
        if got is not None and got.info.get("source_signature") == sig and all(got.has(n) for n in needs):
            got.info["path"] = str(cached)
            return check_reference(got, needs, widths, str(cached))
    src = _ImageSource(p, resolution)
    got = _features_of(nets, src, needs, batch, None, progress, f"reference {p.name}")
    got.info = {"source": str(ref), "kind": src.kind, "num_images": len(src), "resolution": resolution,
                "networks": key_fields["nets"], "source_signature": sig, "format": "dataset",
                "path": str(cached or p)}
    if cached is not None and world()[0] == 0:
        save_reference(cached, got)
    return check_reference(got, needs, widths, str(ref))


# ----------------------------------------------------------------------------------------------------------------
# Generation: sample i from seed + i, class i % label_dim
# ----------------------------------------------------------------------------------------------------------------
def labels_for(indices, label_dim):
    """The class schedule: sample i has class i % label_dim (balanced), None for unconditional models."""
    return None if not label_dim else torch.as_tensor(np.asarray(indices) % label_dim, dtype=torch.int64)


@torch.no_grad()
def generate(model, indices, steps, sampler="pushforward", grid="uniform", cfg_scale=None, seed=0, vae=None,
             device=None, kind="uint8", source="the model"):
    """uint8 pixels (n, 3|1, H, W) and labels of samples `indices`; each is a function of (seed + i) alone.

    imm_fast.sample draws everything: the prior noise of sample i and its restart noise come from its own
    generator (seed + i), passed in per sample, so an image does not depend on the batch it was made in. kind: the
    pixel decoder of the model's data (imm_fast.data.to_pixels). NonFiniteSamplesError when a sample is not finite.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    shape = (model.img_channels, model.img_resolution, model.img_resolution)
    gens = [torch.Generator().manual_seed(int(seed) + int(i)) for i in indices]
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev) * model.sigma_data
    labels = labels_for(indices, model.label_dim)
    lab = None if labels is None else labels.to(dev)
    x = sample(model, noise, steps, sampler, grid, lab, cfg_scale if model.label_dim else None, generator=gens)
    bad = int((~torch.isfinite(x.flatten(1))).any(1).sum())
    if bad:
        idx = np.asarray(indices)
        raise NonFiniteSamplesError(
            f"{bad} of the {steps}-step samples {int(idx.min())}..{int(idx.max())} of {source} hold NaN/inf; nothing "
            f"was scored (they would decode to flat images and a meaningless score); likely causes: non-finite "
            f"weights in the checkpoint, or a guidance scale the model cannot take (cfg_scale={cfg_scale})")
    return decode(model, x, vae, kind), labels


def decode(model, x, vae=None, kind="uint8"):
    """Model samples -> uint8 (N, C, H, W): latents through the VAE (on its device), else data.to_pixels."""
    if vae is not None:
        from .vae import decode_latents

        return decode_latents(vae, x)
    if model.img_channels not in (1, 3):
        raise ValueError(f"a {model.img_channels}-channel model samples latents: pass vae (--vae, a local "
                         "AutoencoderKL folder) to decode them")
    return to_pixels(x, kind)


def _shard_ranges(num, shard_size):
    return [(k, k * shard_size, min(num, (k + 1) * shard_size)) for k in range((num + shard_size - 1) // shard_size)]


def _read_shard(path, n, with_images, outputs=()):
    try:
        with np.load(path, allow_pickle=False) as z:
            if len(z["labels"]) == n and (not with_images or "images" in z.files) \
                    and all(o in z.files and len(z[o]) == n for o in outputs):
                return {k: z[k] for k in z.files}
    except Exception:  # noqa: BLE001 - an unreadable shard is made again
        pass
    return None


def _make_shard(model, lo, hi, job, nets, save_images):
    """The arrays of shard [lo, hi): feature outputs, labels, + images; and (seconds generating, in networks)."""
    outs, labels, images = {}, [], []
    t_gen = t_feat = 0.0
    for i in range(lo, hi, job["batch"]):
        idx = np.arange(i, min(hi, i + job["batch"]))
        t0 = time.perf_counter()
        px, lab = generate(model, idx, **{k: v for k, v in job.items() if k != "batch"})
        t1 = time.perf_counter()
        for net in nets or ():
            for o, v in net(px).items():
                outs.setdefault(o, []).append(v.float().numpy())
        t_gen, t_feat = t_gen + t1 - t0, t_feat + time.perf_counter() - t1
        labels.append(np.full(len(idx), -1) if lab is None else lab.numpy())
        if save_images:
            images.append(px.permute(0, 2, 3, 1).numpy())  # NHWC, as ADM's evaluator reads it
    arrays = {o: np.concatenate(v) for o, v in outs.items()}
    arrays["labels"] = np.concatenate(labels).astype(np.int64)
    if save_images:
        arrays["images"] = np.concatenate(images)
    return arrays, t_gen, t_feat


def run_shards(model, cache, num, steps, sampler, grid, cfg_scale, seed, nets, vae=None, batch=64, shard_size=1000,
               save_images=False, progress=True, device=None, kind="uint8", source="the model"):
    """Generate and featurize this rank's shards of `num` samples into `cache` (skipping finished ones).
    nets: the feature networks (imm_fast.features), None keeps only images and labels. -> (seconds generating,
    seconds in the networks, images made now) on this rank. Non-finite samples on any rank stop every rank with
    NonFiniteSamplesError (after the shards finished so far are saved)."""
    rank, w = world()
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    outputs = [o for net in nets or () for o in net.outputs]
    job = dict(steps=steps, sampler=sampler, grid=grid, cfg_scale=cfg_scale, seed=seed, vae=vae, device=device,
               kind=kind, source=source, batch=batch)
    bar = Progress(progress and rank == 0, num, label=f"{steps}-step samples", unit="images")
    t_gen = t_feat = 0.0
    made = done = 0
    error = None
    for k, lo, hi in _shard_ranges(num, shard_size):
        if k % w != rank or error is not None:
            continue
        path = cache / f"shard-{k:06d}.npz"
        if path.is_file() and _read_shard(path, hi - lo, save_images, outputs) is not None:
            done += hi - lo
            bar.update(min(num, done * w), resumed=True)
            continue
        try:
            arrays, tg, tf = _make_shard(model, lo, hi, job, nets, save_images)
        except NonFiniteSamplesError as e:
            error = e
            continue
        _savez(path, **arrays)
        t_gen, t_feat, made, done = t_gen + tg, t_feat + tf, made + hi - lo, done + hi - lo
        bar.update(min(num, done * w))
    bar.close()
    if any_rank(error is not None):  # every rank reaches this point: all stop together, none waits forever
        raise error or NonFiniteSamplesError(f"another rank found non-finite {steps}-step samples of {source}; "
                                             "nothing was scored")
    return t_gen, t_feat, made


def _gather_shards(cache, num, shard_size, outputs=("inception", "inception_logits")) -> dict:
    """{output: (num, width) float32} of every shard in `cache`."""
    got = {o: [] for o in outputs}
    for k, lo, hi in _shard_ranges(num, shard_size):
        z = _read_shard(Path(cache) / f"shard-{k:06d}.npz", hi - lo, False, outputs)
        if z is None:
            raise RuntimeError(f"shard {k} of {cache} is missing or incomplete after all ranks finished; run the "
                               "same command again to resume")
        for o in outputs:
            got[o].append(z[o])
    return {o: np.concatenate(v) for o, v in got.items()}


def write_adm_npz(path, cache, num, shard_size):
    """Stream the shards' images into an .npz with uint8 NHWC `arr_0` and int64 labels `arr_1` (ADM's sample
    batch layout), without holding all images in memory, under a name no other file has (-2, -3, ...)."""
    first = _read_shard(cache / "shard-000000.npz", min(num, shard_size), True)
    if first is None:
        raise RuntimeError(f"{cache} holds no images (save_npz was off when its shards were made)")
    hwc = first["images"].shape[1:]

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": (num,) + hwc})
                labels = []
                for k, lo, hi in _shard_ranges(num, shard_size):
                    z = _read_shard(cache / f"shard-{k:06d}.npz", hi - lo, True)
                    f.write(np.ascontiguousarray(z["images"], dtype=np.uint8).tobytes())
                    labels.append(z["labels"])
            buf = io.BytesIO()
            np.save(buf, np.concatenate(labels))
            zf.writestr("arr_1.npy", buf.getvalue())

    return publish_new(path, write)


def publish_new(path, write_fn) -> Path:
    """write_fn(tmp) beside `path`, then give it the first free name of path, <stem>-2<suffix>, ...: a complete
    file appears under a name no other file had (a hard link never replaces), so two evaluations finishing in the
    same second keep both results."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        atomic_write(tmp, write_fn)  # complete and fsynced, with open()'s mode
        for i in range(1, 10000):
            cand = path if i == 1 else path.with_name(f"{path.stem}-{i}{path.suffix}")
            try:
                os.link(tmp, cand)
            except FileExistsError:
                continue
            except OSError:  # a filesystem without hard links: reserve the name, then replace our own empty file
                try:
                    os.close(os.open(cand, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                except FileExistsError:
                    continue
                os.replace(tmp, cand)
            fsync_dir(path.parent)
            return cand
        raise FileExistsError(f"no free name for {str(path)!r} (up to -9999 exist)")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class _CacheLock:
    """One evaluation per shard cache: an exclusive flock on <cache>/lock (the OS drops it when its holder dies,
    so a killed evaluation's cache is resumed by the next one). A live holder makes a second one fail at once."""

    def __init__(self, folder):
        self.folder, self.fd = Path(folder), None

    def __enter__(self):
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise EvalBusyError(f"another evaluation (pid {holder}) is computing the same samples in "
                                f"{str(self.folder)!r}; wait for it to finish (this one then resumes from its "
                                "shards), or pass another out_dir (--out-dir)") from None
        except OSError:
            pass  # no locks on this filesystem: nothing to hold
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def remove(self):
        """Delete the cache folder while holding its lock (no other evaluation can be using it)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def __exit__(self, *exc):
        os.close(self.fd)


# ----------------------------------------------------------------------------------------------------------------
# evaluate()
# ----------------------------------------------------------------------------------------------------------------
def checkpoint_file(path, trust_unverified=False):
    """The weights file load_official reads for `path` (imm_fast.checkpoints.resolve_weights, the resolver:
    hf:// addresses, run folders with or without `latest`, checkpoint folders, files)."""
    from .checkpoints import resolve_weights

    return resolve_weights(path, trust_unverified)



def checkpoint_config(ck_file):
    """The training config saved beside a checkpoint file (its checkpoint folder's config.json), or None."""
    p = Path(ck_file).parent / "config.json"
    try:
        if p.is_file() and not p.is_symlink() and p.stat().st_size <= MAX_CONFIG_BYTES:
            cfg = json.loads(p.read_text())
            return cfg if isinstance(cfg, dict) else None
    except (OSError, ValueError):
        pass
    return None


def pixel_kind_of(checkpoint) -> str:
    """The pixel decoder of a checkpoint's data ("digits" for a digits run, else "uint8"): from the config saved
    beside it; a checkpoint without one (the authors' pickles, a bare file) holds images in [-1, 1]."""
    try:
        cfg = checkpoint_config(checkpoint_file(checkpoint))
    except (OSError, ValueError):
        cfg = None
    return pixel_kind(((cfg or {}).get("data") or {}).get("source"))


def _check_args(num, steps, batch, shard_size, seed, sampler, cfg_scale, is_splits):
    for name, v in (("num", num), ("batch", batch), ("shard_size", shard_size), ("is_splits", is_splits)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if num < 2:
        raise ValueError(f"num must be >= 2 (a covariance needs two samples), got {num}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
        raise ValueError(f"steps must be positive ints, e.g. 1,2,4,8; got {steps!r}")
    if sampler not in ("pushforward", "restart"):
        raise ValueError(f"sampler={sampler!r} is not one of ('pushforward', 'restart')")
    if cfg_scale is not None and (isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float))
                                  or not math.isfinite(cfg_scale) or cfg_scale < 0):
        raise ValueError(f"cfg_scale={cfg_scale!r}: the guidance weight must be a finite number >= 0 (None: off)")


def format_table(result) -> str:
    """The printed table: one column per metric column of METRICS (result["settings"]["metrics"])."""
    ref, st = result["reference"], result["settings"]
    cols = M.metric_columns(st.get("metrics", M.DEFAULT_METRICS))
    lines = [f"{result['checkpoint']}  vs  {ref.get('path', ref.get('source'))}  ({st['num']} images, "
             f"cfg {st['cfg_scale']}, {st['sampler']})",
             "| steps | NFE | " + " | ".join(c.header for c in cols) + " | images/s |",
             "|---" * (len(cols) + 3) + "|"]
    for n, r in result["results"].items():
        lines.append(f"| {n} | {r['nfe']} | " + " | ".join(c.show(r) for c in cols)
                     + f" | {r['images_per_s']:.1f} |")
    return "\n".join(lines)


def strict_json(obj, where="", reasons=None):
    """(a copy json.dumps(allow_nan=False) accepts, {dotted key: reason}): a non-finite float becomes null and
    its place and value are recorded, so the file stays strict JSON and says what happened."""
    reasons = {} if reasons is None else reasons
    if isinstance(obj, dict):
        where = f"{where}." if where else ""
        return {str(k): strict_json(v, f"{where}{k}", reasons)[0] for k, v in obj.items()}, reasons
    if isinstance(obj, (list, tuple)):
        return [strict_json(v, f"{where}.{i}", reasons)[0] for i, v in enumerate(obj)], reasons
    if isinstance(obj, float) and not math.isfinite(obj):
        reasons[where] = f"{obj} (not finite; written as null)"
        return None, reasons
    return obj, reasons


def _write_record(out, stamp, result):
    clean, reasons = strict_json(result)
    if reasons:
        clean["nonfinite"] = reasons
    text = json.dumps(clean, indent=1, allow_nan=False)
    return publish_new(out / f"eval-{stamp}.json", lambda tmp: Path(tmp).write_text(text))


def _ref_required(checkpoint) -> ValueError:
    return ValueError(f"ref is required for {str(checkpoint)!r} (--ref): statistics (.npz with mu, sigma, e.g. "
                      "EDM's cifar10-32x32.npz or ADM's VIRTUAL_imagenet256_labeled.npz) or a dataset to compute "
                      "them from (a CIFAR-10 python folder, an image folder, an .npz/.npy of uint8 images); only "
                      "a digits run (config.json beside the checkpoint) is evaluated without one")


def evaluate(checkpoint, ref=None, num=None, steps=None, cfg_scale=None, sampler=None, grid="uniform", batch=64,
             seed=None, inception=None, vae=None, device=None, save_npz=False, shard_size=1000, is_splits=10,
             out_dir=None, ref_resolution=None, keep_cache=False, progress=True, verbose=True,
             metrics=M.DEFAULT_METRICS, dinov2=None, trust_unverified=False):
    """The metrics of a checkpoint's samples against a reference, per step count; see the module docstring.

    checkpoint: a run folder, a checkpoint folder, an imm_fast .safetensors or an authors' .pkl (load_official).
    ref: statistics .npz (imm_fast / EDM / ADM reference batch) or a dataset (see reference_statistics); None for
    a digits run (its digits table). num: images per step count (default 50000; digits: the run's eval_samples).
    steps (default 1, 2, 4, 8; digits: the run's eval_steps), seed (0; digits: the run's), sampler
    ("pushforward"; digits: the run's). grid: "uniform", "edm" or a list of middle eta values (then steps is
    len(list) + 1). metrics: names in imm_fast.metrics.METRICS. inception / dinov2: the weights files, "download",
    or None (the environment variable, then the torch hub cache). vae: a local AutoencoderKL folder for latent
    models. save_npz: also write ADM's sample-batch .npz per step count. trust_unverified: accept a training
    checkpoint without its manifest. Returns the dict written to <out_dir>/eval-<time>.json (default: beside the
    checkpoint; the current folder for hf://, never the Hub cache) on every rank; rank 0 writes it and prints the table.
    """
    t_start = time.perf_counter()
    metrics = M.check_metrics(metrics)
    ck_file = checkpoint_file(checkpoint, trust_unverified)  # resolved once: the record names what is loaded
    run_cfg = checkpoint_config(ck_file)
    kind = pixel_kind(((run_cfg or {}).get("data") or {}).get("source"))
    if ref is None:
        if kind == "digits":
            return evaluate_digits(checkpoint, run_cfg, num, steps, cfg_scale, sampler, seed, out_dir, device, verbose,
                                   ck_file=ck_file)
        raise _ref_required(checkpoint)
    if not isinstance(grid, str):
        grid = [float(v) for v in grid]
        steps = (len(grid) + 1,)
    num, seed, sampler = 50000 if num is None else num, 0 if seed is None else seed, sampler or "pushforward"
    steps = tuple(int(s) if isinstance(s, (int, np.integer)) and not isinstance(s, bool) else s
                  for s in (steps or (1, 2, 4, 8)))
    _check_args(num, steps, batch, shard_size, seed, sampler, cfg_scale, is_splits)
    init_distributed(device)
    dev = resolve_device(device)
    out = Path(out_dir) if out_dir is not None else Path.cwd() if is_hub_path(checkpoint) else ck_file.parent
    nets = _load_nets(metrics, {"inception": inception, "dinov2": dinov2}, dev)  # a missing file fails first
    reference = load_reference(ref, nets, metrics, ref_resolution, batch, out / "eval-cache",
                               progress and world()[0] == 0)
    _warn_other_weights(reference, nets, world()[0])
    model, vae_model = _load_model(ck_file, vae, dev)
    settings = dict(num=num, steps=list(steps), cfg_scale=cfg_scale if model.label_dim else None, sampler=sampler,
                    grid=grid, seed=seed, batch=batch, shard_size=shard_size, is_splits=is_splits,
                    vae=None if vae is None else str(vae), save_npz=bool(save_npz), world_size=world()[1],
                    device=str(dev), ref=str(ref), ref_resolution=ref_resolution, metrics=list(metrics),
                    pixels=kind)
    job = dict(model=model, nets=nets, vae=vae_model, dev=dev, settings=settings, reference=reference, out=out,
               progress=progress, source=str(checkpoint), ck_file=ck_file, keep_cache=keep_cache,
               stamp=datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S"))
    result = _run(job)
    result["seconds"] = time.perf_counter() - t_start
    if world()[0] == 0:
        result["json"] = str(_write_record(out, job["stamp"], result))
        if verbose:
            print(format_table(result))
            print(f"written: {result['json']}")
    barrier()
    return result


def _run(job):
    """Every step count's shards and metrics under the lock of their cache -> the result record (no file yet)."""
    from ._files import file_sha256

    st, nets = job["settings"], job["nets"]
    ck_sha = file_sha256(job["ck_file"])
    # Everything that decides the shards' content (not batch or world size): their cache key.
    key_fields = dict(version=CACHE_VERSION, checkpoint=ck_sha, nets={n.name: n.sha256 for n in nets}, num=st["num"],
                      cfg=st["cfg_scale"], sampler=st["sampler"], grid=st["grid"], seed=st["seed"],
                      shard=st["shard_size"], vae=st["vae"], images=st["save_npz"], pixels=st["pixels"])
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    with _hold_cache(job["out"] / "eval-cache" / key, world()[0]) as lock:
        results = {str(n): _score_steps(job, lock.folder / f"{n}step", n) for n in st["steps"]}
        if lock.fd is not None and not job["keep_cache"]:
            lock.remove()
    result = dict(checkpoint=job["source"], checkpoint_file=str(job["ck_file"]), checkpoint_sha256=ck_sha,
                  networks={n.name: {"weights": str(n.weights), "sha256": n.sha256} for n in nets},
                  reference=job["reference"].info, settings=st, results=results, time_utc=job["stamp"],
                  torch=torch.__version__, device_name=_device_name(job["dev"]))
    if "inception" in result["networks"]:
        result["inception"] = result["networks"]["inception"]["weights"]
        result["inception_sha256"] = result["networks"]["inception"]["sha256"]
    return result


class _NoLock:
    def __init__(self, folder):
        self.folder, self.fd = Path(folder), None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _hold_cache(folder, rank):
    """Rank 0 locks the shard cache (the other ranks learn whether it could, so none waits on a failed one)."""
    lock, error = (_CacheLock(folder), None) if rank == 0 else (_NoLock(folder), None)
    if rank == 0:
        try:
            lock.__enter__()
        except EvalBusyError as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise EvalBusyError(error)
    return _Entered(lock)


class _Entered:
    """A lock already entered, as a context manager that releases it."""

    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        return self.lock

    def __exit__(self, *exc):
        if isinstance(self.lock, _CacheLock):
            self.lock.__exit__(*exc)
        return False


def _load_model(checkpoint, vae, dev):
    from .checkpoints import load_official

    model = load_official(checkpoint, device=dev)
    if model.img_channels not in (1, 3) and vae is None:
        raise ValueError(f"{str(checkpoint)!r} is a latent model ({model.img_channels} channels): pass vae (--vae, a "
                         "local AutoencoderKL folder such as sd-vae-ft-ema) to decode its samples")
    if vae is None:
        return model, None
    from .vae import load_vae

    return model, load_vae(vae, dev)


def _warn_other_weights(reference, nets, rank):
    made_with = reference.info.get("networks") or {}
    if "inception" not in made_with and reference.info.get("inception_sha256"):
        made_with = {"inception": reference.info["inception_sha256"]}
    for net in nets:
        theirs = made_with.get(net.name)
        if theirs is not None and theirs != net.sha256 and rank == 0:
            import warnings

            warnings.warn(f"the reference {reference.info.get('path')} was computed with other {net.name} weights "
                          f"(sha256 {theirs[:12]}..., now {net.sha256[:12]}...): the distances compare different "
                          "features")


def _score_steps(job, cache, n):
    """One step count: this rank's shards, then (rank 0) the metrics of all of them. -> the row (every rank)."""
    st, rank = job["settings"], world()[0]
    t0 = time.perf_counter()
    t_gen, t_feat, made = run_shards(job["model"], cache, st["num"], n, st["sampler"], st["grid"], st["cfg_scale"],
                                     st["seed"], job["nets"], job["vae"], st["batch"], st["shard_size"],
                                     st["save_npz"], job["progress"], job["dev"], st["pixels"], job["source"])
    made = sum_over_ranks(made)  # also the barrier: every rank has written its shards
    wall = time.perf_counter() - t0
    row = None
    if rank == 0:
        outputs = sorted({o for m in st["metrics"] for o in M.METRICS[m].reads})
        outs = _gather_shards(cache, st["num"], st["shard_size"], outputs)
        row = M.compute_metrics(st["metrics"], outs, job["reference"], {"is_splits": st["is_splits"],
                                                                        "device": job["dev"]})
        row.update(nfe=n * (2 if st["cfg_scale"] is not None else 1), images=st["num"], made_now=made, seconds=wall,
                   generate_s_rank0=t_gen, features_s_rank0=t_feat, images_per_s=made / wall if made else 0.0)
        if st["save_npz"]:
            row["npz"] = str(write_adm_npz(job["out"] / f"eval-{job['stamp']}-{n}step.npz", cache, st["num"],
                                           st["shard_size"]))
    return broadcast_object(row)


def _device_name(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------------------------
# Digits: the training run's own table, for any checkpoint
# ----------------------------------------------------------------------------------------------------------------
def evaluate_digits(checkpoint, run_cfg, num=None, steps=None, cfg_scale=None, sampler=None, seed=None,
                    out_dir=None, device=None, verbose=True, ck_file=None) -> dict:
    """The digits table of a digits run's checkpoint (classifier accuracy and FD against the held-out digits,
    guided and not, beside the real-vs-real floor): what training prints at its end, with the run's settings
    (eval_samples, eval_steps, sample.cfg_scale, seed, sampler) unless given. Written as eval-<time>.json."""
    from ._files import file_sha256
    from .checkpoints import load_official

    sample_cfg = run_cfg.get("sample") or {}
    num = run_cfg.get("eval_samples", 1000) if num is None else num
    steps = tuple(steps or run_cfg.get("eval_steps") or (1, 2, 4, 8))
    w = sample_cfg.get("cfg_scale") if cfg_scale is None else cfg_scale
    seed = run_cfg.get("seed", 0) if seed is None else seed
    sampler = sampler or sample_cfg.get("sampler") or "pushforward"
    _check_args(num, steps, 1, 1, seed, sampler, w, 1)
    ck_file = checkpoint_file(checkpoint) if ck_file is None else ck_file  # what is loaded is what is recorded
    model = load_official(ck_file, device=resolve_device(device))
    if model.label_dim != 10 or (model.img_channels, model.img_resolution, model.img_resolution) != DIGITS_SHAPE:
        raise ValueError(f"{str(checkpoint)!r} is not a class-conditional 8x8 digits model; pass --ref")
    table = M.digits_report(model, steps, w or 0.0, num, seed, sampler)
    text = M.format_digits_table(table, w)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    result = dict(checkpoint=str(checkpoint), checkpoint_file=str(ck_file), checkpoint_sha256=file_sha256(ck_file),
                  settings=dict(num=num, steps=list(steps), cfg_scale=w, seed=seed, sampler=sampler, kind="digits"),
                  digits={str(k): v for k, v in table.items()}, table=text, time_utc=stamp)
    if int(os.environ.get("RANK", "0")) == 0:  # one record under torchrun (the table is the same on every rank)
        result["json"] = str(_write_record(Path(out_dir) if out_dir is not None else ck_file.parent, stamp, result))
        if verbose:
            print(text)
            print(f"written: {result['json']}")
    return result


# ----------------------------------------------------------------------------------------------------------------
# During training
# ----------------------------------------------------------------------------------------------------------------
_TRAIN_REF = {}


class _DatasetPixels:
    """A training dataset as uint8 pixels (the source of the training-images reference)."""

    def __init__(self, ds, limit=50000):
        self.ds, self.n = ds, min(len(ds), limit)

    def __len__(self):
        return self.n

    def get(self, indices):
        return self.ds.to_pixels(self.ds.get(np.asarray(indices))[0]).numpy()


def _train_reference(cfg, nets, metrics, ds):
    """The reference of training-time evaluation, computed once per process: cfg.eval_ref, else the training
    images (None for latents without eval_ref)."""
    shas = tuple(sorted((n.name, n.sha256) for n in nets))
    if cfg.eval_ref is not None:
        key = (str(cfg.eval_ref), json.dumps(source_signature(cfg.eval_ref), sort_keys=True), shas, metrics)
        if key not in _TRAIN_REF:
            _TRAIN_REF[key] = load_reference(cfg.eval_ref, nets, metrics, progress=False)
        return _TRAIN_REF[key]
    if ds is None or cfg.data.source == "latents":
        return None
    key = ("train-data", cfg.data.path, cfg.data.source, shas, metrics)
    if key not in _TRAIN_REF:
        ref = _features_of(nets, _DatasetPixels(ds), needs_of(metrics), batch=250, progress=False)
        _TRAIN_REF[key] = check_reference(ref, needs_of(metrics), _widths(nets),
                                          f"the training images ({cfg.data.source})")
    return _TRAIN_REF[key]


def train_time_fid(ema, cfg, device, step, ds=None, metrics=M.DEFAULT_METRICS) -> dict:
    """{"<metric>_<n>step" per training name of each metric column (fid, is, ...) and n in cfg.eval_steps,
    "fid_num", "fid_step", "fid_seconds"} of the EMA model on cfg.eval_num samples (sample i from cfg.seed + i,
    as `evaluate`), against cfg.eval_ref (None: the training images `ds`, computed once per process). One
    process, no collectives: call it on rank 0. Problems the run should survive (no weights, latents without a
    VAE, non-finite samples) give {"fid": None, "message"}.
    """
    if cfg.data.source == "latents" and cfg.data.vae_path is None:
        return {"fid": None, "message": "FID skipped: latents need data.vae_path (a local AutoencoderKL) to decode"}
    ok, msg = M.fid_available(cfg.inception)
    if not ok:
        return {"fid": None, "message": msg}
    t0 = time.perf_counter()
    dev = torch.device(device)
    nets = _load_nets(metrics, {"inception": cfg.inception}, dev)
    ref = _train_reference(cfg, nets, metrics, ds)
    if ref is None:
        return {"fid": None, "message": "FID skipped: set eval_ref (statistics .npz or a dataset) for this data"}
    vae = None
    if cfg.data.source == "latents":
        from .vae import load_vae

        vae = load_vae(cfg.data.vae_path, dev)
    was_training = ema.training
    ema.eval()
    out = {}
    try:
        for n in cfg.eval_steps:
            outs = {}
            for i in range(0, cfg.eval_num, 250):
                px, _ = generate(ema, np.arange(i, min(cfg.eval_num, i + 250)), n, cfg.sample.sampler,
                                 cfg.sample.grid, cfg.sample.cfg_scale, cfg.seed, vae, dev,
                                 pixel_kind(cfg.data.source), f"the EMA model at step {step}")
                for net in nets:
                    for o, v in net(px).items():
                        outs.setdefault(o, []).append(v.numpy())
            row = M.compute_metrics(metrics, {o: np.concatenate(v) for o, v in outs.items()}, ref,
                                    {"is_splits": min(10, cfg.eval_num)})
            out.update({f"{c.train}_{n}step": row[c.key] for c in M.metric_columns(metrics) if c.train})
    except NonFiniteSamplesError as e:
        return {"fid": None, "message": f"evaluation skipped at step {step}: {e}"}
    finally:
        ema.train(was_training)
    out["fid_num"], out["fid_step"], out["fid_seconds"] = cfg.eval_num, step, time.perf_counter() - t0
    return out
