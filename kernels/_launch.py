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


def sm_count(device: torch.device, default: int = 132) -> int:
    """Streaming multiprocessors of a CUDA device; `default` (an H100 SXM's 132) for CPU and meta tensors."""
    if device.type != "cuda":
        return default
    return torch.cuda.get_device_properties(device).multi_processor_count
