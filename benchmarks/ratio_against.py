"""--ratio-against REF (benchmarks/ratio_gate.py): another commit's code measured beside this one, in the same run.

A speed-up stored on one host is no baseline for another (the CPU, its caches and its load differ), so the
reference is measured here and now: REF's tree is extracted into a temporary folder (`git archive`: nothing is
registered in the repository, so a killed run leaves nothing to prune), and a worker process imports REF's
packages from there (a meta-path finder maps imm_fast, imm_fast.kernels and imm_fast.csrc to REF's folders, as
setup.py's package_dir does) while it builds each ratio case from the *current* benchmark file. The pytest
process (this checkout's code) and the worker take turns round by round, the order alternating, so both see the
same machine; each round gives each side its speed-up s = t_baseline / t_kernel, and the gated figure is the
median over rounds of s_now / s_ref (a ratio of ratios: 1.0 = unchanged).

Worker protocol: one JSON object a line, requests on the worker's stdin, replies on its original stdout (the
worker points fd 1 at stderr, so a print in imported code cannot break the protocol):
    {"op": "hello"}                                        -> {"packages": {name: folder}}
    {"op": "build", "file", "func", "kwargs", "warmup", "min_sample_s"} -> {"providers": [...], "calls": {...}}
    {"op": "round", "r": r}                                -> {"times": {provider: seconds per call}}
    {"op": "drop"}                                         -> {}
and {"error": text} for a request that raised. Run as `python ratio_against.py ROOT PACKAGES_JSON`.
"""
from __future__ import annotations

import gc
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

BENCH = os.path.dirname(os.path.abspath(__file__))
# Import name -> folder in the checkout (setup.py's package_dir): what the worker takes from REF.
PACKAGES = {"imm_fast": "imm_fast", "imm_fast.kernels": "kernels", "imm_fast.csrc": "csrc"}
BUILD_TIMEOUT_S = 1800  # a case's first build may compile REF's C++ extension (minutes on a busy machine)
ROUND_TIMEOUT_S = 600


class AgainstError(RuntimeError):
    """REF could not be checked out, imported or measured; the message says which and why."""


# ---------------------------------------------------------------------------------------------------------------
# The checkout


def git(repo, *args, timeout=120):
    r = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AgainstError(f"git {' '.join(args)} failed in {repo}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


def resolve(repo, ref):
    """(commit sha, repository root) of `ref` as seen from `repo`; AgainstError naming the ref otherwise."""
    try:
        root = git(repo, "rev-parse", "--show-toplevel")
        return git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"), root
    except AgainstError as e:
        raise AgainstError(f"--ratio-against {ref!r}: not a commit of the repository at {repo} ({e})") from None
    except FileNotFoundError:
        raise AgainstError("--ratio-against needs git on PATH") from None


def checkout(root, sha, dest):
    """Extract commit `sha` of the repository at `root` into the empty folder `dest`."""
    archive = subprocess.Popen(["git", "-C", root, "archive", "--format=tar", sha], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "-C", dest], stdin=archive.stdout, capture_output=True, timeout=600)
    archive.stdout.close()
    err = archive.stderr.read().decode(errors="replace")
    if archive.wait(timeout=60) != 0 or tar.returncode != 0:
        raise AgainstError(f"extracting {sha[:12]} into {dest} failed: {err.strip()} {tar.stderr.decode().strip()}")


# ---------------------------------------------------------------------------------------------------------------
# The worker, as seen from the pytest process


class Worker:
    """REF's side: a temporary checkout and a process importing its packages. close() removes both."""

    def __init__(self, repo, ref, packages=None):
        self.ref = ref
        self.sha, root = resolve(repo, ref)
        self.tmp = tempfile.mkdtemp(prefix=f"imm_fast_against_{self.sha[:12]}_")
        self.proc = None
        try:
            checkout(root, self.sha, self.tmp)
            env = dict(os.environ)
            env.pop("IMM_FAST_BENCH_INJECT", None)  # a test-only slowdown is injected into this checkout only
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), self.tmp, json.dumps(packages or PACKAGES)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env, cwd=self.tmp)
            self.packages = self.call({"op": "hello"}, 300)["packages"]
        except BaseException:
            self.close()
            raise

    def call(self, msg, timeout):
        """Send one request and wait at most `timeout` s for its reply."""
        if self.proc.poll() is not None:
            raise AgainstError(f"the --ratio-against {self.ref} worker has exited (status {self.proc.returncode})")
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else None
        if not line:
            why = (f"gave no answer to {msg['op']!r} within {timeout} s" if line is None else
                   f"exited (status {self.proc.wait(timeout=30)}) during {msg['op']!r}; its stderr is above")
            self.close()
            raise AgainstError(f"the --ratio-against {self.ref} worker {why}")
        reply = json.loads(line)
        if "error" in reply:
            raise AgainstError(f"{self.ref} ({self.sha[:12]}) {msg['op']} failed in the worker:\n{reply['error']}")
        return reply

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# The worker process


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds the mapped packages (PACKAGES) in the checkout, ahead of any installed or editable copy."""

    def __init__(self, root, packages):
        self.paths = {name: os.path.join(root, folder) for name, folder in packages.items()}

    def find_spec(self, fullname, path=None, target=None):
        folder = self.paths.get(fullname)
        if folder is None or not os.path.isdir(folder):
            return None
        init = os.path.join(folder, "__init__.py")
        if os.path.exists(init):
            return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[folder])
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)  # a namespace folder (csrc)
        spec.submodule_search_locations = [folder]
        return spec


class _Serve:
    """The worker's state: loaded benchmark modules and the case being measured."""

    def __init__(self, packages):
        import ratio_gate

        self.rg = ratio_gate
        self.packages = packages
        self.modules = {}
        self.case = None

    def hello(self, msg):
        out = {}
        for name in self.packages:
            mod = importlib.import_module(name)
            out[name] = os.path.dirname(mod.__file__) if getattr(mod, "__file__", None) else list(mod.__path__)[0]
        return {"packages": out}

    def build(self, msg):
        self.case = None
        gc.collect()
        path = msg["file"]
        if path not in self.modules:
            spec = importlib.util.spec_from_file_location(f"_against_{len(self.modules)}", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            self.modules[path] = mod
        fns = getattr(self.modules[path], msg["func"])(**msg["kwargs"])
        rg, timer = self.rg, time.perf_counter
        rg.interleaved_times(fns, msg["warmup"], timer)
        calls = rg.calibrate(fns, msg["min_sample_s"], timer)
        self.case = (rg.repeated(fns, calls), calls)
        return {"providers": list(fns), "calls": calls}

    def round(self, msg):
        samples, calls = self.case
        t = self.rg.per_call(self.rg.interleaved_times(samples, 1, time.perf_counter, start=msg["r"]), calls)
        return {"times": {p: v[0] for p, v in t.items()}}

    def drop(self, msg):
        self.case = None
        gc.collect()
        return {}


def serve(root, packages):
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints of imported code go to stderr, never into the protocol
    sys.meta_path.insert(0, _CheckoutFinder(root, packages))
    sys.path.insert(0, BENCH)  # ratio_gate and the benchmark files' sibling imports: the current ones
    server = _Serve(packages)
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            reply = getattr(server, msg["op"])(msg)
        except Exception:  # noqa: BLE001 - every failure goes back to the pytest process with its traceback
            reply = {"error": traceback.format_exc(limit=-8)}
        proto.write(json.dumps(reply) + "\n")
    # stdin closed: the pytest process is done, or was killed; the checkout is the worker's to remove either way
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], json.loads(sys.argv[2])))
