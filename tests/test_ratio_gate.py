"""The ratio gate of the benchmarks (benchmarks/ratio_gate.py), on a synthetic provider pair so that CI stays fast.

The pair does a fixed amount of Python work: the reference SLOW_UNITS, the kernel FAST_UNITS per call (both read
from the environment of the inner pytest run; 320 and 40 by default, a few ms), so the speed-up is about 8 however
loaded the machine is. The inner runs go through
pytester with the plugin loaded by a conftest, as benchmarks/conftest.py loads it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import ratio_against  # noqa: E402
import ratio_gate  # noqa: E402

sys.path.remove(str(BENCH))

pytest_plugins = ["pytester"]
pb_plugin = pytest.importorskip("pytest_benchmark.plugin")
_CPU_INFO = []


def _cpu_info_once():
    if not _CPU_INFO:
        import cpuinfo

        _CPU_INFO.append(cpuinfo.get_cpu_info() or {})
    return _CPU_INFO[0]


CONFTEST = f"""
import sys
sys.path.insert(0, {str(BENCH)!r})
from ratio_gate import (pytest_addoption, pytest_benchmark_update_machine_info, pytest_configure,  # noqa: F401
                        pytest_sessionfinish, pytest_terminal_summary, ratio_bench)
"""

SYNTHETIC = """
import os
import time

CALLS = []


def worker(units, name):
    def f():  # a fixed amount of work, like a kernel: a loaded machine slows both providers alike
        CALLS.append(name)
        for _ in range(int(units)):
            sum(range(500))
    return f


def test_syn_ratio(ratio_bench):
    fast = float(os.environ.get("FAST_UNITS", "40"))
    slow = float(os.environ.get("SLOW_UNITS", "320"))
    out = ratio_bench("syn-case", {"ref": worker(slow, "ref"), "kernel": worker(fast, "kernel")},
                      baselines=("ref",), rounds=15, warmup=1, min_sample_s=0.008)
    if out is None:  # --benchmark-disable: each provider ran once, untimed
        assert CALLS == ["ref", "kernel"], CALLS
    else:
        assert set(out) == {"syn-case: kernel vs ref"}
"""


@pytest.fixture
def gate(pytester, monkeypatch):
    """run(*args, fast=40, slow=320, env=None) -> the inner pytest run's RunResult. The unit tests allow a 30% drop
    (the gate's noise on this shared machine is measured in benchmarks/RESULTS.md); the slowdowns are 2x or more."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_syn=SYNTHETIC)
    monkeypatch.delenv(ratio_gate.INJECT_ENV, raising=False)
    # pytest-benchmark probes the CPU (py-cpuinfo, seconds on a loaded machine) in every inner run: probe once.
    monkeypatch.setattr(pb_plugin, "get_cpu_info", _cpu_info_once)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # inner runs: pytest-benchmark only (-p below)

    def run(*args, fast=40, slow=320, env=None):
        monkeypatch.setenv("FAST_UNITS", str(fast))
        monkeypatch.setenv("SLOW_UNITS", str(slow))
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        try:
            return pytester.runpytest("-p", "no:cacheprovider", "-p", "pytest_benchmark.plugin", "-q", *args)
        finally:
            for k in env or {}:
                monkeypatch.delenv(k)

    return run


def _save(gate, pytester, **kw):
    r = gate("--ratio-save", "base.json", **kw)
    r.assert_outcomes(passed=1)
    return json.loads((pytester.path / "base.json").read_text())


def test_save_records_speedup_and_machine(gate, pytester):
    import torch

    data = _save(gate, pytester)
    assert data["format"] == ratio_gate.FORMAT
    entry = data["ratios"]["syn-case: kernel vs ref"]
    assert 5.0 < entry["speedup"] < 11.0, entry  # 320 / 40 units
    assert entry["kernel"] == "kernel" and entry["baseline"] == "ref" and entry["rounds"] == 15
    m = data["machine"]
    assert m["threads"] == torch.get_num_threads() and m["torch"] == torch.__version__ and m["cores"] >= 1
    assert m["cpu"] and "triton" in m and "cuda_device" in m


def test_unchanged_code_passes_and_prints_the_table(gate, pytester):
    _save(gate, pytester)
    before = (pytester.path / "base.json").read_bytes()
    r = gate("--ratio-baseline", "base.json", "--ratio-fail", "30%")
    r.assert_outcomes(passed=1)
    r.stdout.re_match_lines([r".*ratio gate.*", r"speed-up\s+baseline\s+now\s+change\s+status",
                             r"syn-case: kernel vs ref\s+\d+\.\d+x\s+\d+\.\d+x\s+[+-]\d+\.\d%\s+ok"])
    assert (pytester.path / "base.json").read_bytes() == before  # compared, never rewritten unless asked


def test_slowdown_fails_after_a_confirming_measurement(gate, pytester):
    _save(gate, pytester)
    r = gate("--ratio-baseline", "base.json", "--ratio-fail", "30%", fast=100)
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*speed-up dropped more than 30% (2 measurements)*",
                            "*syn-case: kernel vs ref*FAIL (2 measurements)"])


def test_injected_double_work_fails(gate, pytester):
    _save(gate, pytester)
    r = gate("--ratio-baseline", "base.json", "--ratio-fail", "30%", env={ratio_gate.INJECT_ENV: "twice"})
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*IMM_FAST_BENCH_INJECT=twice*", "*syn-case: kernel vs ref*FAIL*"])


def test_threshold_is_respected(gate, pytester):
    _save(gate, pytester)
    # 8 -> 320/100 = 3.2: a 60% drop fails at 30% (above) and passes when 80% is allowed
    gate("--ratio-baseline", "base.json", "--ratio-fail", "80%", fast=100).assert_outcomes(passed=1)


def test_benchmark_disable_runs_each_provider_once_and_records_nothing(gate, pytester):
    r = gate("--benchmark-disable", "--ratio-save", "base.json")
    r.assert_outcomes(passed=1)
    r.stdout.fnmatch_lines(["*--ratio-save: no ratio test measured anything; base.json left as it was"])
    assert not (pytester.path / "base.json").exists()


def test_benchmark_json_is_complete(gate, pytester):
    gate("--benchmark-json", "out.json").assert_outcomes(passed=1)
    data = json.loads((pytester.path / "out.json").read_text())
    assert data["machine_info"]["imm_fast"]["threads"] >= 1
    (b,) = data["benchmarks"]
    assert b["group"] == "ratio-syn-case" and b["stats"]["rounds"] == 15
    info = b["extra_info"]
    assert set(info["median_s"]) == {"ref", "kernel"} and info["speedup"]["kernel vs ref"] > 2.0
    assert info["calls_per_sample"]["kernel"] > info["calls_per_sample"]["ref"]  # short calls batched to 8 ms


@pytest.mark.parametrize("value, match", [("150%", "between 0% and 100%"), ("0", "between 0% and 100%"),
                                          ("fast", "not a percentage")])
def test_bad_threshold(gate, value, match):
    r = gate("--ratio-fail", value)
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stderr.fnmatch_lines([f"*--ratio-fail={value!r}*{match}*"])


def test_bad_baseline_files(gate, pytester):
    r = gate("--ratio-baseline", "missing.json")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stderr.fnmatch_lines(["*--ratio-baseline 'missing.json': no such file*"])
    (pytester.path / "other.json").write_text(json.dumps({"benchmarks": []}))
    r = gate("--ratio-baseline", "other.json")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stderr.fnmatch_lines(["*not a ratio baseline*"])


def test_bad_injection_name(gate):
    r = gate(env={ratio_gate.INJECT_ENV: "thrice"})
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stderr.fnmatch_lines(["*IMM_FAST_BENCH_INJECT='thrice' is not one of*"])


def test_baseline_of_another_thread_count_is_not_compared(gate, pytester):
    data = _save(gate, pytester)
    data["machine"]["threads"] += 7
    (pytester.path / "base.json").write_text(json.dumps(data))
    r = gate("--ratio-baseline", "base.json")
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*measured with torch threads*speed-ups are not comparable*"])


def test_save_never_overwrites_another_machines_baseline(gate, pytester):
    data = _save(gate, pytester)
    data["machine"]["cpu"] = "another CPU"
    text = json.dumps(data)
    (pytester.path / "base.json").write_text(text)
    r = gate("--ratio-save", "base.json")
    assert r.ret == pytest.ExitCode.TESTS_FAILED
    r.stdout.fnmatch_lines(["*--ratio-save: NOT written*another machine's baseline*"])
    assert (pytester.path / "base.json").read_text() == text


def test_save_merges_with_the_same_machine(gate, pytester):
    data = _save(gate, pytester)
    data["ratios"]["other-case: kernel vs ref"] = dict(data["ratios"]["syn-case: kernel vs ref"])
    (pytester.path / "base.json").write_text(json.dumps(data))
    after = _save(gate, pytester)
    assert set(after["ratios"]) == {"syn-case: kernel vs ref", "other-case: kernel vs ref"}


# ---------------------------------------------------------------------------------------------------------------
# The pieces


def test_interleaving_rotates_the_order():
    calls = []
    fns = {p: (lambda p=p: calls.append(p)) for p in "abc"}
    t = iter(range(100))
    times = ratio_gate.interleaved_times(fns, 3, lambda: next(t))
    assert calls == list("abcbcacab")
    assert {p: len(v) for p, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_speedups_are_medians_of_interleaved_pairs():
    times = {"ref": [4.0, 8.0, 4.0], "k": [1.0, 1.0, 4.0], "compile": [2.0, 2.0, 2.0]}
    s = ratio_gate.speedups(times, ("ref", "compile"))
    assert s[("k", "ref")] == (4.0, 4.0)  # pairs 4, 8, 1 -> median 4; min 4 / min 1
    assert s[("k", "compile")] == (2.0, 2.0)
    assert ("compile", "ref") not in s  # baselines against each other: not gated


def test_calibration_batches_short_calls():
    clock = [0.0]

    def timer():
        return clock[0]

    def call(dt):
        def f():
            clock[0] += dt
        return f

    n = ratio_gate.calibrate({"fast": call(0.001), "slow": call(0.05)}, 0.03, timer)
    assert n == {"fast": 30, "slow": 1}


@pytest.mark.parametrize("text, value", [("20%", 0.2), ("5", 0.05), (" 12.5% ", 0.125)])
def test_parse_threshold(text, value):
    assert ratio_gate.parse_threshold(text) == pytest.approx(value)


def test_benchmarks_leave_the_thread_count_to_the_user():
    for path in BENCH.glob("bench_*.py"):
        assert "set_num_threads" not in path.read_text(), f"{path.name} overrides the user's torch threads"


def test_summarize_prints_the_speedups(gate, pytester, capsys):
    """benchmarks/summarize.py reads both the pytest-benchmark JSON of a ratio run and a ratio baseline."""
    gate("--benchmark-json", "out.json", "--ratio-save", "base.json").assert_outcomes(passed=1)
    sys.path.insert(0, str(BENCH))
    try:
        import summarize
    finally:
        sys.path.remove(str(BENCH))
    summarize.main([str(pytester.path / "out.json"), str(pytester.path / "base.json")])
    out = capsys.readouterr().out
    assert out.count("| syn-case: kernel vs ref | ") == 2, out
    assert "torch threads" in out and "| case: kernel vs baseline | speed-up |" in out


def test_copy_injection_wraps_the_mmd_launcher(monkeypatch):
    """IMM_FAST_BENCH_INJECT=copy: the launcher receives copies of x and y (extra traffic); undone after the test."""
    import torch
    from imm_fast.ops import mmd

    seen = []
    monkeypatch.setattr(mmd, "_launch", lambda backend, x2d, y2d, *args: seen.append((backend, x2d, y2d, args)))
    spy = mmd._launch
    finalizers = []

    class Request:
        addfinalizer = finalizers.append

    ratio_gate._inject_launcher_copy(Request)
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    mmd._launch("cpp", x, y, 2, "rest")
    (backend, x2, y2, args), = seen
    assert backend == "cpp" and args == (2, "rest")
    assert x2.data_ptr() != x.data_ptr() and y2.data_ptr() != y.data_ptr()
    assert torch.equal(x2, x) and torch.equal(y2, y)
    for f in finalizers:
        f()
    assert mmd._launch is spy


# ---------------------------------------------------------------------------------------------------------------
# --ratio-against REF: the reference measured here, in the same rounds, from a commit's checkout

SYN_AGAINST = """
import synkern


def work(units):
    def f():
        for _ in range(int(units)):
            sum(range(500))
    return f


def providers(slow):
    return {"ref": work(slow), "kernel": synkern.kernel}


def test_syn_ratio(ratio_bench):
    ratio_bench("syn-case", providers(320), baselines=("ref",), rounds=15, warmup=1, min_sample_s=0.008,
                recipe=(__file__, "providers", {"slow": 320}))


def test_syn_no_recipe(ratio_bench):
    ratio_bench("syn-bare", providers(320), baselines=("ref",), rounds=5, warmup=1, min_sample_s=0.008)
"""

SYNKERN = """
UNITS = {units}


def kernel():  # the package's "kernel": a fixed amount of work
    for _ in range(UNITS):
        sum(range(500))
"""


def _git(path, *args):
    import subprocess

    subprocess.run(["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                   check=True, capture_output=True)


@pytest.fixture
def against(gate, pytester, monkeypatch):
    """A git repository holding the synthetic package (kernel of 40 units) at HEAD, mapped for the worker (the
    inner runs share this process's ratio_against module)."""
    monkeypatch.setattr(ratio_against, "PACKAGES", {"synkern": "synkern"})
    pytester.makepyfile(test_syn=SYN_AGAINST)
    pkg = pytester.mkpydir("synkern")
    (pkg / "__init__.py").write_text(SYNKERN.format(units=40))
    _git(pytester.path, "init", "-q")
    _git(pytester.path, "add", "-A")
    _git(pytester.path, "commit", "-q", "-m", "kernel")
    return pkg


def test_against_unchanged_code_passes(gate, against):
    r = gate("-k", "syn_ratio", "--ratio-against", "HEAD", "--ratio-fail", "30%")
    r.assert_outcomes(passed=1)
    r.stdout.re_match_lines([r"against HEAD = [0-9a-f]{12} .*synkern.*", r"speed-up\s+baseline\s+now\s+change\s+status",
                             r"syn-case: kernel vs ref\s+\d+\.\d+x\s+\d+\.\d+x\s+[+-]\d+\.\d%\s+ok"])
    assert "DEBUG" not in r.stdout.str()


def test_against_catches_a_3x_slower_kernel_in_the_checkout(gate, against):
    (against / "__init__.py").write_text(SYNKERN.format(units=120))  # uncommitted: this run's code only
    r = gate("-k", "syn_ratio", "--ratio-against", "HEAD", "--ratio-fail", "30%")
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*speed-up dropped more than 30% (2 measurements)*",
                            "*syn-case: kernel vs ref: speed-up *x, HEAD's code, same rounds *x",
                            "*syn-case: kernel vs ref*FAIL (2 measurements)"])


def test_against_injected_3x_slowdown_fails(gate, against):
    r = gate("-k", "syn_ratio", "--ratio-against", "HEAD", "--ratio-fail", "30%",
             env={ratio_gate.INJECT_ENV: "x3"})
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*IMM_FAST_BENCH_INJECT=x3*", "*syn-case: kernel vs ref*FAIL*"])


def test_against_needs_a_recipe_and_a_commit(gate, against):
    r = gate("-k", "no_recipe", "--ratio-against", "HEAD")
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*gives no recipe, so --ratio-against cannot build HEAD's providers*"])
    r = gate("--ratio-against", "no-such-ref")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stderr.fnmatch_lines(["*--ratio-against 'no-such-ref': not a commit of the repository*"])
    r = gate("--ratio-against", "HEAD", "--ratio-baseline", "x.json")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stderr.fnmatch_lines(["*--ratio-against and --ratio-baseline are two references: give one*"])


def test_against_worker_imports_the_commit_not_the_checkout(tmp_path):
    """The worker's finder maps the package to REF's folder, ahead of anything on sys.path."""
    import subprocess

    old = tmp_path / "old" / "synkern"
    old.mkdir(parents=True)
    (old / "__init__.py").write_text("WHERE = 'old'\n")
    w = subprocess.run([sys.executable, "-c", (
        f"import sys; sys.path.insert(0, {str(BENCH)!r}); import ratio_against as a; "
        f"sys.meta_path.insert(0, a._CheckoutFinder({str(tmp_path / 'old')!r}, {{'synkern': 'synkern'}})); "
        "import synkern; print(synkern.WHERE)")], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert w.stdout.strip() == "old", w.stderr
    assert ratio_against.PACKAGES["imm_fast.kernels"] == "kernels"  # setup.py's package_dir


# ---------------------------------------------------------------------------------------------------------------
# Stored baselines: keyed by the host, and never a silent pass


def test_baseline_of_another_host_is_refused_with_the_reason(gate, pytester):
    data = _save(gate, pytester)
    assert data["machine"]["cpu_flags"] is None or isinstance(data["machine"]["cpu_flags"], list)
    data["machine"]["cpu_flags"] = ["avx512f_only_there"]
    data["machine"]["caches"] = {"L2": "1K"}
    (pytester.path / "base.json").write_text(json.dumps(data))
    r = gate("--ratio-baseline", "base.json")
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*measured on another host (CPU flags differ (only in the baseline: avx512f_only_there*"
                            "measured with cache sizes*speed-ups are not comparable*--ratio-against*"])
    del data["machine"]["caches"]
    (pytester.path / "base.json").write_text(json.dumps(data))
    gate("--ratio-baseline", "base.json").stdout.fnmatch_lines(["*the baseline records no cache sizes*"])


def test_baseline_matching_no_case_is_an_error(gate, pytester):
    data = _save(gate, pytester)
    data["ratios"] = {"other-case: kernel vs ref": data["ratios"]["syn-case: kernel vs ref"]}
    (pytester.path / "base.json").write_text(json.dumps(data))
    r = gate("--ratio-baseline", "base.json")
    assert r.ret == pytest.ExitCode.TESTS_FAILED
    r.stdout.fnmatch_lines(["*ERROR: --ratio-baseline base.json: its 1 case(s) match none of the 1 measured here*"])
    r = gate("--ratio-baseline", "base.json", "--benchmark-disable")
    assert r.ret == pytest.ExitCode.TESTS_FAILED
    r.stdout.fnmatch_lines(["*ERROR: --ratio-baseline base.json: no ratio test measured anything*"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, "fast"])
def test_baseline_with_a_ratio_that_is_not_finite_is_an_error(gate, pytester, bad):
    data = _save(gate, pytester)
    data["ratios"]["syn-case: kernel vs ref"]["speedup"] = bad
    (pytester.path / "base.json").write_text(json.dumps(data))
    r = gate("--ratio-baseline", "base.json")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stderr.fnmatch_lines(["*1 speed-up(s) are not finite positive numbers*'syn-case: kernel vs ref'*"])


def test_injected_x3_slowdown_against_a_stored_baseline_fails(gate, pytester):
    _save(gate, pytester)
    r = gate("--ratio-baseline", "base.json", "--ratio-fail", "30%", env={ratio_gate.INJECT_ENV: "x3"})
    r.assert_outcomes(failed=1)


def test_against_worker_cleans_up_when_the_pytest_process_dies(tmp_path):
    """A killed pytest process closes the worker's stdin: the worker removes REF's checkout itself."""
    repo = tmp_path / "repo"
    (repo / "synkern").mkdir(parents=True)
    (repo / "synkern" / "__init__.py").write_text(SYNKERN.format(units=1))
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "k")
    w = ratio_against.Worker(str(repo), "HEAD", packages={"synkern": "synkern"})
    try:
        assert w.packages["synkern"].startswith(w.tmp) and os.path.isdir(w.tmp)
        w.proc.stdin.close()  # what the kernel does when the parent dies
        assert w.proc.wait(timeout=60) == 0
        assert not os.path.exists(w.tmp)
    finally:
        w.close()
