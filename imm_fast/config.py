"""Typed configuration of imm_fast: model, loss, data, training, sampling, and the named presets.

Every field has a trailing comment (meaning, unit). Values marked *(config)* in the spec live here with the
spec's defaults. Configs are frozen; derive variants with `dataclasses.replace` or `with_overrides`.

Every field is checked when a config is built, so a typo fails before step 0: its type comes from the annotation
(bools are bools, ints are not floats, numbers are finite, tuples have their length; lists become tuples and ints
become floats where a float is declared), its range and choices from `spec(default, ...)` beside it. Errors are
`ConfigError`s (ValueError; `ConfigTypeError` is also a TypeError) naming the dotted key, the bad value and what is
allowed, e.g. "sample.sampler='restrat' is not one of ('pushforward', 'restart')". Adding a checked field is one
line: `my_field: int = spec(4, ge=1)   # meaning (unit)`.

The lists of choices below are declared once; the code that implements each choice imports its list from here.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Tuple, Union

from .errors import ConfigError, ConfigTypeError

# ----------------------------------------------------------------------------------------------------------------
# Choices (one list each, used by the configs and by the code that implements them)
# ----------------------------------------------------------------------------------------------------------------
DIT_SIZES = {  # name -> (hidden_size, depth, num_heads), as in the DiT paper
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
MODEL_TYPES = ("DiT", "SongUNet", "DhariwalUNet")  # backbones, as the authors name their classes (models/)
NOISE_SCHEDULES = ("fm", "vp_cosine")             # interpolants (schedule.py)
F_TYPES = ("euler_fm", "simple_edm", "identity")  # output functions (models/imm.py, schedule.c_skip_out)
TEMB_TYPES = ("identity", "stride")               # second time input of the backbone: s or t - s
EMBEDDING_TYPES = ("positional", "fourier")       # time features of the backbone
ENCODER_TYPES = ("standard", "skip", "residual")  # SongUNet encoders (DDPM++: standard; NCSN++: residual)
DECODER_TYPES = ("standard", "skip")              # SongUNet decoders
PRECISIONS = (None, "bf16", "fp16")               # autocast dtypes: ModelConfig.mixed_precision, TrainConfig.amp
TS_DISTS = ("uniform", "lognormal")               # (s, t) distributions of the loss
KERNELS = ("laplace", "rbf")                      # MMD kernels
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


def _mmd_backends():
    from ._backend import BACKENDS  # looked up when a backend is named: the registry owns the list

    return BACKENDS


# ----------------------------------------------------------------------------------------------------------------
# Declarative field checks
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """What a field allows beyond its annotated type. Ranges apply to every number (each entry of a tuple);
    choices to a single value (a callable returning the tuple is looked up when checked); `check(value)` returns
    a problem ("must ...") or None."""

    choices: Any = None
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    min_len: Optional[int] = None
    check: Optional[Callable[[Any], Optional[str]]] = None

    def range_text(self) -> str:
        lo = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        hi = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return (">= " if lo[0] == "[" else "> ") + lo[1:]
        if hi:
            return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
        return ""

    def in_range(self, v) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))


def spec(default, *, choices=None, ge=None, gt=None, le=None, lt=None, min_len=None, check=None):
    """A dataclass field with its checks: `depth: int = spec(28, ge=1)  # number of DiT blocks`."""
    rule = Rule(choices=choices, ge=ge, gt=gt, le=le, lt=lt, min_len=min_len, check=check)
    return field(default=default, metadata={"rule": rule})


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _key(cls, name: str, prefix: Optional[str] = None) -> str:
    prefix = getattr(cls, "_section", "") if prefix is None else prefix
    return f"{prefix}.{name}" if prefix else name


_NOUNS = {bool: ("true or false", "booleans"), int: ("an int", "ints"), float: ("a number", "numbers"),
          str: ("a string", "strings")}


def _describe(hint, plural=False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "None"
    if origin is Union:
        return " or ".join(_describe(a, plural) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0], True)}"
        if len(set(args)) == 1:
            return f"a list of {len(args)} {_describe(args[0], True)}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if hint in _NOUNS:
        return _NOUNS[hint][plural]
    name = getattr(hint, "__name__", str(hint))
    if dataclasses.is_dataclass(hint):
        return f"{name}s" if plural else f"a {name} (a mapping of its keys)"
    return name


def _match(v, hint):
    """(True, v normalized) if v has the type `hint` (lists -> tuples, ints -> floats), else (False, None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True, v
    if hint is type(None):
        return v is None, v
    if origin is Union:
        for a in args:
            ok, out = _match(v, a)
            if ok:
                return True, out
        return False, None
    if origin is tuple:
        if not isinstance(v, (tuple, list)):
            return False, None
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(v)
        elif len(v) != len(args):
            return False, None
        out = []
        for x, a in zip(v, args):
            ok, y = _match(x, a)
            if not ok:
                return False, None
            out.append(y)
        return True, tuple(out)
    if hint is bool:
        return isinstance(v, bool), v
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool), v
    if hint is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        return ok, (float(v) if ok else None)
    return isinstance(v, hint), v


def check_value(key: str, value, hint, rule: Optional[Rule] = None):
    """`value` normalized to `hint`, or a ConfigError naming `key`, the value and what is allowed."""
    ok, value_n = _match(value, hint)
    if not ok:
        raise ConfigTypeError(f"{key}={value!r} must be {_describe(hint)}, got {type(value).__name__}")
    value = value_n
    if value is None:
        return value
    rule = rule or Rule()
    if rule.choices is not None and not isinstance(value, tuple):
        allowed = tuple(rule.choices() if callable(rule.choices) else rule.choices)
        if value not in allowed:
            others = [a for a in typing.get_args(hint) if not isinstance(value, typing.get_origin(a) or a)
                      and not (a is type(None) and None in allowed)]
            extra = f" (or {' or '.join(map(_describe, others))})" if others else ""
            raise ConfigError(f"{key}={value!r} is not one of {allowed}{extra}")
    if isinstance(value, tuple) and rule.min_len is not None and len(value) < rule.min_len:
        raise ConfigError(f"{key}={list(value)!r} must hold at least {rule.min_len} value(s)")
    leaves = value if isinstance(value, tuple) else (value,)
    for v in leaves:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        what = rule.range_text()
        entry = f"every entry of {key} must be" if isinstance(value, tuple) else "must be"
        shown = list(value) if isinstance(value, tuple) else value
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}={shown!r}: {entry} a finite number" + (f" {what}" if what else ""))
        if not rule.in_range(v):
            raise ConfigError(f"{key}={shown!r} is out of range: {entry} {what}")
    if rule.check is not None:
        problem = rule.check(value)
        if problem:
            raise ConfigError(f"{key}={list(value) if isinstance(value, tuple) else value!r} {problem}")
    return value


def check_fields(cls, values: dict, prefix: Optional[str] = None) -> dict:
    """`values` (a subset of cls's fields) checked by cls's rules and normalized; keys named with `prefix`
    (default: the class's section, e.g. "model"). Models built from stored kwargs use this too."""
    hints, fields = _hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    return {name: check_value(_key(cls, name, prefix), v, hints[name], fields[name].metadata.get("rule"))
            if name in fields else v for name, v in values.items()}


def _validate(obj) -> None:
    """Check (and normalize in place) every field of a frozen config dataclass."""
    cls = type(obj)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        new = check_value(_key(cls, f.name), value, hints[f.name], f.metadata.get("rule"))
        if new is not value:
            object.__setattr__(obj, f.name, new)


def _nonempty(v) -> Optional[str]:
    return None if v.strip() else "must not be empty"


def _plain_name(v) -> Optional[str]:
    if not v.strip() or v in (".", "..") or "/" in v or "\\" in v:
        return "must be a plain folder name (no '/', not '.' or '..')"
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


def check_imm_settings(v: dict, prefix: str = "") -> None:
    """Rules between the IMM wrapper's settings (a dict with f_type, noise_schedule, eps, T), shared by ModelConfig
    and the IMM model built from stored kwargs."""
    k = (lambda name: f"{prefix}.{name}" if prefix else name)
    if v["f_type"] == "euler_fm" and v["noise_schedule"] != "fm":
        raise ConfigError(f"{k('f_type')}='euler_fm' needs {k('noise_schedule')}='fm', got {v['noise_schedule']!r}")
    if not v["eps"] < v["T"]:
        raise ConfigError(f"{k('eps')}={v['eps']!r} must be < {k('T')}={v['T']!r} (times run from T down to eps)")


# ----------------------------------------------------------------------------------------------------------------
# Model, loss and sampling
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    _section = "model"  # the dotted prefix of this section's keys in a TrainConfig

    img_resolution: int = spec(32, ge=1)   # input side length (pixels or latent cells)
    img_channels: int = spec(4, ge=1)      # input channels (4 for SD-VAE latents, 3 for RGB)
    label_dim: int = spec(1000, ge=0)      # number of classes; 0 = unconditional
    model_type: str = spec("DiT", choices=MODEL_TYPES)  # backbone, the authors' class name: "DiT", "SongUNet"
                                           # (DDPM++/NCSN++) or "DhariwalUNet" (ADM); the DiT fields: "DiT" only
    patch_size: int = spec(2, ge=1)        # DiT patch side
    hidden_size: int = spec(1152, ge=1)    # DiT width C
    depth: int = spec(28, ge=1)            # number of DiT blocks
    num_heads: int = spec(16, ge=1)        # attention heads H (head dim = hidden_size / num_heads)
    mlp_ratio: float = spec(4.0, gt=0)     # MLP hidden width / hidden_size
    qk_norm: bool = False                  # LayerNorm on q and k (timm's qk_norm)
    dropout: float = spec(0.0, ge=0, lt=1)  # dropout in the DiT MLP / UNet blocks (shared by student and target
                                           # through the RNG state)
    class_dropout_prob: float = spec(0.0, ge=0, lt=1)  # label dropout inside the backbone (kept 0: IMM drops
                                           # labels in the loss)
    s_embed: bool = True                   # second time embedder (s or t-s)
    embedding_type: str = spec("positional", choices=EMBEDDING_TYPES)  # time features: sinusoidal or Fourier
    noise_schedule: str = spec("fm", choices=NOISE_SCHEDULES)  # interpolant: "fm" (OT-FM) or "vp_cosine"
    f_type: str = spec("euler_fm", choices=F_TYPES)  # output function: "euler_fm", "simple_edm" or "identity"
    temb_type: str = spec("stride", choices=TEMB_TYPES)  # second time input: "identity" -> s, "stride" -> t - s
    time_scale: float = spec(1000.0, gt=0)  # time inputs are multiplied by this
    sigma_data: float = spec(0.5, gt=0)    # data std sigma_d; prior noise is N(0, sigma_d^2 I)
    T: float = spec(0.994, gt=0, le=1)     # largest time
    eps: float = spec(0.0, ge=0, lt=1)     # smallest time eps_t (< T)
    mixed_precision: Optional[str] = spec(None, choices=PRECISIONS)  # network autocast on CUDA: None, bf16, fp16
    fused: Optional[bool] = None           # fused kernels in the DiT: None = auto (CUDA with triton), True, False
    # UNet fields ("SongUNet"/"DhariwalUNet"; the authors' names and their CIFAR-10 DDPM++ values as defaults).
    # dropout, s_embed, embedding_type and class_dropout_prob (-> the UNet's label_dropout) are shared with the DiT.
    model_channels: int = spec(128, ge=1)  # base width (channels at multiplier 1)
    channel_mult: Tuple[int, ...] = spec((2, 2, 2), ge=1, min_len=1)  # width multiplier per resolution level (one
                                           # 2x downsample per level)
    channel_mult_emb: int = spec(4, ge=1)  # embedding width = model_channels x this
    channel_mult_noise: int = spec(1, ge=1)  # SongUNet time-feature width = model_channels x this (2 for NCSN++)
    num_blocks: int = spec(4, ge=1)        # residual blocks per level
    attn_resolutions: Tuple[int, ...] = spec((16,), ge=1)  # resolutions (pixels) with self-attention
    encoder_type: str = spec("standard", choices=ENCODER_TYPES)  # SongUNet encoder: "standard" (DDPM++), "skip" or
                                           # "residual" (NCSN++)
    decoder_type: str = spec("standard", choices=DECODER_TYPES)  # SongUNet decoder: "standard" or "skip"
    resample_filter: Tuple[int, ...] = spec((1, 1), ge=1, min_len=1)  # SongUNet up/down FIR: (1, 1) DDPM++,
                                           # (1, 3, 3, 1) NCSN++
    channels_last: bool = True             # UNet activations and conv weights channels_last on CUDA (layout only)

    def __post_init__(self):
        _validate(self)
        check_imm_settings(dataclasses.asdict(self), self._section)
        if self.model_type != "DiT":
            self._check_unet()
        elif self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} must be divisible by "
                              f"model.num_heads={self.num_heads}")
        elif self.img_resolution % self.patch_size:
            raise ConfigError(f"model.img_resolution={self.img_resolution} must be divisible by "
                              f"model.patch_size={self.patch_size}")

    def _check_unet(self):
        """Rules between the UNet fields (types, ranges and choices are the fields' own specs)."""
        levels = 1 << (len(self.channel_mult) - 1)
        if self.img_resolution % levels:
            raise ConfigError(f"model.img_resolution={self.img_resolution} must be divisible by 2^(len(model."
                              f"channel_mult) - 1) = {levels}")
        ks = {1, *self.channel_mult}
        for c in sorted({self.model_channels * k for k in ks | {a + b for a in ks for b in ks}}):
            if c < 4 or c % min(32, c // 4):  # the UNet's GroupNorm uses min(32, C // 4) groups
                raise ConfigError(f"model.model_channels={self.model_channels} with model.channel_mult="
                                  f"{list(self.channel_mult)} gives a {c}-channel layer that GroupNorm(min(32, C // 4) "
                                  "groups) cannot split evenly")
        if self.model_type == "DhariwalUNet" and self.embedding_type != "positional":
            raise ConfigError(f"model.embedding_type={self.embedding_type!r}: model_type='DhariwalUNet' has "
                              "positional time features only")


def dit_config(name: str, **kw) -> ModelConfig:
    """ModelConfig for a named DiT size, e.g. "XL/2", "B/4", "S/8"."""
    try:
        size, patch = name.split("/")
        hidden, depth, heads = DIT_SIZES[size]
        patch = int(patch)
    except (ValueError, KeyError):
        raise ConfigError(f"DiT name {name!r} must be one of S|B|L|XL + /2|/4|/8, e.g. 'XL/2'") from None
    return ModelConfig(patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads, **kw)


@dataclass(frozen=True)
class LossConfig:
    _section = "loss"

    group_size: int = spec(4, ge=1)        # particles per group M (batch = groups x M)
    ts_dist: str = spec("uniform", choices=TS_DISTS)  # (s, t) distribution: "uniform" or "lognormal"
    lognormal_mean: float = -1.1           # mean of log eta_t (lognormal)
    lognormal_std: float = spec(2.0, gt=0)  # std of log eta_t (lognormal)
    k: int = spec(12, ge=0)                # r(s,t) step: delta = (eta_max - eta_min) / 2^k
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

    steps: Tuple[int, ...] = spec((1, 2, 4, 8), ge=1, min_len=1)  # step counts to sample at
    sampler: str = spec("pushforward", choices=SAMPLERS)  # "pushforward" or "restart"
    grid: Union[str, Tuple[float, ...]] = spec("uniform", choices=GRIDS, gt=0, min_len=1, check=_grid)
                                           # "uniform", "edm" or middle eta values (decreasing, in the model's range)
    cfg_scale: Optional[float] = spec(None, ge=0)  # classifier-free guidance weight w (None = off)
    num_images: int = spec(64, ge=1)       # images per grid

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
    nested = {}
    flat = {}
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise ConfigError(f"unknown config key {_prefix + key!r} for {type(cfg).__name__}; known: {sorted(names)}")
        if rest:
            if not dataclasses.is_dataclass(getattr(cfg, head)):
                raise ConfigError(f"unknown config key {_prefix + key!r}: {_prefix + head} is a value, not a section")
            nested.setdefault(head, {})[rest] = value
        else:
            flat[head] = value
    for head, sub in nested.items():
        flat[head] = with_overrides(getattr(cfg, head), sub, f"{_prefix}{head}.")
    return dataclasses.replace(cfg, **flat)


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

    name: str = spec("digits", check=_nonempty)  # preset / run family name (run folders are <out_dir>/<name>-<time>)
    model: ModelConfig = field(default_factory=ModelConfig)   # network + IMM output function
    loss: LossConfig = field(default_factory=LossConfig)      # the IMM objective
    data: DataConfig = field(default_factory=DataConfig)      # the dataset
    sample: SampleConfig = field(default_factory=SampleConfig)  # sample grids and evaluation sampling
    log: LogConfig = field(default_factory=LogConfig)         # optional TensorBoard / W&B logging
    batch_size: int = spec(256, ge=1)  # GLOBAL batch per optimizer step (all ranks, all accumulation steps)
    grad_accum: int = spec(1, ge=1)   # micro-batches per optimizer step (per rank)
    max_steps: int = spec(1000, ge=1)  # optimizer steps
    lr: float = spec(1e-4, gt=0)      # peak learning rate
    optimizer: str = spec("adamw", choices=OPTIMIZERS)  # "adamw" or "radam"
    betas: Tuple[float, float] = spec((0.9, 0.999), ge=0, lt=1)  # Adam betas
    weight_decay: float = spec(0.0, ge=0)  # decoupled weight decay
    warmup_steps: int = spec(0, ge=0)  # linear learning-rate warmup (steps)
    grad_clip: float = spec(0.0, ge=0)  # max global grad norm (0 = no clipping; the norm is logged either way)
    max_nonfinite_steps: int = spec(3, ge=1)  # consecutive skipped steps (non-finite loss or grad norm) before the
                                      # run stops with an error
    ema_decay: float = spec(0.9999, ge=0, lt=1)  # EMA of the weights (evaluation only)
    ema_warmup: bool = False          # decay_eff = min(ema_decay, (1 + step) / (10 + step)) for short runs
    amp: Optional[str] = spec("bf16", choices=PRECISIONS)  # student-pass autocast on CUDA (ignored on CPU)
    seed: int = spec(0, ge=0, le=SEED_MAX)  # seeds model init, data order, (s, r, t), noise, label dropout
    device: str = spec("auto", check=_device)  # "auto" (CUDA if available), "cpu", "cuda", "cuda:N"
    threads: Optional[int] = spec(None, ge=1)  # torch CPU threads (None = 1 on the CPU unless OMP_NUM_THREADS is
                                      # set: a busy core stalls every multi-threaded step; benchmarks/RESULTS.md)
    out_dir: str = spec("runs", check=_nonempty)  # parent folder of run folders
    run_name: Optional[str] = spec(None, check=_plain_name)  # run folder name (None = <name>-<UTC timestamp>)
    resume: Optional[str] = spec(None, check=_nonempty)  # a run folder or checkpoint folder to continue from
    log_every: int = spec(10, ge=1)   # steps between metrics lines (loss averaged over them)
    sample_every: int = spec(0, ge=0)  # steps between sample grids (0 = only at the end)
    ckpt_every: int = spec(0, ge=0)   # steps between checkpoints (0 = only at the end)
    sigusr1: str = spec("save", choices=("save", "exit"))  # on SIGUSR1: save a checkpoint and carry on, or save
                                      # and exit like SIGTERM (SIGTERM/SIGINT always save and exit)
    eval_every: int = spec(0, ge=0)   # steps between metric evaluations (0 = only at the end)
    eval_samples: int = spec(1000, ge=1)  # samples per step count for the final metrics
    eval_steps: Tuple[int, ...] = spec((1, 2, 4, 8), ge=1, min_len=1)  # step counts evaluated
    final_eval: bool = True           # compute metrics at the end of training
    # Train-time FID of the EMA model (image data; imm_fast.evaluation.train_time_fid, run at eval_every/the end):
    eval_num: int = spec(5000, ge=2)  # samples per step count in eval_steps (digits use eval_samples instead; a
                                      # covariance needs two)
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
        M = self.loss.group_size
        if self.batch_size % (self.grad_accum * M):
            raise ConfigError(f"batch_size={self.batch_size} must be divisible by grad_accum x loss.group_size = "
                              f"{self.grad_accum} x {M} (each micro-batch holds whole groups of M particles)")
        if self.data.source != "latents" and self.data.vae_path is not None:
            raise ConfigError(f"data.vae_path={self.data.vae_path!r} only applies to data.source='latents', got "
                              f"data.source={self.data.source!r}")
        if isinstance(self.sample.grid, tuple):
            from .schedule import eta_bounds

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
        ema_decay=0.9999, sample_every=5000, ckpt_every=10_000, eval_samples=50_000, eval_steps=(1, 2))


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
        eval_samples=50_000)


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
        ckpt_every=10_000, eval_samples=50_000)


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


def _apply(cfg: "TrainConfig", flat: dict) -> "TrainConfig":
    if "model.arch" in flat:  # run configs saved before model_type replaced arch (then always "DiT")
        flat = dict(flat)
        flat.setdefault("model.model_type", flat.pop("model.arch"))
    flat = {k: _coerce(cfg, k, v) for k, v in flat.items()}
    # Apply nested keys first so that cross-field checks of TrainConfig see the final sub-configs together.
    return with_overrides(cfg, flat)


def read_config_file(path) -> dict:
    """The mapping stored in a YAML or JSON config file (e.g. a run's config.json); errors name the file."""
    import json
    import os

    path = os.fspath(path)
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path!r}: {e.strerror or e}") from None
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
        data = dict(cfg)
        preset = data.pop("preset", None) or "digits"
        if preset not in PRESETS:
            raise ConfigError(f"preset={preset!r} is not one of {sorted(PRESETS)}"
                              + (f" (in config file {str(source)!r})" if source is not None else ""))
        base, flat = PRESETS[preset], _flatten(data)
    else:
        raise ConfigTypeError(f"cfg must be None, a preset name, a TrainConfig, a dict or a YAML path, got "
                              f"{type(cfg).__name__}")
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
