"""hf:// checkpoints: resolved through huggingface_hub's cache, offline mode honoured, clear errors. No network:
the Hub cache is laid out in the test exactly as huggingface_hub writes it (refs/main -> snapshots/<commit>/file)."""
import os
import time
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import imm_fast
from imm_fast import hub
from imm_fast.checkpoints import push_to_hub
from _helpers import random_model
from _official_format import write_official_pickle

hf = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants as hf_constants  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_with(tmp_path, monkeypatch, repo="lumaai/imm", filename="tiny.pkl", channels=4):
    """A Hub cache holding `filename` of `repo` at main; returns (cache folder, the model pickled there)."""
    cache = tmp_path / "hub"
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    m = random_model(img_resolution=8, img_channels=channels, label_dim=6, patch_size=2, hidden_size=32, depth=2,
                     num_heads=4)
    kw = {k: v for k, v in m.init_kwargs.items() if k != "fused"}
    write_official_pickle(snap / filename, m, kw, monkeypatch)
    return cache, m


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache, m = _cache_with(tmp_path, monkeypatch)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))  # read at call time by hf_hub_download
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, m


def test_parse():
    assert hub.parse("hf://lumaai/imm/imagenet256_ts_a2.pkl") == ("lumaai/imm", "imagenet256_ts_a2.pkl", None)
    assert hub.parse("hf://a/b@v1.0/sub/dir/x.pkl") == ("a/b", "sub/dir/x.pkl", "v1.0")
    for bad in ("hf://lumaai/imm", "hf://lumaai//x.pkl", "hf:///imm/x.pkl"):
        with pytest.raises(ValueError, match="hf://<owner>/<repo>"):
            hub.parse(bad)
    assert hub.resolve("plain/local.pkl") == "plain/local.pkl"


def test_load_official_from_the_hub_cache_offline(offline_cache):
    cache, m = offline_cache
    loaded = imm_fast.load_official("hf://lumaai/imm/tiny.pkl")
    x, t, s = torch.randn(2, 4, 8, 8), torch.tensor(0.7), torch.tensor(0.2)
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, s, labels), m(x, t, s, labels), rtol=0, atol=0)
    explicit = imm_fast.load_official(f"hf://lumaai/imm@{COMMIT}/tiny.pkl")  # a pinned revision
    assert explicit.label_dim == 6


def test_offline_miss_is_a_clear_error(offline_cache):
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        imm_fast.load_official("hf://lumaai/imm/imagenet256_ts_a2.pkl")


def test_missing_local_release_names_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf://lumaai/imm/imagenet256_ts_a2.pkl"):
        imm_fast.load_official(tmp_path / "imagenet256_ts_a2.pkl")
    with pytest.raises(FileNotFoundError) as e:
        imm_fast.load_official(tmp_path / "mine.pkl")
    assert "hf://" not in str(e.value)


def test_without_huggingface_hub_the_message_says_how(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"imm_fast\[hub\]"):
        hub.resolve("hf://lumaai/imm/cifar10.pkl")


def test_cli_sample_reads_hf_paths(tmp_path, monkeypatch):
    cache, _ = _cache_with(tmp_path, monkeypatch, channels=3)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "grid.png"
    r = subprocess.run([sys.executable, "-m", "imm_fast", "sample", "hf://lumaai/imm/tiny.pkl", "--steps", "1",
                        "--num", "6", "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = subprocess.run([sys.executable, "-m", "imm_fast", "sample", "hf://lumaai/imm/nothere.pkl", "--out",
                        str(tmp_path / "other.png")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "HF_HUB_OFFLINE is set" in r.stderr and "Traceback" not in r.stderr


def test_push_to_hub_stages_ema_config_and_card_that_load_back(tmp_path, monkeypatch):
    """The upload itself is huggingface_hub's; what imm_fast stages is checked, then served from a Hub cache."""
    pytest.importorskip("sklearn")
    r = imm_fast.train(None, out_dir=str(tmp_path), run_name="run", max_steps=2, progress=False, final_eval=False,
                       sample_every=0, device="cpu", **{"model.depth": 1, "model.hidden_size": 32,
                                                        "model.num_heads": 2, "batch_size": 16, "sample.steps": [1],
                                                        "sample.num_images": 10})
    staged = {}

    def upload_folder(self, repo_id, folder_path, commit_message):
        staged.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
        staged["_args"] = (repo_id, commit_message)
        return types.SimpleNamespace(commit_url=f"https://example.invalid/{repo_id}/commit/1")

    monkeypatch.setattr(hf.HfApi, "create_repo", lambda self, repo_id, private, exist_ok: None)
    monkeypatch.setattr(hf.HfApi, "upload_folder", upload_folder)
    url = push_to_hub(r.run_dir, "me/digits-imm")
    assert url.endswith("/commit/1") and staged["_args"] == ("me/digits-imm", "imm_fast: EMA weights at step 2")
    assert set(staged) == {"ema.safetensors", "config.json", "README.md", "_args"}
    card = staged["README.md"].decode()
    assert card.startswith("---\nlibrary_name: imm_fast") and 'load_official("hf://me/digits-imm/ema.safetensors")' in card
    assert json.loads(staged["config.json"])["max_steps"] == 2
    with pytest.raises(ValueError, match="repo_id"):
        push_to_hub(r.run_dir, "no-owner")

    cache = tmp_path / "hub"  # serve the staged weights from a Hub cache, as a user downloading them would
    snap = cache / "models--me--digits-imm" / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text(COMMIT)
    (snap / "ema.safetensors").write_bytes(staged["ema.safetensors"])
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pulled = imm_fast.load_official("hf://me/digits-imm/ema.safetensors")
    local = imm_fast.load_official(r.run_dir)
    for a, b in zip(pulled.state_dict().values(), local.state_dict().values()):
        assert torch.equal(a, b)


def test_without_network_the_cache_is_read_at_once_and_the_hint_is_current(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE unset, no network: no 32 s of retries (one connection attempt), a cached file loads, and
    a miss names today's command (`hf download`)."""
    cache, m = _cache_with(tmp_path, monkeypatch)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in hub._PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    attempts = []

    def no_network(address, timeout=None, *a, **k):
        attempts.append(address)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(hub.socket, "create_connection", no_network)
    t0 = time.perf_counter()
    assert imm_fast.load_official("hf://lumaai/imm/tiny.pkl").label_dim == 6
    with pytest.raises(FileNotFoundError) as info:
        imm_fast.load_official("hf://lumaai/imm/cifar10.pkl")
    assert time.perf_counter() - t0 < 5 and len(attempts) == 2
    msg = str(info.value)
    assert "`hf download lumaai/imm cifar10.pkl`" in msg and "huggingface-cli" not in msg
    assert "Network is unreachable" in msg
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # behind a proxy the Hub client decides
    assert hub.unreachable("https://huggingface.co") is None


def test_eval_resolves_hub_paths_like_sample(tmp_path, monkeypatch, capsys):
    from imm_fast import evaluation as E
    from imm_fast.__main__ import main

    cache, _ = _cache_with(tmp_path, monkeypatch, channels=3)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = cache / "models--lumaai--imm" / "snapshots" / COMMIT / "tiny.pkl"
    assert E.checkpoint_file("hf://lumaai/imm/tiny.pkl") == cached
    # The CLI gets past the checkpoint (it said "does not exist") to the next missing input, the Inception weights.
    code = main(["eval", "hf://lumaai/imm/tiny.pkl", "--ref", str(tmp_path / "ref.npz"), "--num", "2",
                 "--inception", str(tmp_path / "no-inception.pth"), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "no-inception.pth" in err and "does not exist" not in err.split("no-inception")[0]
