"""Backbones (DiT, SongUNet, DhariwalUNet), their registry and the IMM output-function wrapper.

Each backbone module registers its config section (models/registry.py); importing this package registers them.
"""
from __future__ import annotations

from . import registry
from .dit import DiT, DiTConfig, dit_config
from .imm import IMM, build_backbone
from .registry import ModelConfig, register, resolve
from .unet import DhariwalUNet, DhariwalUNetConfig, SongUNet, SongUNetConfig


def dit_kwargs_for(model_type: str) -> dict:
    """"DiT" -> {}; "DiT_XL_2" -> the XL sizes with patch 2 (the authors' class names)."""
    cls, sizes = resolve(model_type)
    if cls is not DiTConfig:
        raise ValueError(f"model_type={model_type!r} is not a DiT")
    return sizes


def backbone_kwargs(cfg) -> dict:
    """The backbone's constructor keywords for a model config (the authors' names, as IMM(**...) takes them)."""
    return cfg.backbone_kwargs()


def build_model(cfg=None, **overrides):
    """An IMM model from a model config (or its fields as keywords); the DiT's label table has label_dim + 1 rows."""
    import dataclasses

    cfg = dataclasses.replace(cfg, **overrides) if cfg is not None else ModelConfig(**overrides)
    return IMM(**cfg.imm_kwargs(), **cfg.backbone_kwargs())


__all__ = ["DiT", "DiTConfig", "DhariwalUNet", "DhariwalUNetConfig", "IMM", "ModelConfig", "SongUNet",
           "SongUNetConfig", "backbone_kwargs", "build_backbone", "build_model", "dit_config", "dit_kwargs_for",
           "register", "registry", "resolve"]
