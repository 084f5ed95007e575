"""imm_fast's own weights format: one safetensors file whose metadata holds the model's init kwargs.

`save_model` writes it atomically; `read_native` reads it back as (init kwargs or None, state dict), refusing
metadata that is not JSON, too long, or nested past MAX_JSON_DEPTH (a clear error, never a RecursionError).
"""
from __future__ import annotations

import json

from .._files import atomic_write
from ..errors import CheckpointError, excerpt

FORMAT = "imm_fast"
MAX_JSON_DEPTH = 64          # nesting of the stored init kwargs (they are about 3 deep)
MAX_METADATA = 1 << 20       # characters of the init-kwargs JSON


def save_model(path, model, state_dict=None):
    """Write `state_dict` (default: model.state_dict()) of an IMM model as one safetensors file, atomically.

    The file's metadata holds the model's init kwargs, so `load_official(path)` rebuilds it without a config.
    """
    from safetensors.torch import save_file

    core = getattr(model, "module", model)
    if not hasattr(core, "init_kwargs"):
        raise TypeError(f"model must be an imm_fast IMM model (built by imm_fast.build_model), got {type(core).__name__}")
    sd = core.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    meta = {"format": FORMAT, "init_kwargs": json.dumps(core.init_kwargs)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _init_kwargs(meta: dict, path):
    text = meta.get("init_kwargs")
    if not isinstance(text, str) or len(text) > MAX_METADATA:
        raise CheckpointError(f"{str(path)!r}: metadata field 'init_kwargs' is missing or longer than "
                              f"{MAX_METADATA:,} characters")
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth_of_text(text) > MAX_JSON_DEPTH:
        raise CheckpointError(f"{str(path)!r}: metadata field 'init_kwargs' nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r}: metadata field 'init_kwargs' is missing or not JSON "
                              f"({type(e).__name__}: {excerpt(str(e), 120)})") from None


def _depth_of_text(text: str) -> int:
    """Bracket nesting of a JSON text, strings skipped: checked before json.loads, which recurses per level."""
    depth = best = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


def read_native(path):
    """(init kwargs, state dict) of a safetensors file; init kwargs is None when it is not imm_fast's format."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"could not read {str(path)!r} as safetensors: {excerpt(str(e), 200)}") from e
    if meta.get("format") != FORMAT:
        return None, sd
    return _init_kwargs(meta, path), sd
