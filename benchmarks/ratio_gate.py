"""The ratio gate: a throughput-regression check that holds on shared machines.

Absolute medians on a shared CPU, a CI runner or a busy GPU box move by tens of percent from run to run; the
speed-up of a kernel over its reference, measured side by side, barely moves. A ratio test times every provider
of one benchmark case (kernel, reference, torch.compile of the reference) in interleaved rounds: each round calls
each provider once, in an order rotated from round to round, so the two calls of a pair see the same machine.
The gated figure of a (kernel, baseline) pair is the median over rounds of t_baseline / t_kernel (the speed-up);
the ratio of the providers' minimum times is stored beside it.

Options (pytest benchmarks/ ...):
  --ratio-against REF     measure the same cases with commit REF's code beside this checkout's, in the same rounds
                          (benchmarks/ratio_against.py); a speed-up whose ratio now / REF drops below
                          1 - --ratio-fail fails. Nothing stored: works on any host (e.g. REF = the merge base)
  --ratio-baseline PATH   compare each measured speed-up with PATH, a baseline saved on this host (CPU model,
                          flags, cache sizes, torch threads; the card on a GPU): a case measured on another host
                          is refused with the reason; a drop beyond --ratio-fail fails the test. A baseline whose
                          cases match none measured, or holding a ratio that is not a finite positive number, is
                          an error. A table (baseline, now, change) closes the run
  --ratio-fail PCT        the allowed drop of a speed-up, "20%" (default) or "20"
  --ratio-save PATH       write the measured speed-ups to PATH (merged into PATH's entries when it holds a
                          baseline of the same machine; rewritten after each measurement, atomically)
  --ratio-rounds N        interleaved rounds per case (default: each test's own, 20-40)
  --ratio-confirm N       re-measurements of a case whose speed-up dropped beyond the threshold before it fails
                          (default 1: a burst of load on a shared machine does not fail the run, a real slowdown
                          fails every measurement)

Test-only fault injection (to prove the gate catches a slowdown): IMM_FAST_BENCH_INJECT=twice makes every
non-baseline provider do its work twice, =x3 three times; IMM_FAST_BENCH_INJECT=copy adds a copy of both inputs
to the MMD launcher (imm_fast.ops.mmd._launch). Under --ratio-against only this checkout's side is slowed.

pytest-benchmark stays the timer (its --benchmark-timer) and its JSON stays complete: a ratio test's entry times
the whole interleaved round and carries the per-provider medians and the speed-ups in extra_info.
"""
from __future__ import annotations

import datetime
import glob
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys

import pytest

FORMAT = "imm_fast-ratio-baseline/1"
INJECT_ENV = "IMM_FAST_BENCH_INJECT"
INJECTIONS = ("", "twice", "x3", "copy")
REPEATS = {"twice": 2, "x3": 3}
STAT = "median over interleaved rounds of t_baseline / t_kernel"


# ---------------------------------------------------------------------------------------------------------------
# The machine


def _cpuinfo_field(*names) -> str | None:
    """The first /proc/cpuinfo line whose key is one of `names` (lower case), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in names:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list | None:
    """The CPU's feature flags (x86 "flags", Arm "features"), sorted; None where the OS does not say."""
    text = _cpuinfo_field("flags", "features")
    return sorted(set(text.split())) if text else None


def cpu_caches() -> dict | None:
    """{"L1d": "48K", "L1i": "64K", "L2": "2048K", "L3": ...} of CPU 0, from sysfs; None where unknown."""
    out = {}
    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            level, kind, size = (open(os.path.join(d, f)).read().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        out[f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind, "")] = size
    return out or None


def env_info() -> dict:
    """What a speed-up depends on: CPU model, flags and caches, cores, threads (as the user set them), versions,
    CUDA device. The host key of a stored baseline is a part of it (HOST_KEYS)."""
    info = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "caches": cpu_caches(), "cores": os.cpu_count(),
            "threads": None, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "python": platform.python_version(), "platform": platform.platform(), "torch": None, "triton": None,
            "cuda_device": None}
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


# What must match for a stored speed-up to be compared: on the CPU the processor (model, flags, caches) and the
# torch thread count; on a GPU the card.
HOST_KEYS = {"cpu": ("cpu", "cpu_flags", "caches", "threads"), "cuda": ("cuda_device",)}
_KEY_NAMES = {"cpu": "CPU model", "cpu_flags": "CPU flags", "caches": "cache sizes", "threads": "torch threads",
              "cuda_device": "CUDA device"}


def host_differences(saved: dict, now: dict, device: str) -> list:
    """Why a speed-up saved on host `saved` cannot be compared on host `now` for `device` cases ([] = it can)."""
    out = []
    for k in HOST_KEYS["cuda" if device == "cuda" else "cpu"]:
        a, b = saved.get(k), now.get(k)
        if k not in saved:
            out.append(f"the baseline records no {_KEY_NAMES[k]} (written before host keys existed)")
        elif k == "cpu_flags" and a != b:
            only_a, only_b = sorted(set(a or ()) - set(b or ())), sorted(set(b or ()) - set(a or ()))
            out.append(f"CPU flags differ (only in the baseline: {' '.join(only_a[:8]) or '-'}; only here: "
                       f"{' '.join(only_b[:8]) or '-'})")
        elif a != b:
            out.append(f"measured with {_KEY_NAMES[k]} {a!r}, this run has {b!r}")
    return out


def load_avg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Options and files


def pytest_addoption(parser):
    g = parser.getgroup("ratio gate", "speed-ups measured in interleaved rounds (benchmarks/ratio_gate.py)")
    g.addoption("--ratio-against", metavar="REF", default=None,
                help="measure every ratio case with git commit REF's code too, in the same rounds, and fail when "
                     "a speed-up's ratio now / REF drops beyond --ratio-fail (nothing stored; any host)")
    g.addoption("--ratio-baseline", metavar="PATH", default=None,
                help="compare the measured speed-ups with this baseline JSON, saved on this host, and fail on a "
                     "drop beyond --ratio-fail")
    g.addoption("--ratio-fail", metavar="PCT", default="20%",
                help="allowed drop of a speed-up against the baseline, e.g. 20%% (default)")
    g.addoption("--ratio-save", metavar="PATH", default=None,
                help="write the measured speed-ups to this baseline JSON (merged with a same-host baseline)")
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


def _finite_positive(entry) -> bool:
    try:
        v = float(entry["speedup"])
    except (TypeError, KeyError, ValueError):
        return False
    return math.isfinite(v) and v > 0


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
    if not data["ratios"]:
        raise pytest.UsageError(f"--ratio-baseline {path!r} holds no speed-ups: it can gate nothing")
    bad = sorted(k for k, e in data["ratios"].items() if not _finite_positive(e))
    if bad:
        raise pytest.UsageError(
            f"--ratio-baseline {path!r}: {len(bad)} speed-up(s) are not finite positive numbers, so nothing could "
            f"drop below them: {', '.join(repr(k) for k in bad[:4])}{' ...' if len(bad) > 4 else ''} "
            "(re-measure them with --ratio-save)")
    return data


def write_json_atomic(path: str, data: dict) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    from imm_fast._files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


class RatioSession:
    """The run's measurements, its baseline or REF, and what --ratio-save writes."""

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
        self.against = opt("--ratio-against")
        if self.against and self.baseline_path:
            raise pytest.UsageError("--ratio-against and --ratio-baseline are two references: give one")
        self.baseline = read_baseline(self.baseline_path) if self.baseline_path else None
        self.repo = str(config.rootpath)
        self.against_sha, self.worker, self.against_packages = None, None, None
        if self.against:
            import ratio_against

            try:
                self.against_sha = ratio_against.resolve(self.repo, self.against)[0]
            except ratio_against.AgainstError as e:
                raise pytest.UsageError(str(e)) from None
        self.save_path = opt("--ratio-save")
        self.inject = os.environ.get(INJECT_ENV, "")
        if self.inject not in INJECTIONS:
            raise pytest.UsageError(f"{INJECT_ENV}={self.inject!r} is not one of {INJECTIONS}")
        self.measured = {}  # key -> entry
        self.rows = []  # (key, reference speed-up, now, change, status)
        self.compared = self.refused = 0  # cases compared with the baseline / REF; cases refused (another host)
        self.problem = None  # why the run fails although no test did (set at the session's end)
        self.save_error = None
        self._saved = None

    def against_worker(self):
        """REF's worker, started at the first ratio case (a run without one pays nothing)."""
        if self.worker is None:
            import ratio_against

            self.worker = ratio_against.Worker(self.repo, self.against_sha)
            self.against_packages = self.worker.packages
        return self.worker

    def close(self):
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    def _save_base(self):
        """The entries --ratio-save keeps: those of an existing same-host file (never another host's)."""
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
                diff = [d for dev in ("cpu", "cuda") for d in host_differences(old.get("machine", {}), env_info(),
                                                                                dev)]
                if diff:
                    raise RuntimeError(f"--ratio-save {self.save_path!r} holds another machine's baseline "
                                       f"({'; '.join(diff)}); not overwriting it: save to a new path")
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

    def verdict(self, key, e):
        """(the reference speed-up, the change, failed) of one measured pair e; (None, None, False) when there
        is nothing to compare it with."""
        if self.against:
            if "ratio" not in e:  # a provider REF does not have
                return None, None, False
            return e["ref_speedup"], e["ratio"] - 1, e["ratio"] < 1 - self.threshold
        base = self.baseline_of(key)
        if base is None:
            return None, None, False
        return base, e["speedup"] / base - 1, e["speedup"] < base * (1 - self.threshold)


def pytest_configure(config):
    config._imm_ratio = RatioSession(config)


def pytest_unconfigure(config):
    rs = getattr(config, "_imm_ratio", None)
    if rs is not None:
        rs.close()


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


def ratio_of_ratios(now: dict, ref: dict, k, b):
    """(median over rounds of s_now / s_ref, median of s_ref), s = t_b / t_k of one round on one side."""
    s_ref = [rb / rk for rb, rk in zip(ref[b], ref[k])]
    pairs = [(nb / nk) / s for nb, nk, s in zip(now[b], now[k], s_ref)]
    return statistics.median(pairs), statistics.median(s_ref)


def ratio_key(group, kernel, baseline):
    return f"{group}: {kernel} vs {baseline}"


class _Local:
    """This checkout's providers, in this process."""

    def __init__(self, fns, timer):
        self.fns, self.timer = fns, timer

    def prepare(self, warmup, min_sample_s):
        interleaved_times(self.fns, warmup, self.timer)  # warm-up: compile, autotune, caches; not recorded
        self.calls = calibrate(self.fns, min_sample_s, self.timer)
        self.samples = repeated(self.fns, self.calls)
        return list(self.fns)

    def round(self, r):
        t = per_call(interleaved_times(self.samples, 1, self.timer, start=r), self.calls)
        return {p: v[0] for p, v in t.items()}

    def drop(self):
        self.fns = self.samples = None


class _Remote:
    """REF's providers, built by the worker from the same recipe (benchmarks/ratio_against.py)."""

    def __init__(self, worker, recipe):
        self.worker, self.recipe = worker, recipe

    def prepare(self, warmup, min_sample_s):
        import ratio_against

        file, func, kwargs = self.recipe
        reply = self.worker.call({"op": "build", "file": os.path.abspath(file), "func": func, "kwargs": kwargs,
                                  "warmup": warmup, "min_sample_s": min_sample_s}, ratio_against.BUILD_TIMEOUT_S)
        self.calls = reply["calls"]
        return reply["providers"]

    def round(self, r):
        import ratio_against

        return self.worker.call({"op": "round", "r": r}, ratio_against.ROUND_TIMEOUT_S)["times"]

    def drop(self):
        import ratio_against

        try:
            self.worker.call({"op": "drop"}, 120)
        except ratio_against.AgainstError:  # the worker is gone: the error that ended the case is the one to see
            pass


class _Rounds:
    """Rounds over one or two sides (this checkout, REF), taking turns in alternating order."""

    def __init__(self, sides):
        self.sides = sides
        self.times = [None] * len(sides)
        self.r = 0

    def start(self, providers):
        self.times = [{p: [] for p in ps} for ps in providers]

    def one_round(self):
        order = list(range(len(self.sides)))
        for i in (order if self.r % 2 == 0 else order[::-1]):
            for p, t in self.sides[i].round(self.r).items():
                self.times[i][p].append(t)
        self.r += 1

    def figures(self, baselines, first=0):
        """{(kernel, baseline): {"speedup", "speedup_min"[, "ratio", "ref_speedup"]}} over rounds[first:]."""
        now = {p: v[first:] for p, v in self.times[0].items()}
        ref = {p: v[first:] for p, v in self.times[1].items()} if len(self.times) > 1 else {}
        out = {}
        for (k, b), (s, m) in speedups(now, baselines).items():
            out[(k, b)] = {"speedup": s, "speedup_min": m}
            if k in ref and b in ref:
                out[(k, b)]["ratio"], out[(k, b)]["ref_speedup"] = ratio_of_ratios(now, ref, k, b)
        return out


@pytest.fixture
def ratio_bench(benchmark, request):
    """measure(group, providers, baselines, rounds=20, warmup=2, device="cpu", min_sample_s=None, recipe=None)
    -> {key: speed-up}, or None under --benchmark-disable (each provider then runs once, untimed).

    providers: {name: callable()} (each synchronizes its device), the baselines among them by name. Every
    non-baseline provider is gated against every baseline. A timed sample of a provider is as many back-to-back
    calls as last min_sample_s (calibrated after the warm-up; default 30 ms on the CPU, where the scheduler's time
    slices must average out, 10 ms on a GPU); its time per call enters the round.
    recipe: (file, function name, kwargs) such that file's function(**kwargs) returns the same providers; under
    --ratio-against the worker builds REF's providers from it (kwargs: JSON values only).
    """
    session: RatioSession = request.config._imm_ratio

    def measure(group, providers, baselines, rounds=20, warmup=2, device="cpu", min_sample_s=None, recipe=None):
        if not any(b in providers for b in baselines) or all(p in baselines for p in providers):
            raise ValueError(f"ratio test {group!r}: providers {list(providers)} need a baseline among "
                             f"{list(baselines)} and a provider that is not one")
        fns = _injected(session, request, providers, baselines)
        timer = getattr(benchmark, "_timer", None) or __import__("time").perf_counter
        benchmark.group = f"ratio-{group}"
        if benchmark.disabled:  # CI smoke: every provider once, untimed
            benchmark.pedantic(lambda: [f() for f in fns.values()], rounds=1, iterations=1)
            return None
        _refuse_another_host(session, device)
        if session.against and recipe is None:
            pytest.fail(f"ratio test {group!r} gives no recipe, so --ratio-against cannot build {session.against}'s "
                        "providers", pytrace=False)
        sides = [_Local(fns, timer)] + ([_Remote(session.against_worker(), recipe)] if session.against else [])
        try:
            return _measure(session, benchmark, group, sides, baselines, session.rounds or rounds, warmup,
                            device, min_sample_s or (0.03 if device == "cpu" else 0.01))
        finally:
            for side in sides:
                side.drop()

    return measure


def _injected(session, request, providers, baselines):
    k = REPEATS.get(session.inject, 1)
    if session.inject == "copy":
        _inject_launcher_copy(request)
    if k == 1:
        return dict(providers)
    return {p: (f if p in baselines else (lambda f=f: [f() for _ in range(k)])) for p, f in providers.items()}


def _refuse_another_host(session, device):
    """A stored speed-up is only compared on the host that measured it (CPU speed-ups depend on the processor,
    its caches and the thread count, GPU ones on the card): otherwise the case fails with the reason."""
    if session.baseline is None:
        return
    diff = host_differences(session.baseline.get("machine", {}), env_info(), device)
    if diff:
        session.refused += 1
        pytest.fail(f"--ratio-baseline {session.baseline_path} was measured on another host ({'; '.join(diff)}): "
                    "speed-ups are not comparable (use --ratio-against REF, which measures the reference here, "
                    "or write a baseline for this host with --ratio-save)", pytrace=False)


def _measure(session, benchmark, group, sides, baselines, rounds, warmup, device, min_sample_s):
    rec = _Rounds(sides)
    rec.start([side.prepare(warmup, min_sample_s) for side in sides])
    load_before = load_avg()
    benchmark.pedantic(rec.one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    result = rec.figures(baselines)
    gate = (lambda e: e.get("ratio", math.inf)) if session.against else (lambda e: e["speedup"])
    failing = [kb for kb, e in result.items() if session.verdict(ratio_key(group, *kb), e)[2]]
    attempts = 1
    while failing and attempts <= session.confirm:  # re-measure: a real slowdown fails again
        attempts += 1
        first = rec.r
        for _ in range(rounds):
            rec.one_round()
        again = rec.figures(baselines, first)
        result = {kb: max(result[kb], again[kb], key=gate) for kb in result}  # fails only if every attempt did
        failing = [kb for kb, e in result.items() if session.verdict(ratio_key(group, *kb), e)[2]]
    _record(session, benchmark, group, rec, baselines, result, failing, dict(
        rounds=rounds, attempts=attempts, device=device, load_avg=[load_before, load_avg()]))
    if failing:
        what = f"{session.against}'s code, same rounds" if session.against else "baseline"
        lines = [f"{ratio_key(group, k, b)}: speed-up {result[(k, b)]['speedup']:.3f}x, {what} "
                 f"{session.verdict(ratio_key(group, k, b), result[(k, b)])[0]:.3f}x" for k, b in failing]
        pytest.fail(f"speed-up dropped more than {session.threshold:.0%} ({attempts} measurements):\n  "
                    + "\n  ".join(lines), pytrace=False)
    return {ratio_key(group, k, b): e["speedup"] for (k, b), e in result.items()}


def _record(session, benchmark, group, rec, baselines, result, failing, facts):
    """The case's figures into pytest-benchmark's extra_info, the --ratio-save entries and the closing table."""
    times, calls = rec.times[0], rec.sides[0].calls
    med = {p: statistics.median(v) for p, v in times.items()}
    benchmark.extra_info.update(
        providers=list(times), baselines=[b for b in baselines if b in times], **facts,
        calls_per_sample=calls, median_s=med, min_s={p: min(v) for p, v in times.items()},
        inject=session.inject or None, threads=env_info()["threads"],
        speedup={f"{k} vs {b}": e["speedup"] for (k, b), e in result.items()},
        speedup_min={f"{k} vs {b}": e["speedup_min"] for (k, b), e in result.items()})
    if session.against:
        benchmark.extra_info.update(against=session.against, against_commit=session.against_sha,
                                    ratio_vs_against={f"{k} vs {b}": e.get("ratio") for (k, b), e in result.items()})
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for (k, b), e in result.items():
        key = ratio_key(group, k, b)
        session.measured[key] = {"speedup": e["speedup"], "speedup_min": e["speedup_min"], "kernel": k,
                                 "baseline": b, "kernel_median_s": med[k], "baseline_median_s": med[b],
                                 "calls_per_sample": [calls[k], calls[b]], "measured": now, **facts}
        if "ratio" in e:
            session.measured[key].update(against=session.against_sha, ratio_vs_against=e["ratio"],
                                         against_speedup=e["ref_speedup"])
        ref, change, _ = session.verdict(key, e)
        session.compared += ref is not None
        status = "new" if ref is None else ("FAIL" if (k, b) in failing else "ok")
        if facts["attempts"] > 1:  # the table says when a case needed its confirming measurement
            status += f" ({facts['attempts']} measurements)"
        session.rows.append((key, ref, e["speedup"], change, status))
    session.save()


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
    if session is None or not (session.rows or session.save_path or session.problem):
        return
    tr = terminalreporter
    tr.section("ratio gate")
    if session.inject:
        tr.write_line(f"{INJECT_ENV}={session.inject}: a slowdown was injected (test only)")
    if session.against:
        where = f" (imported from {session.against_packages})" if session.against_packages else ""
        tr.write_line(f"against {session.against} = {session.against_sha[:12]}{where}: baseline = its speed-up "
                      f"in the same rounds, change = median over rounds of now / {session.against} - 1 "
                      f"(allowed drop {session.threshold:.0%})")
    elif session.baseline is not None:
        tr.write_line(f"baseline {session.baseline_path} (allowed drop {session.threshold:.0%}), {STAT}")
    w = max([len(r[0]) for r in session.rows] + [10])
    tr.write_line(f"{'speed-up':<{w}}  {'baseline':>9}  {'now':>9}  {'change':>8}  status")
    for key, ref, s, change, status in session.rows:
        b = "-" if ref is None else f"{ref:.3f}x"
        ch = "-" if change is None else f"{change:+.1%}"
        tr.write_line(f"{key:<{w}}  {b:>9}  {s:>8.3f}x  {ch:>8}  {status}", red=status.startswith("FAIL"))
    m = env_info()
    tr.write_line(f"measured: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}, "
                  f"triton {m['triton']}, cuda {m['cuda_device']}, load {load_avg()}")
    if session.problem:
        tr.write_line(f"ERROR: {session.problem}", red=True)
    if session.save_path:
        if session.save_error:
            tr.write_line(f"--ratio-save: NOT written: {session.save_error}", red=True)
        elif session.measured:
            tr.write_line(f"--ratio-save: wrote {len(session.measured)} speed-ups to {session.save_path}")
        else:
            tr.write_line(f"--ratio-save: no ratio test measured anything; {session.save_path} left as it was")


def _nothing_compared(rs) -> str | None:
    """Why a run asked to compare compared nothing (a silent pass otherwise), or None."""
    if not (rs.against or rs.baseline is not None) or rs.compared or rs.refused:
        return None
    what = f"--ratio-against {rs.against}" if rs.against else f"--ratio-baseline {rs.baseline_path}"
    if not rs.measured:
        return f"{what}: no ratio test measured anything (all deselected or skipped), so nothing was compared"
    if rs.against:
        return f"{what}: none of the {len(rs.measured)} measured speed-ups has a provider pair in {rs.against}"
    theirs = sorted(rs.baseline["ratios"])
    return (f"{what}: its {len(theirs)} case(s) match none of the {len(rs.measured)} measured here, so nothing "
            f"was compared (measured e.g. {sorted(rs.measured)[0]!r}; the baseline has e.g. {theirs[0]!r})")


def pytest_sessionfinish(session, exitstatus):
    rs = getattr(session.config, "_imm_ratio", None)
    if rs is None:
        return
    rs.close()
    rs.problem = _nothing_compared(rs)
    if (rs.save_error or rs.problem) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED  # asked to save or compare, and nothing was
