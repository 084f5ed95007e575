"""The ratio gate: a throughput-regression check that holds on shared machines.

Absolute medians on a shared CPU, a CI runner or a busy GPU box move by tens of percent from run to run; the
speed-up of a kernel over its reference, measured side by side, barely moves. A ratio test times every provider
of one benchmark case (kernel, reference, torch.compile of the reference) in interleaved rounds: each round calls
each provider once, in an order rotated from round to round, so the two calls of a pair see the same machine.
The gated figure of a (kernel, baseline) pair is the median over rounds of t_baseline / t_kernel (the speed-up);
the ratio of the providers' minimum times is stored beside it.

Options (pytest benchmarks/ ...):
  --ratio-baseline PATH   compare each measured speed-up with PATH; a drop beyond --ratio-fail fails the test,
                          and a table (baseline, now, change) closes the run
  --ratio-fail PCT        the allowed drop of a speed-up, "20%" (default) or "20"
  --ratio-save PATH       write the measured speed-ups to PATH (merged into PATH's entries when it holds a
                          baseline of the same machine; rewritten after each measurement, atomically)
  --ratio-rounds N        interleaved rounds per case (default: each test's own, 20-40)
  --ratio-confirm N       re-measurements of a case whose speed-up dropped beyond the threshold before it fails
                          (default 1: a burst of load on a shared machine does not fail the run, a real slowdown
                          fails every measurement)

Test-only fault injection (to prove the gate catches a slowdown): IMM_FAST_BENCH_INJECT=twice makes every
non-baseline provider do its work twice; IMM_FAST_BENCH_INJECT=copy adds a copy of both inputs to the MMD
launcher (imm_fast.ops.mmd._launch).

pytest-benchmark stays the timer (its --benchmark-timer) and its JSON stays complete: a ratio test's entry times
the whole interleaved round and carries the per-provider medians and the speed-ups in extra_info.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys

import pytest

FORMAT = "imm_fast-ratio-baseline/1"
INJECT_ENV = "IMM_FAST_BENCH_INJECT"
INJECTIONS = ("", "twice", "copy")
STAT = "median over interleaved rounds of t_baseline / t_kernel"


# ---------------------------------------------------------------------------------------------------------------
# The machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info() -> dict:
    """What a speed-up depends on: CPU, cores, threads (as the user set them), versions, CUDA device."""
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": None, "OMP_NUM_THREADS":
            os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version(), "platform": platform.platform(),
            "torch": None, "triton": None, "cuda_device": None}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["threads"] = torch.get_num_threads()
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name()
    try:  # the installed version, without importing triton (an import has side effects: not here)
        info["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        pass
    return info


def _fingerprint(m: dict) -> tuple:
    return m.get("cpu"), m.get("threads"), m.get("cuda_device")


def load_avg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Options and files


def pytest_addoption(parser):
    g = parser.getgroup("ratio gate", "speed-ups measured in interleaved rounds (benchmarks/ratio_gate.py)")
    g.addoption("--ratio-baseline", metavar="PATH", default=None,
                help="compare the measured speed-ups with this baseline JSON and fail on a drop beyond --ratio-fail")
    g.addoption("--ratio-fail", metavar="PCT", default="20%",
                help="allowed drop of a speed-up against the baseline, e.g. 20%% (default)")
    g.addoption("--ratio-save", metavar="PATH", default=None,
                help="write the measured speed-ups to this baseline JSON (merged with a same-machine baseline)")
    g.addoption("--ratio-rounds", metavar="N", type=int, default=None,
                help="interleaved rounds per ratio test (default: the test's own)")
    g.addoption("--ratio-confirm", metavar="N", type=int, default=1,
                help="re-measurements before a drop fails (default 1)")


def parse_threshold(text) -> float:
    """'20%' or '20' -> 0.20; anything outside (0, 100) percent is a usage error."""
    s = str(text).strip()
    try:
        v = float(s[:-1] if s.endswith("%") else s)
    except ValueError:
        raise pytest.UsageError(f"--ratio-fail={text!r} is not a percentage (e.g. 20%)") from None
    if not 0 < v < 100:
        raise pytest.UsageError(f"--ratio-fail={text!r} must be a drop between 0% and 100% (exclusive)")
    return v / 100


def read_baseline(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise pytest.UsageError(f"--ratio-baseline {path!r}: no such file (write one with --ratio-save)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise pytest.UsageError(f"--ratio-baseline {path!r}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("ratios"), dict):
        raise pytest.UsageError(f"--ratio-baseline {path!r}: not a ratio baseline (format {FORMAT!r} expected)")
    return data


def write_json_atomic(path: str, data: dict) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    from imm_fast._files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


class RatioSession:
    """The run's measurements, its baseline, and what --ratio-save writes."""

    def __init__(self, config):
        opt = config.getoption
        self.threshold = parse_threshold(opt("--ratio-fail"))
        self.rounds = opt("--ratio-rounds")
        if self.rounds is not None and self.rounds < 3:
            raise pytest.UsageError(f"--ratio-rounds={self.rounds} is too few: 3 or more")
        self.confirm = opt("--ratio-confirm")
        if self.confirm < 0:
            raise pytest.UsageError(f"--ratio-confirm={self.confirm} must be 0 or more")
        self.baseline_path = opt("--ratio-baseline")
        self.baseline = read_baseline(self.baseline_path) if self.baseline_path else None
        self.save_path = opt("--ratio-save")
        self.inject = os.environ.get(INJECT_ENV, "")
        if self.inject not in INJECTIONS:
            raise pytest.UsageError(f"{INJECT_ENV}={self.inject!r} is not one of {INJECTIONS}")
        self.measured = {}  # key -> entry
        self.rows = []  # (key, baseline, now, status)
        self.save_error = None
        self._saved = None

    def _save_base(self):
        """The entries --ratio-save keeps: those of an existing same-machine file (never another machine's)."""
        if self._saved is None:
            self._saved = {}
            if os.path.exists(self.save_path):
                try:
                    with open(self.save_path) as f:
                        old = json.load(f)
                except (OSError, json.JSONDecodeError) as e:
                    raise RuntimeError(f"--ratio-save {self.save_path!r} exists but cannot be read ({e}); "
                                       "not overwriting it") from None
                if not isinstance(old, dict) or old.get("format") != FORMAT:
                    raise RuntimeError(f"--ratio-save {self.save_path!r} exists and is not a ratio baseline; "
                                       "not overwriting it")
                if _fingerprint(old.get("machine", {})) != _fingerprint(env_info()):
                    raise RuntimeError(
                        f"--ratio-save {self.save_path!r} holds another machine's baseline "
                        f"({_fingerprint(old.get('machine', {}))} vs this {_fingerprint(env_info())}); "
                        "not overwriting it: save to a new path")
                self._saved = dict(old["ratios"])
        return self._saved

    def save(self):
        if not self.save_path or self.save_error:
            return
        try:
            ratios = {**self._save_base(), **self.measured}
            write_json_atomic(self.save_path, {
                "format": FORMAT, "statistic": STAT, "machine": env_info(),
                "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "ratios": ratios})
        except (OSError, RuntimeError) as e:
            self.save_error = str(e)

    def baseline_of(self, key):
        if self.baseline is None:
            return None
        entry = self.baseline["ratios"].get(key)
        return None if entry is None else float(entry["speedup"])


def pytest_configure(config):
    config._imm_ratio = RatioSession(config)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    """pytest-benchmark's JSON records the threads, CPU model, torch/triton versions and CUDA device too."""
    machine_info["imm_fast"] = env_info()


# ---------------------------------------------------------------------------------------------------------------
# Measuring


def interleaved_times(fns: dict, rounds: int, timer, start=0):
    """{provider: [seconds per round]}: each round calls every provider once, the order rotated by one per round."""
    names = list(fns)
    times = {p: [] for p in names}
    for r in range(start, start + rounds):
        k = r % len(names)
        for p in names[k:] + names[:k]:
            t0 = timer()
            fns[p]()
            times[p].append(timer() - t0)
    return times


def calibrate(fns: dict, min_sample_s: float, timer, probes=3, cap=10_000) -> dict:
    """{provider: calls per timed sample} so that a sample lasts at least min_sample_s at the provider's best
    probed speed: a sub-millisecond kernel and a 10 ms reference then see the machine's load over similar spans."""
    n = {}
    for p, f in fns.items():
        best = float("inf")
        for _ in range(probes):
            t0 = timer()
            f()
            best = min(best, timer() - t0)
        n[p] = max(1, min(cap, int(-(-min_sample_s // max(best, 1e-9)))))
    return n


def repeated(fns: dict, calls: dict) -> dict:
    return {p: (f if calls[p] == 1 else (lambda f=f, k=calls[p]: [f() for _ in range(k)])) for p, f in fns.items()}


def per_call(times: dict, calls: dict) -> dict:
    return {p: [t / calls[p] for t in v] for p, v in times.items()}


def speedups(times: dict, baselines) -> dict:
    """{(kernel, baseline): (median of per-round t_baseline / t_kernel, min(t_baseline) / min(t_kernel))}."""
    out = {}
    for k in times:
        if k in baselines:
            continue
        for b in baselines:
            if b in times:
                pairs = [tb / tk for tb, tk in zip(times[b], times[k])]
                out[(k, b)] = (statistics.median(pairs), min(times[b]) / min(times[k]))
    return out


def ratio_key(group, kernel, baseline):
    return f"{group}: {kernel} vs {baseline}"


@pytest.fixture
def ratio_bench(benchmark, request):
    """measure(group, providers, baselines, rounds=20, warmup=2, device="cpu", min_sample_s=None)
    -> {key: speed-up}, or None under --benchmark-disable (each provider then runs once, untimed).

    providers: {name: callable()} (each synchronizes its device), the baselines among them by name. Every
    non-baseline provider is gated against every baseline. A timed sample of a provider is as many back-to-back
    calls as last min_sample_s (calibrated after the warm-up; default 30 ms on the CPU, where the scheduler's time
    slices must average out, 10 ms on a GPU); its time per call enters the round.
    """
    session: RatioSession = request.config._imm_ratio

    def measure(group, providers, baselines, rounds=20, warmup=2, device="cpu", min_sample_s=None):
        if not any(b in providers for b in baselines) or all(p in baselines for p in providers):
            raise ValueError(f"ratio test {group!r}: providers {list(providers)} need a baseline among "
                             f"{list(baselines)} and a provider that is not one")
        fns = dict(providers)
        if session.inject == "twice":
            fns = {p: (f if p in baselines else (lambda f=f: (f(), f()))) for p, f in fns.items()}
        elif session.inject == "copy":
            _inject_launcher_copy(request)
        rounds = session.rounds or rounds
        timer = getattr(benchmark, "_timer", None) or __import__("time").perf_counter
        benchmark.group = f"ratio-{group}"
        if benchmark.disabled:  # CI smoke: every provider once, untimed
            benchmark.pedantic(lambda: [f() for f in fns.values()], rounds=1, iterations=1)
            return None
        mismatch = _mismatch(session, device)
        if mismatch:
            pytest.fail(mismatch, pytrace=False)
        load_before = load_avg()
        interleaved_times(fns, warmup, timer)  # warm-up: compile, autotune, caches; not recorded
        if min_sample_s is None:
            min_sample_s = 0.03 if device == "cpu" else 0.01
        calls = calibrate(fns, min_sample_s, timer)
        samples = repeated(fns, calls)
        state = {"round": 0, "times": {p: [] for p in fns}}

        def one_round():
            t = per_call(interleaved_times(samples, 1, timer, start=state["round"]), calls)
            state["round"] += 1
            for p, v in t.items():
                state["times"][p] += v

        benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
        times = state["times"]
        result = speedups(times, baselines)
        failing = [kb for kb, (s, _) in result.items() if _dropped(session, ratio_key(group, *kb), s)]
        attempts = 1
        while failing and attempts <= session.confirm:  # re-measure: a real slowdown fails again
            attempts += 1
            again = speedups(per_call(interleaved_times(samples, rounds, timer, start=attempts), calls), baselines)
            result = {kb: max(result[kb], again[kb]) for kb in result}  # fails only if every attempt failed
            failing = [kb for kb, (s, _) in result.items() if _dropped(session, ratio_key(group, *kb), s)]
        load_after = load_avg()
        med = {p: statistics.median(v) for p, v in times.items()}
        benchmark.extra_info.update(
            providers=list(fns), baselines=[b for b in baselines if b in fns], rounds=rounds, attempts=attempts,
            calls_per_sample=calls,
            median_s=med, min_s={p: min(v) for p, v in times.items()}, inject=session.inject or None,
            threads=env_info()["threads"], device=device, load_avg=[load_before, load_after],
            speedup={f"{k} vs {b}": s for (k, b), (s, _) in result.items()},
            speedup_min={f"{k} vs {b}": m for (k, b), (_, m) in result.items()})
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        out = {}
        for (k, b), (s, m) in result.items():
            key = ratio_key(group, k, b)
            out[key] = s
            session.measured[key] = {"speedup": s, "speedup_min": m, "kernel": k, "baseline": b, "device": device,
                                     "rounds": rounds, "attempts": attempts, "kernel_median_s": med[k],
                                     "calls_per_sample": [calls[k], calls[b]],
                                     "baseline_median_s": med[b], "measured": now, "load_avg": [load_before,
                                                                                                load_after]}
            base = session.baseline_of(key)
            status = "new" if base is None else ("FAIL" if (k, b) in failing else "ok")
            if attempts > 1:  # the table says when a case needed its confirming measurement
                status += f" ({attempts} measurements)"
            session.rows.append((key, base, s, status))
        session.save()
        if failing:
            lines = [f"{ratio_key(group, k, b)}: speed-up {result[(k, b)][0]:.3f}x, baseline "
                     f"{session.baseline_of(ratio_key(group, k, b)):.3f}x" for k, b in failing]
            pytest.fail(f"speed-up dropped more than {session.threshold:.0%} ({attempts} measurements):\n  "
                        + "\n  ".join(lines), pytrace=False)
        return out

    return measure


def _mismatch(session, device):
    """Why this run cannot be compared with the baseline (CPU speed-ups depend on the thread count, GPU ones on
    the card), or None."""
    if session.baseline is None:
        return None
    bm, now = session.baseline.get("machine", {}), env_info()
    field = "threads" if device == "cpu" else "cuda_device"
    if bm.get(field) != now.get(field):
        what = "torch threads" if field == "threads" else "CUDA device"
        return (f"--ratio-baseline {session.baseline_path} was measured with {what} {bm.get(field)!r}, this run has "
                f"{now.get(field)!r}: speed-ups are not comparable (set OMP_NUM_THREADS / torch threads to match, "
                "or write a baseline for this setting with --ratio-save)")
    return None


def _dropped(session, key, speedup):
    base = session.baseline_of(key)
    return base is not None and speedup < base * (1 - session.threshold)


def _inject_launcher_copy(request):
    """Test-only: the MMD launcher copies x and y before it launches (a slowdown the gate must catch)."""
    from imm_fast.ops import mmd

    launch = mmd._launch

    def copying(backend, x2d, y2d, *args):
        return launch(backend, x2d.clone(), y2d.clone(), *args)

    mp = pytest.MonkeyPatch()
    mp.setattr(mmd, "_launch", copying)
    request.addfinalizer(mp.undo)


# ---------------------------------------------------------------------------------------------------------------
# Report


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session: RatioSession = getattr(config, "_imm_ratio", None)
    if session is None or not (session.rows or session.save_path):
        return
    tr = terminalreporter
    tr.section("ratio gate")
    if session.inject:
        tr.write_line(f"{INJECT_ENV}={session.inject}: a slowdown was injected (test only)")
    if session.baseline is not None:
        bm, now = session.baseline.get("machine", {}), env_info()
        tr.write_line(f"baseline {session.baseline_path} (allowed drop {session.threshold:.0%}), "
                      f"{STAT}")
        if _fingerprint(bm) != _fingerprint(now):
            tr.write_line(f"note: the baseline was measured on {_fingerprint(bm)}, this run on {_fingerprint(now)}: "
                          "speed-ups depend on the CPU/GPU and the thread count")
    w = max([len(r[0]) for r in session.rows] + [10])
    tr.write_line(f"{'speed-up':<{w}}  {'baseline':>9}  {'now':>9}  {'change':>8}  status")
    for key, base, s, status in session.rows:
        b = "-" if base is None else f"{base:.3f}x"
        ch = "-" if base is None else f"{s / base - 1:+.1%}"
        tr.write_line(f"{key:<{w}}  {b:>9}  {s:>8.3f}x  {ch:>8}  {status}", red=status.startswith("FAIL"))
    m = env_info()
    tr.write_line(f"measured: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}, "
                  f"triton {m['triton']}, cuda {m['cuda_device']}, load {load_avg()}")
    if session.save_path:
        if session.save_error:
            tr.write_line(f"--ratio-save: NOT written: {session.save_error}", red=True)
        elif session.measured:
            tr.write_line(f"--ratio-save: wrote {len(session.measured)} speed-ups to {session.save_path}")
        else:
            tr.write_line(f"--ratio-save: no ratio test measured anything; {session.save_path} left as it was")


def pytest_sessionfinish(session, exitstatus):
    rs = getattr(session.config, "_imm_ratio", None)
    if rs is not None and rs.save_error and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED  # asked to save, and nothing was saved
