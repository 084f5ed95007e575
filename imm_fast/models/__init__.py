"""Backbones (DiT) and the IMM output-function wrapper."""
from __future__ import annotations

from .dit import DiT
from .imm import IMM, dit_kwargs_for


def build_model(cfg=None, **overrides):
    """An IMM model from a ModelConfig (or its fields as keywords); the DiT's label table has label_dim + 1 rows."""
    import dataclasses

    from ..config import ModelConfig

    cfg = dataclasses.replace(cfg or ModelConfig(), **overrides)
    return IMM(
        img_resolution=cfg.img_resolution, img_channels=cfg.img_channels, label_dim=cfg.label_dim,
        mixed_precision=cfg.mixed_precision, noise_schedule=cfg.noise_schedule, model_type="DiT",
        sigma_data=cfg.sigma_data, f_type=cfg.f_type, T=cfg.T, eps=cfg.eps, temb_type=cfg.temb_type,
        time_scale=cfg.time_scale, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, class_dropout_prob=cfg.class_dropout_prob,
        num_classes=cfg.label_dim, s_embed=cfg.s_embed, qk_norm=cfg.qk_norm, dropout=cfg.dropout,
        embedding_kwargs={"embedding_type": cfg.embedding_type}, fused=cfg.fused)


__all__ = ["DiT", "IMM", "build_model", "dit_kwargs_for"]
