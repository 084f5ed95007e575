"""Backbones (DiT, SongUNet, DhariwalUNet) and the IMM output-function wrapper."""
from __future__ import annotations

from .dit import DiT
from .imm import IMM, build_backbone, dit_kwargs_for
from .unet import DhariwalUNet, SongUNet


def backbone_kwargs(cfg) -> dict:
    """The backbone's constructor keywords for a ModelConfig (the authors' names, as IMM(**...) takes them)."""
    if cfg.model_type == "DiT":
        return dict(patch_size=cfg.patch_size, hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads,
                    mlp_ratio=cfg.mlp_ratio, class_dropout_prob=cfg.class_dropout_prob, num_classes=cfg.label_dim,
                    s_embed=cfg.s_embed, qk_norm=cfg.qk_norm, dropout=cfg.dropout,
                    embedding_kwargs={"embedding_type": cfg.embedding_type}, fused=cfg.fused)
    kw = dict(model_channels=cfg.model_channels, channel_mult=list(cfg.channel_mult),
              channel_mult_emb=cfg.channel_mult_emb, num_blocks=cfg.num_blocks,
              attn_resolutions=list(cfg.attn_resolutions), dropout=cfg.dropout, label_dropout=cfg.class_dropout_prob,
              s_embed=cfg.s_embed, channels_last=cfg.channels_last)
    if cfg.model_type == "SongUNet":
        kw.update(embedding_type=cfg.embedding_type, channel_mult_noise=cfg.channel_mult_noise,
                  encoder_type=cfg.encoder_type, decoder_type=cfg.decoder_type,
                  resample_filter=list(cfg.resample_filter))
    return kw


def build_model(cfg=None, **overrides):
    """An IMM model from a ModelConfig (or its fields as keywords); the DiT's label table has label_dim + 1 rows."""
    import dataclasses

    from ..config import ModelConfig

    cfg = dataclasses.replace(cfg or ModelConfig(), **overrides)
    return IMM(
        img_resolution=cfg.img_resolution, img_channels=cfg.img_channels, label_dim=cfg.label_dim,
        mixed_precision=cfg.mixed_precision, noise_schedule=cfg.noise_schedule, model_type=cfg.model_type,
        sigma_data=cfg.sigma_data, f_type=cfg.f_type, T=cfg.T, eps=cfg.eps, temb_type=cfg.temb_type,
        time_scale=cfg.time_scale, **backbone_kwargs(cfg))


__all__ = ["DiT", "DhariwalUNet", "IMM", "SongUNet", "backbone_kwargs", "build_backbone", "build_model",
           "dit_kwargs_for"]
