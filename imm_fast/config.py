"""Typed configuration of imm_fast: model, loss, data, training, sampling, and the named presets.

Every field has a trailing comment (meaning, unit). Configs are frozen; derive variants with `dataclasses.replace`
or `with_overrides` (which also switches the model section to another backbone). The model section is the
backbone's own (imm_fast.models: `ModelConfig(model_type="SongUNet", ...)` builds a SongUNetConfig), so a config
holds, prints and checks only the fields of the backbone it names.

Every field is checked when a config is built, so a typo fails before step 0: its type comes from the annotation
(bools are bools, ints are not floats, numbers are finite, tuples have their length; lists become tuples and ints
become floats where a float is declared), its range and choices from `spec(default, ...)` beside it. Errors are
`ConfigError`s (ValueError; `ConfigTypeError` is also a TypeError) naming the dotted key, the bad value and what is
allowed, e.g. "sample.sampler='restrat' is not one of ('pushforward', 'restart')". Adding a checked field is one
line: `my_field: int = spec(4, ge=1)   # meaning (unit)`.

Each list of choices is declared once, next to the code that implements it (schedules in schedule.py, MMD kernels
in ops/mmd.py, backbone options in their module); the ones a section owns are declared here.
`check_fits(cfg, device)` compares the memory a run will need with what the device has, before step 0.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

from . import _backend
# Also re-exported, so callers of imm_fast.config find the checks and lists they used to find here: Rule,
# check_fields, check_value, DIT_SIZES, TEMB_TYPES, check_imm_settings, F_TYPES, NOISE_SCHEDULES.
from ._fields import Rule, _hints, _validate, check_fields, check_size, check_value, excerpt, spec  # noqa: F401
from .errors import ConfigError, ConfigTypeError
from .models.dit import DIT_SIZES, dit_config  # noqa: F401
from .models.registry import (PRECISIONS, TEMB_TYPES, ModelConfig, check_imm_settings,  # noqa: F401
                              other_backbones_fields, resolve)
from .ops.mmd import KERNELS
from .schedule import F_TYPES, NOISE_SCHEDULES, eta_bounds  # noqa: F401

# ----------------------------------------------------------------------------------------------------------------
# Choices of the sections below (a backbone's choices live in its module; these are the ones a config owns or
# shares with the module that implements them)
# ----------------------------------------------------------------------------------------------------------------
TS_DISTS = ("uniform", "lognormal")               # (s, t) distributions of the loss
TARGET_LABELS = ("clean", "dropped")              # labels of the target pass
WEIGHT_EXPONENTS = (1, 2)                         # a in alpha_t^a
SAMPLERS = ("pushforward", "restart")             # sampling.py
GRIDS = ("uniform", "edm")                        # named time grids (sampling.time_grid); or a list of middle etas
DATA_SOURCES = ("digits", "cifar10", "folder", "array", "latents")
SPLITS = ("train", "test", "all")
OPTIMIZERS = ("adamw", "radam")
COMPILE_MODES = (None, "regional", "full")        # torch.compile of the backbone
DEVICES = ("auto", "cpu", "cuda", "cuda:<index>")
SEED_MAX = 2**32 - 1                              # numpy's seed range
COUNT_MAX = 2**30            # any count (batch, images, samples, steps per sample): a sanity bound, far above memory
K_MAX = 52                   # loss.k: past float64's 52-bit mantissa, delta = (eta_max - eta_min) / 2^k vanishes
THREADS_MAX = 4096           # torch.set_num_threads (check_fits also compares with this machine's CPUs)
LR_MAX = 1e3                 # Adam moves each weight by about lr per step; far past any useful value, and far below
                             # where torch's Adam step size lr / (1 - beta1^t) overflows float32 (3.4e38)


def _mmd_backends():
    return _backend.names("mmd")  # looked up when checked: ops.mmd (imported above) registered them


def _nonempty(v) -> Optional[str]:
    return None if v.strip() else "must not be empty"


MAX_NAME_LEN = 200  # characters of a run or run-family name (a folder name, with a timestamp added)


def _plain_name(v) -> Optional[str]:
    if not v.strip() or v in (".", "..") or "/" in v or "\\" in v or "\0" in v:
        return "must be a plain folder name (no '/', not '.' or '..')"
    if len(v) > MAX_NAME_LEN:
        return f"must be a plain folder name of at most {MAX_NAME_LEN} characters"
    return None


def _device(v) -> Optional[str]:
    return None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) else f"is not one of {DEVICES}"


def eta_grid_problem(etas) -> Optional[str]:
    """None if `etas` (middle eta values of a sampling grid) are finite, positive and strictly decreasing."""
    etas = list(etas)
    if not all(isinstance(e, (int, float)) and math.isfinite(e) and e > 0 for e in etas):
        return "must hold finite positive eta values"
    if any(b >= a for a, b in zip(etas, etas[1:])):
        return "must hold strictly decreasing eta values (time runs from T down to eps)"
    return None


def _grid(v) -> Optional[str]:
    return eta_grid_problem(v) if isinstance(v, tuple) else None


# ----------------------------------------------------------------------------------------------------------------
# Loss and sampling (the model section, ModelConfig, is each backbone's own: imm_fast.models.registry)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossConfig:
    _section = "loss"

    group_size: int = spec(4, ge=1, cap=COUNT_MAX)  # particles per group M (batch = groups x M)
    ts_dist: str = spec("uniform", choices=TS_DISTS)  # (s, t) distribution: "uniform" or "lognormal"
    lognormal_mean: float = -1.1           # mean of log eta_t (lognormal)
    lognormal_std: float = spec(2.0, gt=0)  # std of log eta_t (lognormal)
    k: int = spec(12, ge=0, cap=K_MAX)      # r(s,t) step: delta = (eta_max - eta_min) / 2^k
    a: int = spec(2, choices=WEIGHT_EXPONENTS)  # weighting exponent a in alpha_t^a (1 or 2)
    b: float = 4.0                         # weighting shift b in sigmoid(b - lambda_t)
    kernel: str = spec("laplace", choices=KERNELS)  # MMD kernel: "laplace" or "rbf"
    kernel_eps: float = spec(1e-4, gt=0)   # clamp of the distance inside the kernel
    label_dropout: float = spec(0.1, ge=0, lt=1)  # probability that a label becomes the null class (student pass)
    target_labels: str = spec("clean", choices=TARGET_LABELS)  # target labels: "clean" (un-dropped) or "dropped"
    target_fp32: bool = True               # target pass without autocast
    backend: Optional[str] = spec(None, choices=_mmd_backends)  # mmd_loss backend (None = auto)

    def __post_init__(self):
        _validate(self)


@dataclass(frozen=True)
class SampleConfig:
    _section = "sample"

    steps: Tuple[int, ...] = spec((1, 2, 4, 8), ge=1, cap=COUNT_MAX, min_len=1)  # step counts to sample at
    sampler: str = spec("pushforward", choices=SAMPLERS)  # "pushforward" or "restart"
    grid: Union[str, Tuple[float, ...]] = spec("uniform", choices=GRIDS, gt=0, min_len=1, check=_grid)
                                           # "uniform", "edm" or middle eta values (decreasing, in the model's range)
    cfg_scale: Optional[float] = spec(None, ge=0)  # classifier-free guidance weight w (None = off)
    num_images: int = spec(64, ge=1, cap=COUNT_MAX)  # images per grid

    def __post_init__(self):
        _validate(self)


@dataclass(frozen=True)
class LogConfig:
    _section = "log"

    tensorboard: bool = False         # also log to TensorBoard (<run>/tb; needs the tensorboard package)
    wandb: Optional[str] = spec(None, check=_nonempty)  # also log to this Weights & Biases project (needs wandb;
                                      # WANDB_MODE=offline and the other WANDB_* settings are respected)

    def __post_init__(self):
        _validate(self)


def with_overrides(cfg, overrides: dict, _prefix: str = ""):
    """A copy of a (nested) dataclass config with dotted-key overrides, e.g. {"model.depth": 4}."""
    if not overrides:
        return cfg
    if isinstance(cfg, ModelConfig) and overrides.get("model_type", cfg.model_type) != cfg.model_type:
        return _switch_backbone(cfg, overrides)
    nested = {}
    flat = {}
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise ConfigError(f"unknown config key {excerpt(_prefix + key)} for {type(cfg).__name__}; known: "
                              f"{sorted(names)}")
        if rest:
            if not dataclasses.is_dataclass(getattr(cfg, head)):
                raise ConfigError(f"unknown config key {excerpt(_prefix + key)}: {excerpt(_prefix + head)} is a value, "
                                  "not a section")
            nested.setdefault(head, {})[rest] = value
        else:
            flat[head] = value
    for head, sub in nested.items():
        flat[head] = with_overrides(getattr(cfg, head), sub, f"{_prefix}{head}.")
    return dataclasses.replace(cfg, **flat)


def _switch_backbone(cfg: ModelConfig, overrides: dict) -> ModelConfig:
    """The section of another backbone: the fields it shares with `cfg` carried over, then `overrides`; a key the
    new backbone does not have is refused."""
    target, sizes = resolve(overrides["model_type"], "model.model_type")
    if sizes:
        raise ConfigError(f"model.model_type={overrides['model_type']!r} is a checkpoint alias; use "
                          f"model_type={target.name!r} with its size fields")
    unknown = sorted(set(overrides) - target.field_names())
    if unknown:
        raise ConfigError(f"unknown config key {excerpt('model.' + unknown[0])} for model_type="
                          f"{target.name!r}; its keys: {sorted(target.field_names())}")
    kept = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in target.field_names()}
    return ModelConfig(**{**kept, **overrides})


# ----------------------------------------------------------------------------------------------------------------
# Data, training and the named presets
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    _section = "data"

    source: str = spec("digits", choices=DATA_SOURCES)  # "digits" (scikit-learn's 8x8), "cifar10" (python-pickle
                                      # batches folder), "folder" (images, class = subfolder), "array" (.npy/.npz),
                                      # "latents" (encoded)
    path: Optional[str] = spec(None, check=_nonempty)  # dataset location (not used by "digits")
    split: str = spec("train", choices=SPLITS)  # "train", "test" or "all" (digits: fixed 80/20 split; cifar10:
                                      # batch files)
    resolution: Optional[int] = spec(None, ge=1)  # "folder": resize + center-crop to this side (None = keep, all
                                      # must match)
    class_conditional: bool = True    # use the labels (False: unconditional; labels are ignored)
    hflip: bool = False               # random horizontal flips (drawn from the checkpointed data generator)
    vae_path: Optional[str] = spec(None, check=_nonempty)  # "latents": a local diffusers AutoencoderKL folder to
                                      # decode sample grids

    def __post_init__(self):
        _validate(self)
        if self.source not in ("digits",) and self.path is None:
            raise ConfigError(f"data.source={self.source!r} needs data.path (a file or folder)")


@dataclass(frozen=True)
class TrainConfig:
    _section = ""

    name: str = spec("digits", check=_plain_name)  # preset / run family name (run folders are <out_dir>/<name>-<time>)
    model: ModelConfig = field(default_factory=ModelConfig)   # network + IMM output function
    loss: LossConfig = field(default_factory=LossConfig)      # the IMM objective
    data: DataConfig = field(default_factory=DataConfig)      # the dataset
    sample: SampleConfig = field(default_factory=SampleConfig)  # sample grids and evaluation sampling
    log: LogConfig = field(default_factory=LogConfig)         # optional TensorBoard / W&B logging
    batch_size: int = spec(256, ge=1, cap=COUNT_MAX)  # GLOBAL batch per optimizer step (all ranks, all
                                      # accumulation steps)
    grad_accum: int = spec(1, ge=1, cap=COUNT_MAX)  # micro-batches per optimizer step (per rank)
    max_steps: int = spec(1000, ge=1)  # optimizer steps
    lr: float = spec(1e-4, gt=0, cap=LR_MAX)  # peak learning rate
    optimizer: str = spec("adamw", choices=OPTIMIZERS)  # "adamw" or "radam"
    betas: Tuple[float, float] = spec((0.9, 0.999), ge=0, lt=1)  # Adam betas
    weight_decay: float = spec(0.0, ge=0, cap=1e6)  # decoupled weight decay (lr x weight_decay < 1)
    warmup_steps: int = spec(0, ge=0)  # linear learning-rate warmup (steps)
    grad_clip: float = spec(0.0, ge=0, cap=1e30)  # max global grad norm (0 = no clipping; the norm is logged
                                      # either way)
    max_nonfinite_steps: int = spec(3, ge=1)  # consecutive skipped steps (non-finite loss or grad norm) before the
                                      # run stops with an error
    ema_decay: float = spec(0.9999, ge=0, lt=1)  # EMA of the weights (evaluation only)
    ema_warmup: bool = False          # decay_eff = min(ema_decay, (1 + step) / (10 + step)) for short runs
    amp: Optional[str] = spec("bf16", choices=PRECISIONS)  # student-pass autocast on CUDA (ignored on CPU)
    seed: int = spec(0, ge=0, le=SEED_MAX)  # seeds model init, data order, (s, r, t), noise, label dropout
    device: str = spec("auto", check=_device)  # "auto" (CUDA if available), "cpu", "cuda", "cuda:N"
    threads: Optional[int] = spec(None, ge=1, cap=THREADS_MAX)  # torch CPU threads (None = 1 on the CPU unless
                                      # OMP_NUM_THREADS is set: a busy core stalls every multi-threaded step)
    out_dir: str = spec("runs", check=_nonempty)  # parent folder of run folders
    run_name: Optional[str] = spec(None, check=_plain_name)  # run folder name (None = <name>-<UTC timestamp>)
    resume: Optional[str] = spec(None, check=_nonempty)  # a run folder or checkpoint folder to continue from
    log_every: int = spec(10, ge=1)   # steps between metrics lines (loss averaged over them)
    sample_every: int = spec(0, ge=0)  # steps between sample grids (0 = only at the end)
    ckpt_every: int = spec(0, ge=0)   # steps between checkpoints (0 = only at the end)
    keep_last: int = spec(0, ge=0)    # retention: keep the newest N checkpoints, delete older ones (0 = keep all)
    keep_every: int = spec(0, ge=0)   # retention: also keep checkpoints at steps that are multiples of this (0 = none)
    sigusr1: str = spec("save", choices=("save", "exit"))  # on SIGUSR1: save a checkpoint and carry on, or save
                                      # and exit like SIGTERM (SIGTERM/SIGINT always save and exit)
    eval_every: int = spec(0, ge=0)   # steps between metric evaluations (0 = only at the end)
    eval_samples: int = spec(1000, ge=1, cap=COUNT_MAX)  # samples per step count for the final metrics
    eval_steps: Tuple[int, ...] = spec((1, 2, 4, 8), ge=1, cap=COUNT_MAX, min_len=1)  # step counts evaluated
    final_eval: bool = True           # compute metrics at the end of training
    # Train-time FID of the EMA model (image data; imm_fast.evaluation.train_time_fid, run at eval_every/the end):
    eval_num: int = spec(5000, ge=2, cap=COUNT_MAX)  # samples per step count in eval_steps (digits use eval_samples
                                      # instead; a covariance needs two)
    eval_ref: Optional[str] = spec(None, check=_nonempty)  # reference: statistics .npz (imm_fast/EDM/ADM) or a
                                      # dataset; None = the training images (latents need this set)
    inception: Optional[str] = spec(None, check=_nonempty)  # FID Inception weights file (None = $IMM_FAST_INCEPTION
                                      # or the torch hub cache)
    progress: bool = True             # progress bar on rank 0
    reference: bool = False           # the plain PyTorch path (reference DiT ops, mmd_loss_ref) instead of the
                                      # fused kernels that auto picks on CUDA
    compile: Optional[str] = spec(None, choices=COMPILE_MODES)  # torch.compile the backbone: None, "regional"
                                      # (per DiT/UNet block) or "full"
    tf32: bool = True                 # TF32 matmuls/convolutions on CUDA (as the authors' code sets)

    def __post_init__(self):
        _validate(self)
        if self.lr * self.weight_decay > 1:
            raise ConfigError(f"lr={self.lr!r} x weight_decay={self.weight_decay!r} must be <= 1 (decoupled weight "
                              "decay multiplies the weights by 1 - lr x weight_decay each step)")
        M = self.loss.group_size
        if self.batch_size % (self.grad_accum * M):
            raise ConfigError(f"batch_size={self.batch_size} must be divisible by grad_accum x loss.group_size = "
                              f"{self.grad_accum} x {M} (each micro-batch holds whole groups of M particles)")
        if self.data.source != "latents" and self.data.vae_path is not None:
            raise ConfigError(f"data.vae_path={self.data.vae_path!r} only applies to data.source='latents', got "
                              f"data.source={self.data.source!r}")
        if isinstance(self.sample.grid, tuple):
            m = self.model
            lo, hi = eta_bounds(m.eps, m.T, m.noise_schedule)
            if not all(lo < e < hi for e in self.sample.grid):
                raise ConfigError(f"sample.grid={list(self.sample.grid)!r} must hold eta values strictly between "
                                  f"eta(model.eps)={lo:.6g} and eta(model.T)={hi:.6g}")


def _digits_preset() -> TrainConfig:
    # 8x8x1 digits scaled so the data std is sigma_d = 0.5 (see imm_fast.data); a small class-conditional DiT.
    return TrainConfig(
        name="digits",
        model=ModelConfig(img_resolution=8, img_channels=1, label_dim=10, patch_size=2, hidden_size=128, depth=4,
                          num_heads=4, f_type="euler_fm", temb_type="stride", eps=0.0, T=0.994),
        loss=LossConfig(group_size=4, ts_dist="uniform", k=12, a=1, b=4.0, label_dropout=0.1),
        data=DataConfig(source="digits"),
        sample=SampleConfig(steps=(1, 2, 4, 8), cfg_scale=2.0, num_images=100),
        batch_size=256, max_steps=800, lr=1e-3, warmup_steps=50, grad_clip=1.0, ema_decay=0.99, ema_warmup=True,
        log_every=20, sample_every=400, ckpt_every=400, eval_samples=1000, device="cpu")


def _cifar10_preset() -> TrainConfig:
    # The paper's CIFAR-10 recipe: DDPM++ (SongUNet, 55.7M + the s embedding; the authors'
    # configs/cifar10_generate_images.yaml), simple_edm + identity, dropout 0.2, a = 1, b = 5, k = 15, eps 0.006,
    # T 0.994, M = 4, unconditional, x-flips. Batch 4096, lr 1e-4, betas (0.9, 0.999), no weight decay, EMA 0.9999
    # and 400k steps follow the paper; RAdam (its appendix table, as we read it) is a best guess, as is the
    # absence of warmup and gradient clipping (not stated).
    return TrainConfig(
        name="cifar10",
        model=ModelConfig(model_type="SongUNet", img_resolution=32, img_channels=3, label_dim=0,
                          model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, channel_mult_noise=1,
                          num_blocks=4, attn_resolutions=(16,), embedding_type="positional",
                          encoder_type="standard", decoder_type="standard", resample_filter=(1, 1), s_embed=True,
                          dropout=0.2, noise_schedule="fm", f_type="simple_edm", temb_type="identity",
                          time_scale=1000.0, eps=0.006, T=0.994, mixed_precision=None),
        loss=LossConfig(group_size=4, ts_dist="uniform", k=15, a=1, b=5.0, label_dropout=0.0),
        data=DataConfig(source="cifar10", path="data/cifar-10-batches-py", class_conditional=False, hflip=True),
        # One grid serves every step count here: "uniform" (1 step: T -> eps as the paper). The paper's 2-step
        # grid is the middle eta 1.4: `python -m imm_fast sample RUN --steps 2 --grid 1.4`, or grid=(1.4,) in code.
        sample=SampleConfig(steps=(1, 2), grid="uniform", cfg_scale=None, num_images=64),
        batch_size=4096, max_steps=400_000, lr=1e-4, optimizer="radam", betas=(0.9, 0.999), weight_decay=0.0,
        ema_decay=0.9999, sample_every=5000, ckpt_every=10_000, keep_last=3, keep_every=100_000, eval_samples=50_000,
        eval_steps=(1, 2))


def _cifar10_dit_preset() -> TrainConfig:
    # The paper's CIFAR-10 IMM settings on a DiT-B/2 backbone instead of DDPM++ (imm_fast's earlier cifar10).
    return TrainConfig(
        name="cifar10-dit",
        model=dit_config("B/2", img_resolution=32, img_channels=3, label_dim=0, f_type="simple_edm",
                         temb_type="identity", dropout=0.2, eps=0.006, T=0.994, mixed_precision=None),
        loss=LossConfig(group_size=4, ts_dist="uniform", k=15, a=1, b=5.0, label_dropout=0.0),
        data=DataConfig(source="cifar10", path="data/cifar-10-batches-py", class_conditional=False, hflip=True),
        sample=SampleConfig(steps=(1, 2, 4, 8), cfg_scale=None, num_images=64),
        batch_size=4096, max_steps=400_000, lr=1e-4, ema_decay=0.9999, sample_every=5000, ckpt_every=10_000,
        keep_last=3, keep_every=100_000, eval_samples=50_000)


def _imagenet_preset(size: str) -> TrainConfig:
    # The paper's ImageNet-256 settings on pre-encoded SD-VAE latents (32x32x4), euler_fm + stride, a = 2.
    return TrainConfig(
        name="imagenet256" if size == "XL" else f"imagenet256-{size}",
        model=dit_config(f"{size}/2", img_resolution=32, img_channels=4, label_dim=1000, f_type="euler_fm",
                         temb_type="stride", eps=0.0, T=0.994),
        loss=LossConfig(group_size=4, ts_dist="uniform", k=12, a=2, b=4.0, label_dropout=0.1),
        data=DataConfig(source="latents", path="data/imagenet256-latents"),
        sample=SampleConfig(steps=(1, 2, 4, 8), cfg_scale=1.5, num_images=64),
        batch_size=4096, max_steps=1_000_000, lr=1e-4, optimizer="adamw", ema_decay=0.9999, sample_every=5000,
        ckpt_every=10_000, keep_last=2, keep_every=250_000, eval_samples=50_000)


PRESETS = {
    "digits": _digits_preset(),
    "cifar10": _cifar10_preset(),
    "cifar10-dit": _cifar10_dit_preset(),
    "imagenet256": _imagenet_preset("XL"),
    "imagenet256-S": _imagenet_preset("S"),
    "imagenet256-B": _imagenet_preset("B"),
    "imagenet256-L": _imagenet_preset("L"),
}




def _flatten(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key.split(".")[-1] in ("model", "loss", "data", "sample", "log"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _field_hint(cfg, key: str):
    """The annotated type of a dotted key, or None for an unknown key (with_overrides reports it)."""
    obj = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        obj = getattr(obj, p, None)
        if not dataclasses.is_dataclass(obj):
            return None
    return _hints(type(obj)).get(parts[-1]) if dataclasses.is_dataclass(obj) else None


def _leaf_types(hint) -> set:
    args = typing.get_args(hint)
    return set().union(*map(_leaf_types, args)) if typing.get_origin(hint) is Union else {hint}


def _coerce(cfg, key: str, value):
    """YAML quirks only (the configs check types themselves): "1e-3" -> 1e-3 for a number (YAML 1.1 reads it as a
    string), 2.0 -> 2 for an int."""
    hint = _field_hint(cfg, key)
    if hint is None:
        return value
    leaves = _leaf_types(hint)
    if isinstance(value, str) and str not in leaves and leaves & {int, float}:
        try:
            value = float(value)
        except ValueError:
            return value  # the type check names the key and what is allowed
    if isinstance(value, float) and int in leaves and float not in leaves and value.is_integer():
        return int(value)
    return value


_FLAT_LAYOUT_MARKERS = {"patch_size", "hidden_size", "depth", "model_channels", "channel_mult", "num_blocks"}


def _drop_other_backbones(cfg: "TrainConfig", flat: dict) -> dict:
    """Configs saved before each backbone had its own section hold every backbone's fields side by side in
    `model:` (the others were ignored): recognised by holding DiT and UNet sizes together, they load with only the
    named backbone's fields. Anything else keeps every key, so a stray key is refused as unknown."""
    keys = {k[len("model."):] for k in flat if k.startswith("model.")}
    if not _FLAT_LAYOUT_MARKERS <= keys:
        return flat
    model_type = flat.get("model.model_type", cfg.model.model_type)
    try:
        target, _ = resolve(model_type, "model.model_type")
    except ConfigError:
        return flat  # the type check names it
    others = {f"model.{name}" for name in other_backbones_fields(target)}
    return {k: v for k, v in flat.items() if k not in others}


def _apply(cfg: "TrainConfig", flat: dict) -> "TrainConfig":
    if "model.arch" in flat:  # run configs saved before model_type replaced arch (then always "DiT")
        flat = dict(flat)
        flat.setdefault("model.model_type", flat.pop("model.arch"))
    flat = _drop_other_backbones(cfg, flat)
    flat = {k: _coerce(cfg, k, v) for k, v in flat.items()}
    # Apply nested keys first so that cross-field checks of TrainConfig see the final sub-configs together.
    return with_overrides(cfg, flat)


MAX_CONFIG_BYTES = 1 << 24  # characters of a config file (real ones are a few KB)


def read_config_file(path) -> dict:
    """The mapping stored in a YAML or JSON config file (e.g. a run's config.json); errors name the file."""
    import json
    import os

    path = os.fspath(path)
    try:
        with open(path) as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path!r}: {e.strerror or e}") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path!r} is larger than {MAX_CONFIG_BYTES:,} characters; refused")
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"config file {path!r} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                          f"{first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys, got {type(data).__name__}")
    check_size(data, f"config file {path!r}")
    return data


def load_train_config(cfg=None, overrides: Optional[dict] = None, source=None) -> "TrainConfig":
    """A TrainConfig from None (the digits preset), a preset name, a TrainConfig, a dict or a YAML/JSON path.

    Dicts and files hold nested sections (model:, loss:, data:, sample:) or dotted keys ("model.depth"), and an
    optional `preset:` naming the base (default digits). `overrides` are dotted keys applied last.
    source: the file a dict was read from (e.g. a checkpoint's config.json), named in errors.
    """
    import os

    if cfg is None:
        base, flat = PRESETS["digits"], {}
    elif isinstance(cfg, TrainConfig):
        base, flat = cfg, {}
    elif isinstance(cfg, str) and cfg in PRESETS:
        base, flat = PRESETS[cfg], {}
    elif isinstance(cfg, (str, os.PathLike)):
        path = os.fspath(cfg)
        if not os.path.isfile(path):
            raise ConfigError(f"config {path!r} is neither a preset name {sorted(PRESETS)} nor an existing "
                              "YAML/JSON file")
        return load_train_config(read_config_file(path), overrides, source=path)
    elif isinstance(cfg, dict):
        check_size(cfg, "the config" if source is None else f"config file {str(source)!r}")
        data = dict(cfg)
        preset = data.pop("preset", None) or "digits"
        if preset not in PRESETS:
            raise ConfigError(f"preset={excerpt(preset)} is not one of {sorted(PRESETS)}"
                              + (f" (in config file {str(source)!r})" if source is not None else ""))
        base, flat = PRESETS[preset], _flatten(data)
    else:
        raise ConfigTypeError(f"cfg must be None, a preset name, a TrainConfig, a dict or a YAML path, got "
                              f"{type(cfg).__name__}")
    check_size(overrides or {}, "the overrides")
    flat = {**flat, **(overrides or {})}
    if source is None:
        return _apply(base, flat)
    try:
        return _apply(base, flat)
    except ConfigError as e:
        where = f"config file {str(source)!r}" + (" or its overrides" if overrides else "")
        raise type(e)(f"{e} (in {where})") from None


def config_to_dict(cfg) -> dict:
    """A JSON-able nested dict of a config (tuples become lists)."""
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Will it fit? Sizes that decide an allocation, against this machine, before step 0
# ----------------------------------------------------------------------------------------------------------------
BYTES_PER_PARAM = 20   # float32 weights, gradients, two Adam moments and the EMA copy
FEATURE_BYTES = 2048 * 8  # one Inception feature vector (float64), kept per evaluated sample


def memory_needed(cfg: "TrainConfig", world: int = 1) -> dict:
    """Lower bounds (bytes) of what a run holds at once on one device, by part: every term counts only tensors the
    run cannot avoid, so a refusal is never a false alarm."""
    m = cfg.model
    pixels = m.img_channels * m.img_resolution ** 2
    micro = max(1, cfg.batch_size // (cfg.grad_accum * max(1, world)))
    parts = {
        f"model state ({m.param_lower_bound():,}+ parameters x {BYTES_PER_PARAM} bytes: weights, gradients, Adam, "
        "EMA)": BYTES_PER_PARAM * m.param_lower_bound(),
        f"one micro-batch of {micro:,} (x_t, x_r, student and target outputs, float32)": 4 * 4 * micro * pixels,
        f"the sample grid of sample.num_images={cfg.sample.num_images:,} (float64)": 8 * cfg.sample.num_images * pixels,
    }
    if (cfg.final_eval or cfg.eval_every) and cfg.data.source != "digits":  # digits: a small classifier's features
        n = min(cfg.eval_num, cfg.eval_samples)
        parts[f"Inception features of {n:,} evaluated samples"] = FEATURE_BYTES * n
    return parts


def _available_bytes(device) -> Optional[int]:
    """Free memory of `device` ('cpu', 'cuda', 'cuda:N', a torch.device), or None when it cannot be read."""
    import os

    name = str(device)
    if name.startswith("cuda"):
        try:
            import torch

            return int(torch.cuda.mem_get_info(torch.device(name))[0])
        except Exception:  # no CUDA here: nothing to compare with
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(cfg: "TrainConfig", device="cpu", world: int = 1, available: Optional[int] = None) -> None:
    """Refuse, before step 0, a config whose sizes cannot fit this machine: the memory lower bounds of
    `memory_needed` against the device's free memory, and `threads` against its CPUs."""
    import os

    cpus = os.cpu_count() or 1
    if cfg.threads is not None and cfg.threads > 4 * cpus:
        raise ConfigError(f"threads={cfg.threads} is more than 4 x the {cpus} CPUs of this machine; use at most "
                          f"{cpus} (or leave it unset)")
    available = _available_bytes(device) if available is None else available
    if available is None:
        return
    parts = memory_needed(cfg, world)
    total = sum(parts.values())
    if total > available:
        biggest = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
        detail = "; ".join(f"{what}: {n / 2**30:,.2f} GiB" for what, n in biggest)
        raise ConfigError(f"this config needs at least {total / 2**30:,.2f} GiB on {device} but "
                          f"{available / 2**30:,.2f} GiB are free ({detail}); lower the sizes named")
