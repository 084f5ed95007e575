"""imm_fast: Inductive Moment Matching with fused kernels.

Public API: train, sample, evaluate, mmd_loss (mmd_loss_ref), load_official, push_to_hub, and the config dataclasses.
Importing imm_fast imports
neither triton nor a compiler; heavy modules load on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "train", "sample", "mmd_loss", "mmd_loss_ref", "load_official", "push_to_hub", "build_model", "evaluate",
    "ModelConfig", "LossConfig", "DataConfig", "TrainConfig", "SampleConfig", "PRESETS",
]

_LAZY = {
    "train": ("imm_fast.training", "train"),
    "sample": ("imm_fast.sampling", "sample"),
    "mmd_loss": ("imm_fast.ops.mmd", "mmd_loss"),
    "mmd_loss_ref": ("imm_fast.ops.mmd", "mmd_loss_ref"),
    "load_official": ("imm_fast.checkpoints", "load_official"),
    "push_to_hub": ("imm_fast.checkpoints", "push_to_hub"),
    "build_model": ("imm_fast.models", "build_model"),
    "evaluate": ("imm_fast.evaluation", "evaluate"),
    "ModelConfig": ("imm_fast.config", "ModelConfig"),
    "LossConfig": ("imm_fast.config", "LossConfig"),
    "DataConfig": ("imm_fast.config", "DataConfig"),
    "TrainConfig": ("imm_fast.config", "TrainConfig"),
    "SampleConfig": ("imm_fast.config", "SampleConfig"),
    "PRESETS": ("imm_fast.config", "PRESETS"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'imm_fast' has no attribute {name!r}")


def __dir__():
    # The public surface only, each name once (lazy attributes land in globals() once used).
    return sorted(set(__all__) | {"__version__"})
