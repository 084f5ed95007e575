"""The command line (python -m imm_fast train / sample / encode) and the VAE latents round trip."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from imm_fast.__main__ import cli, main, parse_overrides

TINY = ["model.depth=1", "model.hidden_size=32", "model.num_heads=2", "batch_size=16", "max_steps=2",
        "sample.num_images=10", "sample.steps=[1]", "final_eval=false", "progress=false", "threads=1"]


@pytest.fixture(autouse=True)
def _own_working_folder(tmp_path, monkeypatch):
    """Each CLI test runs in its own empty folder: nothing in the folder pytest was started from (a samples.png the
    README's `sample` command wrote, a runs/ folder) changes what a test sees, and no test writes there."""
    monkeypatch.chdir(tmp_path)


def test_parse_overrides():
    assert parse_overrides(["a=1", "b.c=0.5", "d=[1, 2]", "e=true", "f=text", "g="]) == {
        "a": 1, "b.c": 0.5, "d": [1, 2], "e": True, "f": "text", "g": None}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["max_steps"])


def test_help_without_subcommand():
    p = subprocess.run([sys.executable, "-m", "imm_fast"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "train" in p.stdout and "encode" in p.stdout and "sample" in p.stdout


def test_train_then_sample_from_the_command_line(tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert main(["train", f"out_dir={tmp_path}", "run_name=cli"] + TINY) == 0
    out = capsys.readouterr().out
    assert f"run folder: {tmp_path / 'cli'}" in out
    assert (tmp_path / "cli" / "checkpoints" / "step-0000002" / "ema.safetensors").is_file()
    png = tmp_path / "grid.png"
    assert main(["sample", str(tmp_path / "cli"), "--steps", "2", "--num", "20", "--cfg-scale", "2",
                 "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    before = png.read_bytes()
    assert main(["sample", str(tmp_path / "cli"), "--out", str(png)]) == 2  # no silent overwrite
    assert png.read_bytes() == before
    assert "exists" in capsys.readouterr().err
    assert "metrics: {}" not in out  # final_eval=false: no bare empty metrics line


def test_sample_checks_the_checkpoint_before_the_output_file(tmp_path, capsys):
    (tmp_path / "samples.png").write_bytes(b"a grid the user keeps")  # the default --out, in the current folder
    assert main(["sample", str(tmp_path / "typo-run")]) == 2
    line = _one_error_line(capsys)
    assert "typo-run" in line and "does not exist" in line, line  # the first thing to fix, not the output file
    assert (tmp_path / "samples.png").read_bytes() == b"a grid the user keeps"


def test_every_option_of_every_command_has_help_and_its_default():
    import argparse

    from imm_fast.__main__ import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subs) == {"train", "config", "sample", "encode", "eval"}
    for name, sub in subs.items():
        fmt = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = fmt._get_help_string(action)
            assert action.help, (name, action.dest)
            if action.option_strings:  # every option says what happens when it is not given
                assert "default" in (text % {"default": action.default}).lower(), (name, action.dest, text)
    sample_help = subs["sample"].format_help()
    assert "samples.png" in sample_help and "current folder" in sample_help
    assert "no guidance" in " ".join(sample_help.split()) and "w=2" in sample_help


def test_interrupted_outside_training_is_one_line_and_130(monkeypatch, capsys):
    import imm_fast.__main__ as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_sample", interrupted)
    assert main(["sample", "x"]) == 130
    assert _one_error_line(capsys) == "error: interrupted (Ctrl-C)"


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["train", "--preset", "nope"]) == 2
    assert "preset name" in capsys.readouterr().err
    assert main(["train", "modle.depth=2"]) == 2
    assert "unknown config key 'modle.depth'" in capsys.readouterr().err
    assert main(["train", "--preset", "cifar10", f"data.path={tmp_path / 'none'}"]) == 2
    assert "is not a folder" in capsys.readouterr().err


@pytest.fixture
def tiny_vae(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)
    path = tmp_path / "vae"
    vae.save_pretrained(str(path))
    return path


def test_encode_folder_and_decode(tmp_path, tiny_vae):
    Image = pytest.importorskip("PIL.Image")
    from imm_fast.data import build_dataset
    from imm_fast.config import DataConfig
    from imm_fast.vae import LATENT_MEAN, LATENT_STD, decode_latents, encode_images, load_vae

    rng = np.random.RandomState(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.randint(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    out = tmp_path / "lat"
    assert main(["encode", str(tmp_path / "imgs"), str(out), "--vae", str(tiny_vae), "--resolution", "16",
                 "--batch-size", "4"]) == 0
    lat = np.load(out / "latents.npy")
    # Two-level encoder: 16 / 2 = 8 (the SD-VAE's three downsamplings give 256 / 8 = 32).
    assert lat.shape == (6, 4, 8, 8) and np.load(out / "labels.npy").tolist() == [0, 0, 0, 1, 1, 1]
    assert json.loads((out / "meta.json").read_text())["classes"] == ["a", "b"]
    assert main(["encode", str(tmp_path / "imgs"), str(out), "--vae", str(tiny_vae)]) == 2  # no overwrite

    # The normalization is (z - mean) * 0.5 / std of the posterior sample; decode inverts it.
    vae = load_vae(tiny_vae)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(1)
    z_norm = encode_images(vae, x, g)
    dist = vae.encode(x).latent_dist
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(LATENT_MEAN).reshape(1, 4, 1, 1)
    std = torch.tensor(LATENT_STD).reshape(1, 4, 1, 1)
    torch.testing.assert_close(z_norm, (dist.mean + dist.std * eps - mean) * 0.5 / std)
    pixels = decode_latents(vae, z_norm)
    ref = vae.decode(dist.mean + dist.std * eps).sample
    torch.testing.assert_close(pixels, ((ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), atol=1, rtol=0)
    ds = build_dataset(DataConfig(source="latents", path=str(out)))
    assert ds.shape == (4, 8, 8) and ds.num_classes == 2
    with pytest.raises(FileNotFoundError, match="local folder"):
        load_vae(tmp_path / "no-vae")


def _one_error_line(capsys):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("override,words", [
    ("sample.sampler=restrat", ["sample.sampler='restrat'", "pushforward"]),
    ("lr=nan", ["lr=nan", "finite"]),
    ("model.fused=maybe", ["model.fused='maybe'", "true or false"]),
    ("sample.steps=4", ["sample.steps=4", "list of ints"]),
    ("seed=1.5", ["seed=1.5", "an int"]),
    ("device=tpu", ["device='tpu'", "cuda"]),
])
def test_config_typo_is_one_line_and_exit_2(tmp_path, capsys, override, words):
    # max_steps=1 etc. only matter if the typo were accepted: then the test fails fast instead of training.
    assert main(["train", override, "max_steps=1", "final_eval=false", f"out_dir={tmp_path}"] + TINY[:3]) == 2
    line = _one_error_line(capsys)
    for w in words:
        assert w in line, line


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    from _helpers import random_model
    from imm_fast.checkpoints import save_model

    assert main(["sample", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in _one_error_line(capsys)
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in _one_error_line(capsys)
    ck = save_model(tmp_path / "m.safetensors", random_model(img_resolution=8, img_channels=1, label_dim=2,
                                                             hidden_size=32, depth=1, num_heads=2))
    png = tmp_path / "out.png"
    for args, words in [(["--num", "0"], "--num 0"), (["--steps", "0"], "--steps 0"), (["--grid", "cosine"], "--grid"),
                        (["--labels", "7"], "class_labels")]:
        assert main(["sample", str(ck), "--out", str(png)] + args) == 2
        assert words in _one_error_line(capsys)
        assert not png.exists()
    (tmp_path / "evil.pkl").write_bytes(pickle_evil())
    assert main(["sample", str(tmp_path / "evil.pkl")]) == 2
    assert "allow-list" in _one_error_line(capsys)

    def bug(args):
        raise RuntimeError("an unexpected bug")

    import imm_fast.__main__ as cli

    monkeypatch.setattr(cli, "_cmd_train", bug)
    with pytest.raises(RuntimeError, match="unexpected bug"):  # not swallowed into one line
        main(["train"])


def pickle_evil():
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    return pickle.dumps({"ema": Evil()})


def test_one_line_on_real_stderr():
    p = subprocess.run([sys.executable, "-m", "imm_fast", "train", "loss.k=-1"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: loss.k=-1 is out of range: must be >= 0"], p.stderr


def test_a_run_stopped_by_nonfinite_steps_is_one_line_and_not_success(tmp_path, capsys):
    """Data that is all NaN: every step is skipped, the run stops after max_nonfinite_steps with exit 2."""
    data = tmp_path / "nan.npy"
    np.save(data, np.full((32, 1, 8, 8), np.nan, np.float32))
    argv = ["train", "data.source=array", f"data.path={data}", "data.class_conditional=false", "model.label_dim=0",
            "max_nonfinite_steps=2", f"out_dir={tmp_path}", "run_name=nan"] + TINY
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err  # the skips are logged above the one error line
    assert "2 optimizer steps in a row were non-finite" in errors[0] and "likely causes" in errors[0]
    assert not list((tmp_path / "nan").glob("checkpoints/step-*"))  # nothing saved from a run that never stepped


def test_a_preempted_run_exits_with_the_signals_status(monkeypatch, capsys):
    import signal

    import imm_fast.__main__ as cli
    from imm_fast.training import Preempted

    for sig, status in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        def preempted(args, sig=sig):
            raise Preempted(sig, 7, None, "stopped")

        monkeypatch.setattr(cli, "_cmd_train", preempted)
        assert main(["train"]) == status
        assert "Traceback" not in capsys.readouterr().err


def test_a_torchrun_worker_leaves_with_its_status_at_once(monkeypatch, capsys):
    """Under torchrun (WORLD_SIZE > 1) the command line (cli) ends with os._exit(status) after flushing its output:
    an error's status 2 and a finished command's 0 reach the launcher, never an abort in the interpreter's
    teardown. main, called from Python, returns."""
    left = []

    class Left(Exception):
        pass

    def fake_exit(code):
        left.append(code)
        raise Left

    monkeypatch.setattr("os._exit", fake_exit)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Left):
        cli(["train", "batch_size=abc"])
    assert left == [2] and "batch_size" in capsys.readouterr().err
    with pytest.raises(Left):
        cli(["config", "--preset", "digits"])
    assert left == [2, 0]
    assert main(["config", "--preset", "digits"]) == 0 and left == [2, 0]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli(["config", "--preset", "digits"]) == 0 and left == [2, 0]
