"""The backend registry: which implementations each op has, and which one runs.

Each op (`mmd`, `adaln`, `attention`) registers an ordered list of `Impl`s, fastest first, the pure-torch
reference ("torch") last. An Impl states what it supports (device types, dtypes, `limits` for shapes and
options) and whether it is present at all (`ready`: triton importable, C++ extension built); `why_not(args)`
collects every reason it cannot run on a call's `args` (an `OpArgs`: device type, dtype and the op's few
shape/option facts, plain values so the choice can be cached and traced as a constant by torch.compile).

One rule for every op:
    the `backend=` argument  >  the IMM_FAST_BACKEND environment variable  >  auto
- argument: runs that backend, or raises ValueError listing every registered backend's reasons for `args`.
- IMM_FAST_BACKEND (any registered backend name, e.g. torch / triton / cpp / cuda; unset or "" = auto) steers
  every op: an op that has that backend and can run it here uses it; otherwise the op warns once (per op, backend
  and reasons) and picks automatically. A name that no op registered raises ValueError.
- auto: the first Impl in the op's list that can run and that auto may pick (`auto_skip` returns a reason to
  pass over an Impl that could run: the Triton interpreter on CPU, a shape measured slower); "torch" always can.
A new backend is one `register(op, Impl(name, ..., launcher=...))` call, under any name of the form NAME_RE; the
op's custom op finds its launcher with `launcher(op, backend, device_type)` (each op's module documents what its
launcher returns), and the op's tests loop over `names(op)`. Launchers of every backend follow one convention for
outputs that were not asked for: `absent(like)`, a (0,) tensor on like's device and dtype, a distinct tensor per
output; the fake (shape-only) implementations return the same.

The `fused` switch of the DiT and the reference switch of training resolve in `resolve_fused` (see there for the
precedence of `TrainConfig.reference`, `ModelConfig.fused`, `LossConfig.backend` and IMM_FAST_BACKEND).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

ENV = "IMM_FAST_BACKEND"
NAME_RE = r"[a-z][a-z0-9_]{0,31}"  # backend and op names: short lowercase identifiers (error messages, env values)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the fused kernels take (fp32 accumulation)


# ----------------------------------------------------------------------------------------------------------------
# What a call needs, what an implementation supports

@dataclasses.dataclass(frozen=True)
class OpArgs:
    """The facts of one call that backend choice depends on (hashable; no tensors)."""
    device: str                    # device type: "cpu", "cuda", ...
    dtype: torch.dtype             # compute dtype (promoted over the inputs)
    extra: Tuple[Tuple[str, object], ...] = ()  # op-specific facts, e.g. (("Dh", 64),)

    def get(self, key, default=None):
        return dict(self.extra).get(key, default)


def op_args(device, dtype, **extra) -> OpArgs:
    return OpArgs(torch.device(device).type, dtype, tuple(sorted(extra.items())))


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation of an op. Reasons are short phrases: '<backend>: <reason>' is how they are shown."""
    name: str                                                  # matches NAME_RE; "torch" is the reference
    devices: Optional[Tuple[str, ...]] = None                  # device types it runs on (None: any)
    dtypes: Optional[Tuple[torch.dtype, ...]] = None           # None: any floating dtype
    ready: Optional[Callable[[str], Optional[str]]] = None     # device type -> why it is absent here, or None
    limits: Optional[Callable[[OpArgs], List[str]]] = None     # shape / option limits -> reasons
    auto_skip: Optional[Callable[[OpArgs], Optional[str]]] = None  # why auto passes it over though it could run
    launcher: Optional[Callable[[str], Callable]] = None      # device type -> the op's launcher (imported lazily)

    def why_not(self, args: OpArgs) -> List[str]:
        """Every reason this implementation cannot run on args (empty: it can)."""
        reasons = []
        if self.devices is not None and args.device not in self.devices:
            reasons.append(f"runs on {'/'.join(self.devices)} tensors, not {args.device}")
        if self.dtypes is not None and args.dtype not in self.dtypes:
            reasons.append(f"takes {'/'.join(_dt(d) for d in self.dtypes)}, not {_dt(args.dtype)}")
        if not reasons and self.ready is not None:  # may build or import: only when it could otherwise run
            r = self.ready(args.device)
            if r:
                reasons.append(r)
        if self.limits is not None:
            reasons.extend(self.limits(args))
        return reasons


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


REFERENCE = Impl("torch")  # the pure-torch <op>_ref: any device, any dtype

_REGISTRY: Dict[str, List[Impl]] = {}
_NAMES: Tuple[str, ...] = ()  # every registered backend name, in first-registration order (kept by _changed)


def _check_name(what: str, name) -> None:
    if not isinstance(name, str) or not re.fullmatch(NAME_RE, name):
        raise ValueError(f"{what} {name!r} must be a short lowercase name matching {NAME_RE!r}")


def register(op: str, impl: Impl) -> None:
    """Add impl to op's list, after the kernels registered before it and before the reference (auto tries them
    in that order). Registering a name again replaces that entry in place."""
    _check_name("op name", op)
    if not isinstance(impl, Impl):
        raise TypeError(f"register({op!r}, impl): impl must be an imm_fast._backend.Impl, got {type(impl).__name__}")
    _check_name("backend name", impl.name)
    if impl.name == "torch" and impl is not REFERENCE:
        raise ValueError(f"backend name 'torch' is the pure-torch reference of every op; name {op}'s new "
                         "implementation otherwise")
    if impl is not REFERENCE and not callable(impl.launcher):
        raise ValueError(f"backend {impl.name!r} of {op} needs launcher=<device type -> the op's launcher>")
    kernels = [i for i in _REGISTRY.get(op, []) if i is not REFERENCE]
    at = next((k for k, i in enumerate(kernels) if i.name == impl.name), None)
    if at is None:
        kernels.append(impl)
    elif impl is not REFERENCE:
        kernels[at] = impl
    _REGISTRY[op] = kernels + [REFERENCE]
    _changed()


def unregister(op: str, name: str) -> None:
    """Remove backend name from op (the reference stays); a name op does not have raises KeyError."""
    if name == "torch" or name not in [i.name for i in impls(op)]:
        raise KeyError(f"{op} has no removable backend {name!r}; it has {names(op)}")
    _REGISTRY[op] = [i for i in _REGISTRY[op] if i.name != name]
    if _REGISTRY[op] == [REFERENCE]:
        del _REGISTRY[op]
    _changed()


def _changed() -> None:
    global _NAMES
    _NAMES = tuple(dict.fromkeys(i.name for op in _REGISTRY for i in _REGISTRY[op]))
    _CHOICES.clear()


def impls(op: str) -> List[Impl]:
    if op not in _REGISTRY:
        raise KeyError(f"no backends registered for op {op!r}; known: {sorted(_REGISTRY)}")
    return list(_REGISTRY[op])


def names(op: Optional[str] = None) -> Tuple[str, ...]:
    """op's backend names in auto order (the reference "torch" last), or with op None every name any op has."""
    return tuple(i.name for i in impls(op)) if op is not None else _NAMES


def launcher(op: str, backend: str, device_type: str):
    """What backend registered as op's launcher for device_type (the op's custom op calls it with the op's
    contract, documented in the op's module)."""
    impl = next((i for i in impls(op) if i.name == backend), None)
    if impl is None or impl.launcher is None:
        raise ValueError(f"{op} has no launcher for backend={backend!r}; its backends: {names(op)}")
    return impl.launcher(device_type)


def reasons(op: str, args: OpArgs) -> Dict[str, List[str]]:
    """{backend: its reasons not to run on args} for every backend of op (an empty list: it can run)."""
    return {i.name: i.why_not(args) for i in impls(op)}


def _format(op: str, args: OpArgs) -> str:
    lines = []
    for name, rs in reasons(op, args).items():
        lines.append(f"  {name}: {'; '.join(rs) if rs else 'can run'}")
    have = names(op)
    lines += [f"  {b}: not implemented for {op}" for b in _NAMES if b not in have]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The rule: argument > IMM_FAST_BACKEND > auto

def check_backend(backend, arg="backend"):
    """backend is None (auto) or a name some op registered."""
    if backend is not None and (not isinstance(backend, str) or backend not in _NAMES):
        raise ValueError(f"{arg}={backend!r} is not one of the registered backends {_NAMES} (or None for auto)")
    return backend


def env_backend() -> Optional[str]:
    """IMM_FAST_BACKEND, checked (None when unset or empty)."""
    env = os.environ.get(ENV) or None
    if env is not None and env not in _NAMES:
        raise ValueError(f"{ENV}={env!r} is not one of the registered backends {_NAMES} (unset it, or set it "
                         "empty, for auto)")
    return env


def auto(op: str, args: OpArgs) -> str:
    """The first implementation of op that can run on args and that auto may pick."""
    for impl in impls(op):
        if not impl.why_not(args) and not (impl.auto_skip and impl.auto_skip(args)):
            return impl.name
    return "torch"


# Choices made so far: select runs on every eager op call (each DiT block calls several ops), and walking the
# registry with its reason strings took 7.4 us a call against 3.5 us cached (CPU, measured). What it depends on
# does not change within a process (an extension that was built or failed stays so; triton stays importable or
# not), except the registry itself, so `register` and `unregister` clear this. Only checked arguments get here;
# errors are not cached: they raise again, with their reasons.
_CHOICES: Dict[tuple, str] = {}


def select(op: str, backend: Optional[str], device, dtype, **facts) -> str:
    """The backend op runs on (device, dtype, facts): argument > IMM_FAST_BACKEND > auto (module docstring).
    Plain arguments only, so that torch.compile can treat the choice as a constant of the traced graph."""
    key = (op, backend, os.environ.get(ENV) or None, device, dtype, *sorted(facts.items()))
    try:
        return _CHOICES[key]
    except (KeyError, TypeError):  # TypeError: an unhashable backend, refused by check_backend below
        check_backend(backend)
        choice = _select(op, backend, env_backend(), op_args(device, dtype, **facts))
        _CHOICES[key] = choice
        return choice


def _select(op, backend, env, args):
    if backend is not None:
        impl = next((i for i in impls(op) if i.name == backend), None)
        if impl is None or impl.why_not(args):
            raise ValueError(f"{op}: backend={backend!r} cannot run on {args.device} {_dt(args.dtype)} tensors "
                             f"here. Every backend's reasons:\n{_format(op, args)}")
        return backend
    if env is not None:
        impl = next((i for i in impls(op) if i.name == env), None)
        why = ["not implemented for this op"] if impl is None else impl.why_not(args)
        if not why:
            return env
        choice = auto(op, args)
        warn_once(f"env-{op}-{env}-{args.device}-{args.dtype}", f"{ENV}={env!r} cannot run {op} on {args.device} "
                  f"{_dt(args.dtype)} tensors ({'; '.join(why)}); {op} picks automatically: {choice!r}")
        return choice
    return auto(op, args)


def constant_under_compile(fn):
    """Mark fn as returning a constant for torch.compile (its result is baked into the graph, as
    torch.compiler.assume_constant_result does) without importing torch._dynamo (~1 s) at `import imm_fast`."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True  # the mark assume_constant_result sets (checked by tests/test_backend.py)
    return fn


select = constant_under_compile(select)


# ----------------------------------------------------------------------------------------------------------------
# Shared facts about the environment

_HAS_TRITON = None


def has_triton() -> bool:
    """Triton importable (never imported by `import imm_fast`); looked up once."""
    global _HAS_TRITON
    if _HAS_TRITON is None:
        try:
            _HAS_TRITON = importlib.util.find_spec("triton") is not None
        except (ImportError, ValueError):
            _HAS_TRITON = False
    return _HAS_TRITON


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors (how CI checks them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device) -> bool:
    """Triton can run a kernel on tensors of this device."""
    return triton_ready(torch.device(device).type) is None


def triton_ready(device_type: str) -> Optional[str]:
    """Why Triton cannot run on this device type here, or None."""
    if not has_triton():
        return "triton is not installed"
    if device_type == "cuda" and triton_interpret():
        return "TRITON_INTERPRET=1 runs Triton on CPU tensors only"
    if device_type == "cpu" and not triton_interpret():
        return "on CPU tensors Triton needs TRITON_INTERPRET=1 (the interpreter, for tests)"
    return None


def interpreter_not_auto(args: OpArgs) -> Optional[str]:
    """auto_skip for Triton: the CPU interpreter is for tests, never picked automatically."""
    return "the Triton CPU interpreter is used only when asked for" if args.device == "cpu" else None


def absent(like: torch.Tensor, dtype=None) -> torch.Tensor:
    """An output that was not asked for: a (0,) tensor on like's device (like's dtype
    unless given). Launchers of every backend and the fake implementations return it."""
    return like.new_empty(0, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# The fused / reference switch

def resolve_fused(fused: Optional[bool], device, reference: bool = False) -> bool:
    """Whether the DiT runs its blocks through imm_fast's fused ops (True) or the reference ops (False).

    Precedence, first that applies:
      1. reference=True (TrainConfig.reference): False; training then also sets the loss backend to "torch"
         (`reference_loss_backend`), so the whole step is the plain PyTorch path.
      2. fused=True / False (ModelConfig.fused, DiT(fused=...)): as given. The fused ops still choose their
         backend by the same rule as every op (argument > IMM_FAST_BACKEND > auto); on a device without kernels
         they run the reference ops, in the fused block order.
      3. fused=None and IMM_FAST_BACKEND=torch: False (the environment asks for the reference everywhere).
      4. fused=None: True on CUDA when triton is installed, else False.
    LossConfig.backend is the `backend=` argument of mmd_loss: None is auto under IMM_FAST_BACKEND.
    """
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be None, True or False, got {fused!r}")
    if reference:
        return False
    if fused is not None:
        return fused
    if env_backend() == "torch":
        return False
    return torch.device(device).type == "cuda" and has_triton()


def reference_loss_backend(backend: Optional[str], reference: bool = False) -> Optional[str]:
    """LossConfig.backend under TrainConfig.reference (rule 1 of resolve_fused): "torch" when reference, else
    backend as LossConfig checked it (against mmd's registered backends)."""
    return "torch" if reference else backend


# ----------------------------------------------------------------------------------------------------------------

_warned = set()


def warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
