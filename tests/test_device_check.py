"""benchmarks/device_check.sh cannot rot between GPU windows: its CPU dry run (the same steps on CPU shapes, the
CUDA-only parts reported as skipped) writes every file a device run brings back, one JSON line per case, and a
table rebuilt from those lines; a step past the time budget is cut and recorded, never silently lost."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
FILES = {"results.jsonl", "table.md", "run.log", "install.log", "tests.log", "bench.log", "profile.txt",
         "ratio-cpu.json"}
STEPS = ["versions", "install", "extension-build", "headline", "kernel-ratios", "attention-table", "profile",
         "roofline"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _run(tmp_path, *args, **env):
    out = tmp_path / "out"
    e = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1", **env)
    e.pop("IMM_FAST_BENCH_INJECT", None)
    r = subprocess.run(["bash", str(BENCH / "device_check.sh"), *args], cwd=tmp_path, env=e, capture_output=True,
                       text=True, timeout=1200)
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    return r, out, recs


@pytest.mark.slow
def test_dry_run_writes_every_file_and_times_every_step(tmp_path):
    r, out, recs = _run(tmp_path, "--dry-run")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert names == FILES, names  # what comes back from the device machine: 8 files at most
    assert all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())
    steps = {rec["step"]: rec for rec in recs if rec["kind"] == "step"}
    assert set(STEPS) <= set(steps), steps.keys()
    assert [s for s in steps if steps[s]["status"] not in ("ok", "skipped")] == []
    assert all(isinstance(steps[s]["seconds"], float) and steps[s]["seconds"] >= 0 for s in STEPS)
    assert steps["attention-table"]["status"] == "skipped" and "CUDA" in steps["attention-table"]["reason"]
    assert all(steps[f"tests/{f}"]["status"] == "skipped" for f in ("test_mmd.py", "test_attention.py"))
    assert sum(1 for rec in recs if rec["kind"] == "step" and rec["step"] == "roofline") == 1  # one line a step
    head = {rec["case"]: rec for rec in recs if rec["kind"] == "headline"}
    for p in ("reference", "fused", "fused+compile", "reference+compile"):
        assert head[f"train_step tiny b16 {p}"]["outcome"] == "passed"
        assert head[f"train_step tiny b16 {p}"]["per_s"] > 0
    assert head["train_step tiny b16 fused+compile"]["compile_s"] is not None  # compile time apart from run time
    assert head["sample tiny b16 fused+graph"]["outcome"] == "skipped"
    ratios = [rec for rec in recs if rec["kind"] == "test" and rec.get("group", "").startswith("ratio-mmd")]
    assert ratios and all(rec["outcome"] == "passed" for rec in ratios)
    assert json.loads((out / "ratio-cpu.json").read_text())["ratios"]
    table = (out / "table.md").read_text()
    for s in STEPS:
        assert f"| {s} |" in table
    assert "| train_step tiny b16 fused | passed |" in table and "cpp vs ref" in table


def test_a_spent_budget_cuts_steps_and_says_so(tmp_path):
    """BUDGET_S caps the whole run: a step gets what is left, a step with nothing left is recorded as skipped, and
    every step still has its line and its row in the table."""
    r, out, recs = _run(tmp_path, "--dry-run", BUDGET_S="4")
    steps = {rec["step"]: rec for rec in recs if rec["kind"] == "step"}
    assert set(STEPS) <= set(steps), (steps.keys(), r.stdout[-2000:])
    assert all(rec.get("timeout_s", 0) <= 4 for rec in steps.values())
    assert any("the 4 s budget is spent" in rec.get("reason", "") for rec in steps.values()), steps
    table = (out / "table.md").read_text()
    assert all(f"| {s} |" in table for s in STEPS), table


def test_summarize_rebuilds_from_the_lines_a_kill_left(tmp_path, capsys):
    """A torn last line (the writer killed mid-case) is left out and counted; the rest still makes the table."""
    sys.path.insert(0, str(BENCH))
    try:
        import results
        import summarize
    finally:
        sys.path.remove(str(BENCH))
    path = tmp_path / "results.jsonl"
    results.append({"kind": "step", "step": "headline", "status": "timeout", "rc": 124, "seconds": 80.0}, str(path))
    results.append({"kind": "headline", "case": "train_step XL/2 b64 fused", "outcome": "passed", "per_s": 512.0,
                    "unit": "samples/s", "median_s": 0.125, "first_call_s": 3.0, "compile_s": None,
                    "nan": float("nan")}, str(path))
    with open(path, "a") as f:
        f.write('{"kind": "headline", "case": "train_st')
    recs, torn = results.read(str(path))
    assert torn == 1 and [r["kind"] for r in recs] == ["step", "headline"] and recs[1]["nan"] == "nan"
    summarize.main([str(path)])
    out = capsys.readouterr().out
    assert "| headline | timeout | 80.0 |" in out
    assert "| train_step XL/2 b64 fused | passed | 512.0 samples/s | 125.0 | 3.0 | - | - |" in out
    assert "1 line(s)" in out


def _bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        import results
        import summarize
    finally:
        sys.path.remove(str(BENCH))
    return results, summarize


def test_measured_beside_the_model_on_a_modelled_card(tmp_path, capsys):
    """On an H100 SXM or H200, the kernels' measured medians (a ratio case's per-provider medians, a plain bench
    case's) are set beside the floor and the bound the model stored for their group; other cards, the reference
    providers and groups the model does not cover print nothing."""
    results, summarize = _bench_modules()
    model = {"triton": "3.9.0", "groups": {"mmd-4096x4x4096-float32-fwdbwd": {
        "H100 SXM": {"floor_us": 60.0, "bound_us": 75.0, "cases": ["mmd x"]},
        "H200": {"floor_us": 42.0, "bound_us": 52.5, "cases": ["mmd x"]}}}}
    (tmp_path / "model.json").write_text(json.dumps(model))
    path = str(tmp_path / "results.jsonl")
    results.append({"kind": "env", "device": "NVIDIA H100 80GB HBM3"}, path)
    results.append({"kind": "test", "case": "bench_mmd.py::test_mmd_gpu_ratio[4096x4x4096-fp32-fwdbwd]",
                    "outcome": "passed", "group": "ratio-mmd-4096x4x4096-float32-fwdbwd", "median_s": 1.0,
                    "extra_info": {"median_s": {"ref": 9e-4, "compile": 3e-4, "triton": 1.2e-4, "cuda": 1.5e-4}}},
                   path)
    results.append({"kind": "test", "case": "bench_mmd.py::test_mmd_gpu_ratio[4096x8x3072-fp32-fwdbwd]",
                    "outcome": "passed", "group": "ratio-mmd-4096x8x3072-float32-fwdbwd", "median_s": 1.0,
                    "extra_info": {"median_s": {"ref": 9e-4, "triton": 1e-4}}}, path)
    recs, _ = results.read(path)
    summarize.print_against_model(recs, str(tmp_path / "model.json"))
    out = capsys.readouterr().out
    assert "| mmd-4096x4x4096-float32-fwdbwd | triton | 120.0 | 60.0 | 50% | 75.0 | 62% |" in out
    assert "| mmd-4096x4x4096-float32-fwdbwd | cuda | 150.0 | 60.0 | 40% | 75.0 | 50% |" in out
    assert "| ref |" not in out and "4096x8x3072" not in out and out.startswith("\nH100 SXM")
    assert summarize.card_of("NVIDIA H200") == "H200" and summarize.card_of("NVIDIA H100 PCIe") is None
    recs[0]["device"] = "NVIDIA A100-SXM4-80GB"
    summarize.print_against_model(recs, str(tmp_path / "model.json"))
    assert capsys.readouterr().out == ""


def test_the_stored_model_covers_the_device_runs_groups():
    """benchmarks/roofline_model.json (written by `roofline.py --save`) has both cards for the MMD shapes the
    device run measures (bench_mmd's quick GPU shapes, forward+backward) and the adaLN DiT-XL group."""
    model = json.loads((BENCH / "roofline_model.json").read_text())
    for group in ("mmd-4096x4x4096-float32-fwdbwd", "mmd-4096x8x3072-bfloat16-fwdbwd",
                  "adaln-XL-residual_adaln-fwdbwd"):
        assert set(model["groups"][group]) == {"H100 SXM", "H200"}, group
        assert 0 < model["groups"][group]["H200"]["floor_us"] <= model["groups"][group]["H200"]["bound_us"]
