"""The authors' released pickles, read WITHOUT executing any code stored in them.

A checkpoint of the authors' code is a dict whose 'ema' entry is an IMMPrecond saved through NVlabs-style
`torch_utils.persistence`. The restricted unpickler (safe_pickle) turns every persistent object and every module
class into an inert record (class name + state), tensors are rebuilt by torch's own tensor functions (storages
through `torch.load(weights_only=True)`), and any global not on OFFICIAL_GLOBALS raises UnsafeCheckpointError.
`read_official_pickle` returns the stored init kwargs and the state dict recovered from the records; the loader
(native.load_official) builds imm_fast's own modules from them.
"""
from __future__ import annotations

import collections
import io
import os
from collections import OrderedDict

import torch

from ..errors import CheckpointError, UnsafeCheckpointError, UserError, excerpt
from .safe_pickle import check_tensor_bytes, check_torch_zip, numpy_array_globals, restricted_load

MAX_MODULE_DEPTH = 200  # nesting of modules in an authors' pickle (a DiT is about 6 deep)

class _Record:
    """An inert stand-in for a pickled object of an allowed class: it keeps the class name and the state."""

    _qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        obj.__dict__["_state"] = {}
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__["_state"] = state if isinstance(state, dict) else {}

    def __setitem__(self, key, value):  # dict-like classes pickled with SETITEMS
        self.__dict__["_state"][key] = value


class _Persistent(_Record):
    _qualname = "torch_utils.persistence.<persistent>"


class _EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict (a plain dict with attribute access)."""


_RECORD_CLASSES = {}


def _record_class(module, name):
    key = f"{module}.{name}"
    if key not in _RECORD_CLASSES:
        _RECORD_CLASSES[key] = type(name, (_Record,), {"_qualname": key})
    return _RECORD_CLASSES[key]


def _reconstruct_persistent_obj(meta):
    """Replaces torch_utils.persistence._reconstruct_persistent_obj: keep class name and state, never exec source."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UnsafeCheckpointError("malformed persistent-object record in the pickle")
    obj = _Persistent.__new__(_Persistent)
    obj.__dict__["class_name"] = meta.get("class_name")
    obj.__setstate__(meta.get("state") or {})
    return obj


def _load_storage_from_bytes(b):
    """Replaces torch.storage._load_from_bytes (which would call torch.load with weights_only=False)."""
    if not isinstance(b, (bytes, bytearray)):
        raise UnsafeCheckpointError(f"storage record holds {type(b).__name__}, not bytes")
    if bytes(b[:2]) == b"PK":
        check_torch_zip("a tensor storage record", bytes(b))
    return torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")


def _copyreg_reconstructor(cls, base, state):
    if not (isinstance(cls, type) and issubclass(cls, _Record)) or base is not object:
        raise UnsafeCheckpointError(f"copyreg._reconstructor of {cls!r} is not allowed")
    return cls.__new__(cls)


OFFICIAL_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("copyreg", "_reconstructor"): _copyreg_reconstructor,
    ("collections", "OrderedDict"): OrderedDict,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "object"): object,
    # OmegaConf containers in init kwargs (a config's lists, e.g. channel_mult, stay ListConfig when its network
    # section is splatted into the constructor): their metadata names these types and builds a defaultdict(dict).
    ("typing", "Any"): "typing.Any",
    ("collections", "defaultdict"): collections.defaultdict,
    **{("builtins", t.__name__): t for t in (list, dict, tuple, int, float, str, bool)},
}
for _name in ("_rebuild_tensor_v3", "_rebuild_parameter_with_state"):
    if hasattr(torch._utils, _name):
        OFFICIAL_GLOBALS[("torch._utils", _name)] = getattr(torch._utils, _name)


# numpy scalars in stored init kwargs (e.g. a float64 T): data-only constructors.
OFFICIAL_GLOBALS.update({k: v for k, v in numpy_array_globals().items() if k[1] in ("scalar", "dtype")})
# Module classes the authors' modules are made of: replaced by inert records, never imported.
_RECORD_MODULE_PREFIXES = ("torch.nn.modules.", "timm.", "training.", "torch_utils.", "omegaconf.")


def _official_fallback(module, name):
    """torch dtypes by name; the authors' module classes become inert records (never imported)."""
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if module.startswith(_RECORD_MODULE_PREFIXES) and name.isidentifier() and not name.startswith("_"):
        return _record_class(module, name)
    return None


def _record_state(obj):
    return obj.__dict__.get("_state", {}) if isinstance(obj, _Record) else {}


def _collect_state_dict(obj, prefix="", out=None, source="the checkpoint", _seen=()):
    """Walk _parameters/_buffers/_modules of the records like nn.Module.state_dict does (a module that contains
    itself, or nesting past MAX_MODULE_DEPTH, is a CheckpointError naming the file and the module)."""
    out = OrderedDict() if out is None else out
    where = prefix.rstrip(".")[:120] or "the network"
    if id(obj) in _seen:
        raise CheckpointError(f"{str(source)!r}: module {where!r} contains itself")
    if len(_seen) > MAX_MODULE_DEPTH:
        raise CheckpointError(f"{str(source)!r}: modules nest deeper than {MAX_MODULE_DEPTH} at {where!r}")
    _seen = _seen + (id(obj),)
    st = _record_state(obj)
    for field in ("_parameters", "_buffers", "_modules"):
        if not isinstance(st.get(field) or {}, dict):
            raise CheckpointError(f"{str(source)!r}: field {field!r} of module {where!r} must be a dict, got "
                                  f"{type(st[field]).__name__}")
    non_persistent = st.get("_non_persistent_buffers_set") or set()
    for name, p in (st.get("_parameters") or {}).items():
        if p is not None:
            out[prefix + name] = p.detach() if isinstance(p, torch.Tensor) else p
    for name, b in (st.get("_buffers") or {}).items():
        if b is not None and name not in non_persistent:
            out[prefix + name] = b
    for name, m in (st.get("_modules") or {}).items():
        if m is not None:
            _collect_state_dict(m, prefix + name + ".", out, source, _seen)
    return out


class _LegacyTorchFile(CheckpointError):
    """The pickle is torch's legacy (pre-1.6) serialization: load_official reads it with torch.load instead."""


def _plain(value, depth=0):
    """Init-kwarg values as plain Python: OmegaConf ListConfig/DictConfig records (and their nodes) become lists
    and dicts of their stored values; everything else is returned as it is."""
    if depth > 50:
        raise ValueError("checkpoint init kwargs are nested too deeply")
    if isinstance(value, _Record) and value._qualname.startswith("omegaconf."):
        st = _record_state(value)
        if "_val" in st:  # a value node
            return _plain(st["_val"], depth + 1)
        content = st.get("_content")
        if isinstance(content, dict):
            return {k: _plain(v, depth + 1) for k, v in content.items()}
        if isinstance(content, (list, tuple)):
            return [_plain(v, depth + 1) for v in content]
        return None  # a None-valued container
    if isinstance(value, dict):
        return {k: _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, depth + 1) for v in value)
    return value


def read_official_pickle(path, key="ema"):
    """(init_kwargs, state_dict) of the network stored under `key` in an authors' .pkl, without running its code."""
    with open(path, "rb") as f:
        try:
            data = restricted_load(f, path, OFFICIAL_GLOBALS, "the checkpoint", _official_fallback)
        except UserError:
            raise
        except RecursionError:
            raise CheckpointError(f"could not read {str(path)!r}: its pickle nests objects too deeply (an object "
                                  "that contains itself?)") from None
        except Exception as e:  # truncated or corrupt file
            raise CheckpointError(f"could not read {str(path)!r} as an IMM checkpoint pickle: {type(e).__name__}: "
                                  f"{excerpt(str(e), 200)}") from e
    if isinstance(data, int) and data == torch.serialization.MAGIC_NUMBER:
        raise _LegacyTorchFile(f"{str(path)!r} is a legacy torch.save file, not an authors' pickle")
    if isinstance(data, dict):
        if key not in data:
            raise CheckpointError(f"the pickle {str(path)!r} has no {key!r} entry; it has {excerpt(sorted(map(str, data)), 200)}")
        net = data[key]
    else:
        net = data
    if not isinstance(net, _Record):
        raise CheckpointError(f"entry {key!r} of {str(path)!r} is not a pickled module (got {type(net).__name__})")
    st = _record_state(net)
    init_kwargs, init_args = st.get("_init_kwargs"), st.get("_init_args")
    if init_args and not isinstance(init_args, (tuple, list)):
        raise CheckpointError(f"{str(path)!r}: field '_init_args' of {key!r} must be a tuple, got "
                              f"{type(init_args).__name__}")
    if init_args:
        raise CheckpointError(f"{str(path)!r}: positional init args {excerpt(init_args)} of {key!r} are not supported")
    if init_kwargs is None or (isinstance(init_kwargs, dict) and not init_kwargs):
        raise CheckpointError(f"{str(path)!r}: the pickled network {key!r} carries no '_init_kwargs' to rebuild it "
                              "from")
    if not isinstance(init_kwargs, dict) or not all(isinstance(k, str) for k in init_kwargs):
        raise CheckpointError(f"{str(path)!r}: field '_init_kwargs' of {key!r} must be a dict of named values, got "
                              f"{type(init_kwargs).__name__}")
    sd = _collect_state_dict(net, source=path)
    check_tensor_bytes(sd, path, os.path.getsize(path))
    try:  # OmegaConf containers (the authors' Hydra configs) as plain lists and dicts
        init_kwargs = {k: _plain(v) for k, v in init_kwargs.items()}
    except ValueError as e:
        raise CheckpointError(f"{str(path)!r}: field '_init_kwargs' of {key!r}: {e}") from None
    return init_kwargs, sd
