"""load_official: any supported checkpoint -> an IMM model of imm_fast's own modules, through a table of loaders.

The path goes through the resolver (training_state.resolve_weights: hf:// addresses, run folders, checkpoint
folders), then the file's kind picks its loader in LOADERS (diffusers' habit: adding a format is one entry):
- "safetensors": imm_fast's own file (native.save_model: init kwargs in the metadata), or a plain state dict;
- "torch-zip": a torch.save state dict, size-checked before torch inflates it, read weights-only;
- "pickle": the authors' .pkl (official.read_official_pickle, never running stored code), or a legacy torch.save.
A plain state dict's architecture is inferred from the tensor shapes, its IMM settings from `model_kwargs`
(default: the paper's ImageNet euler_fm/stride settings for a DiT, its CIFAR-10 simple_edm/identity ones for a UNet).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import CheckpointError, excerpt
from ..models.stored import build_from_kwargs, imm_defaults, infer_model_kwargs
from .native import read_native
from .official import _LegacyTorchFile, read_official_pickle
from .safe_pickle import check_tensor_bytes, check_torch_zip
from .training_state import resolve_weights

def _with_prefix(sd):
    if any(k.startswith("model.") for k in sd):
        return OrderedDict(sd)
    return OrderedDict(("model." + k, v) for k, v in sd.items())


def _torch_load(p, key):
    """The state dict in a torch.save file (zip or legacy format), read weights-only."""
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"could not read {str(p)!r} as a weights-only torch checkpoint: "
                              f"{excerpt(' '.join(str(e).split()), 300)}") from e
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
        obj = obj[key]
    if not (isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise CheckpointError(f"{str(p)!r} holds no state dict (a dict of tensors), got {type(obj).__name__}")
    check_tensor_bytes(obj, p, os.path.getsize(p))
    return obj


def _from_plain_state_dict(sd, device, fused, model_kwargs, source="the state dict"):
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}")
    sd = _with_prefix(sd)
    model_kwargs = dict(model_kwargs or {})
    arch = infer_model_kwargs(sd, model_kwargs.get("num_heads"), source)
    # Settings the shapes cannot tell: the backbone's IMM defaults (the paper's, for the dataset it was used on).
    kw = {**imm_defaults(arch.get("model_type", "DiT")), **arch}
    kw.update(model_kwargs)
    return build_from_kwargs(kw, sd, device, fused, source=source)


def _load_safetensors(p, device, key, fused, model_kwargs):
    init_kwargs, sd = read_native(p)
    if init_kwargs is not None:
        return build_from_kwargs(init_kwargs, sd, device, fused, source=p)
    return _from_plain_state_dict(sd, device, fused, model_kwargs, source=p)


def _load_torch_zip(p, device, key, fused, model_kwargs):
    check_torch_zip(p)
    return _from_plain_state_dict(_torch_load(p, key), device, fused, model_kwargs, source=p)


def _load_pickle(p, device, key, fused, model_kwargs):
    try:
        init_kwargs, sd = read_official_pickle(p, key)
    except _LegacyTorchFile:
        return _from_plain_state_dict(_torch_load(p, key), device, fused, model_kwargs, source=p)
    return build_from_kwargs(init_kwargs, sd, device, fused, source=p)


LOADERS = {"safetensors": _load_safetensors, "torch-zip": _load_torch_zip, "pickle": _load_pickle}


def file_kind(p: Path) -> "str | None":
    """The LOADERS key of a file: by suffix for safetensors, else by its first bytes."""
    if p.suffix == ".safetensors":
        return "safetensors"
    with open(p, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "pickle"
    return None


def load_official(path, device="cpu", key="ema", fused=None, model_kwargs=None, trust_unverified=False):
    """Load an IMM model (imm_fast's own modules, eval mode, no grad) from any supported checkpoint.

    path: the authors' .pkl (a local file, or `hf://lumaai/imm/<file>` from the Hugging Face Hub); an imm_fast
    .safetensors file; a run checkpoint directory (ema.safetensors preferred, else model.safetensors; a run folder
    uses its newest verified checkpoint); or a plain state dict file (torch.save, legacy torch.save or
    safetensors). key: which network of an authors' pickle ('ema'). fused: override the DiT's fused switch.
    model_kwargs: IMM/backbone settings for plain state dicts (their architecture is inferred from shapes; num_heads
    must be given when the shapes do not determine it; the IMM settings default to the paper's ImageNet ones for a
    DiT, its CIFAR-10 ones for a UNet). trust_unverified: accept a training checkpoint without its manifest
    (unverifiable; off by default). Errors name the file and the field.
    """
    p = resolve_weights(path, trust_unverified)
    kind = file_kind(p)
    if kind is None:
        raise CheckpointError(f"{str(p)!r} is neither a pickle, a torch checkpoint nor a safetensors file")
    return LOADERS[kind](p, device, key, fused, model_kwargs)
