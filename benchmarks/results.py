"""One JSON line per finished case, so a timeout or a crash loses at most the case that was running.

IMM_FAST_RESULTS=PATH turns it on: every test's outcome (with its pytest-benchmark statistics and extra_info when
it has them), every device_run.py case and every device_check.sh step is appended to PATH as one line, flushed
and fsync'ed before the next case starts. summarize.py rebuilds the tables from those lines. IMM_FAST_STEP names
the step the lines belong to (device_check.sh sets it).

As a pytest plugin: benchmarks/conftest.py loads it; for tests/ run `pytest -p results` with benchmarks/ on
PYTHONPATH.
"""
from __future__ import annotations

import json
import math
import os
import time

import pytest

ENV, STEP_ENV = "IMM_FAST_RESULTS", "IMM_FAST_STEP"


def _plain(v):
    """JSON-safe: non-finite floats become strings (JSON has no NaN), unknown objects their str()."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def append(record: dict, path: str | None = None) -> None:
    """Append one line to `path` (default: $IMM_FAST_RESULTS; nothing when unset) and make it durable."""
    path = path or os.environ.get(ENV)
    if not path:
        return
    line = json.dumps(_plain({"step": os.environ.get(STEP_ENV), "time": round(time.time(), 3), **record}))
    with open(path, "a") as f:  # one write of one line: a killed writer leaves at most a torn last line
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read(path: str) -> tuple:
    """(records, torn): the readable lines of `path`, and how many were not (a line cut by a kill)."""
    records, torn = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                torn += 1
    return records, torn


# ---------------------------------------------------------------------------------------------------------------
# pytest plugin


def _bench_fields(item):
    bench = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(getattr(bench, "stats", None), "stats", None)
    if bench is None or stats is None:
        return {}
    return {"group": bench.group, "median_s": stats.median, "mean_s": stats.mean, "min_s": stats.min,
            "rounds": stats.rounds, "extra_info": dict(bench.extra_info)}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """The benchmark's figures ride on the call report to pytest_runtest_logreport."""
    outcome = yield
    if call.when == "call" and os.environ.get(ENV):
        outcome.get_result().imm_bench = _bench_fields(item)


def pytest_runtest_logreport(report):
    if not os.environ.get(ENV):
        return
    done = report.when == "call" or (report.when == "setup" and not report.passed)
    if not done:
        return
    rec = {"kind": "test", "case": report.nodeid, "outcome": report.outcome, "seconds": round(report.duration, 4)}
    if report.skipped and isinstance(report.longrepr, tuple):
        rec["reason"] = str(report.longrepr[2])[:300]
    elif report.failed:
        rec["reason"] = str(getattr(report, "longreprtext", "") or report.longrepr)[-600:]
    rec.update(getattr(report, "imm_bench", {}))
    append(rec)
