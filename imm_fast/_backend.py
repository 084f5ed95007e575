"""Which backends exist and which one runs.

Order of precedence: the `backend=` argument > the IMM_FAST_BACKEND environment variable > auto.
Auto picks, per op and device, the fastest implementation available (a table the kernel modules fill
from measurements), falling back to the pure-torch reference ("torch").
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

BACKENDS = ("torch", "triton", "cpp", "cuda")


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


def triton_usable(device: torch.device) -> bool:
    """Triton can run a kernel on tensors of this device."""
    if not has_triton():
        return False
    if device.type == "cuda":
        return not triton_interpret()
    return device.type == "cpu" and triton_interpret()


def check_backend(backend, allowed, arg="backend"):
    if backend is not None and backend not in allowed:
        raise ValueError(f"{arg}={backend!r} is not one of {tuple(allowed)} (or None for auto)")
    return backend


def requested(backend, allowed):
    """The backend asked for by the argument or, failing that, by IMM_FAST_BACKEND (None = auto)."""
    check_backend(backend, allowed)
    if backend is None:
        env = os.environ.get("IMM_FAST_BACKEND") or None
        if env is not None and env not in BACKENDS:
            raise ValueError(f"IMM_FAST_BACKEND={env!r} is not one of {BACKENDS}")
        # One variable steers every op: an op without that backend (attention has no "cpp") picks automatically.
        backend = env if env in allowed else None
    return backend


_warned = set()


def warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
