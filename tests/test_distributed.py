"""Data parallelism: torchrun with 2 gloo processes on the CPU makes the same update as 1 process with the same
global batch (each rank forms its own groups from its slice of the globally drawn batch; DDP averages the gradients).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import imm_fast

pytest.importorskip("sklearn")

ARGS = ["model.depth=1", "model.hidden_size=32", "model.num_heads=2", "batch_size=32", "max_steps=2", "lr=1e-3",
        "sample.num_images=10", "sample.steps=[1]", "final_eval=false", "progress=false", "log_every=1",
        "device=cpu", "threads=1", "loss.label_dropout=0.2"]


def _run(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def test_two_gloo_ranks_match_one_process(tmp_path):
    from safetensors.torch import load_file

    single = _run([sys.executable, "-m", "imm_fast", "train", f"out_dir={tmp_path}", "run_name=one"] + ARGS, tmp_path)
    dist = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "imm_fast", "train", f"out_dir={tmp_path}", "run_name=two"] + ARGS, tmp_path)
    assert "world 2" in dist.stderr
    # Only rank 0 writes: one set of files.
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["latest", "step-0000002"]
    a = load_file(str(tmp_path / "one" / "checkpoints" / "step-0000002" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "step-0000002" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    # The run really trained (weights moved from the initialization, the loss was logged by both).
    from imm_fast.config import load_train_config
    from imm_fast.models import build_model

    torch.manual_seed(0)
    cfg = load_train_config(None, {k: v for k, v in (x.split("=", 1) for x in ARGS[:3])})
    init = build_model(cfg.model).state_dict()
    assert any(not torch.allclose(a[k], init[k]) for k in a)
    assert "loss" in (tmp_path / "two" / "metrics.jsonl").read_text()
    assert single.returncode == 0


def test_two_gloo_ranks_stop_together_on_nonfinite_steps(tmp_path):
    """All-NaN data under DDP: the ranks skip the same steps and stop with the one-line error after
    max_nonfinite_steps, exit non-zero, and none waits for the other (the timeout would fail the test)."""
    import numpy as np

    data = tmp_path / "nan.npy"
    np.save(data, np.full((64, 1, 8, 8), np.nan, np.float32))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "imm_fast",
           "train", f"out_dir={tmp_path}", "run_name=nan", "data.source=array", f"data.path={data}",
           "data.class_conditional=false", "model.label_dim=0", "max_nonfinite_steps=2", "max_steps=5"]
    cmd += [a for a in ARGS if not a.startswith(("max_steps", "loss.label_dropout"))]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0, p.stdout + p.stderr
    # The ranks stop at the same step with the one-line error and exit status 2. torchrun SIGTERMs a rank that is
    # still printing once the other has exited, so that rank may end with -15 before its own line is written.
    assert p.stderr.count("error: stopping at step 1: 2 optimizer steps in a row were non-finite") >= 1, p.stderr[-3000:]
    codes = set(re.findall(r"exitcode\s*:\s*(-?\d+)", p.stderr))
    assert "2" in codes and codes <= {"2", "-15"}, p.stderr[-3000:]
    assert 'File "' + str(Path(imm_fast.__file__).parent) not in p.stderr, p.stderr[-3000:]  # no imm_fast traceback
    assert not list((tmp_path / "nan").glob("checkpoints/step-*"))


def _worker_pids(launcher_pid):
    """{rank: pid} of the torchrun workers below the launcher (their RANK from /proc/<pid>/environ)."""
    out, todo = {}, [launcher_pid]
    while todo:
        pid = todo.pop()
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for kid in map(int, kids):
            todo.append(kid)
            try:
                env = dict(x.split("=", 1) for x in Path(f"/proc/{kid}/environ").read_text().split("\0") if "=" in x)
            except OSError:
                continue
            if "RANK" in env and "LOCAL_RANK" in env:
                out[int(env["RANK"])] = kid
    return out


@pytest.mark.slow  # three torchrun launches
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks through /proc")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_then_resume_is_exact(tmp_path):
    """SIGTERM to rank 1 only: rank 0 never sees a signal, yet both stop after the same step (they agree in the
    step's all-reduce), rank 0 writes a verified checkpoint, nothing hangs; the resumed 2-rank run ends with the
    weights of an uninterrupted one."""
    import json
    import signal
    import time

    from safetensors.torch import load_file

    from imm_fast.checkpoints import verify_checkpoint

    args = [a for a in ARGS if not a.startswith("max_steps")] + ["max_steps=40", "ckpt_every=0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "imm_fast", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stopped = subprocess.Popen(torchrun + [f"out_dir={tmp_path}", "run_name=stop"] + args, cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "stop" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):  # a few steps done
        assert stopped.poll() is None and time.time() < deadline, stopped.communicate()
        time.sleep(0.05)
    os.kill(_worker_pids(stopped.pid)[1], signal.SIGTERM)
    _, err = stopped.communicate(timeout=240)
    assert stopped.returncode != 0
    line = [x for x in err.splitlines() if "imm_fast: stopped by SIGTERM at step" in x]
    assert len(line) == 1 and "resume with: torchrun --nproc_per_node 2 -m imm_fast train resume=" in line[0], err
    cks = sorted((tmp_path / "stop" / "checkpoints").glob("step-*"))
    assert len(cks) == 1 and verify_checkpoint(cks[0]) is None and int(cks[0].name[5:]) < 40
    assert (tmp_path / "stop" / "run.lock").read_text() == ""
    _run(torchrun + [f"resume={tmp_path / 'stop'}"], tmp_path)
    _run(torchrun + [f"out_dir={tmp_path}", "run_name=full"] + args, tmp_path)
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step-0000040" / "model.safetensors"))
    b = load_file(str(tmp_path / "stop" / "checkpoints" / "step-0000040" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == 40
