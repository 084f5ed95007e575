"""Optional logging backends: TensorBoard read back from its event files; W&B through a recording stand-in module
(wandb itself is not a test dependency); clear errors when a requested backend is missing."""
import sys
import types

import numpy as np
import pytest

from imm_fast.config import LogConfig, load_train_config
from imm_fast.loggers import LogBackends, flatten_numbers


def test_flatten_numbers_keeps_finite_numbers_only():
    rec = {"step": 3, "loss": 0.5, "grad_norm": float("nan"), "ok": True, "note": "x", "skipped": 0,
           "eval": {"1step": {"fd": 2.5, "acc": float("inf")}, "table": "..."}}
    assert flatten_numbers(rec) == {"step": 3, "loss": 0.5, "skipped": 0, "eval/1step/fd": 2.5}


def test_log_config_is_checked():
    assert load_train_config(None, {"log.tensorboard": True}).log.tensorboard is True
    with pytest.raises(ValueError, match="log.tensorboard"):
        LogConfig(tensorboard="yes")
    with pytest.raises(ValueError, match="log.wandb"):
        LogConfig(wandb="  ")
    assert not LogBackends(LogConfig(), "unused").active  # off by default: nothing opened


def test_tensorboard_scalars_and_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = LogBackends(LogConfig(tensorboard=True), tmp_path)
    for step in (10, 20):
        logs.scalars(step, {"step": step, "loss": 1.0 / step, "eval": {"2step": {"fd": 3.0 + step}}})
    grid = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    logs.image(20, "samples/2step", grid)
    with pytest.raises(ValueError, match="uint8"):
        logs.image(20, "bad", grid.astype(np.float32))
    logs.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("loss")] == [(10, 0.1), (20, 0.05)]
    assert [e.value for e in acc.Scalars("eval/2step/fd")] == [13.0, 23.0]
    (img,) = acc.Images("samples/2step")
    assert (img.step, img.width, img.height) == (20, 24, 16)


def test_tensorboard_resume_purges_later_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = LogBackends(LogConfig(tensorboard=True), tmp_path)
    for step in (10, 20, 30):
        logs.scalars(step, {"loss": float(step)})
    logs.close()
    logs = LogBackends(LogConfig(tensorboard=True), tmp_path, resume_step=20)  # resumed from the step-20 checkpoint
    logs.scalars(30, {"loss": 300.0})
    logs.close()
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(10, 10.0), (20, 20.0), (30, 300.0)]


class _FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, values, step):
        self.calls.append(("log", dict(values), step))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []
    mod = types.ModuleType("wandb")
    mod.util = types.SimpleNamespace(generate_id=lambda: f"id{len(calls)}")

    def init(**kw):
        calls.append(("init", kw))
        return _FakeRun(calls)

    mod.init = init
    mod.Image = lambda arr: ("Image", arr.shape)
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return calls


def test_wandb_logs_and_resumes_the_same_run(tmp_path, fake_wandb):
    logs = LogBackends(LogConfig(wandb="imm"), tmp_path, config={"lr": 1e-3})
    logs.scalars(5, {"step": 5, "loss": 0.25, "grad_norm": float("inf")})
    logs.image(5, "samples/1step", np.zeros((8, 8, 1), np.uint8))
    logs.close()
    init = fake_wandb[0][1]
    assert init["project"] == "imm" and init["resume"] == "allow" and init["config"] == {"lr": 1e-3}
    assert init["dir"] == str(tmp_path) and init["name"] == tmp_path.name
    assert fake_wandb[1] == ("log", {"loss": 0.25}, 5)
    assert fake_wandb[2] == ("log", {"samples/1step": ("Image", (8, 8, 1))}, 5)
    assert fake_wandb[3] == ("finish",)
    LogBackends(LogConfig(wandb="imm"), tmp_path).close()  # a resume: the stored id, not a new one
    assert fake_wandb[4][1]["id"] == init["id"]


def test_missing_backend_is_a_clear_error_at_start(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"log.wandb='imm' needs the 'wandb' package: pip install 'imm_fast\[wandb\]'"):
        LogBackends(LogConfig(wandb="imm"), tmp_path)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match="log.tensorboard=true needs the 'tensorboard' package"):
        LogBackends(LogConfig(tensorboard=True), tmp_path)


def test_train_logs_to_tensorboard_only_when_asked(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("sklearn")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import imm_fast

    tiny = {"model.depth": 1, "model.hidden_size": 32, "model.num_heads": 2, "batch_size": 16, "max_steps": 4,
            "log_every": 2, "sample.steps": [1], "sample.num_images": 10, "progress": False, "final_eval": False,
            "device": "cpu", "out_dir": str(tmp_path)}
    r = imm_fast.train(None, run_name="off", **tiny)
    assert not (r.run_dir / "tb").exists()
    r = imm_fast.train(None, run_name="on", **{**tiny, "log.tensorboard": True})
    acc = EventAccumulator(str(r.run_dir / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in acc.Scalars("loss")] == [2, 4]
    assert [e.step for e in acc.Images("samples/1step")] == [4]
