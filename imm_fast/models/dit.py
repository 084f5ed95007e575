"""DiT backbone (Peebles & Xie) as IMM uses it: adaLN-Zero blocks, a t-embedder plus an s-embedder, labels.

Parameter names equal the reference DiT's (x_embedder.proj, t_embedder.mlp.0, s_embedder.mlp.2,
y_embedder.embedding_table, blocks.N.attn.qkv, blocks.N.attn.proj, blocks.N.mlp.fc1/fc2,
blocks.N.adaLN_modulation.1, final_layer.linear, final_layer.adaLN_modulation.1, pos_embed), so the authors'
checkpoints load without renaming. The reference path reproduces the authors' forward op for op; the fused path
(fused=True) runs the same math through imm_fast.ops (adaLN and attention kernels), with identical state dicts.

Shapes: N batch, T tokens = (R/p)^2, C hidden, H heads, Dh = C/H head dim, p patch, R resolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .. import _backend
from .._fields import excerpt, spec
from ..errors import CheckpointError, ConfigError
from ..ops.adaln import adaln_modulate, gated_residual_adaln
from ..ops.attention import attention
from .registry import ModelConfig, declared, register

EMBEDDING_TYPES = ("positional", "fourier")  # time features of TimestepEmbedder


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """(N, Cin, R, R) image -> (N, T, C) tokens by a stride-p convolution."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, C)


class TimestepEmbedder(nn.Module):
    """Scalar time -> (N, C): sinusoidal (or Fourier) features in float64, then a 2-layer SiLU MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256, embedding_type="positional", use_mlp=True,
                 scale=1):
        super().__init__()
        self.use_mlp = use_mlp
        self.frequency_embedding_size = frequency_embedding_size
        self.embedding_type = embedding_type
        if use_mlp:
            self.mlp = nn.Sequential(
                nn.Linear(frequency_embedding_size, hidden_size, bias=True),
                nn.SiLU(),
                nn.Linear(hidden_size, hidden_size, bias=True),
            )
        if embedding_type == "fourier":
            self.register_buffer("freqs", torch.randn(frequency_embedding_size // 2) * scale)
        elif embedding_type != "positional":
            raise ValueError(f"embedding_type={embedding_type!r} is not one of {EMBEDDING_TYPES}")

    @staticmethod
    def positional_frequencies(dim, device, max_period=10000):
        """(dim // 2,) float64 frequencies, computed on the CPU (bitwise the reference) then moved once."""
        half = dim // 2
        return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device="cpu") / half).to(device)

    @staticmethod
    def positional_embedding(t, dim, max_period=10000, freqs=None):
        if freqs is None:
            freqs = TimestepEmbedder.positional_frequencies(dim, t.device, max_period)
        args = t[:, None].to(torch.float64) * freqs[None]  # (N, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb  # (N, dim) float64

    def forward(self, t):
        if self.embedding_type == "positional":
            # Cached per device: no host-to-device copy per call (CUDA graphs cannot capture one).
            key = (t.device, self.frequency_embedding_size)
            cache = self.__dict__.setdefault("_freqs_cache", {})
            if key not in cache:
                cache[key] = self.positional_frequencies(self.frequency_embedding_size, t.device)
            t_freq = self.positional_embedding(t, self.frequency_embedding_size, freqs=cache[key])
        else:
            args = t.to(torch.float64).ger(2 * np.pi * self.freqs.to(torch.float64))
            t_freq = torch.cat([args.cos(), args.sin()], dim=1)
        t_freq = t_freq.to(dtype=t.dtype)
        return self.mlp(t_freq) if self.use_mlp else t_freq


class LabelEmbedder(nn.Module):
    """Class index -> (N, C). The DiT passes num_classes + 1 so that its index num_classes is the null class."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (qkv, q_norm, k_norm, proj)."""

    def __init__(self, dim, num_heads, qkv_bias=True, qk_norm=False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, fused=False):
        qk_norm = None
        if isinstance(self.q_norm, nn.LayerNorm):
            qk_norm = (self.q_norm.weight, self.q_norm.bias, self.k_norm.weight, self.k_norm.bias)
        o = attention(self.qkv(x), self.num_heads, qk_norm=qk_norm, backend=None if fused else "torch")
        return self.proj(o)  # (N, T, C)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> dropout -> fc2 -> dropout, with timm's parameter names."""

    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += gate_msa * attn(mod(LN(x))); x += gate_mlp * mlp(mod(LN(x)))."""

    def __init__(self, hidden_size, num_heads, temb_size, mlp_ratio=4.0, qk_norm=False, dropout=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), drop=dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(temb_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """DiT for IMM: forward(x, noise_labels_t, noise_labels_s, class_labels) -> (N, Cin, R, R).

    class_labels: (N, label_dim) one-hot rows; an all-zero row (or None) is the null class. num_classes sizes
    the embedding table (num_classes + 1 rows, + 1 more if class_dropout_prob > 0); the reference DiT keeps
    num_classes=1000 whatever the label width, and so do checkpoints that come from it.
    fused: True -> adaLN and attention through imm_fast's fused ops; False -> the reference ops;
    None -> auto, resolved by imm_fast._backend.resolve_fused (fused on CUDA when triton is installed, unless
    IMM_FAST_BACKEND=torch); see there for how it ranks against TrainConfig.reference and IMM_FAST_BACKEND.
    """

    def __init__(self, img_resolution, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.0, num_classes=1000, s_embed=True, qk_norm=False,
                 embedding_kwargs=None, temb_mult=1, dropout=0.0, fused=None):
        super().__init__()
        self.in_channels = self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.fused = fused
        temb_size = hidden_size * temb_mult
        embedding_kwargs = dict(embedding_kwargs or {})
        self.s_embed = s_embed
        if s_embed:
            self.s_embedder = TimestepEmbedder(temb_size, **embedding_kwargs)
        self.x_embedder = PatchEmbed(img_resolution, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(temb_size, **embedding_kwargs)
        self.y_embedder = LabelEmbedder(num_classes + 1, temb_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, temb_size, mlp_ratio=mlp_ratio, qk_norm=qk_norm, dropout=dropout)
            for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """The reference DiT initialization (xavier linears, adaLN-Zero, zero output layer)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        grid = self.x_embedder.grid_size
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for emb in [self.t_embedder] + ([self.s_embedder] if self.s_embed else []):
            if emb.use_mlp:
                nn.init.normal_(emb.mlp[0].weight, std=0.02)
                nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.constant_(p, 0)

    def compile_regions(self, mode="regional"):
        """torch.compile in place, keeping parameter names: "regional" compiles per block (every block shares one
        graph, so a cold compile stays short), "full" the whole DiT."""
        if mode == "full":
            self.compile(dynamic=False)
        elif mode == "regional":
            fused = self.use_fused(self.pos_embed)  # the path forward takes on this module's device
            for block in self.blocks:
                if fused:  # forward_blocks_fused calls these three and never block.forward
                    for sub in (block.adaLN_modulation, block.attn, block.mlp):
                        sub.compile(dynamic=False)
                else:
                    block.compile(dynamic=False)
        else:
            raise ValueError(f"compile mode={mode!r} is not one of ('regional', 'full')")

    def unpatchify(self, x):
        """(N, T, p*p*Cout) -> (N, Cout, R, R)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def label_index(self, class_labels, n, device):
        """One-hot rows -> class ids; the all-zero row -> the null id (= the label width), as the reference does."""
        if class_labels is None:
            return torch.full((n,), self.y_embedder.num_classes - 1, dtype=torch.long, device=device)
        is_uncond = 1 - class_labels.sum(dim=1, keepdim=True)
        return torch.cat([class_labels, is_uncond], dim=1).argmax(dim=1)

    def condition(self, noise_labels_t, noise_labels_s, class_labels, n, device):
        """c = t_emb + s_emb + y_emb, (N, temb)."""
        if noise_labels_t.shape[0] == 1:
            noise_labels_t = noise_labels_t.expand(n)
        c = self.t_embedder(noise_labels_t)
        if noise_labels_s is not None and self.s_embed:
            if noise_labels_s.shape[0] == 1:
                noise_labels_s = noise_labels_s.expand(n)
            c = c + self.s_embedder(noise_labels_s)
        y = self.y_embedder(self.label_index(class_labels, n, device), self.training)
        return c + y

    def use_fused(self, x):
        """Whether forward takes the fused path for inputs like x (the resolution: _backend.resolve_fused)."""
        return _backend.resolve_fused(self.fused, x.device)

    def forward(self, x, noise_labels_t, noise_labels_s=None, class_labels=None):
        n = x.shape[0]
        fused = self.use_fused(x)
        x = self.x_embedder(x) + self.pos_embed  # (N, T, C)
        c = self.condition(noise_labels_t, noise_labels_s, class_labels, n, x.device)  # (N, C)
        if fused:
            x = self.forward_blocks_fused(x, c)
        else:
            for block in self.blocks:
                x = block(x, c)
            x = self.final_layer(x, c)  # (N, T, p*p*Cout)
        return self.unpatchify(x)

    def forward_blocks_fused(self, x, c):
        """The blocks with every boundary (gated residual + next LayerNorm + modulate) fused into one pass."""
        mods = [block.adaLN_modulation(c).chunk(6, dim=1) for block in self.blocks]  # 6 x (N, C) views each
        shift_f, scale_f = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        h = adaln_modulate(x, *(mods[0][:2] if mods else (shift_f, scale_f)))  # (N, T, C)
        for i, block in enumerate(self.blocks):
            _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[i]
            x, h = gated_residual_adaln(x, gate_msa, block.attn(h, fused=True), shift_mlp, scale_mlp)
            shift_next, scale_next = mods[i + 1][:2] if i + 1 < len(mods) else (shift_f, scale_f)
            x, h = gated_residual_adaln(x, gate_mlp, block.mlp(h), shift_next, scale_next)
        return self.final_layer.linear(h)


def sincos_pos_embed_2d(embed_dim, grid_size):
    """(grid^2, embed_dim) fixed 2-D sin-cos position embedding (MAE's layout: w coordinate first)."""
    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64))
    emb_h = _sincos_1d(embed_dim // 2, grid_w)
    emb_w = _sincos_1d(embed_dim // 2, grid_h)
    return np.concatenate([emb_h, emb_w], axis=1)


def _sincos_1d(embed_dim, pos):
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.outer(pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# ----------------------------------------------------------------------------------------------------------------
# The DiT's config section, named sizes, inference from a state dict and IMM defaults (see models/registry.py)
# ----------------------------------------------------------------------------------------------------------------
DIT_SIZES = {  # name -> (hidden_size, depth, num_heads), as in the DiT paper
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
PATCH_SIZES = (2, 4, 8)  # the DiT paper's patch sides
_HEADS = {hidden: heads for hidden, _, heads in DIT_SIZES.values()}  # head counts of the paper's widths


@register
@dataclass(frozen=True)
class DiTConfig(ModelConfig):
    name = "DiT"
    network = DiT
    alias_help = "DiT_<S|B|L|XL>_<2|4|8>"
    ignored_kwargs = ("skip",)  # accepted by the reference DiT, unused by its forward
    imm_defaults = dict(noise_schedule="fm", f_type="euler_fm", temb_type="stride", sigma_data=0.5, T=0.994,
                        eps=0.0, time_scale=1000.0)  # the paper's ImageNet-256 settings

    patch_size: int = spec(2, ge=1, cap=1024)  # DiT patch side
    hidden_size: int = spec(1152, ge=1, cap=65536)  # DiT width C
    depth: int = spec(28, ge=1, cap=1024)   # number of DiT blocks
    num_heads: int = spec(16, ge=1, cap=4096)  # attention heads H (head dim = hidden_size / num_heads)
    mlp_ratio: float = spec(4.0, gt=0, cap=256)  # MLP hidden width / hidden_size
    qk_norm: bool = False                  # LayerNorm on q and k (timm's qk_norm)
    embedding_type: str = spec("positional", choices=EMBEDDING_TYPES)  # time features: sinusoidal or Fourier
    fused: Optional[bool] = None           # fused kernels in the DiT: None = auto (CUDA with triton), True, False

    def check(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} must be divisible by "
                              f"model.num_heads={self.num_heads}")
        if self.img_resolution % self.patch_size:
            raise ConfigError(f"model.img_resolution={self.img_resolution} must be divisible by "
                              f"model.patch_size={self.patch_size}")

    def backbone_kwargs(self) -> dict:
        return dict(patch_size=self.patch_size, hidden_size=self.hidden_size, depth=self.depth,
                    num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, class_dropout_prob=self.class_dropout_prob,
                    num_classes=self.label_dim, s_embed=self.s_embed, qk_norm=self.qk_norm, dropout=self.dropout,
                    embedding_kwargs={"embedding_type": self.embedding_type}, fused=self.fused)

    @classmethod
    def network_kwargs(cls, img_resolution, img_channels, label_dim, model_kwargs) -> dict:
        # label_dim is the wrapper's: the DiT's table is sized by num_classes (1000 in the reference by default).
        kw = {k: v for k, v in model_kwargs.items() if k not in cls.ignored_kwargs}
        if isinstance(kw.get("hidden_size"), int) and isinstance(kw.get("num_heads"), int) and kw["num_heads"] > 0 \
                and kw["hidden_size"] % kw["num_heads"]:
            raise ConfigError(f"hidden_size={kw['hidden_size']} must be divisible by num_heads={kw['num_heads']}")
        return dict(img_resolution=img_resolution, in_channels=img_channels, **kw)

    @classmethod
    def variant(cls, name: str, **kw) -> "DiTConfig":
        """The config of a named DiT size, e.g. "XL/2", "B/4", "S/8"."""
        try:
            size, patch = name.split("/")
            hidden, depth, heads = DIT_SIZES[size]
            patch = int(patch)
        except (ValueError, KeyError, AttributeError):
            raise ConfigError(f"DiT name {excerpt(name)} must be one of S|B|L|XL + /2|/4|/8, e.g. 'XL/2'") from None
        return cls(patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads, **kw)

    @classmethod
    def alias(cls, model_type: str):
        parts = model_type.split("_")
        if len(parts) == 3 and parts[0] == "DiT" and parts[1] in DIT_SIZES and parts[2] in map(str, PATCH_SIZES):
            hidden, depth, heads = DIT_SIZES[parts[1]]
            return dict(patch_size=int(parts[2]), hidden_size=hidden, depth=depth, num_heads=heads)
        return None

    @classmethod
    def owns(cls, state_dict) -> bool:
        return "model.x_embedder.proj.weight" in state_dict

    @classmethod
    def min_params(cls, kw: dict) -> int:
        # Per block: qkv + proj 4C^2, MLP 2rC^2, adaLN 6C^2 (weights only, so a lower bound).
        kw = declared(cls, kw)
        return int(kw["depth"] * (10 + 2 * kw["mlp_ratio"]) * kw["hidden_size"] ** 2)

    @classmethod
    def infer(cls, state_dict, num_heads=None, source="the state dict") -> dict:
        """DiT heads: `num_heads` if given, else hidden / head_dim when qk-norm weights store head_dim, else the
        DiT paper's table for its widths; any other width needs num_heads given."""
        sd, src = state_dict, str(source)
        try:
            w = sd["model.x_embedder.proj.weight"]  # (C, Cin, p, p)
            hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
            num_patches = sd["model.pos_embed"].shape[1]
            rows = sd["model.y_embedder.embedding_table.weight"].shape[0]
        except KeyError as e:
            raise CheckpointError(f"{src!r} is not an IMM DiT state dict: it has no tensor {e.args[0]!r}") from None
        except (AttributeError, IndexError):
            raise CheckpointError(f"{src!r}: the embedder tensors have unexpected shapes") from None
        grid = int(round(num_patches ** 0.5))
        depth = len({k.split(".")[2] for k in sd if k.startswith("model.blocks.")})
        fc1 = sd.get("model.blocks.0.mlp.fc1.weight")
        mlp_hidden = fc1.shape[0] if fc1 is not None else 4 * hidden
        q_norm = sd.get("model.blocks.0.attn.q_norm.weight")
        if num_heads is None:
            if q_norm is not None and q_norm.dim() == 1 and q_norm.numel() and hidden % q_norm.numel() == 0:
                num_heads = hidden // q_norm.numel()  # LayerNorm(head_dim): unambiguous
            elif hidden in _HEADS:
                num_heads = _HEADS[hidden]
            else:
                raise CheckpointError(f"{src!r}: the number of attention heads of a width-{hidden} DiT cannot be "
                                      "read from its shapes; pass it: "
                                      "load_official(..., model_kwargs={'num_heads': H})")
        return dict(img_resolution=grid * patch, img_channels=in_ch, patch_size=patch, hidden_size=hidden,
                    depth=depth, num_heads=num_heads, mlp_ratio=mlp_hidden / hidden, num_classes=rows - 1,
                    label_dim=rows - 1, s_embed="model.s_embedder.mlp.0.weight" in sd, qk_norm=q_norm is not None)


def dit_config(name: str, **kw) -> DiTConfig:
    """ModelConfig for a named DiT size, e.g. "XL/2", "B/4", "S/8"."""
    return DiTConfig.variant(name, **kw)
