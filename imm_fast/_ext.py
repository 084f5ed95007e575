"""The C++/CUDA extension (csrc/): ops registered as torch.ops.imm_fast_C.* by TORCH_LIBRARY.

Where it comes from, first that works: `imm_fast._C` (built by setup.py when torch was importable at build
time), else a just-in-time build with ninja into the torch extensions cache (~/.cache/torch_extensions, or
TORCH_EXTENSIONS_DIR; cpp_extension locks the build folder, and the cached library is reused while sources,
flags and torch version are unchanged), else nothing: callers stay on the reference path after a one-time
warning. IMM_FAST_BUILD_EXT=0 forbids the just-in-time build.

The CPU loops are built for the compiler's baseline ISA plus an AVX2+FMA copy chosen at run time (no
-march=native, so a cached build is safe on another CPU); IMM_FAST_CPU_ISA=base forces the baseline copy.
CUDA sources join the build only with a CUDA build of torch and a CUDA toolkit (CUDA_HOME).

Contract (shapes: B = G*M rows, D values per row; see csrc/mmd.h):
    mmd_ext(device_type) -> module-like with .mmd_fwd, or None
    mmd_fwd(x2d, y2d, group_size, scale, eps, rbf, normalize_dim, need_gx, need_gy) -> (mmd2, gx, gy)
"""
from __future__ import annotations

import glob
import os
import re
import threading
import types

import torch

from . import _backend

_NS = "imm_fast_C"
_MMD_OP = f"{_NS}::mmd_fwd"
_lock = threading.Lock()
_loaded = None  # None: not tried yet; True / False: the ops are / are not registered


def _csrc_dir() -> str:
    """csrc/ beside the package (a source or editable install), else the copy installed as imm_fast/csrc."""
    here = os.path.dirname(os.path.abspath(__file__))
    beside = os.path.join(os.path.dirname(here), "csrc")
    return beside if os.path.isdir(beside) else os.path.join(here, "csrc")


def _cuda_build_possible() -> bool:
    from torch.utils import cpp_extension

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _jit_build(with_cuda: bool) -> None:
    """Compile csrc/ with ninja (cached) and load it with torch.ops.load_library."""
    from torch.utils import cpp_extension

    src = _csrc_dir()
    cpp = sorted(glob.glob(os.path.join(src, "*.cpp")))
    if not cpp:
        raise FileNotFoundError(f"no C++ sources in {src} (not an editable/source install)")
    sources = cpp + (sorted(glob.glob(os.path.join(src, "*.cu"))) if with_cuda else [])
    # torch's version in the name: a cached library built against other torch headers is never reused.
    tag = re.sub(r"\W", "_", torch.__version__)
    cpp_extension.load(
        name=f"imm_fast_C_{'cuda' if with_cuda else 'cpu'}_{tag}",
        sources=sources,
        extra_cflags=["-O3", "-fopenmp"] + (["-DIMM_FAST_WITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=["-O3", "-DIMM_FAST_WITH_CUDA"],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[src],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("IMM_FAST_VERBOSE_BUILD", "0") == "1",
    )


def _has_kernel(key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(_MMD_OP, key)
    except RuntimeError:  # the op is not registered at all
        return False


def _register_fake() -> None:
    """Shapes-only implementation so torch.compile / FakeTensor can trace through the op."""
    try:
        @torch.library.register_fake(_MMD_OP)
        def _(x, y, group_size, scale, eps, rbf, normalize_dim, need_gx, need_gy):
            G = x.shape[0] // group_size
            mmd2 = x.new_empty((G,), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
            gx = x.new_empty(tuple(x.shape) if need_gx else (0, 0))
            gy = y.new_empty(tuple(y.shape) if need_gy else (0, 0))
            return mmd2, gx, gy
    except RuntimeError:  # already registered (e.g. a second loader in the same process)
        pass


def _load() -> bool:
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        err = None
        try:
            import imm_fast._C  # noqa: F401  (registers the ops)
        except ImportError as e:
            err = e
            if os.environ.get("IMM_FAST_BUILD_EXT", "1") == "0":
                err = RuntimeError("imm_fast._C is not built and IMM_FAST_BUILD_EXT=0 forbids building it")
            else:
                # CUDA sources join when they can; if that build fails, the CPU ops alone are still worth having.
                for with_cuda in ([True, False] if _cuda_build_possible() else [False]):
                    try:
                        _jit_build(with_cuda)
                        err = None
                        break
                    except Exception as e2:  # no compiler, no ninja, build error, unwritable cache...
                        err = e2
                        if with_cuda:
                            _backend.warn_once("ext-cuda-build", f"imm_fast: building the CUDA kernels failed "
                                               f"({type(e2).__name__}: {e2}); trying the CPU ops alone.")
        _loaded = err is None and _has_kernel("CPU")
        if _loaded:
            _register_fake()
        else:
            _backend.warn_once(
                "ext-build",
                f"imm_fast: C++ extension unavailable ({type(err).__name__ if err else 'op missing'}: {err}); "
                "using the reference PyTorch path (a C++ compiler and ninja enable it; IMM_FAST_BUILD_EXT=0 "
                "skips the build attempt).")
        return _loaded


def mmd_ext(device_type: str):
    """The MMD op for tensors of `device_type` ("cpu" or "cuda"), or None when it is unavailable."""
    if device_type not in ("cpu", "cuda"):
        return None
    if not _load():
        return None
    key = "CPU" if device_type == "cpu" else "CUDA"
    if not _has_kernel(key):
        _backend.warn_once(
            f"ext-{device_type}",
            f"imm_fast: the C++ extension has no {key} kernel (needs a CUDA build of torch and a CUDA toolkit "
            f"when it is built; torch.version.cuda={torch.version.cuda}); using another backend.")
        return None
    return types.SimpleNamespace(mmd_fwd=getattr(torch.ops, _NS).mmd_fwd)
