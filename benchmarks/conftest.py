"""Benchmark plugin: the ratio gate (benchmarks/ratio_gate.py): options --ratio-baseline/--ratio-fail/--ratio-save,
the ratio_bench fixture, the closing table, and the machine facts added to pytest-benchmark's JSON."""
from ratio_gate import (pytest_addoption, pytest_benchmark_update_machine_info, pytest_configure,  # noqa: F401
                        pytest_sessionfinish, pytest_terminal_summary, ratio_bench)
