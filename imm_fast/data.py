"""Datasets for training: the embedded 8x8 digits, CIFAR-10 pickles, image folders, .npy/.npz arrays, latents.

Every dataset is an `ArrayDataset`: N samples held in memory (or memory-mapped for latents) plus optional integer
labels; `get(indices)` returns (x float32 (n, C, R, R) scaled to a data std of about sigma_d = 0.5, labels (n,) int64
or None). The sample order comes from `EpochSampler`, a seeded permutation per epoch whose whole state is two ints,
so a resumed run draws exactly the batches an uninterrupted one would.

Scaling (to_model / to_pixels are inverses):
- digits: pixels 0..16 -> (x - 8) / 12: range [-2/3, 2/3], std 0.50 over the dataset (mean -0.26).
- uint8 images: x / 127.5 - 1 in [-1, 1] (the EDM convention, std about 0.5 for natural images).
- latents and float arrays: used as stored (latents are normalized at encode time by imm_fast.vae).

Shapes: N samples, C channels, R side; images are stored NCHW.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import DataConfig
from .errors import DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
DIGITS_SPLIT_SEED = 0       # the fixed train / test split of the 1,797 digits
DIGITS_TEST_FRACTION = 0.2  # 360 held-out digits for the classifier and the Frechet distance
DIGITS_COUNT = 1797         # scikit-learn's copy of the UCI 8x8 digits
DIGITS_SHAPE = (1, 8, 8)    # (C, R, R)
DIGITS_CLASSES = 10
DIGITS_MAX = 16.0           # pixels are 0..16
DIGITS_OFFSET, DIGITS_SCALE = 8.0, 12.0  # model scale (x - 8) / 12: std 0.50 over the dataset (sigma_d)
PIXEL_KINDS = ("digits", "uint8")  # how model-scale samples become pixels (see to_pixels)


def digits_to_model(raw):
    """Digits pixels 0..16 -> model scale, (x - 8) / 12 (a tensor or an array)."""
    return (raw - DIGITS_OFFSET) / DIGITS_SCALE


def to_pixels(x, kind="uint8"):
    """Model-scale samples (N, C, R, R) -> uint8 pixels on the CPU, the decoder per kind of data:
    "digits": x * 12 + 8 back to 0..16, then to 0..255; "uint8" (images scaled to [-1, 1]): (x + 1) / 2 * 255.
    Values outside the range are clamped."""
    if kind not in PIXEL_KINDS:
        raise ValueError(f"pixel kind {kind!r} is not one of {PIXEL_KINDS}")
    x = x.detach().to(torch.float32).cpu()
    x = (x * DIGITS_SCALE + DIGITS_OFFSET) / DIGITS_MAX if kind == "digits" else (x + 1.0) / 2.0
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8)


def pixel_kind(data_source) -> str:
    """The pixel decoder of a training data source (DataConfig.source): digits, else images in [-1, 1]."""
    return "digits" if data_source == "digits" else "uint8"


@dataclass
class ArrayDataset:
    """In-memory (or memory-mapped) samples; `kind` selects the pixel scaling ("digits", "uint8", "float")."""

    x: object                       # (N, C, R, R) numpy array (uint8 / float) or torch tensor
    labels: Optional[np.ndarray]    # (N,) int64 or None
    kind: str                       # "digits", "uint8" or "float"
    num_classes: int = 0            # 0 = unconditional
    class_names: Optional[list] = None

    def __len__(self):
        return int(self.x.shape[0])

    @property
    def shape(self):
        return tuple(int(v) for v in self.x.shape[1:])  # (C, R, R)

    def to_model(self, raw: torch.Tensor) -> torch.Tensor:
        raw = raw.to(torch.float32)
        if self.kind == "digits":
            return digits_to_model(raw)
        if self.kind == "uint8":
            return raw / 127.5 - 1.0
        return raw

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space samples -> uint8 pixels (N, C, R, R) for grids and metrics (floats: clamp [-1, 1])."""
        return to_pixels(x, "digits" if self.kind == "digits" else "uint8")

    def get(self, indices, hflip=None):
        """(x float32 (n, C, R, R) in model scale, labels int64 (n,) or None); hflip: bool mask (n,) or None."""
        idx = np.asarray(indices, dtype=np.int64)
        if isinstance(self.x, torch.Tensor):
            raw = self.x[torch.from_numpy(idx)]
        else:
            order = np.argsort(idx, kind="stable")  # sorted reads are much faster on memory-mapped arrays
            rows = np.empty((len(idx),) + self.x.shape[1:], dtype=self.x.dtype)
            rows[order] = self.x[idx[order]]
            raw = torch.from_numpy(rows)
        x = self.to_model(raw)
        if hflip is not None and bool(hflip.any()):
            x = torch.where(hflip.reshape(-1, 1, 1, 1), x.flip(-1), x)
        y = None if self.labels is None else torch.from_numpy(np.asarray(self.labels)[idx].astype(np.int64))
        return x, y


class EpochSampler:
    """Global batches of indices from a seeded permutation per epoch; the state is (epoch, position).

    Every rank holds the same sampler and takes its own slice of each global batch.
    """

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("the dataset is empty")
        self.n, self.seed = n, seed
        self.epoch, self.pos = 0, 0
        self._perm = None

    def _permutation(self):
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(self.n, generator=g).numpy()
        return self._perm

    def next(self, batch: int) -> np.ndarray:
        out = []
        while batch > 0:
            perm = self._permutation()
            take = min(batch, self.n - self.pos)
            out.append(perm[self.pos:self.pos + take])
            self.pos += take
            batch -= take
            if self.pos == self.n:
                self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        return np.concatenate(out)

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state):
        if state["n"] != self.n:
            raise ValueError(f"the checkpoint's data sampler saw {state['n']} samples but the dataset has {self.n}: "
                             "resume with the same data")
        self.epoch, self.pos, self.seed, self._perm = state["epoch"], state["pos"], state["seed"], None


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------
def digits_split():
    """(train_indices, test_indices) of the fixed 80/20 split of scikit-learn's 1,797 digits."""
    n = DIGITS_COUNT
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(n)
    n_test = int(round(n * DIGITS_TEST_FRACTION))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def load_digits_arrays(split="train"):
    """(images float32 (n, 1, 8, 8) in 0..16, labels int64 (n,)) from the copy scikit-learn ships (no download)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits dataset comes with scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    x = d.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    y = d.target.astype(np.int64)
    if split != "all":
        train, test = digits_split()
        sel = train if split == "train" else test
        x, y = x[sel], y[sel]
    return x, y


def load_cifar10(path, split="train"):
    """(uint8 (N, 3, 32, 32), labels (N,)) from the `cifar-10-batches-py` folder (data_batch_1..5, test_batch)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"data.path={str(path)!r} is not a folder; expected the CIFAR-10 python version "
                                "(cifar-10-batches-py with data_batch_1..5 and test_batch)")
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    names["all"] = names["train"] + names["test"]
    xs, ys = [], []
    for name in names[split]:
        f = root / name
        if not f.is_file():
            raise FileNotFoundError(f"CIFAR-10 batch file {str(f)!r} is missing (data.path={str(path)!r})")
        with open(f, "rb") as fh:
            try:
                from .checkpoints.safe_pickle import numpy_array_globals, restricted_load

                d = restricted_load(fh, f, numpy_array_globals(), "a CIFAR-10 batch file", encoding="bytes")
            except Exception as e:
                raise ValueError(f"could not read CIFAR-10 batch {str(f)!r}: {e}") from e
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[b"labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _load_image(path, resolution):
    """(3, R, R) uint8 pixels of one image file; an unreadable or truncated file is a DataError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return _decode_image(im, resolution)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # truncated, corrupt, unknown
        raise DataError(f"could not read image {str(path)!r}: {type(e).__name__}: {e}") from e


def _decode_image(im, resolution):
    from PIL import Image

    im = im.convert("RGB")
    if resolution is not None:
        w, h = im.size
        s = resolution / min(w, h)  # resize the short side, then center-crop (as the DiT/ADM pipelines)
        im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)  # (3, R, R)


def list_image_folder(path):
    """([(file, class index)], class names). Class = first-level subfolder; files directly in `path` -> no classes."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"data.path={str(path)!r} is not a folder of images")
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = []
    if subdirs:
        for ci, name in enumerate(subdirs):
            for f in sorted((root / name).rglob("*")):
                if f.suffix.lower() in IMAGE_EXTS:
                    items.append((f, ci))
    else:
        items = [(f, -1) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_EXTS]
    if not items:
        raise ValueError(f"data.path={str(path)!r} holds no images ({', '.join(IMAGE_EXTS)})")
    return items, subdirs


def load_image_folder(path, resolution=None):
    items, names = list_image_folder(path)
    imgs = [_load_image(f, resolution) for f, _ in items]
    shapes = {im.shape for im in imgs}
    if len(shapes) > 1:
        raise ValueError(f"images in {str(path)!r} have different sizes {sorted(shapes)[:4]}; set data.resolution "
                         "to resize and center-crop them")
    x = np.stack(imgs)
    y = np.array([c for _, c in items], dtype=np.int64) if names else None
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"images in {str(path)!r} are {x.shape[-2]}x{x.shape[-1]}, not square; set data.resolution")
    return x, y, names


def _np_load(path, **kw):
    """np.load with an error naming the file (a truncated .npy, pickled objects, not an array file)."""
    try:
        return np.load(path, allow_pickle=False, **kw)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"could not read array file {str(path)!r}: {type(e).__name__}: {e}") from e


# A real image or feature array never compresses by more than this (noise-free images reach ~10x); a zip bomb
# does by orders of magnitude. Smaller members are let through (a constant array of a few MB is harmless).
MAX_NPZ_RATIO = 64
MAX_NPZ_SMALL = 1 << 24  # bytes


def npz_members(path) -> dict:
    """{name without .npy: (shape, dtype, stored bytes)} of an .npz, from each member's .npy header only (a few
    bytes inflated), so a file can be checked before any array in it is allocated. DataError for a broken file."""
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = {(1, 0): np.lib.format.read_array_header_1_0,
                            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read is None:
                        raise ValueError(f"member {info.filename!r} has .npy format version {version}")
                    shape, _, dtype = read(f)
                out[info.filename[:-4]] = (tuple(int(v) for v in shape), dtype, info.compress_size)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise DataError(f"could not read {str(path)!r} as an .npz: {type(e).__name__}: {e}") from e
    return out


def check_npz(path, caps=None) -> dict:
    """npz_members(path), after refusing a member that would inflate far beyond its stored size (a zip bomb) or
    beyond caps[name] bytes. Raises DataError naming the member, its shape and both sizes."""
    members = npz_members(path)
    for name, (shape, dtype, stored) in members.items():
        nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        cap = (caps or {}).get(name)
        if cap is not None and nbytes > cap:
            raise DataError(f"{str(path)!r}: {name!r} is {shape} {dtype} ({nbytes / 2**20:.1f} MiB), more than the "
                            f"{cap / 2**20:.1f} MiB it can hold here; refusing to load it")
        if nbytes > MAX_NPZ_SMALL and nbytes > MAX_NPZ_RATIO * max(stored, 1):
            raise DataError(f"{str(path)!r}: {name!r} declares {shape} {dtype} ({nbytes / 2**20:.1f} MiB) from "
                            f"{stored / 2**20:.2f} MiB stored (ratio > {MAX_NPZ_RATIO}); not a real array file (a "
                            "zip bomb?), refusing to inflate it")
    return members


def load_array(path):
    """(x (N, C, R, R), labels or None) from .npy (images only) or .npz (keys x|images|arr_0 and y|labels)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data.path={str(path)!r} does not exist")
    if p.suffix == ".npy":
        x, y = _np_load(p, mmap_mode="r"), None
    elif p.suffix == ".npz":
        check_npz(p)
        z = _np_load(p)
        xk = next((k for k in ("x", "images", "arr_0") if k in z.files), None)
        if xk is None:
            raise ValueError(f"{str(path)!r} has keys {z.files}; put the images under 'x' (and labels under 'y')")
        yk = next((k for k in ("y", "labels", "arr_1") if k in z.files), None)
        try:  # members are read here, lazily
            x = z[xk]
            y = None if yk is None else np.asarray(z[yk], dtype=np.int64)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"could not read {xk!r} or {yk!r} of {str(path)!r}: {type(e).__name__}: {e}") from e
    else:
        raise ValueError(f"data.path={str(path)!r} must end in .npy or .npz for data.source='array'")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"array {str(path)!r} must be (N, C, R, R) or (N, R, R, C), got shape {x.shape}")
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):  # NHWC -> NCHW
        x = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    if y is not None and len(y) != len(x):
        raise ValueError(f"{str(path)!r}: {len(y)} labels for {len(x)} images")
    return x, y


def load_latents(path):
    """Encoded latents (imm_fast encode): a folder with latents.npy (+ labels.npy) or a .npy/.npz file."""
    p = Path(path)
    if p.is_dir():
        f = p / "latents.npy"
        if not f.is_file():
            raise FileNotFoundError(f"data.path={str(path)!r} has no latents.npy (make one with "
                                    "`python -m imm_fast encode`)")
        x = _np_load(f, mmap_mode="r")
        y = _np_load(p / "labels.npy") if (p / "labels.npy").is_file() else None
        if x.ndim != 4:
            raise ValueError(f"{str(f)!r} must be (N, C, R, R), got shape {x.shape}")
        return x, (None if y is None else y.astype(np.int64))
    return load_array(path)


def build_dataset(cfg: DataConfig) -> ArrayDataset:
    """The dataset a DataConfig describes (labels dropped when class_conditional is False)."""
    names = None
    if cfg.source == "digits":
        x, y = load_digits_arrays(cfg.split)
        ds = ArrayDataset(torch.from_numpy(x), y, "digits")
    elif cfg.source == "cifar10":
        x, y = load_cifar10(cfg.path, cfg.split)
        ds = ArrayDataset(torch.from_numpy(x), y, "uint8")
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    elif cfg.source == "folder":
        x, y, names = load_image_folder(cfg.path, cfg.resolution)
        ds = ArrayDataset(torch.from_numpy(x), y, "uint8")
    elif cfg.source == "array":
        x, y = load_array(cfg.path)
        ds = ArrayDataset(x, y, "uint8" if x.dtype == np.uint8 else "float")
    else:
        x, y = load_latents(cfg.path)
        ds = ArrayDataset(x, y, "float")
    if not cfg.class_conditional:
        ds.labels = None
    if ds.labels is not None:
        if len(ds.labels) and ds.labels.min() < 0:
            raise ValueError(f"labels of {cfg.source!r} data must be >= 0")
        ds.num_classes = int(ds.labels.max()) + 1 if len(ds.labels) else 0
        ds.class_names = names
    return ds


def check_compatible(ds: ArrayDataset, model_cfg) -> None:
    """Raise a ValueError naming the override to fix when the data does not fit the model config."""
    want = (model_cfg.img_channels, model_cfg.img_resolution, model_cfg.img_resolution)
    if ds.shape != want:
        raise ValueError(f"the data's samples are {ds.shape} (C, R, R) but the model expects {want}: set "
                         f"model.img_channels={ds.shape[0]} model.img_resolution={ds.shape[1]}, or data.resolution")
    if ds.labels is None and model_cfg.label_dim != 0:
        raise ValueError(f"the data has no labels (or data.class_conditional=false) but model.label_dim="
                         f"{model_cfg.label_dim}: set model.label_dim=0")
    if ds.labels is not None and ds.num_classes > model_cfg.label_dim:
        raise ValueError(f"the data has {ds.num_classes} classes but model.label_dim={model_cfg.label_dim}: set "
                         f"model.label_dim={ds.num_classes} (or data.class_conditional=false with model.label_dim=0)")

