"""Benchmark plugins: the ratio gate (benchmarks/ratio_gate.py: --ratio-against/--ratio-baseline/--ratio-fail/
--ratio-save, the ratio_bench fixture, the closing table, the machine facts in pytest-benchmark's JSON), one JSON
line per finished case under IMM_FAST_RESULTS (benchmarks/results.py), and a cold compiler for every case."""
import os
import sys

import pytest

from ratio_gate import (pytest_addoption, pytest_benchmark_update_machine_info, pytest_configure,  # noqa: F401
                        pytest_sessionfinish, pytest_terminal_summary, pytest_unconfigure, ratio_bench)
from results import pytest_runtest_logreport, pytest_runtest_makereport  # noqa: F401

if os.environ.get("IMM_FAST_BENCH_COMPILE_BACKEND"):  # the CPU dry run: dynamo without inductor's codegen
    from device_run import use_compile_backend

    use_compile_backend()


@pytest.fixture(autouse=True)
def _cold_compiler():
    """torch._dynamo.reset() before every case: each case compiles its own graphs from cold (its compile time is
    its own) and no case inherits another's recompiles; past the recompile limit dynamo raises instead of
    silently running the "compile" provider eagerly."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()
        if "fail_on_recompile_limit_hit" in dynamo.config._config:
            dynamo.config.fail_on_recompile_limit_hit = True
    yield
