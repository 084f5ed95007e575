"""Writes pickles in the format of the authors' released checkpoints, without the authors' code.

The authors' IMMPrecond and DiT classes are NVlabs `torch_utils.persistence` persistent classes: each pickles as
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, meta = dict(type='class', version=6,
module_src=<source>, class_name=<name>, state=<__dict__>); timm's PatchEmbed/Attention/Mlp and torch.nn modules
pickle as ordinary classes. Here stand-in modules with those names are registered in sys.modules (by the caller's
monkeypatch) and an imm_fast model's module tree is re-dressed as those classes, so the stream has the same
shape as the authors'. The same holds for the UNets (training/unets.py: SongUNet, DhariwalUNet and all their
layers are persistent classes). module_src is whatever the caller passes: a loader must never execute it.
"""
import pickle
import sys
import types

import torch.nn as nn

PERSISTENT = {"IMM": "IMMPrecond", "DiT": "DiT", "TimestepEmbedder": "TimestepEmbedder",
              "LabelEmbedder": "LabelEmbedder", "DiTBlock": "DiTBlock", "FinalLayer": "FinalLayer"}
# The authors' training/unets.py: every layer of SongUNet / DhariwalUNet is a persistent class of the same name
# (torch.nn.ModuleDict containers pickle as themselves).
UNET_PERSISTENT = ("SongUNet", "DhariwalUNet", "UNetBlock", "Linear", "Conv2d", "GroupNorm", "PositionalEmbedding",
                   "FourierEmbedding")
TIMM = {"PatchEmbed", "Attention", "Mlp"}


def install_fake_modules(monkeypatch, module_src):
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called: only its name goes into the pickle
        raise AssertionError("the fake reconstructor must not run")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    torch_utils = types.ModuleType("torch_utils")
    torch_utils.persistence = persistence
    vit = types.ModuleType("timm.models.vision_transformer")
    classes = {}
    for name in TIMM:
        cls = type(name, (nn.Module,), {"__module__": "timm.models.vision_transformer"})
        setattr(vit, name, cls)
        classes[name] = cls

    def make_persistent(class_name, module="training.dit"):
        def __reduce__(self):
            meta = dict(type="class", version=6, module_src=module_src, class_name=class_name,
                        state=dict(self.__dict__))
            return (_reconstruct_persistent_obj, (meta,), None)

        return type(class_name, (nn.Module,), {"__module__": module, "__reduce__": __reduce__})

    for ours, theirs in PERSISTENT.items():
        classes[ours] = make_persistent(theirs)
    for name in UNET_PERSISTENT:
        classes[name] = make_persistent(name, "training.unets")
    for name, mod in [("torch_utils", torch_utils), ("torch_utils.persistence", persistence),
                      ("timm", types.ModuleType("timm")), ("timm.models", types.ModuleType("timm.models")),
                      ("timm.models.vision_transformer", vit)]:
        monkeypatch.setitem(sys.modules, name, mod)
    return classes


def redress(module, classes):
    """A copy of the module tree whose objects are the stand-in classes (same __dict__ and tensors)."""
    name = type(module).__name__
    cls = None if type(module).__module__.startswith("torch.nn") else classes.get(name)  # nn.Linear stays itself
    if cls is None:
        if not type(module).__module__.startswith("torch.nn"):
            raise TypeError(f"no stand-in for {type(module)}")
        cls = type(module)
    obj = cls.__new__(cls)
    obj.__dict__.update(module.__dict__)
    obj.__dict__["_modules"] = {k: (redress(v, classes) if v is not None else None)
                                for k, v in module._modules.items()}
    return obj


def write_official_pickle(path, model, init_kwargs, monkeypatch, module_src="raise SystemExit('never run me')"):
    """Pickle {'ema': model as IMMPrecond, 'step': 1} in the authors' format."""
    classes = install_fake_modules(monkeypatch, module_src)
    net = redress(model, classes)
    net.__dict__["_init_args"] = ()
    net.__dict__["_init_kwargs"] = dict(init_kwargs)
    for k in ("init_kwargs", "compute_dtype"):
        net.__dict__.pop(k, None)
    with open(path, "wb") as f:
        pickle.dump({"ema": net, "step": 1}, f)
