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
"""
from __future__ import annotations

import collections
import inspect
import io
import json
import os
import pickle
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

FORMAT = "imm_fast"


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The pickle asks for something that is not on the allow-list (it could run code)."""


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------
def atomic_write(path, write_fn):
    """write_fn(tmp_path) into a temporary file beside `path`, fsync it, then os.replace it into place.

    A crash at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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


def _collect_state_dict(obj, prefix="", out=None):
    """Walk _parameters/_buffers/_modules of the records like nn.Module.state_dict does."""
    out = OrderedDict() if out is None else out
    st = _record_state(obj)
    non_persistent = st.get("_non_persistent_buffers_set") or set()
    for name, p in (st.get("_parameters") or {}).items():
        if p is not None:
            out[prefix + name] = p.detach() if isinstance(p, torch.Tensor) else p
    for name, b in (st.get("_buffers") or {}).items():
        if b is not None and name not in non_persistent:
            out[prefix + name] = b
    for name, m in (st.get("_modules") or {}).items():
        if m is not None:
            _collect_state_dict(m, prefix + name + ".", out)
    return out


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
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # truncated or corrupt file
            raise ValueError(f"could not read {path!s} as an IMM checkpoint pickle: {type(e).__name__}: {e}") from e
    if isinstance(data, dict):
        if key not in data:
            raise ValueError(f"the pickle {path!s} has no {key!r} entry; it has {sorted(map(str, data))}")
        net = data[key]
    else:
        net = data
    if not isinstance(net, _Record):
        raise ValueError(f"entry {key!r} of {path!s} is not a pickled module (got {type(net).__name__})")
    st = _record_state(net)
    init_kwargs = {k: _plain(v) for k, v in dict(st.get("_init_kwargs") or {}).items()}
    if st.get("_init_args"):
        raise ValueError(f"{path!s}: positional init args {st['_init_args']!r} are not supported")
    if not init_kwargs:
        raise ValueError(f"{path!s}: the pickled network carries no init kwargs to rebuild it from")
    return init_kwargs, _collect_state_dict(net)


# --------------------------------------------------------------------------------------------------------------
# Building models from (init kwargs, state dict)
# --------------------------------------------------------------------------------------------------------------
def _backbone_parameters(model_type):
    """Constructor keywords of the backbone that model_type names (the DiT also takes 'skip', unused)."""
    from .models.dit import DiT
    from .models.unet import UNET_TYPES

    cls = UNET_TYPES.get(model_type, DiT)
    extra = set() if model_type in UNET_TYPES else {"skip"}
    return (set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}) | extra


def _imm_parameters():
    from .models.imm import IMM

    return set(inspect.signature(IMM.__init__).parameters) - {"self", "model_kwargs"}


def build_from_kwargs(init_kwargs, state_dict, device="cpu", fused=None):
    """An IMM model from stored constructor kwargs, loaded with `state_dict` (strict), in eval mode.

    Keys the authors' backbone accepts but ignores (it takes **kwargs) are dropped with a warning.
    """
    from .models.imm import IMM

    import numpy as np

    kw = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in init_kwargs.items()}
    model_type = kw.get("model_type", "DiT")
    allowed = _imm_parameters() | _backbone_parameters(model_type)
    for k in ("in_channels", "out_channels"):  # the wrapper passes img_channels for both
        kw.pop(k, None)
    ignored = sorted(k for k in kw if k not in allowed)
    for k in ignored:
        kw.pop(k)
    if ignored:
        warnings.warn(f"checkpoint init kwargs ignored (the authors' {model_type} ignores them too): {ignored}")
    if fused is not None and "fused" in allowed:  # the DiT's switch; the UNets have no fused path
        kw["fused"] = fused
    if isinstance(kw.get("embedding_kwargs"), dict):
        kw["embedding_kwargs"] = dict(kw["embedding_kwargs"])
    model = IMM(**kw)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model built from its kwargs: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    return model.to(device).eval().requires_grad_(False)


_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}


def infer_model_kwargs(state_dict):
    """Backbone architecture from a state dict's shapes: a UNet (model.enc.* keys) or a DiT (heads: the DiT
    table, else width / 64)."""
    sd = state_dict
    if any(k.startswith("model.enc.") for k in sd):
        return _infer_unet_kwargs(sd)
    w = sd["model.x_embedder.proj.weight"]  # (C, Cin, p, p)
    hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
    num_patches = sd["model.pos_embed"].shape[1]
    grid = int(round(num_patches ** 0.5))
    depth = len({k.split(".")[2] for k in sd if k.startswith("model.blocks.")})
    rows = sd["model.y_embedder.embedding_table.weight"].shape[0]
    mlp_hidden = sd["model.blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * hidden
    return dict(img_resolution=grid * patch, img_channels=in_ch, patch_size=patch, hidden_size=hidden, depth=depth,
                num_heads=_HEADS.get(hidden, max(1, hidden // 64)), mlp_ratio=mlp_hidden / hidden,
                num_classes=rows - 1, label_dim=rows - 1, s_embed="model.s_embedder.mlp.0.weight" in sd,
                qk_norm="model.blocks.0.attn.q_norm.weight" in sd)


def _infer_unet_kwargs(sd):
    """SongUNet / DhariwalUNet constructor kwargs from the names and shapes of a state dict (model. prefix)."""
    import re

    song = not any(k.startswith("model.out_conv.") for k in sd)
    enc = {}  # resolution -> {block index: out channels}
    attn = set()
    for k, v in sd.items():
        m = re.match(r"model\.enc\.(\d+)x\d+_block(\d+)\.conv1\.weight$", k)
        if m:
            enc.setdefault(int(m[1]), {})[int(m[2])] = v.shape[0]
        m = re.match(r"model\.enc\.(\d+)x\d+_block\d+\.qkv\.weight$", k)
        if m:
            attn.add(int(m[1]))
    if not enc:
        raise KeyError("model.enc.<R>x<R>_block0.conv1.weight")
    conv = next(k for k in sd if re.match(r"model\.enc\.\d+x\d+_conv\.weight$", k))
    res = int(conv.split(".")[2].split("x")[0])
    in_ch = sd[conv].shape[1]
    noise_ch = sd["model.map_layer0.weight"].shape[1]
    emb_ch = sd["model.map_layer0.weight"].shape[0]
    mc = sd[conv].shape[0] if song else noise_ch  # Song: the stem conv is model_channels wide; ADM: the features
    levels = sorted(enc, reverse=True)
    label_key = "model.map_label.weight"
    kw = dict(img_resolution=res, img_channels=in_ch, model_type="SongUNet" if song else "DhariwalUNet",
              label_dim=sd[label_key].shape[1] if label_key in sd else 0, model_channels=mc,
              channel_mult=[enc[r][0] // mc for r in levels], channel_mult_emb=emb_ch // mc,
              num_blocks=len(enc[levels[0]]), attn_resolutions=sorted(attn, reverse=True),
              s_embed="model.map_layer0_s.weight" in sd)
    if "model.map_augment.weight" in sd:
        kw["augment_dim"] = sd["model.map_augment.weight"].shape[1]
    if song:
        f = next((v for k, v in sd.items() if k.endswith("resample_filter")), None)
        taps = [1, 1]
        if f is not None:  # f = outer(f1, f1) / sum(f1)^2: its diagonal's square root is f1 / sum(f1)
            f1 = f.reshape(f.shape[-2], f.shape[-1]).diagonal().double().sqrt()
            taps = [int(round(v)) for v in (f1 / f1.min()).tolist()]
        kw.update(embedding_type="fourier" if "model.map_noise.freqs" in sd else "positional",
                  channel_mult_noise=noise_ch // mc, resample_filter=taps,
                  encoder_type="residual" if any("_aux_residual" in k for k in sd) else
                  "skip" if any("_aux_skip" in k for k in sd) else "standard",
                  decoder_type="skip" if sum(k.endswith("_aux_conv.weight") for k in sd) > 1 else "standard")
    return kw


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

    path: the authors' .pkl; an imm_fast .safetensors file; a run checkpoint directory (ema.safetensors preferred,
    else model.safetensors; a run folder follows its `latest` checkpoint); or a plain state dict file.
    key: which network of an authors' pickle ('ema'). fused: override the DiT's fused switch.
    model_kwargs: IMM/backbone settings for plain state dicts (their architecture is inferred from shapes; the IMM
    settings default to the paper's ImageNet ones for a DiT, its CIFAR-10 ones for a UNet).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"path={str(path)!r} does not exist")
    if p.is_dir():
        if (p / "latest").is_file():
            p = p / (p / "latest").read_text().strip()
        elif (p / "checkpoints" / "latest").is_file():
            p = p / "checkpoints" / (p / "checkpoints" / "latest").read_text().strip()
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
            raise ValueError(f"could not read {str(p)!r} as safetensors: {e}") from e
        if meta.get("format") == FORMAT:
            return build_from_kwargs(json.loads(meta["init_kwargs"]), sd, device, fused)
        return _from_plain_state_dict(sd, device, fused, model_kwargs)
    if head[:2] == b"PK":  # a torch.save zip archive
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"could not read {str(p)!r} as a weights-only torch checkpoint: {e}") from e
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
        if not (isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())):
            raise ValueError(f"{str(p)!r} holds no state dict (a dict of tensors)")
        return _from_plain_state_dict(obj, device, fused, model_kwargs)
    if not head or head[0] != 0x80:
        raise ValueError(f"{str(p)!r} is neither a pickle, a torch checkpoint nor a safetensors file")
    init_kwargs, sd = read_official_pickle(p, key)
    return build_from_kwargs(init_kwargs, sd, device, fused)


def _from_plain_state_dict(sd, device, fused, model_kwargs):
    sd = _with_prefix(sd)
    try:
        arch = infer_model_kwargs(sd)
    except (KeyError, StopIteration) as e:
        raise ValueError(f"state dict is not an IMM DiT or UNet (missing {e})") from None
    # Settings the shapes cannot tell: the paper's CIFAR-10 ones for a UNet, the ImageNet ones for a DiT.
    kw = {**(_IMAGENET_DEFAULTS if arch.get("model_type", "DiT") == "DiT" else _CIFAR_DEFAULTS), **arch}
    kw.update(model_kwargs or {})
    return build_from_kwargs(kw, sd, device, fused)
