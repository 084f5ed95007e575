"""The just-in-time build of imm_fast/_ext.py cannot hang: a killed build, a stale lock, a live one, the cache key.

Builds a tiny C++ file (no torch headers: about a second) through the same `build_library` the extension uses.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings

import pytest

from imm_fast import _ext

pytestmark = pytest.mark.skipif(shutil.which("c++") is None or shutil.which("ninja") is None,
                                reason="needs a C++ compiler and ninja")

SRC = 'extern "C" int imm_fast_build_probe() { return 42; }\n'


def _spec(folder):
    path = os.path.join(folder, "probe.cpp")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        with open(path, "w") as f:
            f.write(SRC)
    return dict(sources=[path], extra_cflags=["-O0"], extra_include_paths=[folder])


def _build_in_subprocess(root, src, name, pause):
    code = textwrap.dedent(f"""
        from imm_fast import _ext
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_ext_build import _spec
        _ext.build_library({name!r}, _spec({src!r}), root={root!r})
    """)
    env = dict(os.environ, IMM_FAST_BUILD_TEST_PAUSE_S=str(pause))
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _wait_for(pred, timeout=60.0):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def test_killed_build_does_not_block_the_next(tmp_path):
    """SIGKILL a process in the middle of its build (lock held, temporary folder made): the next call clears the
    stale lock with a warning, removes the dead build's folder and finishes within seconds."""
    root, src, name = str(tmp_path / "cache"), str(tmp_path / "src"), "probe_kill"
    _spec(src)
    proc = _build_in_subprocess(root, src, name, pause=120)
    lock = os.path.join(root, name + ".lock")
    try:
        _wait_for(lambda: os.path.exists(lock) and any(".tmp-" in p for p in os.listdir(root)))
        owner = json.load(open(lock))
        assert owner["pid"] == proc.pid and owner["host"] == socket.gethostname()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert os.path.exists(lock)  # left behind by the killed build
    record = f"{lock}.{proc.pid}-1"  # an owner record of a process killed while taking the lock
    open(record, "w").close()
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lib, loaded = _ext.build_library(name, _spec(src), root=root)
    elapsed = time.monotonic() - t0
    assert elapsed < 60, elapsed  # a small build, no waiting on the dead owner
    assert any("stale build lock" in str(x.message) and "is gone" in str(x.message) for x in w)
    assert os.path.isfile(lib) and loaded
    assert not os.path.exists(lock)
    assert not [p for p in os.listdir(root) if ".tmp-" in p]  # the dead build's temporaries are gone
    assert not os.path.exists(record)
    # The next process finds the finished library at once: no lock, no build.
    t0 = time.monotonic()
    assert _ext.build_library(name, _spec(src), root=root) == (lib, False)
    assert time.monotonic() - t0 < 1


def _fake_lock(path, pid, age=0.0):
    with open(path, "w") as f:
        json.dump({"pid": pid, "host": socket.gethostname(), "started": time.time() - age}, f)
    if age:
        t = time.time() - age
        os.utime(path, (t, t))


def test_live_owner_times_out_with_a_clear_error(tmp_path, monkeypatch):
    """A lock whose owner is alive is waited for, at most IMM_FAST_BUILD_WAIT_S, then a clear error."""
    root, src, name = str(tmp_path / "cache"), str(tmp_path / "src"), "probe_live"
    os.makedirs(root)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _fake_lock(os.path.join(root, name + ".lock"), sleeper.pid)
        monkeypatch.setenv("IMM_FAST_BUILD_WAIT_S", "1")
        t0 = time.monotonic()
        with pytest.raises(_ext.BuildTimeoutError, match=rf"IMM_FAST_BUILD_WAIT_S=1.*process {sleeper.pid} "):
            _ext.build_library(name, _spec(src), root=root)
        assert time.monotonic() - t0 < 10
    finally:
        sleeper.kill()
        sleeper.wait()


def test_old_lock_is_stale_even_with_a_live_owner(tmp_path, monkeypatch):
    root, src, name = str(tmp_path / "cache"), str(tmp_path / "src"), "probe_old"
    os.makedirs(root)
    _fake_lock(os.path.join(root, name + ".lock"), os.getppid(), age=100)  # alive: our parent
    monkeypatch.setenv("IMM_FAST_BUILD_STALE_S", "50")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lib, _ = _ext.build_library(name, _spec(src), root=root)
    assert os.path.isfile(lib)
    assert any("stale build lock" in str(x.message) and "old" in str(x.message) for x in w)


def test_bad_timeouts_are_named(monkeypatch):
    monkeypatch.setenv("IMM_FAST_BUILD_WAIT_S", "soon")
    with pytest.raises(ValueError, match="IMM_FAST_BUILD_WAIT_S='soon'"):
        _ext._seconds("IMM_FAST_BUILD_WAIT_S", 1.0)


def test_build_key_follows_sources_and_flags_not_the_checkout(tmp_path):
    """Two checkouts with the same csrc/ share a key (and so a library); a changed source or flag changes it."""
    a, b = tmp_path / "a" / "csrc", tmp_path / "b" / "csrc"
    shutil.copytree(_ext._csrc_dir(), a)
    shutil.copytree(_ext._csrc_dir(), b)

    def spec(folder, flags=("-O3",)):
        s = _ext._spec(False)
        s["sources"] = [os.path.join(folder, os.path.basename(p)) for p in s["sources"]]
        s["extra_include_paths"] = [str(folder)]
        s["extra_cflags"] = list(flags)
        return s

    ka = _ext._build_key(spec(a))
    assert ka == _ext._build_key(spec(b))
    assert ka != _ext._build_key(spec(a, flags=("-O2",)))
    with open(b / "mmd.h", "a") as f:
        f.write("\n// changed\n")
    assert ka != _ext._build_key(spec(b))  # a header counts too


def test_failed_build_leaves_no_lock_and_no_temporaries(tmp_path):
    root, src = str(tmp_path / "cache"), tmp_path / "src"
    src.mkdir()
    (src / "broken.cpp").write_text("this is not C++\n")
    spec = dict(sources=[str(src / "broken.cpp")], extra_cflags=["-O0"], extra_include_paths=[str(src)])
    with pytest.raises(Exception):
        _ext.build_library("probe_broken", spec, root=root)
    assert os.listdir(root) == []  # neither the lock nor a half-built folder remains


# ---- A broken cache is rebuilt, never loaded; an ownerless lock is stale at once ------------------------------

_LOAD_PROBE = textwrap.dedent("""
    import ctypes, sys
    sys.path.insert(0, {tests!r})
    from imm_fast import _ext
    from test_ext_build import _spec
    lib, loaded = _ext.build_library({name!r}, _spec({src!r}), root={root!r})
    print("probe", ctypes.CDLL(lib).imm_fast_build_probe(), loaded)
""")


def _replace_contents(path, data: bytes):
    """The cached file now holds `data` (a new inode renamed over it): this process has the library mapped, and
    writing into the mapped file itself would crash it (SIGBUS / SIGSEGV) at exit."""
    tmp = f"{path}.corrupt"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def test_truncated_library_is_rebuilt_not_loaded(tmp_path):
    """dlopen of a truncated cached library kills the process (SIGBUS, no message): the next process sees that
    its size is not the recorded one, warns in one line, rebuilds and runs (exit 0)."""
    root, src, name = str(tmp_path / "cache"), str(tmp_path / "src"), "probe_truncated"
    lib, _ = _ext.build_library(name, _spec(src), root=root)
    rec = json.load(open(os.path.join(os.path.dirname(lib), _ext.RECORD)))
    assert rec["size"] == os.path.getsize(lib) and _ext.library_problem(lib) is None
    _replace_contents(lib, open(lib, "rb").read()[:rec["size"] // 2])
    assert "were recorded" in _ext.library_problem(lib)
    code = _LOAD_PROBE.format(tests=os.path.dirname(os.path.abspath(__file__)), name=name, src=src, root=root)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "probe 42 True" in r.stdout  # rebuilt (and loaded by the build), then the function runs
    broken = [line for line in r.stderr.splitlines() if "is not loaded" in line]
    assert len(broken) == 1 and f"{rec['size'] // 2} bytes where {rec['size']} were recorded" in broken[0]
    assert _ext.library_problem(lib) is None  # the rebuilt library verifies again
    assert not [p for p in os.listdir(root) if ".tmp-" in p]


def test_same_size_garbage_or_a_missing_record_is_rebuilt(tmp_path):
    root, src, name = str(tmp_path / "cache"), str(tmp_path / "src"), "probe_garbage"
    lib, _ = _ext.build_library(name, _spec(src), root=root)
    _replace_contents(lib, b"\0" * os.path.getsize(lib))
    assert "sha256 differs" in _ext.library_problem(lib)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert _ext.build_library(name, _spec(src), root=root) == (lib, True)
    assert any("sha256 differs" in str(x.message) and "rebuilding" in str(x.message) for x in w)
    os.remove(os.path.join(os.path.dirname(lib), _ext.RECORD))  # e.g. a cache written before records existed
    assert "no readable library.json" in _ext.library_problem(lib)
    assert _ext.build_library(name, _spec(src), root=root) == (lib, True)
    assert _ext.build_library(name, _spec(src), root=root) == (lib, False)  # verified: loaded as it is


@pytest.mark.parametrize("content", ["", "{}", "not json", '{"pid": "12", "host": 3}'],
                         ids=["empty", "no-owner", "unreadable", "bad-owner"])
def test_lock_without_an_owner_is_stale_at_once(tmp_path, monkeypatch, content):
    """A lock file that names no owner (empty: a process killed right after creating it) is taken over at once,
    not after IMM_FAST_BUILD_STALE_S (30 minutes)."""
    root, src, name = str(tmp_path / "cache"), str(tmp_path / "src"), "probe_ownerless"
    os.makedirs(root)
    with open(os.path.join(root, name + ".lock"), "w") as f:
        f.write(content)
    monkeypatch.setenv("IMM_FAST_BUILD_WAIT_S", "20")
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lib, loaded = _ext.build_library(name, _spec(src), root=root)
    assert loaded and _ext.library_problem(lib) is None
    assert time.monotonic() - t0 < 15  # the build alone, no waiting
    assert any("stale build lock" in str(x.message) and "records no owner" in str(x.message) for x in w)
    assert sorted(os.listdir(root)) == [name]  # the lock is gone, no temporaries left


_FALLBACK = textwrap.dedent("""
    import sys, torch
    sys.modules["imm_fast._C"] = None  # no prebuilt extension: the just-in-time cache
    from torch.utils import cpp_extension
    def no_compiler(*a, **k):
        raise RuntimeError("no C++ compiler (simulated)")
    cpp_extension.load = no_compiler
    from imm_fast import _ext
    from imm_fast.ops.mmd import mmd_loss, mmd_loss_ref
    x, y = torch.randn(8, 5), torch.randn(8, 5)
    assert _ext.mmd_ext("cpu") is None
    torch.testing.assert_close(mmd_loss(x, y, 4), mmd_loss_ref(x, y, 4))
    print("reference ok")
""")


def test_truncated_extension_without_a_compiler_falls_back_to_the_reference(tmp_path):
    """The real extension's cached library truncated, and no compiler to rebuild it: mmd_loss runs on the
    reference after one-line warnings, and the process exits 0 (it used to die of SIGBUS)."""
    if _ext.mmd_ext("cpu") is None:
        pytest.skip("the C++ extension did not build here")
    name = f"imm_fast_C_cpu_{_ext._build_key(_ext._spec(False))}"
    cached = os.path.join(_ext._cache_root(), name)
    copy = tmp_path / "imm_fast" / name
    shutil.copytree(cached, copy)
    lib = copy / f"{name}.so"
    with open(lib, "r+b") as f:
        f.truncate(os.path.getsize(lib) // 3)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _FALLBACK], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reference ok" in r.stdout
    lines = r.stderr.splitlines()
    assert len([line for line in lines if "is not loaded" in line and "were recorded" in line]) == 1, lines
    assert len([line for line in lines if "C++ extension unavailable" in line and "simulated" in line]) == 1, lines
