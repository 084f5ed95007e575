"""The backbone registry and the model config section every backbone extends.

A backbone is one module that defines a frozen dataclass `XConfig(ModelConfig)` decorated with `@register`: its
fields are its config section (checked once, when built), and its class attributes and methods say how to build the
network, its size variants, how to read its architecture from a state dict, the least parameter count its declared
sizes imply (checked against a checkpoint before anything is allocated) and its IMM defaults. `model_type` is
resolved here and only here (`resolve`), for configs and stored checkpoint kwargs alike.

`ModelConfig(model_type=..., ...)` builds the registered section of that backbone (a DiTConfig for "DiT").
Fields of another registered backbone are dropped there: the layout before backbones had their own sections kept
every backbone's fields side by side and ignored the others (so saved configs still load); a name no backbone
knows is refused.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Optional

from .._fields import _validate, check_fields, excerpt, spec
from ..errors import CheckpointError, ConfigError, ConfigTypeError
from ..schedule import F_TYPES, NOISE_SCHEDULES

PRECISIONS = (None, "bf16", "fp16")               # autocast dtypes (models/imm.py): ModelConfig.mixed_precision
TEMB_TYPES = ("identity", "stride")               # second time input of the backbone (models/imm.py): s or t - s
DEFAULT_MODEL_TYPE = "DiT"

_BACKBONES: dict = {}  # model_type -> its ModelConfig subclass, in registration order


def register(cls):
    """Class decorator: make a ModelConfig subclass the section of the backbone `cls.name`."""
    if not (isinstance(cls, type) and issubclass(cls, ModelConfig) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register expects a ModelConfig dataclass, got {cls!r}")
    if not isinstance(getattr(cls, "name", None), str) or cls.network is None:
        raise TypeError(f"{cls.__name__} must set `name` (its model_type) and `network` (its nn.Module class)")
    if cls.name in _BACKBONES and _BACKBONES[cls.name] is not cls:
        raise ValueError(f"model_type={cls.name!r} is already registered by {_BACKBONES[cls.name].__name__}")
    _BACKBONES[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a backbone (tests register toy ones)."""
    _BACKBONES.pop(name, None)


def names() -> tuple:
    """The registered model_type names."""
    return tuple(_BACKBONES)


def resolve(model_type, key: str = "model_type"):
    """(config class, size keywords) for a model_type: a registered name, or a variant alias a backbone accepts in
    stored kwargs (e.g. the authors' 'DiT_XL_2'). model_type is checked here only."""
    if isinstance(model_type, str):
        if model_type in _BACKBONES:
            return _BACKBONES[model_type], {}
        for cls in _BACKBONES.values():
            sizes = cls.alias(model_type)
            if sizes is not None:
                return cls, sizes
    aliases = [a for a in (c.alias_help for c in _BACKBONES.values()) if a]
    extra = f" (or an alias: {', '.join(aliases)})" if aliases else ""
    raise ConfigError(f"{key}={excerpt(model_type)} is not one of {names()}{extra}")


def other_backbones_fields(target) -> set:
    """Field names of the other registered backbones that `target` (a section class) does not have."""
    return set().union(*(c.field_names() for c in _BACKBONES.values())) - target.field_names()


def _model_type_of(v) -> Optional[str]:
    return None if v in _BACKBONES else f"is not one of {names()}"


# ----------------------------------------------------------------------------------------------------------------
# The model section: fields every backbone shares (the IMM wrapper's), and the backbone interface
# ----------------------------------------------------------------------------------------------------------------
class _Dispatch(type):
    """`ModelConfig(**kw)` builds the section of kw['model_type']; any section refuses unknown names clearly."""

    def __call__(cls, *args, **kw):
        if args:
            raise ConfigTypeError(f"{cls.__name__} takes keyword arguments only, got {len(args)} positional")
        if cls.network is None:  # the base: pick the backbone's section
            target, sizes = resolve(kw.get("model_type", DEFAULT_MODEL_TYPE), "model.model_type")
            if sizes:
                raise ConfigError(f"model.model_type={kw['model_type']!r} is a checkpoint alias; use "
                                  f"model_type={target.name!r} with its size fields")
            others = other_backbones_fields(target)
            kw = {k: v for k, v in kw.items() if k not in others}
            cls = target
        unknown = sorted(set(kw) - cls.field_names())
        if unknown:
            raise ConfigError(f"unknown config key {excerpt('model.' + unknown[0])} for model_type="
                              f"{cls.name!r}; its keys: {sorted(cls.field_names())}")
        return super().__call__(**kw)


@dataclass(frozen=True)
class ModelConfig(metaclass=_Dispatch):
    """The model section: the IMM wrapper's fields, shared by every backbone, which extends it with its own.
    `ModelConfig(model_type=..., ...)` builds the registered section of that backbone (see the module doc)."""

    _section = "model"  # the dotted prefix of this section's keys in a TrainConfig
    name = None         # model_type of a registered section (the authors' class name)
    network = None      # its nn.Module class
    alias_help = ""     # how model_type aliases look (e.g. "DiT_<S|B|L|XL>_<2|4|8>"), named in errors
    imm_defaults = {}   # IMM settings a plain state dict of this backbone is loaded with (load_official)

    img_resolution: int = spec(32, ge=1, cap=16384)  # input side length (pixels or latent cells)
    img_channels: int = spec(4, ge=1, cap=1024)  # input channels (4 for SD-VAE latents, 3 for RGB)
    label_dim: int = spec(1000, ge=0, cap=1_000_000)  # number of classes; 0 = unconditional
    model_type: str = spec(DEFAULT_MODEL_TYPE, check=_model_type_of)  # backbone, the authors' class name:
                                           # "DiT", "SongUNet" (DDPM++/NCSN++) or "DhariwalUNet" (ADM)
    dropout: float = spec(0.0, ge=0, lt=1)  # dropout in the backbone's blocks (shared by student and target
                                           # through the RNG state)
    class_dropout_prob: float = spec(0.0, ge=0, lt=1)  # label dropout inside the backbone (kept 0: IMM drops
                                           # labels in the loss)
    s_embed: bool = True                   # second time embedder (s or t-s)
    noise_schedule: str = spec("fm", choices=NOISE_SCHEDULES)  # interpolant: "fm" (OT-FM) or "vp_cosine"
    f_type: str = spec("euler_fm", choices=F_TYPES)  # output function: "euler_fm", "simple_edm" or "identity"
    temb_type: str = spec("stride", choices=TEMB_TYPES)  # second time input: "identity" -> s, "stride" -> t - s
    time_scale: float = spec(1000.0, gt=0, cap=1e6)  # time inputs are multiplied by this
    sigma_data: float = spec(0.5, gt=0, cap=1e6)  # data std sigma_d; prior noise is N(0, sigma_d^2 I)
    T: float = spec(0.994, gt=0, le=1)     # largest time
    eps: float = spec(0.0, ge=0, lt=1)     # smallest time eps_t (< T)
    mixed_precision: Optional[str] = spec(None, choices=PRECISIONS)  # network autocast on CUDA: None, bf16, fp16

    def __post_init__(self):
        _validate(self)
        check_imm_settings(dataclasses.asdict(self), self._section)
        if self.model_type != self.name:
            raise ConfigError(f"model.model_type={self.model_type!r} does not match this {type(self).__name__} "
                              f"(model_type={self.name!r}); change backbones with with_overrides or ModelConfig")
        self.check()

    # -- what a backbone defines (overridden in its module) -----------------------------------------------------
    def check(self) -> None:
        """Rules between this backbone's fields (types, ranges and choices are the fields' own specs)."""

    def backbone_kwargs(self) -> dict:
        """The network's constructor keywords beyond the IMM wrapper's (the authors' names). Every backbone defines
        it: the base class cannot know them."""
        raise TypeError(f"{type(self).__name__} must define backbone_kwargs() (its network's constructor keywords)")

    @classmethod
    def network_kwargs(cls, img_resolution, img_channels, label_dim, model_kwargs) -> dict:
        """All constructor keywords of `network` from the IMM wrapper's arguments and stored backbone keywords."""
        return dict(img_resolution=img_resolution, in_channels=img_channels, label_dim=label_dim, **model_kwargs)

    @classmethod
    def alias(cls, model_type: str) -> Optional[dict]:
        """Size keywords for a model_type alias of this backbone (stored kwargs), or None."""
        return None

    @classmethod
    def owns(cls, state_dict) -> bool:
        """Whether a state dict (keys with the `model.` prefix) holds this backbone."""
        return False

    @classmethod
    def infer(cls, state_dict, num_heads=None, source="the state dict") -> dict:
        """IMM(**...) keywords of the architecture stored in `state_dict` (shapes and names only)."""
        raise CheckpointError(f"{source}: a {cls.name} cannot be read from a bare state dict; save it with its "
                              "init_kwargs (imm_fast.checkpoints.save_model)")

    @classmethod
    def min_params(cls, kw: dict) -> Optional[int]:
        """A lower bound on the parameter count that stored keywords `kw` declare, computed without building
        anything, or None (then the network is built on the meta device and counted)."""
        return None

    # -- shared machinery ---------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> frozenset:
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def variant(cls, name: str, **kw):
        """The config of a named size (e.g. DiT's "XL/2"), with other fields as keywords."""
        raise ConfigError(f"model_type={cls.name!r} has no named sizes")

    def param_lower_bound(self) -> int:
        """At least how many parameters this config's network has, computed without allocating it."""
        kw = self.backbone_kwargs()
        n = type(self).min_params({**self.imm_kwargs(), **kw})
        return n if n is not None else count_on_meta(type(self), self.img_resolution, self.img_channels,
                                                     self.label_dim, kw)

    def imm_kwargs(self) -> dict:
        """The IMM wrapper's constructor keywords (the fields every backbone shares)."""
        base = {f.name for f in dataclasses.fields(ModelConfig)} - {"dropout", "class_dropout_prob", "s_embed"}
        return {k: getattr(self, k) for k in sorted(base, key=_BASE_ORDER.index)}


_BASE_ORDER = [f.name for f in dataclasses.fields(ModelConfig)]


def check_imm_settings(v: dict, prefix: str = "") -> None:
    """Rules between the IMM wrapper's settings (a dict with f_type, noise_schedule, eps, T), shared by ModelConfig
    and the IMM model built from stored kwargs."""
    k = (lambda name: f"{prefix}.{name}" if prefix else name)
    if v["f_type"] == "euler_fm" and v["noise_schedule"] != "fm":
        raise ConfigError(f"{k('f_type')}='euler_fm' needs {k('noise_schedule')}='fm', got "
                          f"{excerpt(v['noise_schedule'])}")
    if not v["eps"] < v["T"]:
        raise ConfigError(f"{k('eps')}={v['eps']!r} must be < {k('T')}={v['T']!r} (times run from T down to eps)")


def constructor_parameters(model_type) -> set:
    """Constructor keywords of the backbone model_type names (plus the stored keys its class accepts and ignores)."""
    cls, _ = resolve(model_type)
    params = set(inspect.signature(cls.network.__init__).parameters) - {"self", "kwargs"}
    return params | set(getattr(cls, "ignored_kwargs", ()))


def checked_network_kwargs(cls, kw: dict) -> dict:
    """Stored backbone keywords checked by the section's own field rules where the names agree."""
    shared = {"dropout", "s_embed", "class_dropout_prob"}  # base fields that are also backbone keywords
    known = cls.field_names() - {f.name for f in dataclasses.fields(ModelConfig)} | shared
    return {**kw, **check_fields(cls, {k: kw[k] for k in known if k in kw}, prefix="")}


def count_on_meta(cls, img_resolution, img_channels, label_dim, backbone_kw: dict) -> int:
    """Parameters of the network built on the meta device (shapes only, no memory): for backbones without an
    analytic `min_params`."""
    import torch

    with torch.device("meta"):
        net = cls.network(**cls.network_kwargs(img_resolution, img_channels, label_dim, backbone_kw))
    return sum(p.numel() for p in net.parameters())


def declared(cls, kw: dict) -> dict:
    """Stored keywords `kw` over the network constructor's defaults: the sizes a build would use."""
    params = inspect.signature(cls.network.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **kw}
