"""imm_fast.checkpoints by job: the one resolver (evaluate, load_official, push_to_hub and resume agree), retention,
write errors, links, required manifests, hostile pickles and archives (issues 20 and 21). Tiny models; the training
runs are a few steps of a 1-block digits model."""
import ast
import errno
import json
import os
import pickle
import time
import types
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import imm_fast
from imm_fast import evaluation as E
from imm_fast._files import atomic_write_text, file_sha256
from imm_fast.checkpoints import (CheckpointWriteError, RunLock, find_checkpoint, load_official, prune_checkpoints,
                                  read_checkpoint, resolve_checkpoint, save_checkpoint, verify_checkpoint)
from imm_fast.checkpoints import training_state
from imm_fast.errors import CheckpointError, UnsafeCheckpointError, UserError

from _helpers import FAST_TRAIN as FAST, random_model
from _official_format import install_fake_modules

PKG = Path(imm_fast.__file__).parent
TINY = dict(img_resolution=8, img_channels=1, label_dim=0, patch_size=2, hidden_size=32, depth=1, num_heads=2)


def _run_with(tmp_path, steps=(10, 20), name="run"):
    """A run folder holding checkpoints at `steps`, each of a different random model; returns (run, models)."""
    run = tmp_path / name
    models = {}
    for step in steps:
        m = random_model(**TINY)
        save_checkpoint(run, step, m, m.state_dict(), {"step": step}, {"step": step, "name": f"at {step}"})
        models[step] = m
    return run, models


def _ck(run, step):
    return run / "checkpoints" / f"step-{step:07d}"


# ------------------------------------------------------------------------------------------------------------------
# The one resolver
# ------------------------------------------------------------------------------------------------------------------
def test_evaluate_loads_and_records_the_checkpoint_the_resolver_chooses(tmp_path, monkeypatch):
    """`latest` lags (a kill between the rename of step 20 and the update of `latest`): evaluate() must name, hash
    and load step 20 (it recorded step 10's sha256 and computed FID on step 20)."""
    run, _ = _run_with(tmp_path)
    atomic_write_text(run / "checkpoints" / "latest", "step-0000010\n")
    want = _ck(run, 20) / "ema.safetensors"
    assert E.checkpoint_file(run) == want
    assert E.checkpoint_file(run / "checkpoints") == want
    loaded = []

    class Stop(Exception):
        pass

    def fake_load(path, *a, **k):
        loaded.append(Path(path))
        raise Stop

    monkeypatch.setattr(E, "_load_nets", lambda metrics, specs, dev: [])  # no feature network needed to get there
    monkeypatch.setattr(E, "load_reference", lambda *a, **k: SimpleNamespace(info={}))
    monkeypatch.setattr(imm_fast.checkpoints, "load_official", fake_load)
    with pytest.raises(Stop):
        E.evaluate(run, tmp_path / "ref.npz", num=2, steps=(1,), progress=False)
    assert loaded == [want]  # what is hashed into the record (checkpoint_file) is what is loaded
    assert file_sha256(want) != file_sha256(_ck(run, 10) / "ema.safetensors")


def test_eval_takes_what_sample_takes(tmp_path):
    """A run folder without `latest` (sample loads it; eval said 'a folder without ema.safetensors'), and a
    `latest` pointing outside the run (followed by eval, refused by the resolver)."""
    run, models = _run_with(tmp_path)
    (run / "checkpoints" / "latest").unlink()
    assert E.checkpoint_file(run) == _ck(run, 20) / "ema.safetensors"
    assert load_official(run).state_dict()["model.pos_embed"].equal(models[20].state_dict()["model.pos_embed"])
    other, _ = _run_with(tmp_path, (30,), name="other")
    atomic_write_text(run / "checkpoints" / "latest", "../../other/checkpoints/step-0000030\n")
    for fn in (E.checkpoint_file, load_official, find_checkpoint):
        with pytest.raises(ValueError, match="refusing to follow"):
            fn(run)


def test_only_the_resolver_reads_latest_and_the_hub_sits_below_the_loader():
    readers = [p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if '"latest"' in p.read_text()]
    assert readers == ["checkpoints/training_state.py"]
    tree = ast.parse((PKG / "hub.py").read_text())
    imported = {(n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("checkpoint" in m or m in ("models", "training", "evaluation") for m in imported), imported
    subclasses = [p.name for p in PKG.rglob("*.py") if "(pickle.Unpickler)" in p.read_text()]
    assert subclasses == ["safe_pickle.py"]  # one restricted unpickler


def test_push_to_hub_uploads_the_resolved_checkpoint_with_its_own_metrics(tmp_path, monkeypatch):
    hf = pytest.importorskip("huggingface_hub")
    run, _ = _run_with(tmp_path)
    with open(run / "metrics.jsonl", "w") as f:
        for step, fid in ((10, 111.5), (20, 22.25)):
            f.write(json.dumps({"step": step, "loss": 1.0}) + "\n")
            f.write(json.dumps({"step": step, "eval": {"fid_1step": fid}}) + "\n")
    (run / "final_metrics.json").write_text(json.dumps({"fid_1step": 22.25}))
    ema = _ck(run, 20) / "ema.safetensors"  # corrupt, same size: the resolver falls back to step 10
    ema.write_bytes(os.urandom(ema.stat().st_size))
    staged = {}

    def upload_folder(self, repo_id, folder_path, commit_message):
        staged.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
        staged["message"] = commit_message
        return types.SimpleNamespace(commit_url="https://example.invalid/commit/1")

    monkeypatch.setattr(hf.HfApi, "create_repo", lambda self, repo_id, private, exist_ok: None)
    monkeypatch.setattr(hf.HfApi, "upload_folder", upload_folder)
    imm_fast.checkpoints.push_to_hub(run, "me/x")
    assert staged["ema.safetensors"] == (_ck(run, 10) / "ema.safetensors").read_bytes()
    assert json.loads(staged["config.json"])["name"] == "at 10"
    card = staged["README.md"].decode()
    assert "111.5" in card and "22.25" not in card and "step 10" in staged["message"]


# ------------------------------------------------------------------------------------------------------------------
# Retention
# ------------------------------------------------------------------------------------------------------------------
def test_retention_keeps_the_newest_the_milestones_and_latest(tmp_path):
    m = random_model(**TINY)
    for step in range(1, 9):
        save_checkpoint(tmp_path, step, m, m.state_dict(), {}, {}, keep_last=2, keep_every=4)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000004", "step-0000007", "step-0000008"]
    # `latest` names an old checkpoint: it survives a prune (and so does the newest verified one).
    atomic_write_text(root / "latest", "step-0000004\n")
    assert prune_checkpoints(tmp_path, 1, 0, root / "step-0000008") == ["step-0000007"]
    assert (root / "step-0000004").is_dir() and (root / "step-0000008").is_dir()
    # Nothing is deleted while the newest checkpoint does not verify.
    save_checkpoint(tmp_path, 9, m, m.state_dict(), {}, {})
    ema = root / "step-0000009" / "ema.safetensors"
    ema.write_bytes(os.urandom(ema.stat().st_size))
    assert prune_checkpoints(tmp_path, 1, 0, root / "step-0000009") == []
    assert (root / "step-0000008").is_dir()


def test_retention_defaults_per_preset():
    from imm_fast.config import PRESETS, TrainConfig

    assert (TrainConfig().keep_last, TrainConfig().keep_every) == (0, 0)  # keep everything unless asked
    assert (PRESETS["digits"].keep_last, PRESETS["digits"].keep_every) == (0, 0)
    assert (PRESETS["cifar10"].keep_last, PRESETS["cifar10"].keep_every) == (3, 100_000)
    for name in ("imagenet256", "imagenet256-S", "imagenet256-B", "imagenet256-L"):
        assert (PRESETS[name].keep_last, PRESETS[name].keep_every) == (2, 250_000)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_kill_during_retention_leaves_a_resumable_run(tmp_path, capfd):
    from test_faults_train import _Child, _wait_for_line

    over = {**FAST, "out_dir": str(tmp_path), "keep_last": 1}
    child = _Child({**over, "run_name": "k", "max_steps": 6}, pause="during_prune@4")
    _wait_for_line(child, "IMM_FAST_TEST_PAUSE during_prune step 4")
    child.kill()
    root = tmp_path / "k" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".deleting-step-0000002", "latest", "step-0000004"]
    capfd.readouterr()
    r = imm_fast.train(None, resume=str(tmp_path / "k"))
    assert "stale temporar" in capfd.readouterr().err and r.step == 6
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000006"]
    ref = imm_fast.train(None, **{**over, "run_name": "ref", "max_steps": 6})
    for name in ("model.safetensors", "ema.safetensors"):
        got, want = _weights(r.checkpoint / name), _weights(ref.checkpoint / name)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# Disk full and write errors
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, writer):
    import safetensors.torch

    run, _ = _run_with(tmp_path, (10,))
    m = random_model(**TINY)
    if writer == "safetensors":
        def fail(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(safetensors.torch, "save_file", fail)
    else:
        def fail(*a, **k):  # what torch.save raises when the disk fills up under it
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2048 vs 1920")

        monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(run, 20, m, m.state_dict(), {"w": torch.zeros(1000)}, {})
    msg = str(info.value)
    assert "\n" not in msg and str(run / "checkpoints") in msg and "needs about" in msg and "free" in msg
    assert "step-0000010 is intact" in msg
    assert isinstance(info.value, (UserError, OSError))
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000010"]  # no temporaries left
    assert verify_checkpoint(root / "step-0000010") is None and read_checkpoint(root / "step-0000010")


def test_a_full_disk_stops_the_cli_with_exit_2(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    from imm_fast.__main__ import main

    def fail(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    args = [f"{k}={json.dumps(v)}" for k, v in {**FAST, "max_steps": 2, "out_dir": str(tmp_path),
                                                  "run_name": "full"}.items()]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "could not write checkpoint step-0000002" in line and "No space" in line and "Traceback" not in err
    assert "no earlier checkpoint" in line and not list((tmp_path / "full" / "checkpoints").iterdir())


# ------------------------------------------------------------------------------------------------------------------
# Links
# ------------------------------------------------------------------------------------------------------------------
def test_the_lock_never_truncates_another_file(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("data" * 100)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        RunLock(run).acquire()
    (run / "run.lock").unlink()
    os.link(victim, run / "run.lock")  # a hard link would be emptied too
    with pytest.raises(UserError, match="hard links"):
        RunLock(run).acquire()
    assert victim.read_text() == "data" * 100


def test_checkpoint_links_are_refused(tmp_path, capsys):
    run, models = _run_with(tmp_path, (10,))
    other, others = _run_with(tmp_path, (99,), name="other")
    link = _ck(run, 99)
    link.symlink_to(_ck(other, 99), target_is_directory=True)
    assert find_checkpoint(run) == _ck(run, 10)  # not the other run's
    assert "step-0000099 failed verification: is a symbolic link" in capsys.readouterr().err
    loaded = load_official(run)
    assert loaded.state_dict()["model.pos_embed"].equal(models[10].state_dict()["model.pos_embed"])
    with pytest.raises(ValueError, match="symbolic link"):
        load_official(link)
    m = random_model(**TINY)
    with pytest.raises(CheckpointError, match="symbolic link"):  # never written through the link either
        save_checkpoint(run, 99, m, m.state_dict(), {}, {})
    assert verify_checkpoint(_ck(other, 99)) is None
    (_ck(run, 10) / "model.safetensors").unlink()  # a file of the checkpoint that is a link
    (_ck(run, 10) / "model.safetensors").symlink_to(_ck(other, 99) / "model.safetensors")
    assert "model.safetensors is a symbolic link" in verify_checkpoint(_ck(run, 10))


def test_latest_as_a_link_is_refused_without_printing_its_target(tmp_path):
    run, _ = _run_with(tmp_path, (10,))
    secret = tmp_path / "secret"
    secret.write_text("TOPSECRET " * 1000)
    latest = run / "checkpoints" / "latest"
    latest.unlink()
    latest.symlink_to(secret)
    with pytest.raises(ValueError, match="refusing to follow") as info:
        resolve_checkpoint(run)
    assert "TOPSECRET" not in str(info.value) and len(str(info.value)) < 600
    latest.unlink()
    latest.write_text("X" * 5000)  # a long file: a bounded excerpt only
    with pytest.raises(ValueError, match="refusing to follow") as info:
        resolve_checkpoint(run)
    assert len(str(info.value)) < 600


# ------------------------------------------------------------------------------------------------------------------
# Manifests are required
# ------------------------------------------------------------------------------------------------------------------
def test_a_checkpoint_without_its_manifest_needs_an_explicit_opt_in(tmp_path):
    run, _ = _run_with(tmp_path, (10, 20))
    ck = _ck(run, 20)
    (ck / "manifest.json").unlink()
    ema = ck / "ema.safetensors"
    ema.write_bytes(os.urandom(ema.stat().st_size))  # same-size garbage
    assert "has no manifest.json" in verify_checkpoint(ck) and "trust_unverified" in verify_checkpoint(ck)
    assert verify_checkpoint(ck, full=False) is not None
    with pytest.raises(ValueError, match="unverifiable"):
        load_official(ck)
    assert find_checkpoint(run) == _ck(run, 10)  # never the "last good" one
    assert verify_checkpoint(ck, trust_unverified=True) is None
    assert find_checkpoint(run, trust_unverified=True) == ck


# ------------------------------------------------------------------------------------------------------------------
# Hostile files: pickle DAG bombs, nesting, archive bombs
# ------------------------------------------------------------------------------------------------------------------
BASE = dict(img_resolution=8, img_channels=4, label_dim=6, patch_size=2, hidden_size=32, depth=2, num_heads=4)


def _net_pickle(path, monkeypatch, **state):
    classes = install_fake_modules(monkeypatch, "raise SystemExit('never run me')")
    net = classes["IMM"].__new__(classes["IMM"])
    net.__dict__.update(dict(_init_args=(), _init_kwargs=dict(BASE), _parameters={}, _buffers={}, _modules={}))
    net.__dict__.update(state)
    with open(path, "wb") as f:
        pickle.dump({"ema": net, "step": 1}, f)
    assert path.stat().st_size < 64_000
    return path


def test_pickle_dag_bomb_in_modules_is_refused_at_once(tmp_path, monkeypatch):
    m = nn.Sequential()
    m.register_buffer("b", torch.zeros(1))
    for _ in range(40):  # 2^40 module paths through 40 shared objects
        up = nn.Sequential()
        up._modules["a"] = up._modules["b"] = m
        m = up
    path = _net_pickle(tmp_path / "dag.pkl", monkeypatch, _modules={"model": m})
    t0 = time.perf_counter()
    with pytest.raises(UnsafeCheckpointError, match=r"dag\.pkl.*shared references"):
        load_official(path)
    assert time.perf_counter() - t0 < 1


def test_pickle_dag_bomb_in_init_kwargs_is_refused_at_once(tmp_path, monkeypatch):
    x = []
    for _ in range(40):
        x = [x, x]
    path = _net_pickle(tmp_path / "kw.pkl", monkeypatch, _init_kwargs={**BASE, "channel_mult": x})
    t0 = time.perf_counter()
    with pytest.raises(UnsafeCheckpointError, match=r"kw\.pkl.*shared references"):
        load_official(path)
    assert time.perf_counter() - t0 < 1


def test_a_dag_filled_top_down_is_counted_too(tmp_path):
    """Lists referenced before they are filled (APPENDS after the reference): sizes are counted on the finished
    graph, not at the moment of reference."""
    from imm_fast.checkpoints.safe_pickle import restricted_load

    n = 40
    body = b"".join(b"]q" + bytes([i]) + b"0" for i in range(n))  # n empty lists, memo 0..n-1 (protocol 2)
    for i in range(n - 1, 0, -1):  # fill list i with [list i-1, list i-1], the top one first
        body += b"h" + bytes([i]) + b"(h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"e0"
    data = b"\x80\x02" + body + b"h" + bytes([n - 1]) + b"."
    assert len(pickle.loads(data)) == 2  # a valid pickle (its graph is small; only walking it explodes)
    path = tmp_path / "topdown.pkl"
    path.write_bytes(data)
    with open(path, "rb") as f, pytest.raises(UnsafeCheckpointError, match="shared references"):
        restricted_load(f, path, {}, "the test")


def test_nesting_is_capped_with_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    from imm_fast.checkpoints.safe_pickle import restricted_load

    n = 100_000
    path = tmp_path / "deep.pkl"
    path.write_bytes(b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b".")  # lists nested 100000 deep
    with open(path, "rb") as f, pytest.raises(UnsafeCheckpointError, match=r"deep\.pkl.*nest deeper"):
        restricted_load(f, path, {}, "the test")
    m = random_model(**TINY)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    save_file(sd, str(tmp_path / "deep.safetensors"),
              metadata={"format": "imm_fast", "init_kwargs": "[" * n + "]" * n})
    with pytest.raises(CheckpointError, match=r"deep\.safetensors.*nests deeper"):
        load_official(tmp_path / "deep.safetensors")


def test_train_state_bomb_is_refused_before_it_inflates(tmp_path):
    run, _ = _run_with(tmp_path, (10,))
    ck = _ck(run, 10)
    plain = tmp_path / "plain.pt"
    torch.save({"step": 10, "optimizer": torch.zeros(8 << 20)}, plain)  # 32 MB of zeros, stored
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(ck / "train_state.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert (ck / "train_state.pt").stat().st_size < 1 << 20
    manifest = json.loads((ck / "manifest.json").read_text())  # recomputed, as a hostile editor would
    manifest["files"]["train_state.pt"] = {"bytes": (ck / "train_state.pt").stat().st_size,
                                           "sha256": file_sha256(ck / "train_state.pt")}
    (ck / "manifest.json").write_text(json.dumps(manifest))
    assert verify_checkpoint(ck) is None
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"train_state\.pt.*zip bomb"):
        read_checkpoint(ck)
    assert time.perf_counter() - t0 < 2


# ------------------------------------------------------------------------------------------------------------------
# Resume: config and weights from the same verified checkpoint; the non-finite check once per checkpoint
# ------------------------------------------------------------------------------------------------------------------
def test_resume_reads_config_and_weights_from_the_same_verified_checkpoint(tmp_path, capfd):
    pytest.importorskip("sklearn")
    r = imm_fast.train(None, out_dir=str(tmp_path), run_name="c", max_steps=4, **FAST)
    cfg = r.checkpoint / "config.json"
    text = cfg.read_text()
    assert '"lr": 0.001,' in text
    cfg.write_text(text.replace('"lr": 0.001,', '"lr": 0.009,'))  # same size: only the sha256 tells
    capfd.readouterr()
    r2 = imm_fast.train(None, resume=str(r.run_dir), max_steps=6)
    err = capfd.readouterr().err
    assert "step-0000004 failed verification" in err and "resumed at step 2" in err
    assert json.loads((r2.checkpoint / "config.json").read_text())["lr"] == 0.001


def test_the_nonfinite_check_runs_once_per_checkpoint(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    from imm_fast import training

    calls = []
    real = training_state._nonfinite

    def counting(state_dicts):
        calls.append(len(state_dicts))
        return real(state_dicts)

    monkeypatch.setattr(training_state, "_nonfinite", counting)
    imm_fast.train(None, out_dir=str(tmp_path), run_name="n", max_steps=2, **{**FAST, "ckpt_every": 0})
    assert calls == [2]  # model and EMA together, one host sync, for the one checkpoint
    assert training.nonfinite_entries is training_state.nonfinite_entries


def _imports(path: Path, module: str) -> set:
    """imm_fast modules that `module` (at `path`) imports, function-level imports included."""
    out = set()
    pkg = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom) and n.level:
            base = pkg.rsplit(".", n.level - 1)[0] if n.level > 1 else pkg
            out.add(f"{base}.{n.module}" if n.module else base)
            out |= {f"{base}.{a.name}" for a in n.names} if not n.module else set()
        elif isinstance(n, ast.ImportFrom) and (n.module or "").startswith("imm_fast"):
            out.add(n.module)
        elif isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name.startswith("imm_fast")}
    return out


def test_no_import_circle_through_the_checkpoints_or_the_hub():
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    graph = {m: {d for d in _imports(p, m) if d in mods} for m, p in mods.items()}

    def reaches(src, dst, seen):
        for d in graph[src]:
            if d == dst or (d not in seen and (seen.add(d) or reaches(d, dst, seen))):
                return True
        return False

    ours = [m for m in mods if m.startswith("imm_fast.checkpoints.") or m == "imm_fast.hub"]
    assert len(ours) >= 8  # the package modules and the hub: the check is not vacuous
    circles = [m for m in ours if reaches(m, m, set())]
    assert not circles, circles
