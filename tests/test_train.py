"""The training loop: files of a run, EMA checkpoints that load and sample, exact resume after SIGKILL, gradient
accumulation, configs and presets, and bad input (clear errors, nothing saved overwritten)."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

import imm_fast  # noqa: E402
from imm_fast.config import PRESETS, TrainConfig, load_train_config  # noqa: E402

# A tiny digits run: one DiT block of width 32, batch 16 (4 groups of M = 4), a few steps.
TINY = {"model.depth": 1, "model.hidden_size": 32, "model.num_heads": 2, "batch_size": 16, "lr": 1e-3,
        "sample.num_images": 10, "sample.steps": [1, 2], "eval_steps": [1, 2], "eval_samples": 50,
        "progress": False, "final_eval": False, "log_every": 2, "sample_every": 0, "device": "cpu"}


@pytest.fixture(autouse=True)
def _own_working_folder(tmp_path, monkeypatch):
    """Nothing a test does depends on, or writes into, the folder pytest was started from."""
    monkeypatch.chdir(tmp_path)


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _digest(root: Path):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_run_writes_grids_checkpoints_metrics_and_ema_loads(tmp_path):
    r = imm_fast.train(None, out_dir=str(tmp_path), run_name="run", max_steps=4, ckpt_every=2, final_eval=True,
                       **{k: v for k, v in TINY.items() if k != "final_eval"})
    run = tmp_path / "run"
    assert r.run_dir == run and r.step == 4 and r.checkpoint == run / "checkpoints" / "step-0000004"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    for step in (2, 4):
        ck = run / "checkpoints" / f"step-{step:07d}"
        assert {p.name for p in ck.iterdir()} == {"model.safetensors", "ema.safetensors", "train_state.pt",
                                                 "config.json", "manifest.json"}
    assert not list((run / "checkpoints").glob(".tmp-*"))
    for n in (1, 2):
        png = (run / "samples" / f"step-0000004-{n}step.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "loss" in x]
    assert steps == [2, 4] and all(x["loss"] > 0 and x["it_s"] > 0 and x["samples_s"] > 0 for x in lines
                                   if "loss" in x)
    assert all(x["skipped"] == 0 and x["nonfinite_groups"] == 0 for x in lines if "loss" in x)
    umask = os.umask(0o022)
    os.umask(umask)
    for f in (run / "checkpoints" / "step-0000004").iterdir():  # the group can read a shared run folder
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    assert (run / "run.lock").read_text() == ""  # released at the end
    assert "eval" in lines[-1] and set(r.metrics["digits"]) == {"1", "2"}
    assert json.loads((run / "final_metrics.json").read_text())["digits"]["2"]["fd_floor"] > 0
    cfg = load_train_config(json.loads((run / "config.json").read_text()))
    assert cfg.model.depth == 1 and cfg.max_steps == 4

    # The saved EMA model loads back (run folder -> latest -> ema.safetensors) and samples.
    ema = imm_fast.load_official(run)
    saved = _load(run / "checkpoints" / "step-0000004" / "ema.safetensors")
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    model = _load(run / "checkpoints" / "step-0000004" / "model.safetensors")
    assert any(not torch.equal(model[k], saved[k]) for k in saved)  # the EMA is its own set of weights
    x = imm_fast.sample(ema, torch.randn(3, 1, 8, 8) * 0.5, 2, class_labels=torch.tensor([0, 1, 2]), cfg_scale=2.0)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()


_CHILD = r"""
import json, sys, time
import torch
import imm_fast
overrides = json.loads(sys.argv[1])
delay = float(sys.argv[2])
imm_fast.train(None, callback=(lambda step, info: time.sleep(delay)) if delay else None, **overrides)
"""


def _child(tmp_path, overrides, delay=0.0):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), json.dumps(overrides), str(delay)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    common = {**TINY, "max_steps": 20, "ckpt_every": 5, "threads": 1, "out_dir": str(tmp_path),
              "model.dropout": 0.1}  # dropout: the global RNG state must be restored too
    full = _child(tmp_path, {**common, "run_name": "full"})
    killed = _child(tmp_path, {**common, "run_name": "killed"}, delay=0.15)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists():
        assert killed.poll() is None, killed.stdout.read().decode()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "checkpoints" / "step-0000020").exists()  # really killed mid-run
    resumed_at = latest.read_text().strip()
    before = _digest(tmp_path / "killed" / "checkpoints" / resumed_at)

    # Resume with nothing but the run folder: the saved config is used.
    resumed = subprocess.run([sys.executable, "-m", "imm_fast", "train", f"resume={tmp_path / 'killed'}"],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    out, _ = full.communicate(timeout=300)
    assert full.returncode == 0, out.decode()
    assert _digest(tmp_path / "killed" / "checkpoints" / resumed_at) == before  # nothing saved was rewritten
    for name in ("model.safetensors", "ema.safetensors"):
        a = _load(tmp_path / "full" / "checkpoints" / "step-0000020" / name)
        b = _load(tmp_path / "killed" / "checkpoints" / "step-0000020" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    logged = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(2, 21, 2))  # the log reads as one run


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    runs = {}
    for accum in (1, 2):
        r = imm_fast.train(None, out_dir=str(tmp_path), run_name=f"a{accum}", max_steps=2, grad_accum=accum,
                           **{**TINY, "sample.steps": [1]})
        runs[accum] = _load(r.checkpoint / "model.safetensors")
    for k in runs[1]:
        torch.testing.assert_close(runs[2][k], runs[1][k], rtol=1e-4, atol=1e-6)


def test_config_sources(tmp_path):
    assert load_train_config(None) == PRESETS["digits"]
    assert load_train_config("cifar10") == PRESETS["cifar10"]
    y = tmp_path / "c.yaml"
    y.write_text("preset: digits\nmax_steps: 7\nmodel:\n  depth: 2\nsample.steps: [1, 4]\n")
    cfg = load_train_config(str(y), {"lr": 3e-4})
    assert (cfg.max_steps, cfg.model.depth, cfg.sample.steps, cfg.lr) == (7, 2, (1, 4), 3e-4)
    assert load_train_config({"preset": "imagenet256-S", "batch_size": 64}).model.hidden_size == 384
    assert isinstance(load_train_config(cfg), TrainConfig)


def test_presets_hold_the_paper_settings():
    c = PRESETS["cifar10"]
    assert (c.model.f_type, c.model.temb_type, c.loss.a, c.loss.b, c.loss.k, c.loss.group_size, c.model.dropout,
            c.model.label_dim) == ("simple_edm", "identity", 1, 5.0, 15, 4, 0.2, 0)
    i = PRESETS["imagenet256"]
    assert (i.batch_size, i.loss.group_size, i.model.f_type, i.model.temb_type, i.loss.a, i.loss.b, i.loss.k,
            i.loss.label_dropout, i.optimizer, i.lr, i.ema_decay) == (4096, 4, "euler_fm", "stride", 2, 4.0, 12,
                                                                      0.1, "adamw", 1e-4, 0.9999)
    assert (i.model.hidden_size, i.model.depth, i.model.num_heads, i.model.patch_size) == (1152, 28, 16, 2)
    assert {PRESETS[f"imagenet256-{s}"].model.hidden_size for s in "SBL"} == {384, 768, 1024}


def test_bad_input_is_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        imm_fast.train(None, **{**TINY, "batch_size": 18})
    with pytest.raises(ValueError, match="preset name"):
        imm_fast.train("no-such-preset")
    with pytest.raises(ValueError, match="unknown config key 'modle.depth'"):
        imm_fast.train(None, **{"modle.depth": 2})
    with pytest.raises(ValueError, match="data.path"):
        imm_fast.train("cifar10", **{"data.path": None})
    with pytest.raises(FileNotFoundError, match="missing"):
        imm_fast.train("cifar10", **{"data.path": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="img_resolution"):
        imm_fast.train(None, **{**TINY, "model.img_resolution": 16})

    r = imm_fast.train(None, out_dir=str(tmp_path), run_name="r", max_steps=2, **TINY)
    before = _digest(r.run_dir)
    with pytest.raises(ValueError, match="already holds checkpoints"):  # a finished run is not overwritten
        imm_fast.train(None, out_dir=str(tmp_path), run_name="r", max_steps=2, **TINY)
    assert _digest(r.run_dir) == before
    (r.checkpoint / "train_state.pt").write_bytes(b"garbage")
    before = _digest(r.run_dir)
    with pytest.raises(ValueError, match="corrupt"):
        imm_fast.train(None, resume=str(r.run_dir), max_steps=4)
    assert _digest(r.run_dir) == before
    with pytest.raises(FileNotFoundError, match="does not exist"):
        imm_fast.train(None, resume=str(tmp_path / "nothing"))
    r2 = imm_fast.train(None, out_dir=str(tmp_path), run_name="r2", max_steps=2, ckpt_every=1, **TINY)
    before = _digest(r2.run_dir)
    with pytest.raises(ValueError, match="older than"):
        imm_fast.train(None, resume=str(r2.run_dir / "checkpoints" / "step-0000001"), max_steps=3)
    assert _digest(r2.run_dir) == before


@pytest.mark.parametrize("preset", ["cifar10-dit", "imagenet256-S"])  # the DDPM++ cifar10: tests/test_unet.py
def test_image_presets_run_on_tiny_data(tmp_path, preset):
    import pickle

    import numpy as np

    rng = np.random.RandomState(0)
    if preset == "cifar10-dit":
        root = tmp_path / "cifar-10-batches-py"
        root.mkdir()
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            with open(root / name, "wb") as f:
                pickle.dump({b"data": rng.randint(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}, f)
    else:
        root = tmp_path / "latents"
        root.mkdir()
        np.save(root / "latents.npy", (rng.randn(16, 4, 32, 32) * 0.5).astype(np.float32))
        np.save(root / "labels.npy", rng.randint(0, 1000, 16))
    small = {"model.depth": 1, "model.hidden_size": 32, "model.num_heads": 2, "model.patch_size": 8,
             "batch_size": 8, "max_steps": 2, "sample.num_images": 4, "sample.steps": [1, 2], "eval_steps": [1],
             "eval_samples": 4, "eval_num": 4, "progress": False, "device": "cpu", "data.path": str(root)}
    r = imm_fast.train(preset, out_dir=str(tmp_path), run_name="r", **small)
    assert r.step == 2 and (r.checkpoint / "ema.safetensors").is_file()
    if preset == "cifar10-dit":
        assert (r.run_dir / "samples" / "step-0000002-2step.png").is_file()
        if r.metrics.get("fid") is None:  # torch-fidelity or its weights missing: a message, no number
            assert "FID skipped" in r.metrics["message"]
    else:  # latents without a VAE: the samples are kept as arrays
        assert (r.run_dir / "samples" / "step-0000002-2step.npy").is_file()
        assert "vae_path" in r.metrics["message"]
    ema = imm_fast.load_official(r.run_dir)
    assert ema.f_type == PRESETS[preset].model.f_type


def test_reference_switch_gives_the_same_training(tmp_path, monkeypatch):
    """reference=True (reference DiT ops + mmd_loss_ref) and the default kernels (the C++ MMD on the CPU) train
    to the same weights; the reference run must not touch the MMD kernels."""
    from imm_fast.ops import mmd as mmd_mod

    runs = {}
    for ref in (False, True):
        calls = []
        real = mmd_mod._launch
        monkeypatch.setattr(mmd_mod, "_launch", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
        r = imm_fast.train(None, out_dir=str(tmp_path), run_name=f"r{int(ref)}", max_steps=2, reference=ref,
                           **{**TINY, "sample.steps": [1]})
        runs[ref] = (_load(r.checkpoint / "model.safetensors"), calls)
    assert runs[True][1] == []
    if mmd_mod._usable("cpp", "cpu"):
        assert set(runs[False][1]) == {"cpp"}
    for k in runs[False][0]:
        torch.testing.assert_close(runs[True][0][k], runs[False][0][k], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile="everything")


# ------------------------------------------------------------------------------------------------------------------
# One run per folder; what a resume may change; a finished run; links
# ------------------------------------------------------------------------------------------------------------------
def test_a_fresh_run_never_writes_into_another_runs_folder(tmp_path, monkeypatch):
    # A killed run that wrote no checkpoint left its config and metrics: a rerun with the same name is refused.
    old = tmp_path / "r"
    old.mkdir()
    (old / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (old / "config.json").write_text('{"lr": 0.5}')
    before = _digest(old)
    with pytest.raises(ValueError, match=r"already holds another run's files \(config.json, metrics.jsonl\)"):
        imm_fast.train(None, out_dir=str(tmp_path), run_name="r", max_steps=1, **TINY)
    assert _digest(old) == before
    # The default <name>-<time> folder taken (two runs in the same second): the new run gets its own folder.
    from imm_fast import training

    monkeypatch.setattr(training.time, "strftime", lambda fmt, t=None: "20260101-000000")
    taken = tmp_path / "digits-20260101-000000"
    taken.mkdir()
    (taken / "metrics.jsonl").write_text("")
    r = imm_fast.train(None, out_dir=str(tmp_path), max_steps=1, **TINY)
    assert r.run_dir == tmp_path / "digits-20260101-000000-2"
    assert [p.name for p in taken.iterdir()] == ["metrics.jsonl"]


def test_resume_refuses_or_records_changes_that_break_exactness(tmp_path, capfd):
    r = imm_fast.train(None, out_dir=str(tmp_path), run_name="r", max_steps=2, **TINY)
    before = _digest(r.run_dir)
    for key, value in (("seed", 7), ("optimizer", "radam")):
        with pytest.raises(ValueError, match=f"changes {key} .* -> '?{value}"):
            imm_fast.train(None, resume=str(r.run_dir), max_steps=3, **{key: value})
        assert _digest(r.run_dir) == before
    capfd.readouterr()
    r2 = imm_fast.train(None, resume=str(r.run_dir), max_steps=3, batch_size=32, **{"loss.group_size": 8})
    err = capfd.readouterr().err
    warnings = [x for x in err.splitlines() if "warning: this resume changes" in x]
    assert len(warnings) == 1 and "batch_size 16 -> 32" in warnings[0] and "loss.group_size 4 -> 8" in warnings[0]
    records = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 2, "resumed_from": "step-0000002",
            "inexact_changes": {"batch_size": [16, 32], "loss.group_size": [4, 8]}} in records
    assert r2.step == 3
    # The top-level config is the one the run now trains with (the checkpoints keep their own).
    top = load_train_config(json.loads((r.run_dir / "config.json").read_text()))
    assert top.batch_size == 32 and top.max_steps == 3


def test_resuming_a_finished_run_does_nothing_unless_asked_to_evaluate(tmp_path, capfd):
    r = imm_fast.train(None, out_dir=str(tmp_path), run_name="r", max_steps=2, final_eval=True,
                       **{k: v for k, v in TINY.items() if k != "final_eval"})
    before = _digest(r.run_dir)
    capfd.readouterr()
    again = imm_fast.train(None, resume=str(r.run_dir))
    assert "already finished (step 2, max_steps=2)" in capfd.readouterr().err
    assert again.step == 2 and again.metrics == {} and again.checkpoint == r.checkpoint
    assert _digest(r.run_dir) == before  # no evaluation, no new line, nothing rewritten
    again = imm_fast.train(None, resume=str(r.run_dir), final_eval=True)
    assert set(again.metrics["digits"]) == {"1", "2"}
    lines = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval" in x for x in lines) == 1  # replaced, not duplicated


def test_metrics_jsonl_is_never_written_through_a_link(tmp_path):
    r = imm_fast.train(None, out_dir=str(tmp_path), run_name="r", max_steps=2, ckpt_every=1, **TINY)
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me\n")
    (r.run_dir / "metrics.jsonl").unlink()
    (r.run_dir / "metrics.jsonl").symlink_to(target)
    with pytest.raises(ValueError, match="symbolic link"):
        imm_fast.train(None, resume=str(r.run_dir), max_steps=3)
    assert target.read_text() == "keep me\n"
    # A link put in place while the run writes is refused by the open itself (O_NOFOLLOW), never appended through.
    from imm_fast.training import _Logger

    logger = _Logger(tmp_path / "fresh", None)
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "metrics.jsonl").symlink_to(target)
    with pytest.raises(OSError):
        logger.log({"step": 1})
    assert target.read_text() == "keep me\n"


def test_the_start_line_names_the_cpu_threads(tmp_path, capfd, monkeypatch):
    n = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        imm_fast.train(None, out_dir=str(tmp_path), run_name="a", max_steps=1, **TINY)
        assert "1 CPU thread)" in capfd.readouterr().err  # the default on CPU
        assert torch.get_num_threads() == 2  # the caller's setting is back
        imm_fast.train(None, out_dir=str(tmp_path), run_name="b", max_steps=1, threads=2, **TINY)
        assert "2 CPU threads)" in capfd.readouterr().err
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        imm_fast.train(None, out_dir=str(tmp_path), run_name="c", max_steps=1, **TINY)
        assert "2 CPU threads)" in capfd.readouterr().err  # the user's OMP_NUM_THREADS is kept
    finally:
        torch.set_num_threads(n)


def test_a_changed_world_size_is_named_as_inexact():
    from imm_fast.config import config_to_dict
    from imm_fast.training import _resume_changes

    cfg = load_train_config(None, {"batch_size": 32})
    saved = config_to_dict(load_train_config(None, {"batch_size": 32}))
    assert _resume_changes(cfg, saved, 2, 2) == {} and _resume_changes(cfg, saved, None, 4) == {}
    assert _resume_changes(cfg, saved, 2, 1) == {"world_size": [2, 1]}
