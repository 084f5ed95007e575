"""Evaluation as the papers report it: FID-50K and Inception Score, sharded over ranks, resumable, from one call.

    evaluate(checkpoint, ref, num=50000, steps=(1, 2, 4, 8), ...) -> dict      (python -m imm_fast eval ...)

- Features: the FID Inception-V3 with the TF-ported weights (imm_fast.inception); FID in float64
  (metrics.frechet_distance), IS with 10 splits (metrics.inception_score).
- Reference statistics (mu, sigma): read from .npz (imm_fast's and EDM's `mu`/`sigma`; ADM's reference batch,
  whose `mu`/`sigma` are used and whose `arr_0` images are the fallback), or computed from a dataset (CIFAR-10
  python pickles = the 50K training images, an image folder, ImageNet train at 256 with the ADM center crop, an
  .npz/.npy of images) and saved as .npz.
- Samples: image i always comes from the generator seeded with seed + i (prior noise, then any restart noise) and
  has class i % label_dim, so the set does not depend on world size or batch size (and classes are balanced:
  50 per class for 50K ImageNet images). Work is cut into shards of `shard_size` images; shard k belongs to rank
  k % world. A finished shard (features, logits, labels, + images with save_npz) is written atomically under
  <out>/eval-cache/<settings hash>/ and skipped when the same evaluation runs again, so an interrupted run resumes.
  The cache is removed after a complete evaluation unless keep_cache=True.
- Output: eval-<UTC time>.json next to the checkpoint (settings, checkpoint and Inception sha256, reference, per
  step count FID / IS / timings) and a printed table; with save_npz, eval-<time>-<N>step.npz holding uint8 NHWC
  `arr_0` and labels `arr_1`, the file ADM's TF evaluator reads.

`train_time_fid(ema, cfg, device, step, ds)` is the small FID the training loop logs (one process, no collectives).

Shapes: N images, (C, R, R) model samples, (3, H, W) uint8 pixels, F = 2048 features, K = 1008 logits.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from . import metrics as M
from ._files import atomic_write, file_sha256
from .inception import CLASSES, FEATURES, inception_outputs, load_inception

CACHE_VERSION = 1  # bump when the content of a shard changes
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)]


# ----------------------------------------------------------------------------------------------------------------
# Reference statistics
# ----------------------------------------------------------------------------------------------------------------
def _savez(path, **arrays):
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temporary name
            np.savez(f, **arrays)

    return atomic_write(path, write)


def save_statistics(path, mu, sigma, **info):
    """Write reference statistics as .npz: mu (F,), sigma (F, F) float64 (+ `info` as JSON), atomically."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"statistics need mu (F,) and sigma (F, F), got {mu.shape} and {sigma.shape}")
    return _savez(path, mu=mu, sigma=sigma, info=np.array(json.dumps(info)))


def load_statistics(path):
    """(mu, sigma, info) from an .npz with `mu` and `sigma` (imm_fast's, EDM's cifar10-32x32.npz, ADM's reference
    batch), or None when the file holds no statistics. Raises for a file that is not an .npz."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ref={str(path)!r} does not exist")
    try:
        z = np.load(p, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"ref={str(path)!r} is not a readable .npz: {e}") from e
    with z:
        if not hasattr(z, "files"):
            return None
        if "mu" not in z.files or "sigma" not in z.files:
            return None
        info = json.loads(str(z["info"])) if "info" in z.files else {}
        fmt = "adm" if "arr_0" in z.files else ("imm_fast" if "info" in z.files else "edm")
        return np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64), {**info, "format": fmt}


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
        from .data import list_image_folder, load_array, load_cifar10

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

    def __init__(self, width=FEATURES):
        self.n, self.s, self.ss = 0, np.zeros(width), np.zeros((width, width))

    def add(self, f):
        f = np.asarray(f, np.float64)
        self.n, self.s, self.ss = self.n + len(f), self.s + f.sum(0), self.ss + f.T @ f

    def all_reduce(self):
        if _world()[1] > 1:
            import torch.distributed as dist

            dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
            t = torch.from_numpy(np.concatenate([[self.n], self.s, self.ss.ravel()])).to(dev)
            dist.all_reduce(t)
            t = t.cpu().numpy()
            w = len(self.s)
            self.n, self.s, self.ss = int(round(t[0])), t[1:1 + w], t[1 + w:].reshape(w, w)

    def stats(self):
        if self.n < 2:
            raise ValueError(f"statistics need at least 2 images, got {self.n}")
        mu = self.s / self.n
        return mu, (self.ss - self.n * np.outer(mu, mu)) / (self.n - 1)


def reference_statistics(source, out=None, inception=None, device=None, resolution=None, batch=100,
                         max_images=None, progress=True):
    """(mu, sigma, info) of a dataset's Inception features, optionally saved to `out` (.npz).

    source: a CIFAR-10 python folder (its 50K training images, as EDM's cifar10-32x32.npz), an image folder
    (recursive; `resolution` center-crops them the ADM way: ImageNet train -> resolution=256), or an .npz/.npy of
    uint8 images (N, C, R, R) / (N, R, R, C). Under torchrun every rank reads its share.
    """
    rank, world = _init_world()
    dev = _device(device)
    net, weights = load_inception(inception, dev)
    src = _ImageSource(source, resolution)
    n = len(src) if max_images is None else min(len(src), int(max_images))
    mine = np.arange(rank, n, world)
    acc = _Moments()
    bar = _Progress(progress and rank == 0, n, f"reference {Path(source).name}", world)
    for i in range(0, len(mine), batch):
        images = torch.from_numpy(src.get(mine[i:i + batch]))
        acc.add(inception_outputs(net, images, batch)[0].numpy())
        bar.update(len(images))
    bar.close()
    acc.all_reduce()
    mu, sigma = acc.stats()
    info = {"source": str(source), "kind": src.kind, "num_images": acc.n, "resolution": resolution,
            "inception_sha256": _sha_cached(weights)}
    if out is not None and rank == 0:
        save_statistics(out, mu, sigma, **info)
    return mu, sigma, info


def load_reference(ref, inception=None, device=None, resolution=None, batch=100, cache_dir=None, progress=True):
    """(mu, sigma, info) for `ref`: statistics from an .npz, else computed from the dataset it names (then saved
    under cache_dir as reference-<hash>.npz and reused from there next time)."""
    p = Path(ref)
    if p.is_file() and p.suffix == ".npz":
        got = load_statistics(p)
        if got is not None:
            return got[0], got[1], {**got[2], "path": str(p)}
    if not p.exists():
        raise FileNotFoundError(f"ref={str(ref)!r} does not exist; give statistics (.npz with mu, sigma, e.g. EDM's "
                                "cifar10-32x32.npz or ADM's VIRTUAL_imagenet256_labeled.npz) or a dataset")
    cached = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{p.resolve()}|{resolution}".encode()).hexdigest()[:16]
        cached = Path(cache_dir) / f"reference-{key}.npz"
        if cached.is_file():
            got = load_statistics(cached)
            if got is not None and got[2].get("inception_sha256") == _sha_cached(_weights_path(inception)):
                return got[0], got[1], {**got[2], "path": str(cached)}
    mu, sigma, info = reference_statistics(p, cached, inception, device, resolution, batch, progress=progress)
    return mu, sigma, {**info, "format": "dataset", "path": str(cached or p)}


# ----------------------------------------------------------------------------------------------------------------
# Ranks, devices, progress
# ----------------------------------------------------------------------------------------------------------------
def _world():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_world():
    """(rank, world); joins the torchrun process group (gloo on CPU, nccl on CUDA) when WORLD_SIZE > 1."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return _world()


def _barrier():
    if _world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def _device(device):
    if device is not None and device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class _Progress:
    """One status line on rank 0: images done (all ranks, estimated from this rank's share), images/s, ETA."""

    def __init__(self, enabled, total, label, world=1):
        self.enabled, self.total, self.label, self.world = enabled, total, label, world
        self.done, self.t0, self.last = 0, time.perf_counter(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, n, skipped=False):
        self.done += n * self.world
        if skipped:
            self.t0 = time.perf_counter()  # resumed shards do not count toward the rate
            self.skipped = self.done
        now = time.perf_counter()
        if not self.enabled or (now - self.last < (0.5 if self.tty else 30) and self.done < self.total):
            return
        self.last = now
        rate = (self.done - getattr(self, "skipped", 0)) / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        line = (f"{self.label}: {min(self.done, self.total)}/{self.total} images, {rate:.1f} images/s, "
                f"ETA {eta:.0f} s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self):
        if self.enabled and self.tty:
            print(file=sys.stderr)


_SHA = {}


def _sha_cached(path):
    key = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns)
    if key not in _SHA:
        _SHA[key] = file_sha256(path)
    return _SHA[key]


def _weights_path(inception):
    from .inception import find_weights

    return find_weights(inception)


# ----------------------------------------------------------------------------------------------------------------
# Generation: sample i from seed + i, class i % label_dim
# ----------------------------------------------------------------------------------------------------------------
def labels_for(indices, label_dim):
    """The class schedule: sample i has class i % label_dim (balanced), None for unconditional models."""
    return None if not label_dim else torch.as_tensor(np.asarray(indices) % label_dim, dtype=torch.int64)


@torch.no_grad()
def generate(model, indices, steps, sampler="pushforward", grid="uniform", cfg_scale=None, seed=0, vae=None,
             device=None):
    """uint8 pixels (n, 3|1, H, W) and labels of samples `indices`; each is a function of (seed + i) alone.

    Pushforward goes through imm_fast.sample (CUDA graphs on CUDA). Restart re-noises each sample from its own
    generator (sample()'s one generator per batch would tie the images to the batch size), one f(x, eps, t_i) step
    at a time through sampling.pushforward.
    """
    from . import schedule as sch
    from .sampling import pushforward, sample, time_grid

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    shape = (model.img_channels, model.img_resolution, model.img_resolution)
    gens = [torch.Generator().manual_seed(int(seed) + int(i)) for i in indices]
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev) * model.sigma_data
    labels = labels_for(indices, model.label_dim)
    lab = None if labels is None else labels.to(dev)
    cfg = cfg_scale if model.label_dim else None
    if sampler == "pushforward":
        x = sample(model, noise, steps, "pushforward", grid, lab, cfg)
    elif sampler == "restart":
        t_steps = time_grid(model, steps, grid, dev)
        x = noise.to(torch.float64)
        for j, t_cur in enumerate(t_steps[:-1]):
            x = pushforward(model, x, torch.stack([t_cur, torch.ones_like(t_cur) * model.eps]), lab, cfg)
            if j < len(t_steps) - 2:
                eps = torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) for g in gens]).to(dev)
                alpha, sigma = sch.alpha_sigma(t_steps[j + 1], model.noise_schedule)
                x = alpha * x + sigma * (eps * model.sigma_data)
    else:
        raise ValueError(f"sampler={sampler!r} is not one of ('pushforward', 'restart')")
    return to_pixels(model, x, vae), labels


def to_pixels(model, x, vae=None):
    """Model samples -> uint8 (N, C, H, W): latents through the VAE (on its device), pixels from [-1, 1]."""
    if vae is not None:
        from .vae import decode_latents

        return decode_latents(vae, x)
    if model.img_channels not in (1, 3):
        raise ValueError(f"a {model.img_channels}-channel model samples latents: pass vae (--vae, a local "
                         "AutoencoderKL folder) to decode them")
    return ((x.float() + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def _shard_ranges(num, shard_size):
    return [(k, k * shard_size, min(num, (k + 1) * shard_size)) for k in range((num + shard_size - 1) // shard_size)]


def _read_shard(path, n, with_images, with_features=True):
    try:
        with np.load(path, allow_pickle=False) as z:
            if len(z["labels"]) == n and (not with_images or "images" in z.files) \
                    and (not with_features or "features" in z.files):
                return {k: z[k] for k in z.files}
    except Exception:  # noqa: BLE001 - an unreadable shard is made again
        pass
    return None


def run_shards(model, cache, num, steps, sampler, grid, cfg_scale, seed, net, vae=None, batch=64, shard_size=1000,
               save_images=False, progress=True, device=None):
    """Generate and featurize this rank's shards of `num` samples into `cache` (skipping finished ones).
    net=None keeps only images and labels (generation alone). -> (seconds generating, seconds in Inception,
    images made now) on this rank."""
    rank, world = _world()
    cache.mkdir(parents=True, exist_ok=True)
    bar = _Progress(progress and rank == 0, num, f"{steps}-step samples", world)
    t_gen = t_feat = 0.0
    made = 0
    for k, lo, hi in _shard_ranges(num, shard_size):
        if k % world != rank:
            continue
        path = cache / f"shard-{k:06d}.npz"
        if path.is_file() and _read_shard(path, hi - lo, save_images, net is not None) is not None:
            bar.update(hi - lo, skipped=True)
            continue
        feats, logits, labels, images = [], [], [], []
        for i in range(lo, hi, batch):
            idx = np.arange(i, min(hi, i + batch))
            t0 = time.perf_counter()
            px, lab = generate(model, idx, steps, sampler, grid, cfg_scale, seed, vae, device)
            t1 = time.perf_counter()
            if net is not None:
                f, lg = inception_outputs(net, px, batch)
                feats.append(f.float().numpy())
                logits.append(lg.float().numpy())
            t_gen, t_feat = t_gen + t1 - t0, t_feat + time.perf_counter() - t1
            labels.append(np.full(len(idx), -1) if lab is None else lab.numpy())
            if save_images:
                images.append(px.permute(0, 2, 3, 1).numpy())  # NHWC, as ADM's evaluator reads it
            bar.update(len(idx))
            made += len(idx)
        arrays = dict(labels=np.concatenate(labels).astype(np.int64))
        if net is not None:
            arrays.update(features=np.concatenate(feats), logits=np.concatenate(logits))
        if save_images:
            arrays["images"] = np.concatenate(images)
        _savez(path, **arrays)
    bar.close()
    return t_gen, t_feat, made


def _gather_shards(cache, num, shard_size):
    feats, logits = np.zeros((num, FEATURES), np.float32), np.zeros((num, CLASSES), np.float32)
    for k, lo, hi in _shard_ranges(num, shard_size):
        z = _read_shard(cache / f"shard-{k:06d}.npz", hi - lo, False)
        if z is None:
            raise RuntimeError(f"shard {k} of {cache} is missing or incomplete after all ranks finished; run the "
                               "same command again to resume")
        feats[lo:hi], logits[lo:hi] = z["features"], z["logits"]
    return feats, logits


def write_adm_npz(path, cache, num, shard_size):
    """Stream the shards' images into an .npz with uint8 NHWC `arr_0` and int64 labels `arr_1` (ADM's sample
    batch layout), without holding all images in memory."""
    first = _read_shard(cache / "shard-000000.npz", min(num, shard_size), True, False)
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
                    z = _read_shard(cache / f"shard-{k:06d}.npz", hi - lo, True, False)
                    f.write(np.ascontiguousarray(z["images"], dtype=np.uint8).tobytes())
                    labels.append(z["labels"])
            buf = io.BytesIO()
            np.save(buf, np.concatenate(labels))
            zf.writestr("arr_1.npy", buf.getvalue())

    return atomic_write(path, write)


# ----------------------------------------------------------------------------------------------------------------
# evaluate()
# ----------------------------------------------------------------------------------------------------------------
def checkpoint_file(path, trust_unverified=False):
    """The weights file load_official reads for `path` (imm_fast.checkpoints.resolve_weights, the one resolver:
    hf:// addresses, run folders with or without `latest`, checkpoint folders, files)."""
    from .checkpoints import resolve_weights

    return resolve_weights(path, trust_unverified)


def _check_args(num, steps, batch, shard_size, seed, sampler):
    for name, v in (("num", num), ("batch", batch), ("shard_size", shard_size)):
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


def format_table(result) -> str:
    ref = result["reference"]
    lines = [f"{result['checkpoint']}  vs  {ref.get('path', ref.get('source'))}  ({result['settings']['num']} images, "
             f"cfg {result['settings']['cfg_scale']}, {result['settings']['sampler']})",
             "| steps | NFE | FID | IS | images/s |", "|---|---|---|---|---|"]
    for n, r in result["results"].items():
        lines.append(f"| {n} | {r['nfe']} | {r['fid']:.3f} | {r['is_mean']:.2f} ± {r['is_std']:.2f} | "
                     f"{r['images_per_s']:.1f} |")
    return "\n".join(lines)


def evaluate(checkpoint, ref, num=50000, steps=(1, 2, 4, 8), cfg_scale=None, sampler="pushforward",
             grid="uniform", batch=64, seed=0, inception=None, vae=None, device=None, save_npz=False,
             shard_size=1000, is_splits=10, out_dir=None, ref_resolution=None, keep_cache=False, progress=True,
             verbose=True, trust_unverified=False):
    """FID and IS of a checkpoint's samples against a reference, per step count; see the module docstring.

    checkpoint: a run folder, a checkpoint folder, an imm_fast .safetensors or an authors' .pkl (load_official).
    ref: statistics .npz (imm_fast / EDM / ADM reference batch) or a dataset (see reference_statistics).
    grid: "uniform", "edm" or a list of middle eta values (then steps is len(list) + 1).
    inception: the weights file, "download", or None ($IMM_FAST_INCEPTION / the torch hub cache).
    vae: a local AutoencoderKL folder for latent models. save_npz: also write ADM's sample-batch .npz per step.
    trust_unverified: accept a training checkpoint without its manifest (see imm_fast.checkpoints).
    Returns the dict written to <out_dir>/eval-<time>.json (out_dir default: the checkpoint's folder, the current
    folder for an hf:// checkpoint, never the Hub cache); every rank returns it, rank 0 writes it and prints the
    table.
    """
    from .checkpoints import load_official

    t_start = time.perf_counter()
    if not isinstance(grid, str):
        grid = [float(v) for v in grid]
        steps = (len(grid) + 1,)
    steps = tuple(int(s) if isinstance(s, (int, np.integer)) and not isinstance(s, bool) else s for s in steps)
    _check_args(num, steps, batch, shard_size, seed, sampler)
    if isinstance(is_splits, bool) or not isinstance(is_splits, int) or is_splits < 1:
        raise ValueError(f"is_splits must be a positive int, got {is_splits!r}")
    rank, world = _init_world()
    dev = _device(device)
    ck_file = checkpoint_file(checkpoint, trust_unverified)  # resolved once: the record names what is loaded
    from .hub import is_hub_path

    out = Path(out_dir) if out_dir is not None else Path.cwd() if is_hub_path(checkpoint) else ck_file.parent
    net, weights = load_inception(inception, dev)  # first: a missing file fails before any sampling
    inception = str(weights)
    model = load_official(ck_file, device=dev)
    if model.img_channels not in (1, 3) and vae is None:
        raise ValueError(f"{str(checkpoint)!r} is a latent model ({model.img_channels} channels): pass vae (--vae, a "
                         "local AutoencoderKL folder such as sd-vae-ft-ema) to decode its samples")
    vae_model = None
    if vae is not None:
        from .vae import load_vae

        vae_model = load_vae(vae, dev)
    ck_sha, inc_sha = _sha_cached(ck_file), _sha_cached(weights)
    mu_ref, sigma_ref, ref_info = load_reference(ref, inception, dev, ref_resolution, batch, out / "eval-cache",
                                                 progress and rank == 0)
    ref_sha = ref_info.get("inception_sha256")
    if ref_sha is not None and ref_sha != inc_sha and rank == 0:
        import warnings

        warnings.warn(f"the reference statistics {ref_info.get('path')} were computed with other Inception weights "
                      f"(sha256 {ref_sha[:12]}..., now {inc_sha[:12]}...): the FID compares different features")
    settings = dict(num=num, steps=list(steps), cfg_scale=cfg_scale if model.label_dim else None, sampler=sampler,
                    grid=grid, seed=seed, batch=batch, shard_size=shard_size, is_splits=is_splits,
                    vae=None if vae is None else str(vae), save_npz=bool(save_npz), world_size=world,
                    device=str(dev), ref=str(ref), ref_resolution=ref_resolution)
    # Everything that decides the images (not batch or world size): the cache key of the shards.
    key_fields = dict(version=CACHE_VERSION, checkpoint=ck_sha, inception=inc_sha, num=num, cfg=settings["cfg_scale"],
                      sampler=sampler, grid=grid, seed=seed, shard=shard_size, vae=settings["vae"],
                      images=bool(save_npz))
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    results = {}
    for n in steps:
        cache = out / "eval-cache" / key / f"{n}step"
        t0 = time.perf_counter()
        t_gen, t_feat, made = run_shards(model, cache, num, n, sampler, grid, settings["cfg_scale"], seed, net,
                                         vae_model, batch, shard_size, save_npz, progress, dev)
        made = _sum_over_ranks(made)  # also the barrier: every rank has written its shards
        wall = time.perf_counter() - t0
        row = None
        if rank == 0:
            feats, logits = _gather_shards(cache, num, shard_size)
            mu, sigma = M.feature_statistics(feats)
            is_mean, is_std = M.inception_score(logits, min(is_splits, num))
            row = dict(fid=M.frechet_distance(mu, sigma, mu_ref, sigma_ref), is_mean=is_mean, is_std=is_std,
                       nfe=n * (2 if settings["cfg_scale"] is not None else 1), images=num, made_now=made,
                       seconds=wall, generate_s_rank0=t_gen, inception_s_rank0=t_feat,
                       images_per_s=made / wall if made else 0.0)
            if save_npz:
                row["npz"] = str(write_adm_npz(out / f"eval-{stamp}-{n}step.npz", cache, num, shard_size))
        results[str(n)] = _broadcast(row)
    result = dict(checkpoint=str(checkpoint), checkpoint_file=str(ck_file), checkpoint_sha256=ck_sha,
                  inception=str(weights), inception_sha256=inc_sha, reference=ref_info, settings=settings,
                  results=results, seconds=time.perf_counter() - t_start, time_utc=stamp,
                  torch=torch.__version__, device_name=_device_name(dev))
    if rank == 0:
        path = out / f"eval-{stamp}.json"
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
        result["json"] = str(path)
        if not keep_cache:
            shutil.rmtree(out / "eval-cache" / key, ignore_errors=True)
        if verbose:
            print(format_table(result))
            print(f"written: {path}")
    _barrier()
    return result


def _sum_over_ranks(v):
    if _world()[1] == 1:
        return v
    import torch.distributed as dist

    t = torch.tensor([float(v)], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return int(round(t.item()))


def _broadcast(obj):
    if _world()[1] == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _device_name(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------------------------
# During training
# ----------------------------------------------------------------------------------------------------------------
_TRAIN_REF = {}


def train_time_fid(ema, cfg, device, step, ds=None) -> dict:
    """{"fid_<n>step", "is_<n>step" per n in cfg.eval_steps, "fid_num", "fid_seconds"} of the EMA model on
    cfg.eval_num samples (sample i from cfg.seed + i, as `evaluate`), against cfg.eval_ref (None: the Inception
    statistics of the training images `ds`, computed once per process). One process, no collectives: call it on
    rank 0. Problems the run should survive (no weights, latents without a VAE) give {"fid": None, "message"}.
    """
    if cfg.data.source == "latents" and cfg.data.vae_path is None:
        return {"fid": None, "message": "FID skipped: latents need data.vae_path (a local AutoencoderKL) to decode"}
    ok, msg = M.fid_available(cfg.inception)
    if not ok:
        return {"fid": None, "message": msg}
    t0 = time.perf_counter()
    dev = torch.device(device)
    net, weights = load_inception(cfg.inception, dev)
    if cfg.eval_ref is not None:
        key = (str(cfg.eval_ref), _sha_cached(weights))
        if key not in _TRAIN_REF:
            _TRAIN_REF[key] = load_reference(cfg.eval_ref, cfg.inception, dev, progress=False)[:2]
    else:
        if ds is None or cfg.data.source == "latents":
            return {"fid": None, "message": "FID skipped: set eval_ref (statistics .npz or a dataset) for this data"}
        key = ("train-data", cfg.data.path, cfg.data.source, _sha_cached(weights))
        if key not in _TRAIN_REF:
            acc = _Moments()
            for i in range(0, min(len(ds), 50000), 250):
                idx = np.arange(i, min(len(ds), 50000, i + 250))
                acc.add(inception_outputs(net, ds.to_pixels(ds.get(idx)[0]))[0].numpy())
            _TRAIN_REF[key] = acc.stats()
    mu_ref, sigma_ref = _TRAIN_REF[key]
    vae = None
    if cfg.data.source == "latents":
        from .vae import load_vae

        vae = load_vae(cfg.data.vae_path, dev)
    was_training = ema.training
    ema.eval()
    out = {}
    try:
        for n in cfg.eval_steps:
            feats, logits = [], []
            for i in range(0, cfg.eval_num, 250):
                idx = np.arange(i, min(cfg.eval_num, i + 250))
                px, _ = generate(ema, idx, n, cfg.sample.sampler, cfg.sample.grid, cfg.sample.cfg_scale, cfg.seed,
                                 vae, dev)
                f, lg = inception_outputs(net, px)
                feats.append(f.numpy())
                logits.append(lg.numpy())
            mu, sigma = M.feature_statistics(np.concatenate(feats))
            out[f"fid_{n}step"] = M.frechet_distance(mu, sigma, mu_ref, sigma_ref)
            out[f"is_{n}step"] = M.inception_score(np.concatenate(logits), min(10, cfg.eval_num))[0]
    finally:
        ema.train(was_training)
    out["fid_num"], out["fid_step"], out["fid_seconds"] = cfg.eval_num, step, time.perf_counter() - t0
    return out
