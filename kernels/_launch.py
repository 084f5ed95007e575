"""What every Triton launcher shares: running the launch on the tensors' own CUDA device.

Triton launches on the *current* CUDA device, not on the device of the pointers it is given: tensors on cuda:1
launched while cuda:0 is current give an illegal address or silent peer access. `device_guard(t)` makes t's
device current for the launch (torch.cuda.device; a no-op context for CPU and meta tensors).
"""
from __future__ import annotations

import contextlib

import torch


def device_guard(t: torch.Tensor):
    """A context in which Triton launches on t's device (cheap when it is already current)."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def target_arch(device) -> int:
    """The compute capability (80, 90, ...) Triton compiles this launch for: the current device's, which the
    launchers' device guard makes the tensors' device. The CPU interpreter takes the sm_90 configs."""
    if device.type == "cpu":
        return 90
    from triton.runtime import driver

    return driver.active.get_current_target().arch


def sm_count(device: torch.device, default: int = 132) -> int:
    """Streaming multiprocessors of a CUDA device; `default` (an H100 SXM's 132) for CPU and meta tensors."""
    if device.type != "cuda":
        return default
    return torch.cuda.get_device_properties(device).multi_processor_count


def interpreter_compat() -> None:
    """Let the Triton CPU interpreter of triton < 3.7 run loops with runtime bounds (`range(0, T, BLOCK)`).

    Its tensors convert to a Python int with `int(array)` on a 1-element (not 0-d) NumPy array, which NumPy >= 2.4
    refuses ("only 0-dimensional arrays can be converted to Python scalars"); newer interpreters squeeze first.
    This converts the same way on every version. Only under TRITON_INTERPRET=1; compiled kernels are untouched."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "imm_fast_squeezes", False):
        return

    def patch_lang_tensor(tensor, *args, **kwargs):
        out = patch(tensor, *args, **kwargs)
        tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])  # restored with the rest afterwards
        return out

    patch_lang_tensor.imm_fast_squeezes = True
    interpreter._patch_lang_tensor = patch_lang_tensor
