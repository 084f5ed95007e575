"""The IMM wrapper f_theta(x_t, s, t) around a backbone G (the IMM paper's parameterization of f), numerically
the authors' IMMPrecond.

f = output_function(x_t, G(c_in x_t, 1000 t, 1000 s | 1000 (t - s), labels), s, t), where the output function is
euler_fm (x_t - (t - s) sigma_d G), simple_edm (c_skip x_t + c_out G) or identity (DDIM(x_t, G, s, t)).
The backbone is stored as `.model`, so state dicts carry the `model.` prefix exactly as the authors' do.

The backbone interface (DiT, SongUNet, DhariwalUNet; `model_type` names them as the authors' classes do):
  backbone(x, noise_labels_t, noise_labels_s, class_labels=...) -> G, shaped like x; noise labels (N,) or (1,),
  class_labels float (N, label_dim) rows or None;  backbone.compile_regions(mode) compiles it in place.

Shapes: N batch, Cin channels, R resolution; t and s are scalars, 0-d, (1,) or (N,) tensors.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import schedule as sch
from .._fields import check_fields
from .registry import PRECISIONS, ModelConfig, check_imm_settings, checked_network_kwargs, resolve

_DTYPES = {None: torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
assert set(_DTYPES) == set(PRECISIONS)


def build_backbone(model_type, img_resolution, img_channels, label_dim, model_kwargs):
    """The network G named by model_type (a registered name or alias), with the authors' constructor arguments;
    stored keywords that share a name with a field of the backbone's config section are checked by its rules."""
    cls, sizes = resolve(model_type)
    kw = checked_network_kwargs(cls, {**sizes, **model_kwargs})
    return cls.network(**cls.network_kwargs(img_resolution, img_channels, label_dim, kw))


def imm_parameters() -> set:
    """The IMM wrapper's own constructor keywords (the rest go to the backbone)."""
    import inspect

    return set(inspect.signature(IMM.__init__).parameters) - {"self", "model_kwargs"}


class IMM(nn.Module):
    """f_theta(x, t, s) with forward(x, t, s, class_labels=None, cfg_scale=None).

    Constructor arguments mirror the authors' IMMPrecond (so their stored init kwargs rebuild it); the rest go to
    the backbone named by model_type: the DiT (patch_size, hidden_size, depth, num_heads, mlp_ratio, qk_norm,
    dropout, num_classes, s_embed, embedding_kwargs, fused, ...) or a UNet (model_channels, channel_mult,
    num_blocks, attn_resolutions, dropout, s_embed, ...; see imm_fast.models.unet).
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, mixed_precision=None, noise_schedule="fm",
                 model_type="DiT", sigma_data=0.5, f_type="euler_fm", T=0.994, eps=0.0, temb_type="identity",
                 time_scale=1000.0, **model_kwargs):
        super().__init__()
        # JSON-able constructor arguments: imm_fast checkpoints store them to rebuild the model.
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                mixed_precision=mixed_precision, noise_schedule=noise_schedule, model_type=model_type,
                                sigma_data=sigma_data, f_type=f_type, T=T, eps=eps, temb_type=temb_type,
                                time_scale=time_scale, **model_kwargs)
        # The same rules as the model config (stored kwargs of a checkpoint come here without a config).
        v = check_fields(ModelConfig, dict(
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
            mixed_precision=mixed_precision, noise_schedule=noise_schedule, sigma_data=sigma_data, f_type=f_type, T=T,
            eps=eps, temb_type=temb_type, time_scale=time_scale), prefix="")
        check_imm_settings(v)
        img_resolution, img_channels, label_dim, sigma_data, T, eps, time_scale = (
            v[k] for k in ("img_resolution", "img_channels", "label_dim", "sigma_data", "T", "eps", "time_scale"))
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        # The network runs in float32 as the authors' (autocast on top); tests set float64 to check gradients.
        self.compute_dtype = torch.float32
        self.mixed_precision = _DTYPES[mixed_precision]
        self.use_mixed_precision = mixed_precision is not None
        self.noise_schedule, self.f_type, self.temb_type = noise_schedule, f_type, temb_type
        self.sigma_data, self.T, self.eps, self.time_scale = sigma_data, T, eps, time_scale
        self.model_type = model_type
        self.model = build_backbone(model_type, img_resolution, img_channels, label_dim, model_kwargs)

    # -- schedule helpers (the model's own schedule) -------------------------------------------------------------
    def alpha_sigma(self, t):
        return sch.alpha_sigma(t, self.noise_schedule)

    def get_init_noise(self, shape, device, generator=None):
        return torch.randn(shape, device=device, generator=generator) * self.sigma_data

    # -- labels --------------------------------------------------------------------------------------------------
    def prepare_labels(self, class_labels, n, device):
        """None / integer ids (n,) / one-hot rows (n, label_dim), any dtype -> float32 (n, label_dim) rows, or None if
        unconditional. The id label_dim (and an all-zero row) is the null class; any other count or shape is a
        ValueError (labels are never broadcast or reshaped).
        """
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros(n, self.label_dim, device=device, dtype=self.compute_dtype)
        if not isinstance(class_labels, torch.Tensor):
            try:
                class_labels = torch.as_tensor(class_labels, device=device)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"class_labels must be {n} integer ids or ({n}, {self.label_dim}) one-hot rows, got "
                                f"{type(class_labels).__name__} ({e})") from None
        shape = tuple(class_labels.shape)
        if class_labels.dim() <= 1 and not class_labels.is_floating_point():  # integer ids; rows are one-hot
            if class_labels.is_complex() or class_labels.dtype == torch.bool:
                raise TypeError(f"class_labels ids must be integers, got dtype {class_labels.dtype}")
            ids = class_labels.reshape(-1).long()
            if ids.numel() != n:
                raise ValueError(f"class_labels holds {ids.numel()} ids (shape {shape}) for a batch of {n}: give one "
                                 f"id per sample, shape ({n},)")
            if ids.numel() and (ids.min() < 0 or ids.max() > self.label_dim):
                raise ValueError(f"class_labels must be ids in [0, {self.label_dim}] ({self.label_dim} = null class), "
                                 f"got range [{ids.min().item()}, {ids.max().item()}]")
            return F.one_hot(ids, self.label_dim + 1)[:, : self.label_dim].to(self.compute_dtype)
        if shape != (n, self.label_dim):
            raise ValueError(f"class_labels must be {n} integer ids, shape ({n},), or one-hot rows of shape "
                             f"({n}, label_dim={self.label_dim}), got {class_labels.dtype} of shape {shape}")
        return class_labels.to(device=device, dtype=self.compute_dtype)

    # -- network and output functions ----------------------------------------------------------------------------
    def forward_model(self, x, t, s, class_labels=None, force_fp32=False):
        """G(c_in x, c_noise_t, c_noise_s, labels); x float32 (N, ...), t and s (N|1, 1, 1, 1)."""
        alpha_t, sigma_t = self.alpha_sigma(t)
        c_in = (alpha_t**2 + sigma_t**2).rsqrt() / self.sigma_data
        c_noise_t = t * self.time_scale
        c_noise_s = (s if self.temb_type == "identity" else t - s) * self.time_scale
        enabled = self.use_mixed_precision and not force_fp32 and x.is_cuda
        with torch.autocast("cuda", enabled=enabled, dtype=self.mixed_precision):
            return self.model(c_in * x, c_noise_t.flatten(), c_noise_s.flatten(), class_labels=class_labels)

    def output_function(self, x, F_x, t, s):
        if self.f_type == "euler_fm":
            return x - (t - s) * self.sigma_data * F_x
        if self.f_type == "simple_edm":
            c_skip, c_out = sch.c_skip_out(s, t, "simple_edm", self.noise_schedule, self.sigma_data)
            return c_skip * x + c_out * F_x
        return sch.ddim(x, F_x, s, t, self.noise_schedule)

    def forward(self, x, t, s, class_labels=None, cfg_scale=None, force_fp32=False):
        """f_theta(x, s, t) -> a sample at time s, in t's dtype; cfg_scale: G = G_u + w (G_c - G_u) in one 2N call."""
        n = x.shape[0]
        t = t.to(x.device) if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=x.dtype, device=x.device)
        s = s.to(x.device, t.dtype) if isinstance(s, torch.Tensor) else torch.tensor(s, dtype=t.dtype, device=x.device)
        dtype = t.dtype
        labels = self.prepare_labels(class_labels, n, x.device)
        x_in, t_in, s_in = x, t.reshape(-1), s.reshape(-1)
        if cfg_scale is not None:
            if labels is None:
                raise ValueError("cfg_scale needs a class-conditional model (label_dim > 0)")
            x_in = torch.cat([x, x], dim=0)
            labels = torch.cat([torch.zeros_like(labels), labels], dim=0)
            t_in = t_in.repeat(2) if t_in.numel() > 1 else t_in
            s_in = s_in.repeat(2) if s_in.numel() > 1 else s_in
        bshape = (-1,) + (1,) * (x.dim() - 1)
        cd = self.compute_dtype
        F_x = self.forward_model(x_in.to(cd), t_in.to(cd).reshape(bshape), s_in.to(cd).reshape(bshape), labels,
                                 force_fp32).to(dtype)
        if cfg_scale is not None:
            F_u, F_c = F_x[:n], F_x[n:]
            F_x = F_u + cfg_scale * (F_c - F_u)
        return self.output_function(x, F_x, t.reshape(bshape), s.reshape(bshape))
