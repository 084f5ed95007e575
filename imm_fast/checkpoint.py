"""Model checkpoints: imm_fast's own (safetensors + init kwargs) and the authors' released pickles.

`load_official(path)` reads, WITHOUT executing any code stored in the file:
- the authors' .pkl (a dict whose 'ema' entry is an IMMPrecond saved through NVlabs-style
  `torch_utils.persistence`): a restricted unpickler turns every persistent object and every module class into an
  inert record (class name + state), tensors are rebuilt by torch's own tensor functions (storages through
  `torch.load(weights_only=True)`), and any global not on the allow-list raises `UnsafeCheckpointError`;
  imm_fast's own modules are then built from the stored init kwargs and loaded from the recovered state dict;
- an imm_fast safetensors file (`save_model`), or a run checkpoint directory holding ema.safetensors or
  model.safetensors;
- a plain state dict (.pt/.pth/.safetensors, with or without the `model.` prefix); its architecture is inferred
  from the tensor shapes, the IMM settings from `model_kwargs` (default: the ImageNet euler_fm/stride settings for
  a DiT, the CIFAR-10 simple_edm/identity ones for a UNet).

Training state (the end of this file): `save_checkpoint` writes checkpoints/step-<7-digit step>/ into a temporary
sibling with a manifest (sizes + sha256) written LAST, renames it into place, then updates `latest`;
`find_checkpoint` is the one resolver of a run folder / checkpoints folder / checkpoint folder: the newest complete,
verified checkpoint, `latest` followed only to a name inside checkpoints/, any fallback explained in one line;
`RunLock` keeps one writer per run folder.
"""
from __future__ import annotations

import collections
import inspect
import io
import json
import os
import pickle
import re
import shutil
import socket
import sys
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from ._files import atomic_write, atomic_write_text, file_sha256, fsync_dir
from .errors import CheckpointError, UserError

FORMAT = "imm_fast"


class UnsafeCheckpointError(UserError, pickle.UnpicklingError):
    """The pickle asks for something that is not on the allow-list (it could run code)."""


# Limits on what a checkpoint may declare, so a small hostile file cannot make the loader allocate or build for
# minutes: an archive may not expand past ZIP_EXPANSION x its size (torch stores tensors uncompressed), a tensor
# may not claim more bytes than the file holds, and the model's dimensions are capped (and must agree with the
# number of stored parameters).
ZIP_EXPANSION = 4
ZIP_SLACK = 1 << 20
MAX_PICKLE_DEPTH = 200  # nesting of modules in an authors' pickle (a DiT is about 6 deep)
MODEL_CAPS = {"depth": 1024, "hidden_size": 65536, "num_heads": 4096, "img_resolution": 16384,
              "img_channels": 1024, "label_dim": 1_000_000, "patch_size": 1024, "mlp_ratio": 256.0,
              "model_channels": 65536, "num_blocks": 1024, "channel_mult_emb": 256, "channel_mult_noise": 256}


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# Size limits
# --------------------------------------------------------------------------------------------------------------
def _check_zip(source, data=None):
    """Refuse a zip archive (a torch.save file, or storage bytes inside a pickle) whose entries declare more bytes
    than ZIP_EXPANSION x its size: a zip bomb. `data`: the archive's bytes when it is not the file itself."""
    import zipfile

    try:
        size = len(data) if data is not None else os.path.getsize(source)
        with zipfile.ZipFile(io.BytesIO(data) if data is not None else source) as z:
            declared = sum(max(0, i.file_size) for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{str(source)!r} is not a readable zip archive: {e}") from None
    if declared > ZIP_EXPANSION * size + ZIP_SLACK:
        raise CheckpointError(f"{str(source)!r}: its zip entries declare {declared:,} bytes but the archive holds "
                              f"{size:,} (more than {ZIP_EXPANSION}x): refusing a possible zip bomb")


def _check_tensor_bytes(sd, source, limit):
    """Each tensor may hold at most `limit` bytes (the file's size): a stored view cannot claim more."""
    for name, t in sd.items():
        if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > limit:
            raise CheckpointError(f"{str(source)!r}: tensor {name!r} declares shape {tuple(t.shape)} "
                                  f"({t.numel() * t.element_size():,} bytes) but the file holds {limit:,} bytes")


# --------------------------------------------------------------------------------------------------------------
# The restricted unpickler for the authors' pickles
# --------------------------------------------------------------------------------------------------------------
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
        _check_zip("a tensor storage record", bytes(b))
    return torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")


def _copyreg_reconstructor(cls, base, state):
    if not (isinstance(cls, type) and issubclass(cls, _Record)) or base is not object:
        raise UnsafeCheckpointError(f"copyreg._reconstructor of {cls!r} is not allowed")
    return cls.__new__(cls)


_SAFE_GLOBALS = {
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
        _SAFE_GLOBALS[("torch._utils", _name)] = getattr(torch._utils, _name)


def _numpy_globals():
    """numpy scalars in stored init kwargs (e.g. a float64 T): data-only constructors."""
    import numpy as np

    scalar = getattr(np, "_core", np.core).multiarray.scalar
    return {("numpy.core.multiarray", "scalar"): scalar, ("numpy._core.multiarray", "scalar"): scalar,
            ("numpy", "dtype"): np.dtype}


_SAFE_GLOBALS.update(_numpy_globals())
# Module classes the authors' modules are made of: replaced by inert records, never imported.
_RECORD_MODULE_PREFIXES = ("torch.nn.modules.", "timm.", "training.", "torch_utils.", "omegaconf.")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith(_RECORD_MODULE_PREFIXES) and name.isidentifier() and not name.startswith("_"):
            return _record_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load {module}.{name} from the checkpoint: it is not on imm_fast's allow-list "
            "(loading it could execute code). If this file is a checkpoint you trust, convert it to a state dict.")

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"persistent id {pid!r} in a plain pickle is not allowed")


def _record_state(obj):
    return obj.__dict__.get("_state", {}) if isinstance(obj, _Record) else {}


def _collect_state_dict(obj, prefix="", out=None, source="the checkpoint", _seen=()):
    """Walk _parameters/_buffers/_modules of the records like nn.Module.state_dict does (a module that contains
    itself, or nesting past MAX_PICKLE_DEPTH, is a CheckpointError naming the file and the module)."""
    out = OrderedDict() if out is None else out
    where = prefix.rstrip(".") or "the network"
    if id(obj) in _seen:
        raise CheckpointError(f"{str(source)!r}: module {where!r} contains itself")
    if len(_seen) > MAX_PICKLE_DEPTH:
        raise CheckpointError(f"{str(source)!r}: modules nest deeper than {MAX_PICKLE_DEPTH} at {where!r}")
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
            data = _RestrictedUnpickler(f).load()
        except UserError:
            raise
        except RecursionError:
            raise CheckpointError(f"could not read {str(path)!r}: its pickle nests objects too deeply (an object "
                                  "that contains itself?)") from None
        except Exception as e:  # truncated or corrupt file
            raise CheckpointError(f"could not read {str(path)!r} as an IMM checkpoint pickle: {type(e).__name__}: "
                                  f"{e}") from e
    if isinstance(data, int) and data == torch.serialization.MAGIC_NUMBER:
        raise _LegacyTorchFile(f"{str(path)!r} is a legacy torch.save file, not an authors' pickle")
    if isinstance(data, dict):
        if key not in data:
            raise CheckpointError(f"the pickle {str(path)!r} has no {key!r} entry; it has {sorted(map(str, data))}")
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
        raise CheckpointError(f"{str(path)!r}: positional init args {init_args!r} of {key!r} are not supported")
    if init_kwargs is None or (isinstance(init_kwargs, dict) and not init_kwargs):
        raise CheckpointError(f"{str(path)!r}: the pickled network {key!r} carries no '_init_kwargs' to rebuild it "
                              "from")
    if not isinstance(init_kwargs, dict) or not all(isinstance(k, str) for k in init_kwargs):
        raise CheckpointError(f"{str(path)!r}: field '_init_kwargs' of {key!r} must be a dict of named values, got "
                              f"{type(init_kwargs).__name__}")
    sd = _collect_state_dict(net, source=path)
    _check_tensor_bytes(sd, path, os.path.getsize(path))
    try:  # OmegaConf containers (the authors' Hydra configs) as plain lists and dicts
        init_kwargs = {k: _plain(v) for k, v in init_kwargs.items()}
    except ValueError as e:
        raise CheckpointError(f"{str(path)!r}: field '_init_kwargs' of {key!r}: {e}") from None
    return init_kwargs, sd


# --------------------------------------------------------------------------------------------------------------
# Building models from (init kwargs, state dict)
# --------------------------------------------------------------------------------------------------------------
def _backbone_parameters(model_type):
    """Constructor keywords of the backbone that model_type names (and the stored keys it accepts and ignores)."""
    from .models.registry import constructor_parameters

    return constructor_parameters(model_type)


def _imm_parameters():
    from .models.imm import imm_parameters

    return imm_parameters()


def _check_model_kwargs(kwargs, source="the checkpoint", state_dict=None):
    """Nesting, caps, types and ranges of the sizes a checkpoint declares, and that they agree with the stored
    parameters, before anything is built (imm_fast.models.stored.check_stored_kwargs)."""
    from .models.stored import check_stored_kwargs

    check_stored_kwargs(kwargs, source, state_dict)


def build_from_kwargs(init_kwargs, state_dict, device="cpu", fused=None, source="the checkpoint"):
    """An IMM model from stored constructor kwargs, loaded with `state_dict` (strict), in eval mode
    (imm_fast.models.stored.build_from_kwargs)."""
    from .models.stored import build_from_kwargs as build

    return build(init_kwargs, state_dict, device, fused, source)


def infer_model_kwargs(state_dict, num_heads=None, source="the state dict"):
    """Backbone architecture from a state dict's shapes, read by the backbone that owns it
    (imm_fast.models.stored.infer_model_kwargs)."""
    from .models.stored import infer_model_kwargs as infer

    return infer(state_dict, num_heads, source)


def _infer_unet_kwargs(sd):
    """SongUNet / DhariwalUNet constructor kwargs from the names and shapes of a state dict (model. prefix)."""
    from .models.unet import infer_unet_kwargs

    return infer_unet_kwargs(sd)


_CIFAR_DEFAULTS = dict(noise_schedule="fm", f_type="simple_edm", temb_type="identity", sigma_data=0.5, T=0.994,
                       eps=0.006, time_scale=1000.0)
_IMAGENET_DEFAULTS = dict(noise_schedule="fm", f_type="euler_fm", temb_type="stride", sigma_data=0.5, T=0.994,
                          eps=0.0, time_scale=1000.0)


def _with_prefix(sd):
    if any(k.startswith("model.") for k in sd):
        return OrderedDict(sd)
    return OrderedDict(("model." + k, v) for k, v in sd.items())


def _read_safetensors(path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return meta, load_file(str(path))


def load_official(path, device="cpu", key="ema", fused=None, model_kwargs=None):
    """Load an IMM model (imm_fast's own modules, eval mode, no grad) from any supported checkpoint.

    path: the authors' .pkl (a local file, or `hf://lumaai/imm/<file>` from the Hugging Face Hub); an imm_fast
    .safetensors file; a run checkpoint directory (ema.safetensors preferred, else model.safetensors; a run folder
    uses its newest verified checkpoint); or a plain state dict file (torch.save, legacy torch.save or
    safetensors). key: which network of an authors' pickle ('ema'). fused: override the DiT's fused switch.
    model_kwargs: IMM/backbone settings for plain state dicts (their architecture is inferred from shapes; num_heads
    must be given when the shapes do not determine it; the IMM settings default to the paper's ImageNet ones for a
    DiT, its CIFAR-10 ones for a UNet). Errors name the file and the field.
    """
    from .hub import missing_file_hint, resolve

    p = Path(resolve(path))  # hf://owner/repo/file -> the Hub cache (downloaded once)
    if not p.exists():
        raise FileNotFoundError(f"path={str(path)!r} does not exist{missing_file_hint(path)}")
    if p.is_dir():
        if (p / "latest").is_file() or (p / "checkpoints").is_dir():
            p = find_checkpoint(p)  # a run folder or its checkpoints/: the newest verified checkpoint
        for name in ("ema.safetensors", "model.safetensors"):
            if (p / name).is_file():
                return load_official(p / name, device, key, fused, model_kwargs)
        raise ValueError(f"path={str(path)!r} is a directory without ema.safetensors or model.safetensors")
    with open(p, "rb") as f:
        head = f.read(8)
    if p.suffix == ".safetensors":
        try:
            meta, sd = _read_safetensors(p)
        except Exception as e:
            raise CheckpointError(f"could not read {str(p)!r} as safetensors: {e}") from e
        if meta.get("format") == FORMAT:
            try:
                init_kwargs = json.loads(meta["init_kwargs"])
            except (KeyError, TypeError, ValueError, RecursionError) as e:
                raise CheckpointError(f"{str(p)!r}: metadata field 'init_kwargs' is missing or not JSON "
                                      f"({type(e).__name__}: {e})") from None
            return build_from_kwargs(init_kwargs, sd, device, fused, source=p)
        return _from_plain_state_dict(sd, device, fused, model_kwargs, source=p)
    if head[:2] == b"PK":  # a torch.save zip archive
        _check_zip(p)
        return _from_plain_state_dict(_torch_load(p, key), device, fused, model_kwargs, source=p)
    if not head or head[0] != 0x80:
        raise CheckpointError(f"{str(p)!r} is neither a pickle, a torch checkpoint nor a safetensors file")
    try:
        init_kwargs, sd = read_official_pickle(p, key)
    except _LegacyTorchFile:
        return _from_plain_state_dict(_torch_load(p, key), device, fused, model_kwargs, source=p)
    return build_from_kwargs(init_kwargs, sd, device, fused, source=p)


def _torch_load(p, key):
    """The state dict in a torch.save file (zip or legacy format), read weights-only."""
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        first = " ".join(str(e).split())[:300]
        raise CheckpointError(f"could not read {str(p)!r} as a weights-only torch checkpoint: {first}") from e
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
        obj = obj[key]
    if not (isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise CheckpointError(f"{str(p)!r} holds no state dict (a dict of tensors), got {type(obj).__name__}")
    _check_tensor_bytes(obj, p, os.path.getsize(p))
    return obj


def _from_plain_state_dict(sd, device, fused, model_kwargs, source="the state dict"):
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}")
    sd = _with_prefix(sd)
    model_kwargs = dict(model_kwargs or {})
    arch = infer_model_kwargs(sd, model_kwargs.get("num_heads"), source)
    # Settings the shapes cannot tell: the paper's CIFAR-10 ones for a UNet, the ImageNet ones for a DiT.
    kw = {**(_IMAGENET_DEFAULTS if arch.get("model_type", "DiT") == "DiT" else _CIFAR_DEFAULTS), **arch}
    kw.update(model_kwargs)
    return build_from_kwargs(kw, sd, device, fused, source=source)


# --------------------------------------------------------------------------------------------------------------
# Training state: checkpoints/step-<7-digit step>/ with a manifest written last, the one `latest` resolver,
# stale temporaries, and the run-folder lock
# --------------------------------------------------------------------------------------------------------------
CKPT_PREFIX = "step-"
MANIFEST = "manifest.json"
CKPT_FILES = ("model.safetensors", "ema.safetensors", "train_state.pt", "config.json")
_CKPT_NAME = re.compile(r"step-(\d+)")


class NonFiniteError(UserError, FloatingPointError):
    """Training met non-finite values it must not keep (weights, or too many non-finite steps in a row)."""


class RunFolderBusyError(UserError, ValueError):
    """Another live process holds the run folder's lock."""


def checkpoint_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:07d}"


def _test_pause(point: str, step: int):
    """Test-only: IMM_FAST_TEST_PAUSE=<point>[@<step>] stops a checkpoint write here until the process is killed
    (points: before_manifest, before_rename, after_rename), so tests can kill -9 at a chosen moment."""
    want = os.environ.get("IMM_FAST_TEST_PAUSE")
    if not want:
        return
    name, _, at = want.partition("@")
    if name == point and (not at or int(at) == step):
        print(f"IMM_FAST_TEST_PAUSE {point} step {step}", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)


def _nonfinite_entries(state_dict) -> list:
    """Names of floating-point tensors holding NaN or inf (one host sync for the whole state dict)."""
    keys = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not keys:
        return []
    ok = torch.stack([torch.isfinite(state_dict[k]).all() for k in keys]).tolist()
    return [k for k, good in zip(keys, ok) if not good]


def save_checkpoint(run_dir, step: int, model, ema_state_dict, train_state: dict, config: dict) -> Path:
    """Write <run_dir>/checkpoints/step-<7-digit step>/ and point `latest` at it; returns the folder.

    Order: model.safetensors, ema.safetensors, train_state.pt, config.json, then manifest.json (sizes + sha256 of
    those four) LAST, all in a temporary sibling; fsync; one rename makes the folder appear complete; then `latest`.
    A finished checkpoint is never overwritten (if it exists already, it is kept and returned). Non-finite weights
    are refused (NonFiniteError) before anything is written.
    """
    run_dir = Path(run_dir)
    core = getattr(model, "module", model)
    for what, sd in (("model", core.state_dict()), ("EMA", ema_state_dict)):
        bad = _nonfinite_entries(sd)
        if bad:
            raise NonFiniteError(f"refusing to write checkpoint {checkpoint_name(step)}: the {what} weights hold NaN "
                                 f"or inf ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})")
    ck_root = run_dir / "checkpoints"
    name = checkpoint_name(step)
    final = ck_root / name
    if final.exists():
        return final
    tmp = ck_root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(tmp / "model.safetensors", model)
    save_model(tmp / "ema.safetensors", model, state_dict=ema_state_dict)
    atomic_write(tmp / "train_state.pt", lambda f: torch.save(train_state, f))
    atomic_write_text(tmp / "config.json", json.dumps(config, indent=1))
    _test_pause("before_manifest", step)
    manifest = {"format": "imm_fast-train-state", "version": 1, "step": step,
                "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": file_sha256(tmp / f)} for f in CKPT_FILES}}
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
    fsync_dir(tmp)
    _test_pause("before_rename", step)
    os.rename(tmp, final)  # atomic on POSIX: the folder appears complete or not at all
    fsync_dir(ck_root)
    _test_pause("after_rename", step)
    atomic_write_text(ck_root / "latest", name + "\n")
    fsync_dir(ck_root)
    return final


_VERIFIED = {}  # (folder, stat of its files) -> None: a checkpoint is hashed once per process, not per lookup


def verify_checkpoint(ck, full: bool = True) -> "str | None":
    """None when folder `ck` is a complete checkpoint whose files match its manifest, else the reason (a phrase).

    full=False checks presence and sizes only (no sha256: cheap, for choosing a config). A folder with the four
    files but no manifest (written before manifests existed) passes; nothing written by save_checkpoint can lack
    one, since the manifest is written before the rename that publishes the folder.
    """
    ck = Path(ck)
    if not ck.is_dir():
        return "not a folder"
    missing = [f for f in CKPT_FILES if not (ck / f).is_file()]
    if missing:
        return f"missing {', '.join(missing)} (incomplete)"
    stats = tuple((f, (ck / f).stat().st_size, (ck / f).stat().st_mtime_ns) for f in CKPT_FILES + (MANIFEST,)
                  if (ck / f).is_file())
    key = (str(ck.resolve()), stats)
    if key in _VERIFIED or (not full and not (ck / MANIFEST).is_file()):
        return None
    if not (ck / MANIFEST).is_file():
        _VERIFIED[key] = None
        return None
    try:
        manifest = json.loads((ck / MANIFEST).read_text())
        files = manifest["files"]
        if sorted(files) != sorted(CKPT_FILES):
            return f"{MANIFEST} lists {sorted(files)}, expected {sorted(CKPT_FILES)} (corrupt)"
        for f, want in files.items():
            size = (ck / f).stat().st_size
            if size != want["bytes"]:
                return f"{f} has {size} bytes, its manifest says {want['bytes']} (corrupt or truncated)"
            if full and file_sha256(ck / f) != want["sha256"]:
                return f"{f} does not match its sha256 in {MANIFEST} (corrupt)"
    except (ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e}) (corrupt)"
    if full:
        _VERIFIED[key] = None
    return None


def list_checkpoints(ck_root) -> list:
    """Names of the step-<digits> folders in a checkpoints/ folder, newest (highest step) first."""
    ck_root = Path(ck_root)
    if not ck_root.is_dir():
        return []
    names = [p.name for p in ck_root.iterdir() if _CKPT_NAME.fullmatch(p.name) and p.is_dir()]
    return sorted(names, key=lambda n: int(n[len(CKPT_PREFIX):]), reverse=True)


def read_latest(ck_root) -> "str | None":
    """The checkpoint name in <ck_root>/latest (None without one). It must name a folder inside ck_root: an
    absolute path, a `..` or any other path is refused (a resume would otherwise write into another run)."""
    latest = Path(ck_root) / "latest"
    if not latest.is_file():
        return None
    text = latest.read_text().strip()
    if not _CKPT_NAME.fullmatch(text):
        raise ValueError(f"{str(latest)!r} holds {text!r}, which is not a checkpoint name inside {str(ck_root)!r} "
                         f"(expected {CKPT_PREFIX}<digits>, no path); refusing to follow it. Fix or delete the file")
    return text


def _step_of(name: str) -> int:
    return int(name[len(CKPT_PREFIX):])


def _is_checkpoint_folder(p: Path) -> bool:
    return (p / "train_state.pt").is_file() or (p / MANIFEST).is_file()


def run_folder_of(path) -> Path:
    """The run folder of a run folder, its checkpoints/ folder or one of its checkpoints (nothing is verified)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"resume={str(path)!r} does not exist")
    if _is_checkpoint_folder(p):
        return p.parent.parent
    if (p / "checkpoints").is_dir():
        return p
    if (p / "latest").is_file() or list_checkpoints(p):
        return p.parent
    raise ValueError(f"resume={str(path)!r} is neither a checkpoint folder (with train_state.pt) nor a run folder "
                     "with checkpoints")


def resolve_checkpoint(path, full: bool = True):
    """(checkpoint folder, notes): the one resolver behind resume and load_official.

    path: a checkpoint folder (it must verify), or a run folder / its checkpoints/ folder: the newest checkpoint
    that is complete and verifies; `latest` is only a cross-check (a kill between the rename of a new checkpoint
    and the update of `latest` leaves it one behind). notes: why another checkpoint than `latest` was chosen.
    full=False skips the sha256 checks (see verify_checkpoint).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"resume={str(path)!r} does not exist")
    if _is_checkpoint_folder(p):
        problem = verify_checkpoint(p, full)
        if problem:
            raise ValueError(f"checkpoint {str(p)!r} is corrupt or incomplete: {problem}; resume from its run folder "
                             "to fall back to the newest checkpoint that verifies")
        return p, []
    ck_root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    pointer = read_latest(ck_root)
    names = list_checkpoints(ck_root)
    if not names:
        raise ValueError(f"resume={str(path)!r} is neither a checkpoint folder (with train_state.pt) nor a run "
                         "folder with checkpoints")
    notes = []
    if pointer is not None and pointer not in names:
        notes.append(f"checkpoints/latest names {pointer}, which does not exist")
    chosen = None
    for name in names:
        problem = verify_checkpoint(ck_root / name, full)
        if problem is None:
            chosen = name
            break
        notes.append(f"{name} failed verification: {problem}")
    if chosen is None:
        raise ValueError(f"no complete, verified checkpoint in {str(ck_root)!r}: " + "; ".join(notes))
    if pointer in names and _step_of(pointer) < _step_of(chosen):
        notes.append(f"checkpoints/latest names {pointer} but {chosen} is newer and complete (the run stopped "
                     "before updating latest)")
    return ck_root / chosen, notes


def find_checkpoint(path, explain: bool = True, full: bool = True) -> Path:
    """The checkpoint folder to resume or load from (see resolve_checkpoint); a fallback is explained in one
    line on stderr when `explain`."""
    ck, notes = resolve_checkpoint(path, full)
    if notes and explain:
        print(f"imm_fast: using checkpoint {ck}: " + "; ".join(notes), file=sys.stderr, flush=True)
    return ck


def repair_run_folder(run_dir, chosen: Path) -> list:
    """With the run lock held, after resume chose `chosen`: remove stale temporaries (.tmp-step-* folders and
    atomic-write leftovers), move checkpoints newer than `chosen` (they failed verification) aside to
    corrupt-step-* (kept for inspection, never deleted), and point `latest` at `chosen`. Returns what was done."""
    ck_root = Path(run_dir) / "checkpoints"
    done = []
    stale = sorted(ck_root.glob(f".tmp-{CKPT_PREFIX}*")) + sorted(ck_root.glob(".*.tmp")) + \
        sorted(Path(run_dir).glob(".*.tmp"))
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if stale:
        done.append(f"removed {len(stale)} stale temporar{'y' if len(stale) == 1 else 'ies'} of a killed run "
                     f"({', '.join(p.name for p in stale[:3])}{', ...' if len(stale) > 3 else ''})")
    for name in list_checkpoints(ck_root):
        if Path(chosen).parent == ck_root and _step_of(name) > _step_of(chosen.name):
            aside = ck_root / f"corrupt-{name}"
            n = 1
            while aside.exists():
                aside, n = ck_root / f"corrupt-{name}.{n}", n + 1
            os.rename(ck_root / name, aside)
            done.append(f"moved {name} (it does not verify) aside to {aside.name}")
    if Path(chosen).parent == ck_root:
        try:
            pointer = read_latest(ck_root)
        except ValueError:
            pointer = None
        if pointer != chosen.name:
            atomic_write_text(ck_root / "latest", chosen.name + "\n")
            done.append(f"pointed latest at {chosen.name}")
    return done


def read_checkpoint(ck):
    """(model state dict, EMA state dict, train state) of a checkpoint folder; corrupt files raise ValueError.
    train_state.pt loads with weights_only=True: no code runs when a checkpoint is read."""
    from safetensors.torch import load_file

    ck = Path(ck)
    try:
        state = torch.load(ck / "train_state.pt", map_location="cpu", weights_only=True)
        model_sd = load_file(str(ck / "model.safetensors"))
        ema_sd = load_file(str(ck / "ema.safetensors"))
    except Exception as e:
        raise ValueError(f"checkpoint {str(ck)!r} is unreadable or corrupt ({type(e).__name__}: {e})") from e
    return model_sd, ema_sd, state


class RunLock:
    """One writer per run folder: an exclusive fcntl.flock on <run>/run.lock, held for the life of the run.

    The OS drops the lock when its holder dies, however it dies, so a lock left by a killed run is taken over
    (with a warning naming it); a live holder makes a second writer fail at once with RunFolderBusyError naming
    its pid, host and start time (written inside the file). The file is emptied, not deleted, on release:
    deleting it would let two processes lock two different files of the same name.
    """

    NAME = "run.lock"

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / self.NAME
        self.fd = None

    def _holder(self, fd) -> dict:
        try:
            raw = os.pread(fd, 4096, 0)
            return json.loads(raw) if raw.strip() else {}
        except (OSError, ValueError):
            return {"unreadable": True}

    @staticmethod
    def _describe(h: dict) -> str:
        return (f"pid {h.get('pid', '?')} on host {h.get('host', '?')} (started {h.get('started', '?')}, "
                f"command {h.get('command', '?')!r})")

    def acquire(self):
        import fcntl

        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise RunFolderBusyError(
                f"run folder {str(self.run_dir)!r} is in use by {self._describe(holder)}: one run folder takes one "
                "writer (two would interleave checkpoints and metrics). Wait for it to finish or stop it, or choose "
                "another run_name") from None
        except OSError as e:  # a filesystem without locks (some network mounts): say so, do not pretend
            print(f"imm_fast: warning: cannot lock {str(self.path)!r} ({e}); this filesystem does not support file "
                  "locks, so nothing stops a second run from writing the same folder", file=sys.stderr, flush=True)
            locked = False
        prev = self._holder(fd)
        if prev and locked:
            print(f"imm_fast: taking over the lock of {str(self.run_dir)!r} left by {self._describe(prev)}, which no "
                  "longer holds it (it was killed)", file=sys.stderr, flush=True)
        elif prev:
            print(f"imm_fast: warning: {str(self.path)!r} names {self._describe(prev)}, which may still be running",
                  file=sys.stderr, flush=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "command": " ".join(sys.argv)[:200]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self):
        if self.fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass  # closing the file releases the lock anyway
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
