"""The C++/CUDA extension (csrc/): ops registered as torch.ops.imm_fast_C.* by TORCH_LIBRARY.

Where it comes from, first that works: `imm_fast._C` (built by setup.py when torch was importable at build
time), else a just-in-time build with ninja, else nothing: auto stays on the reference path after a one-time
warning, and an explicit backend="cpp"/"cuda" raises with the reason. IMM_FAST_BUILD_EXT=0 forbids the build.

The just-in-time build never hangs and never mixes two builds:
- its folder is <TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions>/imm_fast/<name>, where name carries a hash of
  the csrc/ files, the flags, and the torch, CUDA, compiler and Python versions (not the checkout's path: two
  checkouts with the same sources share one library; different sources never meet);
- a build runs in a fresh `<name>.tmp-<pid>-*` folder renamed to <name> when complete, so a killed build leaves
  no half-built library behind (its temporaries are removed by the next build);
- the library's size and sha256 are recorded beside it (library.json) before that rename and checked before
  every load: a truncated or altered library (dlopen of a truncated one dies of SIGBUS) is never loaded but
  rebuilt, after a one-line warning (without a compiler: the reference path, after a one-line warning);
- one process builds at a time (a `<name>.lock` file naming its pid, host and start time, complete from the
  moment it exists); the others wait with a one-line message; a lock that names no owner (empty, unreadable) or
  whose process is gone is cleared at once, one older than IMM_FAST_BUILD_STALE_S (default 1800 s, the longest
  sane build) too, with a warning; a waiter gives up after IMM_FAST_BUILD_WAIT_S (default 1800 s) with
  BuildTimeoutError (auto then runs the reference path, after a one-time warning).
- a one-line message goes to stderr while building.

The CPU loops are built for the compiler's baseline ISA plus an AVX2+FMA copy chosen at run time (no
-march=native, so a cached build is safe on another CPU); IMM_FAST_CPU_ISA=base forces the baseline copy.
CUDA sources join the build only with a CUDA build of torch and a CUDA toolkit (CUDA_HOME) of the same CUDA
major version (`cuda_mismatch`: otherwise one warning line naming both, and the C++ CPU kernels alone).

Contract (shapes: B = G*M rows, D values per row; see csrc/mmd.h):
    mmd_ext(device_type) -> module-like with .mmd_fwd, or None;  unavailable(device_type) -> reason or None
    mmd_fwd(x2d, y2d, group_size, scale, eps, rbf, normalize_dim, need_gx, need_gy) -> (mmd2, gx, gy)
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import types

import torch

from . import _backend

_NS = "imm_fast_C"
_MMD_OP = f"{_NS}::mmd_fwd"
_lock = threading.Lock()
_loaded = None  # None: not tried yet; True / False: the ops are / are not registered
_error = None   # why the ops are not registered


class BuildTimeoutError(RuntimeError):
    """Waited IMM_FAST_BUILD_WAIT_S for another process's build of the extension."""


def _seconds(var: str, default: float) -> float:
    raw = os.environ.get(var)
    if raw is None or raw == "":
        return default
    try:
        v = float(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} must be a number of seconds") from None
    if not v > 0:
        raise ValueError(f"{var}={raw!r} must be > 0 seconds")
    return v


def _csrc_dir() -> str:
    """csrc/ beside the package (a source or editable install), else the copy installed as imm_fast/csrc."""
    here = os.path.dirname(os.path.abspath(__file__))
    beside = os.path.join(os.path.dirname(here), "csrc")
    return beside if os.path.isdir(beside) else os.path.join(here, "csrc")


def _cuda_build_possible() -> bool:
    """A CUDA build of torch, a CUDA toolkit, and the same CUDA major version in both."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return False
    why = cuda_mismatch()
    if why:
        _backend.warn_once("ext-cuda-mismatch", f"imm_fast: {why}")
    return why is None


def _tool_output(cmd) -> str:
    """stdout (else stderr) of `cmd --version`, or '' when it does not run."""
    try:
        out = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _tool_version(cmd) -> str:
    """First line of `cmd --version` (the compiler's identity in the build key), or '' when it does not run."""
    out = _tool_output(cmd)
    return out.splitlines()[0] if out else ""


def toolkit_cuda_version():
    """The CUDA toolkit's version at CUDA_HOME as "major.minor" (from `nvcc --version`), or None without one."""
    from torch.utils import cpp_extension

    if not cpp_extension.CUDA_HOME:
        return None
    m = re.search(r"release (\d+)\.(\d+)", _tool_output([os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")]))
    return f"{m.group(1)}.{m.group(2)}" if m else None


_MISMATCH = {}  # the toolkit probe runs nvcc (tens of ms): once per process and version pair


def cuda_mismatch():
    """One line naming both versions when the CUDA toolkit's major version differs from torch.version.cuda's
    (torch's extension build refuses that pair: the CUDA kernels cannot be built, the C++ CPU ones can), else
    None. setup.py reports it at build time, the just-in-time build and the cuda backend's why_not at run time."""
    key = (torch.version.cuda, os.environ.get("CUDA_HOME"))
    if key not in _MISMATCH:
        toolkit, built = toolkit_cuda_version(), torch.version.cuda
        _MISMATCH[key] = None
        if toolkit and built and toolkit.split(".")[0] != built.split(".")[0]:
            _MISMATCH[key] = (f"the CUDA toolkit is CUDA {toolkit} but torch was built with CUDA {built} (major "
                              f"versions differ): the CUDA kernels are not built, the C++ CPU kernels are; a CUDA "
                              f"{built.split('.')[0]}.x toolkit (CUDA_HOME) builds them")
    return _MISMATCH[key]


def _spec(with_cuda: bool) -> dict:
    """Sources and flags of the extension build."""
    src = _csrc_dir()
    cpp = sorted(glob.glob(os.path.join(src, "*.cpp")))
    if not cpp:
        raise FileNotFoundError(f"no C++ sources in {src} (not an editable/source install)")
    cuda_flag = ["-DIMM_FAST_WITH_CUDA"] if with_cuda else []
    return dict(
        sources=cpp + (sorted(glob.glob(os.path.join(src, "*.cu"))) if with_cuda else []),
        extra_cflags=["-O3", "-fopenmp"] + cuda_flag,
        extra_cuda_cflags=["-O3", "-DIMM_FAST_WITH_CUDA"],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[src],
        with_cuda=with_cuda,
    )


def _build_key(spec: dict) -> str:
    """Hash of everything the library depends on: every file of the sources' folders, flags, tool versions."""
    h = hashlib.sha256()
    folders = sorted({os.path.dirname(p) for p in spec["sources"]} | set(spec["extra_include_paths"]))
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "*"))):
            if os.path.isfile(path) and path.endswith((".cpp", ".cu", ".h", ".c", ".cuh")):
                h.update(os.path.basename(path).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read() + b"\0")
    flags = {k: v for k, v in spec.items() if k not in ("sources", "extra_include_paths")}
    h.update(json.dumps(flags, sort_keys=True).encode())
    h.update(f"{torch.__version__}|{torch.version.cuda}|{sys.version}|{sys.platform}".encode())
    h.update(_tool_version([os.environ.get("CXX", "c++")]).encode())
    if spec.get("with_cuda"):
        from torch.utils import cpp_extension

        h.update(_tool_version([os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")]).encode())
    return h.hexdigest()[:16]


def _cache_root() -> str:
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                  "torch_extensions")
    return os.path.join(base, "imm_fast")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# ----------------------------------------------------------------------------------------------------------------
# The cached library is loaded only when it matches the size and sha256 recorded when it was published: dlopen of
# a truncated shared library maps pages past its end and the process dies of SIGBUS, with no message.

RECORD = "library.json"  # beside the library in its folder: {"library": file name, "size": bytes, "sha256": hex}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _record_library(lib: str) -> None:
    """Record lib's size and sha256 beside it (in the build's temporary folder, before it is published)."""
    rec = {"library": os.path.basename(lib), "size": os.path.getsize(lib), "sha256": _sha256(lib)}
    with open(os.path.join(os.path.dirname(lib), RECORD), "w") as f:
        json.dump(rec, f)


def library_problem(lib: str):
    """Why the cached library must not be loaded (missing, no record, size or sha256 not as recorded), or None."""
    if not os.path.isfile(lib):
        return "it is missing"
    try:
        with open(os.path.join(os.path.dirname(lib), RECORD)) as f:
            rec = json.load(f)
        want_size, want_sha = int(rec["size"]), str(rec["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"it has no readable {RECORD} (size and sha256 recorded at build time)"
    size = os.path.getsize(lib)
    if size != want_size:
        return f"it is {size} bytes where {want_size} were recorded (truncated or overwritten)"
    if _sha256(lib) != want_sha:
        return "its sha256 differs from the one recorded at build time"
    return None


# ----------------------------------------------------------------------------------------------------------------
# The build lock: `<name>.lock` holds its owner's pid, host and start time from the moment it exists

def _read_owner(lock_path: str):
    """The lock's owner record, or None when the file is gone; {} when it is empty or unreadable."""
    try:
        with open(lock_path) as f:
            owner = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _stale_reason(lock_path: str, owner: dict, stale_s: float):
    """Why the lock is stale (no owner recorded, its process is gone, older than stale_s), or None."""
    try:
        age = time.time() - os.path.getmtime(lock_path)
    except FileNotFoundError:
        return None
    if not isinstance(owner.get("pid"), int) or not isinstance(owner.get("host"), str):
        return "it records no owner (empty or unreadable; imm_fast writes the owner before the lock appears)"
    if owner["host"] == socket.gethostname() and not _pid_alive(owner["pid"]):
        return f"its process {owner['pid']} is gone"
    if age > stale_s:
        return f"it is {age:.0f} s old (IMM_FAST_BUILD_STALE_S={stale_s:.0f})"
    return None


def _try_lock(lock_path: str) -> bool:
    """Take the lock: a complete owner record hard-linked into place, so no process ever sees it empty."""
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    tmp = f"{lock_path}.{os.getpid()}-{time.time_ns()}"
    with open(tmp, "w") as f:
        json.dump(owner, f)
    try:
        os.link(tmp, lock_path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: create exclusively, then write
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
        return True
    finally:
        os.remove(tmp)


def _release(lock_path: str) -> None:
    owner = _read_owner(lock_path) or {}
    if (owner.get("pid"), owner.get("host")) == (os.getpid(), socket.gethostname()):  # ours only
        try:
            os.remove(lock_path)
        except FileNotFoundError:
            pass


def _wait_turn(lock_path: str, stale_s: float, wait_s: float, t0: float, told: bool) -> bool:
    """One step of waiting for another build: clear a stale lock at once, else sleep a little; raises
    BuildTimeoutError after wait_s. Returns whether the one-line waiting message was written."""
    owner = _read_owner(lock_path)
    if owner is None:
        return told  # released between our attempts: try again at once
    why = _stale_reason(lock_path, owner, stale_s)
    if why:
        _backend.warn_once(f"ext-stale-{lock_path}-{owner.get('pid')}",
                           f"imm_fast: clearing a stale build lock {lock_path} ({why}; owner {owner})")
        try:
            os.remove(lock_path)
        except FileNotFoundError:
            pass
        return told
    waited = time.monotonic() - t0
    if waited > wait_s:
        raise BuildTimeoutError(
            f"waited {waited:.0f} s (IMM_FAST_BUILD_WAIT_S={wait_s:.0f}) for process {owner.get('pid')} on "
            f"{owner.get('host')} to build the imm_fast C++ kernels ({lock_path}); if that process is hung, "
            "stop it or remove the lock file")
    if not told:
        sys.stderr.write(f"imm_fast: waiting for process {owner.get('pid')} on {owner.get('host')} to build "
                         f"the C++ kernels ({lock_path}; at most {wait_s:.0f} s)\n")
        sys.stderr.flush()
    time.sleep(0.2)
    return True


# ----------------------------------------------------------------------------------------------------------------
# Building and publishing

def _remove_dead_temporaries(root: str, name: str) -> None:
    """`<name>.tmp-<pid>-*` folders of builds (and discarded libraries) and `<name>.lock.<pid>-*` owner records
    of processes that are gone."""
    for prefix in (f"{name}.tmp-", f"{name}.lock."):
        for path in glob.glob(os.path.join(root, prefix + "*")):
            try:
                pid = int(os.path.basename(path)[len(prefix):].split("-")[0])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def _discard(final: str) -> None:
    """Move a published folder out of the way (one rename: no process finds it half-removed), then remove it."""
    aside = f"{final}.tmp-{os.getpid()}-{time.time_ns()}-discarded"
    try:
        os.rename(final, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _publish(tmp: str, final: str, lib: str) -> None:
    """Rename the finished build folder to its final name; a verified library published meanwhile (by a build
    that outlived its stale lock) is kept instead."""
    try:
        os.rename(tmp, final)
        return
    except OSError:
        if library_problem(lib) is None:
            shutil.rmtree(tmp, ignore_errors=True)
            return
    _discard(final)
    os.rename(tmp, final)


def _build_locked(root: str, name: str, spec: dict, final: str, lib: str):
    """The build itself, under the lock: (lib, loaded) as build_library returns it."""
    from torch.utils import cpp_extension

    why = library_problem(lib)
    if why is None:  # finished by another process meanwhile
        return lib, False
    if os.path.exists(final):  # never load a broken library: build it again
        _backend.warn_once(f"ext-broken-{final}", f"imm_fast: the cached C++ library {lib} is not loaded ({why}); "
                           "rebuilding it")
        _discard(final)
    _remove_dead_temporaries(root, name)
    tmp = f"{final}.tmp-{os.getpid()}-{time.time_ns()}"
    sys.stderr.write(f"imm_fast: building the C++ kernels once (about a minute; cached in {final})\n")
    sys.stderr.flush()
    os.makedirs(tmp)
    pause = float(os.environ.get("IMM_FAST_BUILD_TEST_PAUSE_S", "0") or 0)  # tests: die mid-build
    if pause > 0:
        time.sleep(pause)
    # Builds in tmp and loads the library from there (torch.ops.load_library): the rename keeps it.
    try:
        cpp_extension.load(name=name, build_directory=tmp, is_python_module=False,
                           verbose=os.environ.get("IMM_FAST_VERBOSE_BUILD", "0") == "1", **spec)
        built = os.path.join(tmp, f"{name}.so")
        if not os.path.exists(built):  # a second build of one name in a process: torch names it <name>_v<k>.so
            os.rename(max(glob.glob(os.path.join(tmp, f"{name}_v*.so")), key=os.path.getmtime), built)
        _record_library(built)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final, lib)
    return lib, True


def build_library(name: str, spec: dict, root: str = None):
    """Build spec's sources (cpp_extension.load keywords) into <root>/<name>/<name>.so once (see the module
    docstring); returns (its path, whether this call loaded it already: a build loads what it built). A cached
    library is returned only when it matches its recorded size and sha256; a broken one is rebuilt.
    Safe against concurrent and killed builds; never waits longer than IMM_FAST_BUILD_WAIT_S."""
    root = root or _cache_root()
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, name)
    lib = os.path.join(final, f"{name}.so")
    lock_path = final + ".lock"
    wait_s = _seconds("IMM_FAST_BUILD_WAIT_S", 1800.0)
    stale_s = _seconds("IMM_FAST_BUILD_STALE_S", 1800.0)
    t0, told = time.monotonic(), False
    while library_problem(lib) is not None:
        if _try_lock(lock_path):
            try:
                return _build_locked(root, name, spec, final, lib)
            finally:
                _release(lock_path)
        told = _wait_turn(lock_path, stale_s, wait_s, t0, told)
    return lib, False


def _jit_build(with_cuda: bool) -> None:
    """Build (once, cached by the build key) and load csrc/ with torch.ops.load_library."""
    spec = _spec(with_cuda)
    name = f"imm_fast_C_{'cuda' if with_cuda else 'cpu'}_{_build_key(spec)}"
    lib, loaded = build_library(name, spec)
    if not loaded:
        torch.ops.load_library(lib)


def _has_kernel(key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(_MMD_OP, key)
    except RuntimeError:  # the op is not registered at all
        return False


def _register_fake() -> None:
    """Shapes-only implementation so torch.compile / FakeTensor can trace through the op; gradients not asked
    for are (0,) tensors, as the C++ and CUDA code return them (_backend.absent)."""
    try:
        @torch.library.register_fake(_MMD_OP)
        def _(x, y, group_size, scale, eps, rbf, normalize_dim, need_gx, need_gy):
            G = x.shape[0] // group_size
            mmd2 = x.new_empty((G,), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
            gx = x.new_empty(tuple(x.shape)) if need_gx else _backend.absent(x)
            gy = y.new_empty(tuple(y.shape)) if need_gy else _backend.absent(y)
            return mmd2, gx, gy
    except RuntimeError:  # already registered (e.g. a second loader in the same process)
        pass


def _load() -> bool:
    global _loaded, _error
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
                    except Exception as e2:  # no compiler, no ninja, build error, unwritable cache, timeout...
                        err = e2
                        if with_cuda:
                            _backend.warn_once("ext-cuda-build", f"imm_fast: building the CUDA kernels failed "
                                               f"({type(e2).__name__}: {e2}); trying the CPU ops alone.")
        _loaded = err is None and _has_kernel("CPU")
        if _loaded:
            _register_fake()
        else:
            _error = f"{type(err).__name__}: {err}" if err else "the op is not registered"
            _backend.warn_once(
                "ext-build",
                f"imm_fast: C++ extension unavailable ({_error}); using the reference PyTorch path (a C++ "
                "compiler and ninja enable it; IMM_FAST_BUILD_EXT=0 skips the build attempt).")
        return _loaded


def unavailable(device_type: str):
    """Why the extension cannot run on tensors of device_type here (may build it once), or None."""
    if device_type not in ("cpu", "cuda"):
        return f"the C++ extension has no {device_type} kernels"
    if not _load():
        return f"the C++ extension is not available ({_error})"
    key = "CPU" if device_type == "cpu" else "CUDA"
    if not _has_kernel(key):
        if key == "CUDA" and torch.version.cuda is not None and cuda_mismatch():
            return f"the C++ extension has no CUDA kernel: {cuda_mismatch()}"
        return (f"the C++ extension has no {key} kernel (it needs a CUDA build of torch and a CUDA toolkit when "
                f"it is built; torch.version.cuda={torch.version.cuda})")
    return None


def mmd_ext(device_type: str):
    """The MMD op for tensors of `device_type` ("cpu" or "cuda"), or None when it is unavailable."""
    why = unavailable(device_type)
    if why is not None:
        if device_type in ("cpu", "cuda") and _loaded:
            _backend.warn_once(f"ext-{device_type}", f"imm_fast: {why}; using another backend.")
        return None
    return types.SimpleNamespace(mmd_fwd=getattr(torch.ops, _NS).mmd_fwd)
