"""UNet backbones as IMM uses them: SongUNet (DDPM++ / NCSN++, Song et al. 2021) and DhariwalUNet (ADM, Dhariwal &
Nichol 2021), in the EDM formulation (Karras et al. 2022) with IMM's second time embedding (s_embed).

Parameter names equal the authors' (lumalabs/imm training/unets.py: map_noise, map_layer0/1, map_layer0_s/1_s,
map_label, map_augment, enc.<R>x<R>_conv|_down|_block<i>|_aux_*, dec.<R>x<R>_in0|_in1|_up|_block<i>|_aux_*,
out_norm/out_conv; inside a block norm0, conv0, affine, norm1, conv1, skip, norm2, qkv, proj; Conv2d's
resample_filter buffer), so their cifar10.pkl loads without renaming. The forward reproduces theirs op for op,
including its dtypes: the positional time features are float64 (float32 times an arange of float64 frequencies),
so the whole mapping network and every block's `affine` run in float64 and are cast to the activation dtype
inside the block. Under bf16 autocast that path stays float64 (autocast leaves float64 alone), as theirs does.

Second time embedding (their wiring, which differs from EDM's mapping network):
  SongUNet:     emb = map_layer1(silu(map_layer0(swap(map_noise(t)) [+ map_label(y sqrt(label_dim))] [+ aug])))
                emb += map_layer1_s(silu(map_layer0_s(swap(map_noise_s(s)))))   (own embedder, own weights)
                emb = silu(emb)
  DhariwalUNet: emb = map_layer1(silu(map_layer0(map_noise(t) [+ aug]))) [+ map_label(y)]
                emb += map_layer1_s(silu(map_layer0_s(map_noise(s))))           (map_noise_s IS map_noise)
                emb = silu(emb)
swap() exchanges the cos and sin halves. The s branch runs only when s_embed and noise_labels_s is given.

On CUDA the convolution weights and activations are kept channels_last (channels_last=True, the default); this
changes memory layout only, never parameter names or values.

Shapes: N batch, C channels, R resolution (R >> level per level), E = model_channels * channel_mult_emb.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.functional import silu

from .._fields import spec
from ..errors import CheckpointError, ConfigError
from .registry import ModelConfig, declared, register

__all__ = ["SongUNet", "DhariwalUNet", "UNetBlock", "Conv2d", "Linear", "GroupNorm", "PositionalEmbedding",
           "FourierEmbedding", "SongUNetConfig", "DhariwalUNetConfig", "infer_unet_kwargs"]

ENCODER_TYPES = ("standard", "skip", "residual")  # SongUNet encoders (DDPM++: standard; NCSN++: residual)
DECODER_TYPES = ("standard", "skip")              # SongUNet decoders
EMBEDDING_TYPES = ("positional", "fourier")       # SongUNet time features (DhariwalUNet: positional only)


def weight_init(shape, mode, fan_in, fan_out):
    """EDM's initializers: xavier/kaiming, uniform/normal, as functions of fan_in and fan_out."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"init_mode={mode!r} is not one of ('xavier_uniform', 'xavier_normal', 'kaiming_uniform', "
                     "'kaiming_normal')")


class Linear(nn.Module):
    """y = x W^T + b with W cast to x's dtype (so a float64 time embedding stays float64)."""

    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype))
        return x


class Conv2d(nn.Module):
    """kernel x kernel convolution (kernel 0: resampling only) with optional 2x up/down-sampling by the separable
    FIR `resample_filter` ([1,1]: box, [1,3,3,1]: NCSN++'s); fused_resample does the conv and resampling in one
    strided (transposed) conv, as the residual encoder's aux path does."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
                 fused_resample=False, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        if up and down:
            raise ValueError("Conv2d: up and down cannot both be set")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
                       if kernel else None)
        self.bias = nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()  # (1, 1, k, k), sums to 1
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                                   padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:  # depthwise transposed conv with 4 f: zero-insertion upsampling, then the filter
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:  # depthwise strided conv with f: filter, then decimation
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                             padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x


class GroupNorm(nn.Module):
    """GroupNorm with min(num_groups, C / min_channels_per_group) groups (EDM's rule for narrow layers)."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1 or num_channels % self.num_groups:
            raise ValueError(f"GroupNorm: num_channels={num_channels} cannot be split into "
                             f"min({num_groups}, {num_channels} // {min_channels_per_group}) = {self.num_groups} "
                             "equal groups; use channel counts that are multiples of 4 (and of 32 above 128)")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype),
                            eps=self.eps)


def attention_weights(q, k):
    """softmax_k(q^T k / sqrt(c)) in float32, returned in q's dtype. q, k: (N*heads, c, HW) -> (N*heads, HW, HW)."""
    k = k / math.sqrt(k.shape[1])
    return torch.einsum("ncq,nck->nqk", q.to(torch.float32), k.to(torch.float32)).softmax(dim=2).to(q.dtype)


class UNetBlock(nn.Module):
    """Residual block shared by DDPM++, NCSN++ and ADM: GN-SiLU-conv, time conditioning (additive, or
    scale/shift with adaptive_scale), GN-SiLU-dropout-conv, skip, optional single- or multi-head self-attention."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0.0, skip_scale=1.0, eps=1e-5, resample_filter=(1, 1),
                 resample_proj=False, adaptive_scale=True, init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero) if init_zero is not None else dict(init_weight=0)
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = (0 if not attention else num_heads if num_heads is not None
                          else out_channels // channels_per_head)
        self.dropout = dropout
        self.skip_scale = float(skip_scale)
        self.adaptive_scale = adaptive_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter,
                            **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            if out_channels % self.num_heads:
                raise ValueError(f"UNetBlock: out_channels={out_channels} is not divisible by "
                                 f"num_heads={self.num_heads}")
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x                                                                 # (N, Cin, R, R)
        x = self.conv0(silu(self.norm0(x)))                                      # (N, C, R', R')
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)          # (N|1, C or 2C, 1, 1)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x.add_(params)))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale
        if self.num_heads:
            n, c = x.shape[0], x.shape[1]
            # Channel layout of qkv: (heads, c / heads, 3), as the authors' reshape reads it.
            q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            w = attention_weights(q, k)                                          # (N*heads, HW, HW)
            a = torch.einsum("nqk,nck->ncq", w, v)                               # (N*heads, c/heads, HW)
            x = self.proj(a.reshape(*x.shape)).add_(x)
            x = x * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """t -> [cos(t f_i), sin(t f_i)], f_i = (1/max_positions)^(i / (C/2 - endpoint)), in float64 (N, C)."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float64, device=x.device)
        freqs = (1 / self.max_positions) ** (freqs / (half - (1 if self.endpoint else 0)))
        x = x.ger(freqs)  # float32 x float64 -> float64, as the authors' (their .to(x.dtype) keeps float64)
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """t -> [cos(2 pi t f_i), sin(2 pi t f_i)] with random f_i ~ N(0, scale^2) (NCSN++). IMM's default scale is
    0.02 (EDM's is 16); the stored freqs buffer decides for a loaded checkpoint."""

    def __init__(self, num_channels, scale=0.02, learnable=False, **kwargs):
        super().__init__()
        if learnable:
            self.freqs = nn.Parameter(torch.randn(num_channels // 2) * scale)
        else:
            self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.ger(2 * math.pi * self.freqs)
        return torch.cat([x.cos(), x.sin()], dim=1).to(x.dtype)


def _swap_halves(emb):
    """(N, C): [cos | sin] -> [sin | cos] (DDPM++'s order)."""
    return emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)


class _UNetBase(nn.Module):
    """What both UNets share: the encoder/decoder walk, channels_last on CUDA, regional compile."""

    channels_last = True

    def _apply(self, fn, *args, **kwargs):
        # After .to(device)/.cuda(): keep 4-D weights channels_last on CUDA (layout only; names/values unchanged).
        out = super()._apply(fn, *args, **kwargs)
        if self.channels_last:
            for p in self.parameters():
                if p.dim() == 4 and p.is_cuda and not p.is_contiguous(memory_format=torch.channels_last):
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
        return out

    def _input_layout(self, x):
        if self.channels_last and x.is_cuda and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def blocks(self):
        """Every UNetBlock, encoder then decoder."""
        return [m for m in list(self.enc.values()) + list(self.dec.values()) if isinstance(m, UNetBlock)]

    def compile_regions(self, mode="regional"):
        """torch.compile in place, keeping parameter names: "regional" compiles each UNetBlock (blocks of equal
        shapes share a graph; the ~10-20 distinct block shapes each compile once), "full" the whole UNet."""
        if mode == "full":
            self.compile(dynamic=False)
        elif mode == "regional":
            import torch._dynamo

            # One code object (UNetBlock.forward) serves every block shape: allow a graph per distinct shape.
            cfg = torch._dynamo.config
            name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
            setattr(cfg, name, max(getattr(cfg, name), 64))
            for block in self.blocks():
                block.compile(dynamic=False)
        else:
            raise ValueError(f"compile mode={mode!r} is not one of ('regional', 'full')")

    @staticmethod
    def _time_features(map_noise, noise_labels, swap):
        emb = map_noise(noise_labels)
        return _swap_halves(emb) if swap else emb


def _check_common(img_resolution, in_channels, out_channels, label_dim, augment_dim, model_channels, channel_mult,
                  num_blocks, dropout):
    for name, v in (("img_resolution", img_resolution), ("in_channels", in_channels),
                    ("out_channels", out_channels), ("model_channels", model_channels), ("num_blocks", num_blocks)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    for name, v in (("label_dim", label_dim), ("augment_dim", augment_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    mult = list(channel_mult)
    if not mult or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mult):
        raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {channel_mult!r}")
    if img_resolution % (1 << (len(mult) - 1)):
        raise ValueError(f"img_resolution={img_resolution} must be divisible by 2^(len(channel_mult) - 1) = "
                         f"{1 << (len(mult) - 1)} (one 2x downsampling per level)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return mult


class SongUNet(_UNetBase):
    """DDPM++ (embedding_type='positional', encoder 'standard', resample [1,1]) and NCSN++ ('fourier',
    'residual', [1,3,3,1], channel_mult_noise 2) with IMM's s embedding.

    forward(x, noise_labels_t, noise_labels_s=None, class_labels=None, augment_labels=None) -> (N, out, R, R);
    noise labels are (N,) or (1,) (broadcast); class_labels (N, label_dim) float rows. Defaults are the authors'
    (training/unets.py); the paper's CIFAR-10 model uses model_channels=128, channel_mult=[2,2,2], dropout=0.2.
    share_tsemb and unknown keywords are accepted and ignored, as the authors' class does.
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=128,
                 channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10,
                 label_dropout=0, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                 decoder_type="standard", resample_filter=(1, 1), s_embed=True, share_tsemb=True,
                 embedding_kwargs=None, channels_last=True, **kwargs):
        for name, v, allowed in (("embedding_type", embedding_type, EMBEDDING_TYPES),
                                 ("encoder_type", encoder_type, ENCODER_TYPES),
                                 ("decoder_type", decoder_type, DECODER_TYPES)):
            if v not in allowed:
                raise ValueError(f"SongUNet: {name}={v!r} is not one of {allowed}")
        mult = _check_common(img_resolution, in_channels, out_channels, label_dim, augment_dim, model_channels,
                             channel_mult, num_blocks, dropout)
        super().__init__()
        self.label_dropout = label_dropout
        self.channels_last = bool(channels_last)
        self.img_resolution = img_resolution
        embedding_kwargs = dict(embedding_kwargs or {})
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)
        attn_resolutions = set(attn_resolutions)

        def time_embedder():
            if embedding_type == "positional":
                return PositionalEmbedding(noise_channels, endpoint=True)
            return FourierEmbedding(noise_channels, **embedding_kwargs)

        # Mapping.
        self.map_noise = time_embedder()
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.s_embed = s_embed
        if s_embed:
            self.map_noise_s = time_embedder()
            self.map_layer0_s = Linear(noise_channels, emb_channels, **init)
            self.map_layer1_s = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, m in enumerate(mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * m
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, m in reversed(list(enumerate(mult))):
            res = img_resolution >> level
            if level == len(mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * m
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=idx == num_blocks and res in attn_resolutions, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def embed(self, noise_labels_t, noise_labels_s, class_labels, augment_labels, n, device):
        """The conditioning vector silu(emb), (N|1, E), float64 for positional time features."""
        emb = self._time_features(self.map_noise, noise_labels_t, swap=True)            # (N|1, Cn)
        if self.map_label is not None:
            y = class_labels
            if self.training and self.label_dropout:
                y = y * (torch.rand([n, 1], device=device) >= self.label_dropout).to(y.dtype)
            emb = emb + self.map_label(y * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))                               # (N|1, E)
        if noise_labels_s is not None and self.s_embed:
            emb_s = self._time_features(self.map_noise_s, noise_labels_s, swap=True)
            emb = emb + self.map_layer1_s(silu(self.map_layer0_s(emb_s)))
        return silu(emb)

    def forward(self, x, noise_labels_t, noise_labels_s=None, class_labels=None, augment_labels=None):
        emb = self.embed(noise_labels_t, noise_labels_s, class_labels, augment_labels, x.shape[0], x.device)
        x = self._input_layout(x)
        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


class DhariwalUNet(_UNetBase):
    """ADM with IMM's s embedding (which reuses map_noise). Defaults are the authors' (training/unets.py):
    model_channels 192, channel_mult [1,2,3,4], 3 blocks, attention at 32/16/8, 64 channels per head.

    forward(x, noise_labels_t, noise_labels_s=None, class_labels=None, augment_labels=None) -> (N, out, R, R).
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=192,
                 channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8),
                 dropout=0.10, label_dropout=0, s_embed=True, channels_last=True, **kwargs):
        mult = _check_common(img_resolution, in_channels, out_channels, label_dim, augment_dim, model_channels,
                             channel_mult, num_blocks, dropout)
        super().__init__()
        self.label_dropout = label_dropout
        self.channels_last = bool(channels_last)
        self.img_resolution = img_resolution
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)
        attn_resolutions = set(attn_resolutions)

        # Mapping (the parameter-creation order is the authors', so equal seeds give equal initial weights).
        self.map_noise = PositionalEmbedding(model_channels)
        self.s_embed = s_embed
        if s_embed:
            self.map_noise_s = self.map_noise  # shared, as theirs (it has no weights)
            self.map_layer0_s = Linear(model_channels, emb_channels, **init)
            self.map_layer1_s = Linear(emb_channels, emb_channels, **init)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, m in enumerate(mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * m
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * m
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, m in reversed(list(enumerate(mult))):
            res = img_resolution >> level
            if level == len(mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * m
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def embed(self, noise_labels_t, noise_labels_s, class_labels, augment_labels, n, device):
        emb = self.map_noise(noise_labels_t)                                            # (N|1, C) float64
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))                               # (N|1, E)
        if self.map_label is not None:
            y = class_labels
            if self.training and self.label_dropout:
                y = y * (torch.rand([n, 1], device=device) >= self.label_dropout).to(y.dtype)
            emb = emb + self.map_label(y)
        if noise_labels_s is not None and self.s_embed:
            emb = emb + self.map_layer1_s(silu(self.map_layer0_s(self.map_noise_s(noise_labels_s))))
        return silu(emb)

    def forward(self, x, noise_labels_t, noise_labels_s=None, class_labels=None, augment_labels=None):
        emb = self.embed(noise_labels_t, noise_labels_s, class_labels, augment_labels, x.shape[0], x.device)
        x = self._input_layout(x)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))




# ----------------------------------------------------------------------------------------------------------------
# The UNets' config sections, inference from a state dict and IMM defaults (see models/registry.py)
# ----------------------------------------------------------------------------------------------------------------
def _groupnorm_problem(c: "_UNetConfig") -> Optional[str]:
    ks = {1, *c.channel_mult}
    for width in sorted({c.model_channels * k for k in ks | {a + b for a in ks for b in ks}}):
        if width < 4 or width % min(32, width // 4):  # GroupNorm here uses min(32, C // 4) groups
            return (f"model.model_channels={c.model_channels} with model.channel_mult={list(c.channel_mult)} gives "
                    f"a {width}-channel layer that GroupNorm(min(32, C // 4) groups) cannot split evenly")
    return None


@dataclass(frozen=True)
class _UNetConfig(ModelConfig):
    """Fields both UNets share (the authors' names; their CIFAR-10 DDPM++ values as defaults)."""

    imm_defaults = dict(noise_schedule="fm", f_type="simple_edm", temb_type="identity", sigma_data=0.5, T=0.994,
                        eps=0.006, time_scale=1000.0)  # the paper's CIFAR-10 settings

    model_channels: int = spec(128, ge=1, cap=65536)  # base width (channels at multiplier 1)
    channel_mult: Tuple[int, ...] = spec((2, 2, 2), ge=1, cap=256, min_len=1)  # width multiplier per resolution
                                           # level (one 2x downsample per level)
    channel_mult_emb: int = spec(4, ge=1, cap=256)  # embedding width = model_channels x this
    num_blocks: int = spec(4, ge=1, cap=1024)  # residual blocks per level
    attn_resolutions: Tuple[int, ...] = spec((16,), ge=1, cap=16384)  # resolutions (pixels) with self-attention
    channels_last: bool = True             # UNet activations and conv weights channels_last on CUDA (layout only)

    def check(self):
        levels = 1 << (len(self.channel_mult) - 1)
        if self.img_resolution % levels:
            raise ConfigError(f"model.img_resolution={self.img_resolution} must be divisible by 2^(len(model."
                              f"channel_mult) - 1) = {levels}")
        problem = _groupnorm_problem(self)
        if problem:
            raise ConfigError(problem)

    def backbone_kwargs(self) -> dict:
        return dict(model_channels=self.model_channels, channel_mult=list(self.channel_mult),
                    channel_mult_emb=self.channel_mult_emb, num_blocks=self.num_blocks,
                    attn_resolutions=list(self.attn_resolutions), dropout=self.dropout,
                    label_dropout=self.class_dropout_prob, s_embed=self.s_embed, channels_last=self.channels_last)

    @classmethod
    def network_kwargs(cls, img_resolution, img_channels, label_dim, model_kwargs) -> dict:
        kw = {k: v for k, v in model_kwargs.items() if k not in ("in_channels", "out_channels", "img_channels")}
        return dict(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                    label_dim=label_dim, **kw)

    @classmethod
    def owns(cls, state_dict) -> bool:
        unet = any(k.startswith("model.enc.") for k in state_dict)
        return unet and any(k.startswith("model.out_conv.") for k in state_dict) == (cls is DhariwalUNetConfig)

    @classmethod
    def infer(cls, state_dict, num_heads=None, source="the state dict") -> dict:
        try:
            return infer_unet_kwargs(state_dict)
        except (KeyError, StopIteration, IndexError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{str(source)!r} is not an IMM UNet state dict ({type(e).__name__}: {e})") from None

    @classmethod
    def min_params(cls, kw: dict) -> int:
        # The encoder's conv1 weights alone (num_blocks per level, C x C x 3 x 3): a lower bound on the count.
        kw = declared(cls, kw)
        return int(sum(kw["num_blocks"] * 9 * (kw["model_channels"] * m) ** 2 for m in kw["channel_mult"]))


@register
@dataclass(frozen=True)
class SongUNetConfig(_UNetConfig):
    name = "SongUNet"
    network = SongUNet

    channel_mult_noise: int = spec(1, ge=1, cap=256)  # time-feature width = model_channels x this (2 for NCSN++)
    embedding_type: str = spec("positional", choices=EMBEDDING_TYPES)  # time features: sinusoidal or Fourier
    encoder_type: str = spec("standard", choices=ENCODER_TYPES)  # encoder: "standard" (DDPM++), "skip" or
                                           # "residual" (NCSN++)
    decoder_type: str = spec("standard", choices=DECODER_TYPES)  # decoder: "standard" or "skip"
    resample_filter: Tuple[int, ...] = spec((1, 1), ge=1, cap=1024, min_len=1)  # up/down FIR: (1, 1) DDPM++,
                                           # (1, 3, 3, 1) NCSN++

    def backbone_kwargs(self) -> dict:
        return dict(super().backbone_kwargs(), embedding_type=self.embedding_type,
                    channel_mult_noise=self.channel_mult_noise, encoder_type=self.encoder_type,
                    decoder_type=self.decoder_type, resample_filter=list(self.resample_filter))


@register
@dataclass(frozen=True)
class DhariwalUNetConfig(_UNetConfig):
    name = "DhariwalUNet"
    network = DhariwalUNet

    embedding_type: str = spec("positional", choices=EMBEDDING_TYPES[:1])  # time features: ADM's are positional
                                           # only


def infer_unet_kwargs(sd) -> dict:
    """SongUNet / DhariwalUNet IMM(**...) keywords from the names and shapes of a state dict (model. prefix)."""
    song = not any(k.startswith("model.out_conv.") for k in sd)
    enc, attn = _encoder_layout(sd)
    conv = next(k for k in sd if re.match(r"model\.enc\.\d+x\d+_conv\.weight$", k))
    res = int(conv.split(".")[2].split("x")[0])
    noise_ch = sd["model.map_layer0.weight"].shape[1]
    emb_ch = sd["model.map_layer0.weight"].shape[0]
    mc = sd[conv].shape[0] if song else noise_ch  # Song: the stem conv is model_channels wide; ADM: the features
    levels = sorted(enc, reverse=True)
    label_key = "model.map_label.weight"
    kw = dict(img_resolution=res, img_channels=sd[conv].shape[1], model_type="SongUNet" if song else "DhariwalUNet",
              label_dim=sd[label_key].shape[1] if label_key in sd else 0, model_channels=mc,
              channel_mult=[enc[r][0] // mc for r in levels], channel_mult_emb=emb_ch // mc,
              num_blocks=len(enc[levels[0]]), attn_resolutions=sorted(attn, reverse=True),
              s_embed="model.map_layer0_s.weight" in sd)
    if "model.map_augment.weight" in sd:
        kw["augment_dim"] = sd["model.map_augment.weight"].shape[1]
    if song:
        kw.update(_song_switches(sd, noise_ch // mc))
    return kw


def _encoder_layout(sd):
    """({resolution: {block index: out channels}}, resolutions with attention) of the encoder."""
    enc, attn = {}, set()
    for k, v in sd.items():
        m = re.match(r"model\.enc\.(\d+)x\d+_block(\d+)\.conv1\.weight$", k)
        if m:
            enc.setdefault(int(m[1]), {})[int(m[2])] = v.shape[0]
        m = re.match(r"model\.enc\.(\d+)x\d+_block\d+\.qkv\.weight$", k)
        if m:
            attn.add(int(m[1]))
    if not enc:
        raise KeyError("model.enc.<R>x<R>_block0.conv1.weight")
    return enc, attn


def _song_switches(sd, channel_mult_noise) -> dict:
    f = next((v for k, v in sd.items() if k.endswith("resample_filter")), None)
    taps = [1, 1]
    if f is not None:  # f = outer(f1, f1) / sum(f1)^2: its diagonal's square root is f1 / sum(f1)
        f1 = f.reshape(f.shape[-2], f.shape[-1]).diagonal().double().sqrt()
        taps = [int(round(v)) for v in (f1 / f1.min()).tolist()]
    return dict(embedding_type="fourier" if "model.map_noise.freqs" in sd else "positional",
                channel_mult_noise=channel_mult_noise, resample_filter=taps,
                encoder_type="residual" if any("_aux_residual" in k for k in sd) else
                "skip" if any("_aux_skip" in k for k in sd) else "standard",
                decoder_type="skip" if sum(k.endswith("_aux_conv.weight") for k in sd) > 1 else "standard")
