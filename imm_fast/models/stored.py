"""IMM models from what a checkpoint stores: constructor keywords (checked before anything is allocated) or the
shapes of a bare state dict. Works through the backbone registry, so a new backbone needs nothing here.

Every error is a CheckpointError naming the file (`source`) and the field.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from .._fields import check_fields, excerpt
from ..errors import CheckpointError, ConfigError
from . import registry
from .imm import IMM, imm_parameters
from .registry import ModelConfig, constructor_parameters, count_on_meta, resolve

MAX_KWARGS_DEPTH = 8      # nesting of stored keyword values (the deepest real one, embedding_kwargs, is 2)
PARAMS_SLACK = 1 << 20    # declared parameters allowed beyond those stored (buffers, bounds that are not exact)


def _depth(value, limit: int, depth: int = 0) -> None:
    if depth > limit:
        raise ConfigError(f"values nest deeper than {limit} levels")
    if isinstance(value, dict):
        for v in value.values():
            _depth(v, limit, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _depth(v, limit, depth + 1)


def _caps(cls, kw: dict, src: str) -> None:
    """Each declared size against its field's cap first, naming the stored field."""
    for f in dataclasses.fields(cls):
        rule, v = f.metadata.get("rule"), kw.get(f.name)
        if rule is None or rule.cap is None or f.name not in kw:
            continue
        for x in (v if isinstance(v, (list, tuple)) else (v,)):
            if isinstance(x, (int, float)) and not isinstance(x, bool) and x > rule.cap:
                raise CheckpointError(f"{src!r}: init_kwargs.{f.name}={excerpt(v)} exceeds the cap {rule.cap!r} "
                                      f"(the {cls.name} config's bound)")


def _count_on_meta(cls, kw: dict) -> int:
    own = {k: v for k, v in kw.items() if k not in imm_parameters()}
    return count_on_meta(cls, kw["img_resolution"], kw["img_channels"], kw.get("label_dim", 0), own)


def check_stored_kwargs(kwargs: dict, source="the checkpoint", state_dict=None) -> None:
    """Nesting, caps, types and ranges of what a checkpoint declares, and (given its state dict) that the declared
    size is not larger than the stored parameters, all before any real allocation."""
    src = str(source)
    try:
        _depth(kwargs, MAX_KWARGS_DEPTH)
        cls, sizes = resolve(kwargs.get("model_type", registry.DEFAULT_MODEL_TYPE), "init_kwargs.model_type")
        kw = {**sizes, **kwargs}
        _caps(cls, kw, src)
        known = {k: kw[k] for k in cls.field_names() if k in kw and k != "model_type"}
        check_fields(cls, known, prefix="init_kwargs")
    except ConfigError as e:
        raise CheckpointError(f"{src!r}: {e}") from None
    if state_dict is None:
        return
    declared = cls.min_params(kw)
    if declared is None and {"img_resolution", "img_channels"} <= set(kw):
        try:
            declared = _count_on_meta(cls, kw)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{src!r}: cannot build the model from its init_kwargs: {e}") from None
    stored = sum(t.numel() for t in state_dict.values() if isinstance(t, torch.Tensor))
    if declared is not None and declared > 2 * stored + PARAMS_SLACK:
        sizes = ", ".join(f"{k}={excerpt(kw[k])}" for k in sorted(cls.field_names() - ModelConfig.field_names())
                          if k in kw)
        raise CheckpointError(f"{src!r}: init_kwargs ({sizes}) declare at least {declared:,} parameters but the "
                              f"file stores {stored:,}")


def build_from_kwargs(init_kwargs, state_dict, device="cpu", fused=None, source="the checkpoint"):
    """An IMM model from stored constructor kwargs, loaded with `state_dict` (strict), in eval mode.

    Keys the authors' backbone accepts but ignores (it takes **kwargs) are dropped with a warning. source: the
    file, named in every error.
    """
    import numpy as np

    src = str(source)
    if not isinstance(init_kwargs, dict) or not all(isinstance(k, str) for k in init_kwargs):
        raise CheckpointError(f"{src!r}: init_kwargs must be a dict of named values, got "
                              f"{type(init_kwargs).__name__}")
    kw = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in init_kwargs.items()}
    missing_required = [k for k in ("img_resolution", "img_channels") if k not in kw]
    if missing_required:
        raise CheckpointError(f"{src!r}: init_kwargs lack {missing_required} (they have {sorted(kw)[:20]})")
    model_type = kw.get("model_type", registry.DEFAULT_MODEL_TYPE)
    if not isinstance(model_type, str):
        raise CheckpointError(f"{src!r}: init_kwargs.model_type must be a string, got {type(model_type).__name__}")
    try:
        allowed = imm_parameters() | constructor_parameters(model_type)
    except ConfigError as e:
        raise CheckpointError(f"{src!r}: init_kwargs.{e}") from None
    kw = _drop_ignored(kw, allowed, model_type)
    if fused is not None and "fused" in allowed:  # the DiT's switch; the UNets have no fused path
        kw["fused"] = fused
    if isinstance(kw.get("embedding_kwargs"), dict):
        kw["embedding_kwargs"] = dict(kw["embedding_kwargs"])
    check_stored_kwargs(kw, source, state_dict)
    try:
        model = IMM(**kw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{src!r}: cannot build the model from its init_kwargs: {e}") from e
    _load_strict(model, state_dict, src)
    return model.to(device).eval().requires_grad_(False)


def _drop_ignored(kw: dict, allowed: set, model_type: str) -> dict:
    kw = {k: v for k, v in kw.items() if k not in ("in_channels", "out_channels")}  # img_channels sets both
    ignored = sorted(k for k in kw if k not in allowed)
    if ignored:
        warnings.warn(f"checkpoint init kwargs ignored (the authors' {model_type} ignores them too): "
                      f"{excerpt(ignored)}")
    return {k: v for k, v in kw.items() if k in allowed}


def _load_strict(model, state_dict, src: str) -> None:
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{src!r} does not match the model built from its init_kwargs: "
                              f"{' '.join(str(e).split())[:2000]}") from None
    if missing or unexpected:
        raise CheckpointError(f"{src!r} does not match the model built from its init_kwargs: missing "
                              f"{missing[:8]}, unexpected {unexpected[:8]}")


def infer_model_kwargs(state_dict, num_heads=None, source="the state dict") -> dict:
    """The architecture stored in a state dict's names and shapes (keys with the `model.` prefix), read by the
    first registered backbone that owns it (DiT heads: see DiTConfig.infer)."""
    for cls in registry._BACKBONES.values():
        if cls.owns(state_dict):
            return cls.infer(state_dict, num_heads=num_heads, source=source)
    # No owner: the default backbone's reader names the tensor it misses.
    return resolve(registry.DEFAULT_MODEL_TYPE)[0].infer(state_dict, num_heads=num_heads, source=source)


def imm_defaults(model_type: str) -> dict:
    """The IMM settings a bare state dict of this backbone is loaded with (the paper's, for its dataset)."""
    return dict(resolve(model_type)[0].imm_defaults)
