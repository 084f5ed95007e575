"""Fault injection into training (issue 11): non-finite data, lr and weights; kill -9 at chosen points of a checkpoint
write; two writers of one run folder; a corrupted checkpoint tail; a `latest` pointing outside the run; file modes.

Each test asserts the clear error or the exact recovery, that no checkpoint holds NaN, that nothing saved is lost and
that metrics.jsonl stays strict JSON. A tiny digits model (1 block, width 32, batch 16) keeps the file fast.
"""
import json
import math
import os
import select
import signal
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

import imm_fast  # noqa: E402
from imm_fast import training  # noqa: E402
from imm_fast._files import atomic_write_text  # noqa: E402
from imm_fast.checkpoints import (NonFiniteError, RunFolderBusyError, RunLock, save_checkpoint,  # noqa: E402
                                 verify_checkpoint)
from imm_fast.config import LossConfig, TrainConfig  # noqa: E402
from imm_fast.loss import imm_loss  # noqa: E402

from _helpers import FAST_TRAIN as FAST, NaNFirstGroup, random_model  # noqa: E402


def _records(run_dir: Path):
    """metrics.jsonl parsed strictly: NaN / Infinity tokens are not JSON and fail the test."""
    def refuse(token):
        raise AssertionError(f"metrics.jsonl holds the non-JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_checkpoints_finite(run_dir: Path):
    cks = sorted((run_dir / "checkpoints").glob("step-*"))
    for ck in cks:
        assert verify_checkpoint(ck) is None
        for name in ("model.safetensors", "ema.safetensors"):
            assert all(torch.isfinite(v).all() for v in _weights(ck / name).values()), ck / name
    return [ck.name for ck in cks]


# ------------------------------------------------------------------------------------------------------------------
# The loss: a non-finite group gives exactly zero gradient
# ------------------------------------------------------------------------------------------------------------------
def _grads(model, params_of, x, cfg, t, s, noise):
    params_of.zero_grad(set_to_none=True)
    out = imm_loss(model, x, None, cfg, t=t, s=s, noise=noise)
    out.loss.backward()
    return out, {k: p.grad.clone() for k, p in params_of.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("where", ["data", "target"])
def test_nonfinite_group_contributes_exactly_zero_gradient(where):
    """A NaN in one particle's data (or in the target pass of one group) zeroes that group's loss AND gradient: the
    gradient equals that of the other groups alone (scaled by their share of the mean), and is finite."""
    torch.set_num_threads(1)
    m = random_model(img_resolution=8, img_channels=1, label_dim=0, patch_size=2, hidden_size=32, depth=1,
                     num_heads=2).train()
    cfg = LossConfig(group_size=2, backend="torch", label_dropout=0.0)
    G = 3
    x = torch.randn(2 * G, 1, 8, 8) * 0.5
    noise = torch.randn_like(x) * 0.5
    t = torch.tensor([0.9, 0.7, 0.5], dtype=torch.float64)
    s = torch.tensor([0.2, 0.3, 0.1], dtype=torch.float64)
    model = m
    if where == "data":
        x = x.clone()
        x[1, 0, 3, 4] = float("nan")  # particle 1 of group 0
    else:
        model = NaNFirstGroup(m, target_only=True)  # the no-grad target pass of group 0 is NaN
    out, g = _grads(model, m, x, cfg, t, s, noise)
    assert int(out.nonfinite_groups) == 1 and torch.isfinite(out.loss)
    assert all(torch.isfinite(v).all() for v in g.values())
    ref_out, ref = _grads(m, m, x[2:], cfg, t[1:], s[1:], noise[2:])  # the two good groups alone
    torch.testing.assert_close(out.loss, ref_out.loss * (G - 1) / G)
    assert len(ref) > 10 and ref.keys() == g.keys()
    for k in ref:
        torch.testing.assert_close(g[k], ref[k] * (G - 1) / G, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------------------------
# The loop: NaN at the data, at a step's loss, at the lr, at a parameter
# ------------------------------------------------------------------------------------------------------------------
def test_nan_pixel_in_the_data_is_masked_and_training_continues(tmp_path):
    rng = np.random.RandomState(0)
    x = (rng.randn(32, 1, 8, 8) * 0.5).astype(np.float32)
    x[5, 0, 2, 3] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=rng.randint(0, 10, 32))
    r = imm_fast.train(None, out_dir=str(tmp_path), run_name="r", max_steps=4, **FAST,
                       **{"data.source": "array", "data.path": str(tmp_path / "d.npz")})
    assert r.step == 4
    recs = [x for x in _records(r.run_dir) if "loss" in x]
    assert [x["step"] for x in recs] == [1, 2, 3, 4]
    # 32 samples, 16 per step: the NaN sample is in one batch of every epoch; its group is masked, no step skipped.
    assert sum(x["nonfinite_groups"] for x in recs) == 2 and all(x["skipped"] == 0 for x in recs)
    assert all(math.isfinite(x["loss"]) and math.isfinite(x["grad_norm"]) for x in recs)
    assert _assert_checkpoints_finite(r.run_dir) == ["step-0000002", "step-0000004"]


@pytest.mark.parametrize("fault", ["nan_loss", "all_groups_masked"])
def test_a_nonfinite_step_is_skipped_and_training_continues(tmp_path, monkeypatch, fault):
    """The loss of the 3rd step turns NaN (its gradients too), or all its groups are masked (zero gradient, which
    Adam's momentum would still turn into an update): that step is skipped, nothing moves, training goes on."""
    import imm_fast.loss as loss_mod

    real, calls, seen = loss_mod.imm_loss, [], {}

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) == 3 and fault == "nan_loss":
            out.loss = out.loss * float("nan")
        elif len(calls) == 3:
            out.loss, out.nonfinite_groups = out.loss * 0.0, out.nonfinite_groups + 4
        return out

    def remember(step, info):
        seen[step] = {k: v.detach().clone() for k, v in info["model"].state_dict().items()}

    monkeypatch.setattr(loss_mod, "imm_loss", poisoned)
    r = imm_fast.train(None, out_dir=str(tmp_path), run_name="r", max_steps=4, callback=remember, **FAST)
    assert r.step == 4 and len(calls) == 5  # 4 applied steps + 1 skipped
    recs = [x for x in _records(r.run_dir) if "loss" in x]
    assert [(x["step"], x["skipped"]) for x in recs] == [(1, 0), (2, 0), (3, 1), (4, 0)]
    assert sum(x["nonfinite_groups"] for x in recs) == (4 if fault == "all_groups_masked" else 0)
    state = torch.load(r.checkpoint / "train_state.pt", weights_only=True)
    assert all(int(s["step"]) == 4 for s in state["optimizer"]["state"].values())  # Adam stepped 4 times, not 5
    assert _assert_checkpoints_finite(r.run_dir) == ["step-0000002", "step-0000004"]
    assert set(seen) == {1, 2, 3, 4}


def test_lr_inf_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """From step 3 on the lr is inf (injected: the config may refuse lr=inf): step 3 blows the weights up, the next
    steps are non-finite and skipped, the run stops naming the step, the last good checkpoint and the causes."""
    real = training._lr_at
    monkeypatch.setattr(training, "_lr_at", lambda cfg, step: float("inf") if step >= 2 else real(cfg, step))
    with pytest.raises(NonFiniteError) as e:
        imm_fast.train(None, out_dir=str(tmp_path), run_name="r", max_steps=8, **FAST)
    msg = str(e.value)
    assert "step 4" in msg and "step-0000002" in msg and "learning rate" in msg and "data" in msg
    run = tmp_path / "r"
    assert _assert_checkpoints_finite(run) == ["step-0000002"]
    recs = _records(run)
    assert [x["lr"] for x in recs if "loss" in x][-1] is None  # inf is written as null
    assert "error" in recs[-1] and recs[-1]["skipped"] == 3
    assert (run / "run.lock").read_text() == ""  # released


def test_nan_parameter_mid_run_stops_after_max_nonfinite_steps(tmp_path):
    def poison(step, info):
        if step == 3:
            with torch.no_grad():
                info["model"].model.x_embedder.proj.bias[0] = float("nan")

    with pytest.raises(NonFiniteError, match=r"stopping at step 4: 2 optimizer steps in a row were non-finite.*"
                                             r"grad_norm=nan.*step-0000002"):
        imm_fast.train(None, out_dir=str(tmp_path), run_name="r", max_steps=8, max_nonfinite_steps=2,
                       callback=poison, **FAST)
    assert _assert_checkpoints_finite(tmp_path / "r") == ["step-0000002"]
    assert _records(tmp_path / "r")[-1]["skipped"] == 2


def test_checkpoint_with_nonfinite_weights_is_refused(tmp_path):
    m = random_model(img_resolution=8, img_channels=1, label_dim=0, patch_size=2, hidden_size=32, depth=1,
                     num_heads=2)
    ema = {k: v.clone() for k, v in m.state_dict().items()}
    ema["model.final_layer.linear.bias"][0] = float("inf")
    with pytest.raises(NonFiniteError, match="EMA.*final_layer.linear.bias"):
        save_checkpoint(tmp_path, 7, m, ema, {"step": 7}, {})
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        TrainConfig(max_nonfinite_steps=0)


# ------------------------------------------------------------------------------------------------------------------
# kill -9 while a checkpoint is written, then resume from the run folder
# ------------------------------------------------------------------------------------------------------------------
class _Child:
    """A training run in a forked child process (no new interpreter to start); its stderr comes through a pipe."""

    def __init__(self, overrides, pause=None, delay=0.0):
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: train, never return into pytest
            code = 1
            try:
                os.close(r)
                os.dup2(w, 2)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                os.environ.pop("IMM_FAST_TEST_PAUSE", None)
                if pause:
                    os.environ["IMM_FAST_TEST_PAUSE"] = pause
                imm_fast.train(None, callback=(lambda step, info: time.sleep(delay)) if delay else None, **overrides)
                code = 0
            except SystemExit as e:  # training.Preempted: the exit status of the signal
                code = e.code
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(w)
        self.stderr = os.fdopen(r, "rb")
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self):
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.wait()

    def wait(self):
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        self.stderr.close()
        return self.returncode


def _wait_for_line(proc, text, timeout=180):
    deadline, seen = time.time() + timeout, b""
    while time.time() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                break
            seen += chunk
            if text.encode() in seen:
                return seen.decode()
        elif proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"{text!r} never appeared; the child wrote:\n{seen.decode()}")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 6-step run: what every interrupted-and-resumed run must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    r = imm_fast.train(None, out_dir=str(out), run_name="ref", max_steps=6, **FAST)
    return {name: _weights(r.checkpoint / name) for name in ("model.safetensors", "ema.safetensors")}


def _assert_same_weights(ck: Path, ref):
    for name, want in ref.items():
        got = _weights(ck / name)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("point", ["before_manifest", "before_rename", "after_rename"])
def test_kill_during_checkpoint_write_then_resume_from_the_run_folder(tmp_path, capfd, reference_run, point):
    run = tmp_path / "k"
    child = _Child({**FAST, "out_dir": str(tmp_path), "run_name": "k", "max_steps": 6},
                   pause=f"{point}@4")
    _wait_for_line(child, f"IMM_FAST_TEST_PAUSE {point} step 4")
    child.kill()
    assert child.returncode == -signal.SIGKILL
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step-0000002"  # the kill came before `latest` moved
    assert (ck / "step-0000004").is_dir() == (point == "after_rename")
    assert bool(list(ck.glob(".tmp-step-0000004-*"))) == (point != "after_rename")
    assert str(child.pid) in (run / "run.lock").read_text()  # the dead holder's record is still there
    capfd.readouterr()

    r = imm_fast.train(None, resume=str(run))  # the run folder, nothing else
    err = capfd.readouterr().err
    assert r.step == 6 and r.checkpoint == ck / "step-0000006"
    assert f"pid {child.pid}" in err and "taking over" in err
    if point == "after_rename":
        assert "latest names step-0000002 but step-0000004 is newer" in err and "resumed at step 4" in err
    else:
        assert "stale temporar" in err and "resumed at step 2" in err
    assert not list(ck.glob(".tmp-*")) and not list(ck.glob(".*.tmp"))
    assert _assert_checkpoints_finite(run) == ["step-0000002", "step-0000004", "step-0000006"]
    assert (ck / "latest").read_text().strip() == "step-0000006"
    assert [x["step"] for x in _records(run) if "loss" in x] == [1, 2, 3, 4, 5, 6]  # reads as one run
    _assert_same_weights(ck / "step-0000006", reference_run)


def test_corrupted_newest_checkpoint_falls_back_loudly(tmp_path, capfd, reference_run):
    r = imm_fast.train(None, out_dir=str(tmp_path), run_name="c", max_steps=4, **FAST)
    newest = r.checkpoint
    with open(newest / "train_state.pt", "r+b") as f:  # overwrite the last 100 bytes
        f.seek(-100, os.SEEK_END)
        f.write(os.urandom(100))
    with pytest.raises(ValueError, match="corrupt"):  # named explicitly: no silent fallback
        imm_fast.train(None, resume=str(newest), max_steps=6)
    capfd.readouterr()
    r2 = imm_fast.train(None, resume=str(r.run_dir), max_steps=6)
    err = capfd.readouterr().err
    assert "step-0000004 failed verification: train_state.pt does not match its sha256" in err
    assert "moved step-0000004" in err and "resumed at step 2" in err
    assert (r.run_dir / "checkpoints" / "corrupt-step-0000004" / "train_state.pt").is_file()  # kept, not deleted
    assert r2.step == 6
    _assert_same_weights(r2.checkpoint, reference_run)


@pytest.mark.parametrize("pointer", ["../../other/checkpoints/step-0000002", "/tmp/elsewhere/step-0000002",
                                     "step-0000002/../../x"])
def test_latest_outside_the_run_is_refused(tmp_path, pointer):
    r = imm_fast.train(None, out_dir=str(tmp_path), run_name="l", max_steps=2, **FAST)
    atomic_write_text(r.run_dir / "checkpoints" / "latest", pointer + "\n")
    with pytest.raises(ValueError, match="refusing to follow"):
        imm_fast.train(None, resume=str(r.run_dir), max_steps=4)
    with pytest.raises(ValueError, match="refusing to follow"):
        imm_fast.load_official(r.run_dir)


# ------------------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM / SIGINT / SIGUSR1 at a random moment, then resume: the same weights as without the signal
# ------------------------------------------------------------------------------------------------------------------
def _read_all(proc, timeout=180):
    """Everything the child writes to stderr until it exits."""
    deadline, seen = time.time() + timeout, b""
    while time.time() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        chunk = os.read(proc.stderr.fileno(), 65536) if ready else b""
        seen += chunk
        if ready and not chunk:
            break
    proc.wait()
    return seen.decode()


def _assert_bit_identical(ck: Path, ref):
    for name, want in ref.items():
        got = _weights(ck / name)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), (ck, name)


@pytest.mark.parametrize("sig, ckpt_every, seed", [(signal.SIGTERM, 0, 1), (signal.SIGTERM, 2, 2),
                                                   (signal.SIGINT, 0, 3), (signal.SIGINT, 2, 4),
                                                   (signal.SIGTERM, 0, 5)])
def test_signal_at_a_random_moment_saves_then_resume_is_exact(tmp_path, capfd, reference_run, sig, ckpt_every, seed):
    run = tmp_path / "p"
    child = _Child({**FAST, "out_dir": str(tmp_path), "run_name": "p", "max_steps": 6, "ckpt_every": ckpt_every},
                   delay=0.1)
    _wait_for_line(child, "imm_fast: training")
    time.sleep(np.random.RandomState(seed).uniform(0.0, 0.55))  # anywhere in the 6 steps of 0.1 s (a later signal
    # can find the child already exited on an idle machine: exit 0, nothing to test)
    os.kill(child.pid, sig)
    err = _read_all(child)
    assert child.returncode == 128 + sig, err  # 143 for SIGTERM, 130 for SIGINT
    assert "Traceback" not in err, err
    name = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}[sig]
    assert f"stopped by {name}" in err and f"python -m imm_fast train resume={run.absolute()}" in err, err
    assert (run / "run.lock").read_text() == ""  # released
    names = _assert_checkpoints_finite(run)  # every checkpoint verifies
    stopped = max(int(n[5:]) for n in names)
    assert f"checkpoint {run / 'checkpoints' / names[-1]}" in err or stopped == 6, err
    capfd.readouterr()

    r = imm_fast.train(None, resume=str(run))  # the run folder, nothing else
    assert r.step == 6
    _assert_bit_identical(run / "checkpoints" / "step-0000006", reference_run)
    assert [x["step"] for x in _records(run) if "loss" in x] == [1, 2, 3, 4, 5, 6]  # reads as one run


def test_more_signals_during_the_save_change_nothing(tmp_path, monkeypatch, reference_run):
    """SIGTERM, then SIGINT, SIGTERM and SIGUSR1 while the checkpoint is being written (a slowed-down save): the
    first signal decides, the checkpoint is complete and verified, the resume exact."""
    real = training.save_checkpoint

    def slow(*a, **k):
        print("SAVING", file=sys.stderr, flush=True)
        time.sleep(0.6)
        return real(*a, **k)

    monkeypatch.setattr(training, "save_checkpoint", slow)  # the forked child inherits it
    run = tmp_path / "s"
    child = _Child({**FAST, "out_dir": str(tmp_path), "run_name": "s", "max_steps": 6, "ckpt_every": 0}, delay=0.2)
    _wait_for_line(child, "imm_fast: training")
    time.sleep(0.3)
    os.kill(child.pid, signal.SIGTERM)
    _wait_for_line(child, "SAVING")
    for extra in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        os.kill(child.pid, extra)
        time.sleep(0.05)
    err = _read_all(child)
    assert child.returncode == 143, err
    assert "already stopping" in err and "Traceback" not in err, err
    names = _assert_checkpoints_finite(run)
    assert len(names) == 1 and not list((run / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(training, "save_checkpoint", real)
    r = imm_fast.train(None, resume=str(run))
    _assert_bit_identical(r.checkpoint, reference_run)


@pytest.mark.parametrize("mode", ["save", "exit"])
def test_sigusr1_saves_and_carries_on_or_exits_when_asked(tmp_path, reference_run, mode):
    run = tmp_path / "u"
    child = _Child({**FAST, "out_dir": str(tmp_path), "run_name": "u", "max_steps": 6, "ckpt_every": 0,
                    "sigusr1": mode}, delay=0.2)
    _wait_for_line(child, "imm_fast: training")
    time.sleep(0.5)
    os.kill(child.pid, signal.SIGUSR1)
    err = _read_all(child)
    names = _assert_checkpoints_finite(run)
    if mode == "save":
        assert child.returncode == 0 and "SIGUSR1: checkpoint" in err and "training continues" in err, err
        assert len(names) == 2 and names[-1] == "step-0000006", names  # the SIGUSR1 one and the final one
        _assert_bit_identical(run / "checkpoints" / "step-0000006", reference_run)
    else:
        assert child.returncode == 128 + signal.SIGUSR1 and "stopped by SIGUSR1" in err, err
        r = imm_fast.train(None, resume=str(run))
        _assert_bit_identical(r.checkpoint, reference_run)


# ------------------------------------------------------------------------------------------------------------------
# One writer per run folder
# ------------------------------------------------------------------------------------------------------------------
def test_a_second_writer_fails_at_once_naming_the_first(tmp_path):
    child = _Child({**FAST, "out_dir": str(tmp_path), "run_name": "w", "max_steps": 1000}, delay=0.2)
    try:
        _wait_for_line(child, "imm_fast: training")  # printed after the lock is taken
        deadline = time.time() + 120
        while not (tmp_path / "w" / "checkpoints" / "latest").exists():  # something to resume from
            assert child.poll() is None and time.time() < deadline
            time.sleep(0.05)
        for kw in ({"out_dir": str(tmp_path), "run_name": "w"}, {"resume": str(tmp_path / "w")}):
            t0 = time.time()
            with pytest.raises(RunFolderBusyError, match=rf"in use by pid {child.pid} on host .*started"):
                imm_fast.train(None, **{**FAST, "max_steps": 2, **kw}) if "run_name" in kw else \
                    imm_fast.train(None, **kw)
            assert time.time() - t0 < 30
    finally:
        child.kill()
        child.wait()
    with RunLock(tmp_path / "w") as lock:  # the OS released the dead child's lock: taken over at once
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_lock_in_one_process_is_exclusive_and_released(tmp_path):
    a = RunLock(tmp_path).acquire()
    with pytest.raises(RunFolderBusyError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    a.release()
    assert (tmp_path / "run.lock").read_text() == ""
    RunLock(tmp_path).acquire().release()


# ------------------------------------------------------------------------------------------------------------------
# File modes follow the umask
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_gives_the_umask_mode(tmp_path, umask, mode):
    from safetensors.torch import save_file

    from imm_fast._files import atomic_write

    old = os.umask(umask)
    try:
        paths = [atomic_write_text(tmp_path / "f.json", "{}"),  # safetensors recreates its file 0600 by itself
                 atomic_write(tmp_path / "t.safetensors", lambda f: save_file({"x": torch.ones(2)}, f))]
    finally:
        os.umask(old)
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == mode, p
