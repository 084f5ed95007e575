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
