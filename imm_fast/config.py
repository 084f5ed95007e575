"""Typed configuration of imm_fast: model, loss, data, training, sampling, and the named presets.

Every field has a trailing comment (meaning, unit). Values marked *(config)* in the spec live here with the
spec's defaults. Configs are frozen; derive variants with `dataclasses.replace` or `with_overrides`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

DIT_SIZES = {  # name -> (hidden_size, depth, num_heads), as in the DiT paper
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
NOISE_SCHEDULES = ("fm", "vp_cosine")
F_TYPES = ("euler_fm", "simple_edm", "identity")
TEMB_TYPES = ("identity", "stride")


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {tuple(allowed)}")


@dataclass(frozen=True)
class ModelConfig:
    img_resolution: int = 32          # input side length (pixels or latent cells)
    img_channels: int = 4             # input channels (4 for SD-VAE latents, 3 for RGB)
    label_dim: int = 1000             # number of classes; 0 = unconditional
    arch: str = "DiT"                 # backbone family (only DiT for now)
    patch_size: int = 2               # DiT patch side
    hidden_size: int = 1152           # DiT width C
    depth: int = 28                   # number of DiT blocks
    num_heads: int = 16               # attention heads H (head dim = hidden_size / num_heads)
    mlp_ratio: float = 4.0            # MLP hidden width / hidden_size
    qk_norm: bool = False             # LayerNorm on q and k (timm's qk_norm)
    dropout: float = 0.0              # dropout inside the MLP (shared by student and target through the RNG state)
    class_dropout_prob: float = 0.0   # label dropout inside the DiT (kept 0: IMM drops labels in the loss)
    s_embed: bool = True              # second time embedder (s or t-s)
    embedding_type: str = "positional"  # time features: "positional" (sinusoidal) or "fourier"
    noise_schedule: str = "fm"        # interpolant: "fm" (OT-FM) or "vp_cosine"
    f_type: str = "euler_fm"          # output function: "euler_fm", "simple_edm" or "identity"
    temb_type: str = "stride"         # second time input: "identity" -> s, "stride" -> t - s
    time_scale: float = 1000.0        # time inputs are multiplied by this
    sigma_data: float = 0.5           # data std sigma_d; prior noise is N(0, sigma_d^2 I)
    T: float = 0.994                  # largest time
    eps: float = 0.0                  # smallest time eps_t
    mixed_precision: Optional[str] = None  # network autocast on CUDA: None, "bf16" or "fp16"
    fused: Optional[bool] = None      # fused kernels in the DiT: None = auto (CUDA with triton), True, False

    def __post_init__(self):
        _choice("noise_schedule", self.noise_schedule, NOISE_SCHEDULES)
        _choice("f_type", self.f_type, F_TYPES)
        _choice("temb_type", self.temb_type, TEMB_TYPES)
        _choice("arch", self.arch, ("DiT",))
        _choice("embedding_type", self.embedding_type, ("positional", "fourier"))
        _choice("mixed_precision", self.mixed_precision, (None, "bf16", "fp16"))
        if self.f_type == "euler_fm" and self.noise_schedule != "fm":
            raise ValueError("f_type='euler_fm' needs noise_schedule='fm'")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.img_resolution % self.patch_size:
            raise ValueError(f"img_resolution={self.img_resolution} must be divisible by patch_size={self.patch_size}")
        if not 0.0 <= self.eps < self.T <= 1.0:
            raise ValueError(f"need 0 <= eps < T <= 1, got eps={self.eps}, T={self.T}")
        if self.label_dim < 0:
            raise ValueError(f"label_dim must be >= 0, got {self.label_dim}")


def dit_config(name: str, **kw) -> ModelConfig:
    """ModelConfig for a named DiT size, e.g. "XL/2", "B/4", "S/8"."""
    try:
        size, patch = name.split("/")
        hidden, depth, heads = DIT_SIZES[size]
        patch = int(patch)
    except (ValueError, KeyError):
        raise ValueError(f"DiT name {name!r} must be one of S|B|L|XL + /2|/4|/8, e.g. 'XL/2'") from None
    return ModelConfig(patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads, **kw)


@dataclass(frozen=True)
class LossConfig:
    group_size: int = 4               # particles per group M (batch = groups x M)
    ts_dist: str = "uniform"          # (s, t) distribution: "uniform" or "lognormal"
    lognormal_mean: float = -1.1      # mean of log eta_t (lognormal)
    lognormal_std: float = 2.0        # std of log eta_t (lognormal)
    k: int = 12                       # r(s,t) step: delta = (eta_max - eta_min) / 2^k
    a: int = 2                        # weighting exponent a in alpha_t^a (1 or 2)
    b: float = 4.0                    # weighting shift b in sigmoid(b - lambda_t)
    kernel: str = "laplace"           # MMD kernel: "laplace" or "rbf"
    kernel_eps: float = 1e-4          # clamp of the distance inside the kernel
    label_dropout: float = 0.1        # probability that a label becomes the null class (student pass)
    target_labels: str = "clean"      # target labels: "clean" (un-dropped) or "dropped"
    target_fp32: bool = True          # target pass without autocast
    backend: Optional[str] = None     # mmd_loss backend (None = auto)

    def __post_init__(self):
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        _choice("ts_dist", self.ts_dist, ("uniform", "lognormal"))
        _choice("kernel", self.kernel, ("laplace", "rbf"))
        _choice("target_labels", self.target_labels, ("clean", "dropped"))
        _choice("a", self.a, (1, 2))
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")


@dataclass(frozen=True)
class SampleConfig:
    steps: Tuple[int, ...] = (1, 2, 4, 8)  # step counts to sample at
    sampler: str = "pushforward"      # "pushforward" or "restart"
    grid: Union[str, Tuple[float, ...]] = "uniform"  # "uniform", "edm" or middle eta values
    cfg_scale: Optional[float] = None  # classifier-free guidance weight w (None = off)
    num_images: int = 64              # images per grid


def with_overrides(cfg, overrides: dict):
    """A copy of a (nested) dataclass config with dotted-key overrides, e.g. {"model.depth": 4}."""
    if not overrides:
        return cfg
    nested = {}
    flat = {}
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise ValueError(f"unknown config key {key!r} for {type(cfg).__name__}; known: {sorted(names)}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[head] = value
    for head, sub in nested.items():
        flat[head] = with_overrides(getattr(cfg, head), sub)
    return dataclasses.replace(cfg, **flat)


# ----------------------------------------------------------------------------------------------------------------
# Data, training and the named presets
# ----------------------------------------------------------------------------------------------------------------
DATA_SOURCES = ("digits", "cifar10", "folder", "array", "latents")
OPTIMIZERS = ("adamw", "radam")


@dataclass(frozen=True)
class DataConfig:
    source: str = "digits"            # "digits" (scikit-learn's 8x8), "cifar10" (python-pickle batches folder),
                                      # "folder" (images, class = subfolder), "array" (.npy/.npz), "latents" (encoded)
    path: Optional[str] = None        # dataset location (not used by "digits")
    split: str = "train"              # "train", "test" or "all" (digits: fixed 80/20 split; cifar10: batch files)
    resolution: Optional[int] = None  # "folder": resize + center-crop to this side (None = keep, all must match)
    class_conditional: bool = True    # use the labels (False: unconditional; labels are ignored)
    hflip: bool = False               # random horizontal flips (drawn from the checkpointed data generator)
    vae_path: Optional[str] = None    # "latents": a local diffusers AutoencoderKL folder to decode sample grids

    def __post_init__(self):
        _choice("source", self.source, DATA_SOURCES)
        _choice("split", self.split, ("train", "test", "all"))
        if self.source not in ("digits",) and self.path is None:
            raise ValueError(f"data.source={self.source!r} needs data.path (a file or folder)")


@dataclass(frozen=True)
class TrainConfig:
    name: str = "digits"              # preset / run family name (run folders are <out_dir>/<name>-<timestamp>)
    model: ModelConfig = field(default_factory=ModelConfig)   # network + IMM output function
    loss: LossConfig = field(default_factory=LossConfig)      # the IMM objective
    data: DataConfig = field(default_factory=DataConfig)      # the dataset
    sample: SampleConfig = field(default_factory=SampleConfig)  # sample grids and evaluation sampling
    batch_size: int = 256             # GLOBAL batch per optimizer step (all ranks, all accumulation steps)
    grad_accum: int = 1               # micro-batches per optimizer step (per rank)
    max_steps: int = 1000             # optimizer steps
    lr: float = 1e-4                  # peak learning rate
    optimizer: str = "adamw"          # "adamw" or "radam"
    betas: Tuple[float, float] = (0.9, 0.999)  # Adam betas
    weight_decay: float = 0.0         # decoupled weight decay
    warmup_steps: int = 0             # linear learning-rate warmup (steps)
    grad_clip: float = 0.0            # max global grad norm (0 = no clipping; the norm is logged either way)
    ema_decay: float = 0.9999         # EMA of the weights (evaluation only)
    ema_warmup: bool = False          # decay_eff = min(ema_decay, (1 + step) / (10 + step)) for short runs
    amp: Optional[str] = "bf16"       # student-pass autocast on CUDA (ignored on CPU): None, "bf16" or "fp16"
    seed: int = 0                     # seeds model init, data order, (s, r, t), noise, label dropout
    device: str = "auto"              # "auto" (CUDA if available), "cpu", "cuda", "cuda:N"
    threads: Optional[int] = None     # torch CPU threads (None = torch's default)
    out_dir: str = "runs"             # parent folder of run folders
    run_name: Optional[str] = None    # run folder name (None = <name>-<UTC timestamp>)
    resume: Optional[str] = None      # a run folder or checkpoint folder to continue from
    log_every: int = 10               # steps between metrics lines (loss averaged over them)
    sample_every: int = 0             # steps between sample grids (0 = only at the end)
    ckpt_every: int = 0               # steps between checkpoints (0 = only at the end)
    eval_every: int = 0               # steps between metric evaluations (0 = only at the end)
    eval_samples: int = 1000          # samples per step count for the final metrics
    eval_steps: Tuple[int, ...] = (1, 2, 4, 8)  # step counts evaluated
    final_eval: bool = True           # compute metrics at the end of training
    # Train-time FID of the EMA model (image data; imm_fast.evaluation.train_time_fid, run at eval_every/the end):
    eval_num: int = 5000              # samples per step count in eval_steps (digits use eval_samples instead)
    eval_ref: Optional[str] = None    # reference: statistics .npz (imm_fast/EDM/ADM) or a dataset; None = the
                                      # training images (latents need this set)
    inception: Optional[str] = None   # FID Inception weights file (None = $IMM_FAST_INCEPTION or the torch hub cache)
    progress: bool = True             # progress bar on rank 0
    reference: bool = False           # the plain PyTorch path (reference DiT ops, mmd_loss_ref) instead of the
                                      # fused kernels that auto picks on CUDA
    compile: Optional[str] = None     # torch.compile the DiT: None, "regional" (per block) or "full"
    tf32: bool = True                 # TF32 matmuls/convolutions on CUDA (as the authors' code sets)

    def __post_init__(self):
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("amp", self.amp, (None, "bf16", "fp16"))
        _choice("compile", self.compile, (None, "regional", "full"))
        for name in ("batch_size", "grad_accum", "max_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        M = self.loss.group_size
        if self.batch_size % (self.grad_accum * M):
            raise ValueError(f"batch_size={self.batch_size} must be divisible by grad_accum x loss.group_size = "
                             f"{self.grad_accum} x {M} (each micro-batch holds whole groups of M particles)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if isinstance(self.eval_num, bool) or not isinstance(self.eval_num, int) or self.eval_num < 2:
            raise ValueError(f"eval_num must be an int >= 2 (a covariance needs two samples), got {self.eval_num!r}")
        for name in ("eval_ref", "inception"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"{name} must be None or a path, got {v!r}")
        if self.data.source != "latents" and self.data.vae_path is not None:
            raise ValueError("data.vae_path only applies to data.source='latents'")


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
    # The paper's CIFAR-10 IMM settings on a DiT backbone (the DDPM++ UNet is not implemented yet).
    return TrainConfig(
        name="cifar10",
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
    "imagenet256": _imagenet_preset("XL"),
    "imagenet256-S": _imagenet_preset("S"),
    "imagenet256-B": _imagenet_preset("B"),
    "imagenet256-L": _imagenet_preset("L"),
}


def _flatten(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key.split(".")[-1] in ("model", "loss", "data", "sample"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _coerce(cfg, key: str, value):
    """value typed like the field it replaces: lists -> tuples, whole floats -> ints, strings checked."""
    obj = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, p):
            return value  # with_overrides reports the unknown key
        obj = getattr(obj, p)
    if not dataclasses.is_dataclass(obj) or parts[-1] not in {f.name for f in dataclasses.fields(obj)}:
        return value
    cur = getattr(obj, parts[-1])
    if isinstance(value, list):
        value = tuple(value)
    if value is None or cur is None:
        return value
    if isinstance(cur, bool):
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if isinstance(value, str) and isinstance(cur, (int, float)) and not isinstance(cur, bool):
        try:  # YAML 1.1 reads "1e-3" as a string
            value = float(value)
        except ValueError:
            raise ValueError(f"config key {key!r} must be a number, got {value!r}") from None
    if isinstance(cur, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(cur, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(cur, (int, float)) and not isinstance(value, (int, float)):
        raise ValueError(f"config key {key!r} must be a number, got {value!r}")
    return value


def _apply(cfg: "TrainConfig", flat: dict) -> "TrainConfig":
    flat = {k: _coerce(cfg, k, v) for k, v in flat.items()}
    # Apply nested keys first so that cross-field checks of TrainConfig see the final sub-configs together.
    return with_overrides(cfg, flat)


def load_train_config(cfg=None, overrides: Optional[dict] = None) -> "TrainConfig":
    """A TrainConfig from None (the digits preset), a preset name, a TrainConfig, a dict or a YAML/JSON path.

    Dicts and files hold nested sections (model:, loss:, data:, sample:) or dotted keys ("model.depth"), and an
    optional `preset:` naming the base (default digits). `overrides` are dotted keys applied last.
    """
    import json
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
            raise ValueError(f"config {path!r} is neither a preset name {sorted(PRESETS)} nor an existing "
                             "YAML/JSON file")
        with open(path) as f:
            text = f.read()
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(f"config file {path!r} must hold a mapping of keys, got {type(data).__name__}")
        return load_train_config(data, overrides)
    elif isinstance(cfg, dict):
        data = dict(cfg)
        preset = data.pop("preset", None) or "digits"
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r} is not one of {sorted(PRESETS)}")
        base, flat = PRESETS[preset], _flatten(data)
    else:
        raise TypeError(f"cfg must be None, a preset name, a TrainConfig, a dict or a YAML path, got "
                        f"{type(cfg).__name__}")
    flat = {**flat, **(overrides or {})}
    return _apply(base, flat)


def config_to_dict(cfg) -> dict:
    """A JSON-able nested dict of a config (tuples become lists)."""
    return dataclasses.asdict(cfg)
