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
