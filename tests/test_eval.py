"""Evaluation: FID / IS math against independent float64 code, the FID Inception-V3 (random weights saved in the real
weights' format drive the whole pipeline; nothing is downloaded), reference .npz layouts, sharded and resumed
generation, 1 vs 2 gloo ranks, and the error without weights. Inception-V3 at 299x299 is slow on a CPU, so every
test pushes only a handful of images through it.
"""
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import imm_fast
from imm_fast import metrics as M
from imm_fast import evaluation as E
from imm_fast.features import find_inception as find_weights, load_feature_net
from imm_fast.inception import InceptionV3, load_inception, resize_like_tf1

from _helpers import random_model

TINY = dict(img_resolution=8, img_channels=3, label_dim=3, patch_size=2, hidden_size=32, depth=1, num_heads=2)


# ---------------------------------------------------------------------------------------------------------------
# Frechet distance and Inception Score
# ---------------------------------------------------------------------------------------------------------------
def _fd_eigh(mu1, s1, mu2, s2):
    """Independent float64 FID: tr (S1^1/2 S2 S1^1/2)^1/2 from symmetric eigendecompositions (exact for PSD)."""
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(r @ s2 @ r)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


@pytest.mark.parametrize("n,f", [(500, 7), (40, 64), (9, 200)], ids=["full-rank", "rank-deficient", "n<<f"])
def test_frechet_distance_matches_an_independent_float64_implementation(n, f):
    rng = np.random.RandomState(n)
    a = rng.randn(n, f) @ rng.randn(f, f) / np.sqrt(f)
    b = rng.randn(n + 3, f) * 1.3 + 0.2
    mu1, s1 = M.feature_statistics(a)
    mu2, s2 = M.feature_statistics(b)
    assert s1.dtype == np.float64 and np.linalg.matrix_rank(s1) == min(n - 1, f)
    ref = _fd_eigh(mu1, s1, mu2, s2)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    assert M.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ref, rel=1e-6)  # symmetric
    # float32 inputs are promoted: the arithmetic is float64 throughout
    m32, s32 = mu1.astype(np.float32), s1.astype(np.float32)
    assert M.frechet_distance(m32, s32, mu2, s2) == M.frechet_distance(m32.astype(np.float64),
                                                                       s32.astype(np.float64), mu2, s2)
    # FID(X, X) ~ 0 even for a singular covariance
    assert abs(M.frechet_distance(mu1, s1, mu1, s1)) < 1e-6 * np.trace(s1)
    assert M.frechet_distance(mu1, s1, mu1 + 0.5, s1) == pytest.approx(0.25 * f, rel=1e-6, abs=1e-6 * np.trace(s1))


def test_frechet_distance_rejects_bad_shapes_and_invalid_covariances():
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="sigma2"):
        M.frechet_distance(mu, s, mu, np.eye(4))
    with pytest.raises(ValueError, match="imaginary"):
        M.frechet_distance(mu, s, mu, -np.eye(3))  # a negative definite "covariance" has no real root


def _is_loop(logits, splits):
    """Independent IS: per split, exp of the mean over images of sum_y p log(p / p_split)."""
    out = []
    n = len(logits)
    for k in range(splits):
        part = torch.as_tensor(logits[k * n // splits:(k + 1) * n // splits], dtype=torch.float64)
        p = torch.softmax(part, 1)
        py = p.mean(0, keepdim=True)
        out.append(float(torch.exp((p * (p.log() - py.log())).sum(1).mean())))
    return np.mean(out), np.std(out)


def test_inception_score_against_a_loop_and_its_bounds():
    rng = np.random.RandomState(0)
    logits = rng.randn(53, 11) * 3  # 53 images do not split evenly into 10
    mean, std = M.inception_score(logits)
    ref = _is_loop(logits, 10)
    assert mean == pytest.approx(ref[0], rel=1e-10) and std == pytest.approx(ref[1], rel=1e-9, abs=1e-12)
    assert M.inception_score(np.zeros((20, 5)))[0] == pytest.approx(1.0)  # uniform predictions: IS = 1
    confident = np.eye(5)[np.arange(20) % 5] * 60  # every class equally often, each predicted with certainty
    assert M.inception_score(confident, splits=4)[0] == pytest.approx(5.0, rel=1e-6)
    with pytest.raises(ValueError, match="splits"):
        M.inception_score(logits[:5])  # 10 splits need 10 images


# ---------------------------------------------------------------------------------------------------------------
# The Inception network
# ---------------------------------------------------------------------------------------------------------------
def random_inception(path, seed=0):
    """An Inception-V3 with random weights whose features vary across images (He-initialized convolutions,
    perturbed batch-norm statistics), saved as the real weights are: a torch.save'd state dict."""
    g = torch.Generator().manual_seed(seed)
    net = InceptionV3()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        net.fc.weight.copy_(torch.randn(net.fc.weight.shape, generator=g) * 0.3)
    torch.save(net.state_dict(), path)
    return Path(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return random_inception(tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth")


def test_tf1_bilinear_resize_matches_the_tf_formula():
    x = torch.rand(1, 2, 5, 7, dtype=torch.float64) * 255
    out = resize_like_tf1(x, 11)
    ref = torch.empty(1, 2, 11, 11, dtype=torch.float64)
    for i in range(11):
        for j in range(11):
            yi, xj = i * (5 / 11), j * (7 / 11)  # TF 1.x: in = out * scale, no half-pixel shift
            y0, x0 = int(np.floor(yi)), int(np.floor(xj))
            y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
            top = x[..., y0, x0] + (x[..., y0, x1] - x[..., y0, x0]) * (xj - x0)
            bot = x[..., y1, x0] + (x[..., y1, x1] - x[..., y1, x0]) * (xj - x0)
            ref[..., i, j] = top + (bot - top) * (yi - y0)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-4)  # positions are float32, as in TF


def _torch_fidelity_inception():
    """torch-fidelity's network class, loaded from its installed files without its package __init__ (which needs
    torchvision, unusable with some CPU builds of torch). None when torch-fidelity is not installed."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    saved = {k: v for k, v in sys.modules.items() if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = [str(root)]
    sys.modules["torch_fidelity"] = pkg
    try:
        for name in ("defaults", "deprecations", "helpers", "feature_extractor_base", "interpolate_compat_tensorflow",
                     "feature_extractor_inceptionv3"):
            s = importlib.util.spec_from_file_location(f"torch_fidelity.{name}", root / f"{name}.py")
            mod = importlib.util.module_from_spec(s)
            sys.modules[s.name] = mod
            s.loader.exec_module(mod)
        return mod.FeatureExtractorInceptionV3
    finally:
        for k in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_network_matches_torch_fidelity_bit_for_bit(weights):
    cls = _torch_fidelity_inception()
    if cls is None:
        pytest.skip("torch-fidelity is not installed")
    theirs = cls("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights))
    ours, _ = load_inception(str(weights))
    images = torch.randint(0, 256, (2, 3, 9, 9), dtype=torch.uint8)
    f, lg = ours(images)
    tf, tlg = theirs(images)
    assert f.std() > 0.01
    assert torch.equal(f, tf) and torch.equal(lg, tlg)


def test_missing_weights_give_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("IMM_FAST_INCEPTION", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="--inception PATH.*IMM_FAST_INCEPTION"):
        find_weights()
    with pytest.raises(FileNotFoundError, match="not a file"):
        find_weights(str(tmp_path / "nope.pth"))
    monkeypatch.setenv("IMM_FAST_INCEPTION", str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="IMM_FAST_INCEPTION"):
        find_weights()
    monkeypatch.delenv("IMM_FAST_INCEPTION")
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not the FID Inception"):
        load_inception(str(bad))
    # the command line: one line, exit 2, before anything is sampled
    from imm_fast.__main__ import main
    from imm_fast.checkpoints import save_model

    save_model(tmp_path / "m.safetensors", random_model(**TINY))
    err = subprocess.run([sys.executable, "-m", "imm_fast", "eval", str(tmp_path / "m.safetensors"), "--ref",
                          str(tmp_path / "x.npz"), "--num", "4"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TORCH_HOME": str(tmp_path / "th"), "IMM_FAST_INCEPTION": ""})
    assert err.returncode == 2 and "--inception" in err.stderr and "Traceback" not in err.stderr
    assert main(["eval"]) == 2  # neither a checkpoint nor --ref/--ref-out


# ---------------------------------------------------------------------------------------------------------------
# Reference statistics: formats
# ---------------------------------------------------------------------------------------------------------------
def test_statistics_npz_formats_round_trip(tmp_path):
    rng = np.random.RandomState(0)
    mu, f = rng.randn(6), rng.randn(20, 6)
    sigma = np.cov(f, rowvar=False)
    E.save_statistics(tmp_path / "ours.npz", mu, sigma, source="x", num_images=20)
    m2, s2, info = E.load_statistics(tmp_path / "ours.npz")
    assert np.array_equal(m2, mu) and np.array_equal(s2, sigma) and info["num_images"] == 20
    assert info["format"] == "imm_fast"
    np.savez(tmp_path / "edm.npz", mu=mu.astype(np.float32), sigma=sigma)  # EDM's cifar10-32x32.npz layout
    m3, s3, info3 = E.load_statistics(tmp_path / "edm.npz")
    assert m3.dtype == np.float64 and np.allclose(m3, mu, atol=1e-6) and info3["format"] == "edm"
    # ADM's reference batch: images arr_0 (N, H, W, 3) uint8 + pool statistics mu/sigma + spatial mu_s/sigma_s
    np.savez(tmp_path / "adm.npz", arr_0=rng.randint(0, 256, (4, 8, 8, 3), dtype=np.uint8), mu=mu, sigma=sigma,
             mu_s=rng.randn(3), sigma_s=np.eye(3))
    m4, s4, info4 = E.load_statistics(tmp_path / "adm.npz")
    assert np.array_equal(m4, mu) and np.array_equal(s4, sigma) and info4["format"] == "adm"
    np.savez(tmp_path / "images.npz", arr_0=rng.randint(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    assert E.load_statistics(tmp_path / "images.npz") is None  # images only: statistics get computed
    assert E.read_reference(tmp_path / "adm.npz").info["format"] == "adm"
    with pytest.raises(ValueError, match="mu"):
        E.save_statistics(tmp_path / "bad.npz", mu, sigma[:3])
    with pytest.raises(FileNotFoundError, match="ref="):
        E.load_reference(tmp_path / "missing.npz", [])


def test_adm_center_crop_and_dataset_sources(tmp_path):
    from PIL import Image
    import pickle

    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (300, 700, 3), dtype=np.uint8))
    out = E.adm_center_crop(img, 64)  # 300x700 -> box-halved twice (75x175) -> bicubic 64x149 -> center 64x64
    assert out.shape == (3, 64, 64) and out.dtype == np.uint8
    small = img.resize((350, 150), Image.BOX).resize((175, 75), Image.BOX)
    small = small.resize((149, 64), Image.BICUBIC)
    assert np.array_equal(out, np.asarray(small)[:, 42:106].transpose(2, 0, 1))
    folder = tmp_path / "imgs" / "class_a"
    folder.mkdir(parents=True)
    for i in range(3):
        img.crop((i, 0, 300 + i * 50, 300)).save(folder / f"{i}.png")
    src = E._ImageSource(tmp_path / "imgs", resolution=32)
    assert len(src) == 3 and src.get([0, 2]).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="resolution"):
        E._ImageSource(tmp_path / "imgs").get([0, 2])  # different sizes without a crop
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for name in E.CIFAR10_FILES:
        with open(cifar / name, "wb") as fh:
            pickle.dump({b"data": np.full((2, 3072), 7, np.uint8), b"labels": [0, 1]}, fh)
    src = E._ImageSource(cifar)
    assert src.kind == "cifar10" and len(src) == 10 and (src.get([3]) == 7).all()


# ---------------------------------------------------------------------------------------------------------------
# Generation: per-sample seeds, shards, resume, ranks
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from imm_fast.checkpoints import save_model

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("model") / "ema.safetensors"
    save_model(path, random_model(**TINY))
    return path


@pytest.mark.parametrize("sampler", ["pushforward", "restart"])
def test_samples_do_not_depend_on_the_batch(model_file, sampler):
    from imm_fast.checkpoints import load_official

    model = load_official(model_file)
    one, labels = E.generate(model, np.arange(5), 3, sampler, seed=11)
    parts = [E.generate(model, np.arange(i, min(5, i + 2)), 3, sampler, seed=11)[0] for i in range(0, 5, 2)]
    assert one.dtype == torch.uint8 and one.shape == (5, 3, 8, 8)
    assert torch.equal(torch.cat(parts), one)
    assert torch.equal(E.generate(model, [3], 3, sampler, seed=11)[0][0], one[3])
    assert labels.tolist() == [0, 1, 2, 0, 1]
    assert not torch.equal(E.generate(model, np.arange(5), 3, sampler, seed=12)[0], one)


def test_resumed_shards_equal_uninterrupted_ones(model_file, tmp_path):
    from imm_fast.checkpoints import load_official

    model = load_official(model_file)
    args = (7, 2, "pushforward", "uniform", None, 5, None)
    E.run_shards(model, tmp_path / "full", *args, batch=2, shard_size=3, save_images=True, progress=False)
    E.run_shards(model, tmp_path / "cut", *args, batch=3, shard_size=3, save_images=True, progress=False)
    (tmp_path / "cut" / "shard-000001.npz").unlink()  # an interrupted run: one shard never finished
    (tmp_path / "cut" / "shard-000002.npz").write_bytes(b"PK\x03\x04 truncated")  # and one half-written file
    before = (tmp_path / "cut" / "shard-000000.npz").stat().st_mtime_ns
    _, _, made = E.run_shards(model, tmp_path / "cut", *args, batch=3, shard_size=3, save_images=True,
                              progress=False)
    assert made == 4  # shard 0 (3 images) was kept, shards 1 (3) and 2 (1) were made again
    assert (tmp_path / "cut" / "shard-000000.npz").stat().st_mtime_ns == before
    for k in range(3):
        a, b = (np.load(tmp_path / d / f"shard-{k:06d}.npz") for d in ("full", "cut"))
        assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])


WORKER = """
import sys, numpy as np, torch
import imm_fast
r = imm_fast.evaluate(sys.argv[1], sys.argv[2], num=5, steps=(2,), batch=2, shard_size=2, seed=5,
                      inception=sys.argv[3], out_dir=sys.argv[4], save_npz=True, device="cpu", progress=False,
                      keep_cache=True)
assert r["settings"]["world_size"] == torch.distributed.get_world_size() == 2
print("FID", r["results"]["2"]["fid"])
"""


@pytest.mark.slow
def test_two_gloo_ranks_make_the_images_of_one_process(model_file, weights, tmp_path):
    """torchrun with 2 gloo ranks: shards 0, 2 on rank 0 and 1 on rank 1, gathered into ADM's npz layout that equals
    one process's images; the FID is the Frechet distance of the gathered features (independent implementation)."""
    from imm_fast.checkpoints import load_official

    rng = np.random.RandomState(1)
    mu, f = rng.randn(2048) * 0.1, rng.randn(30, 2048) * 0.1
    E.save_statistics(tmp_path / "ref.npz", mu, np.cov(f, rowvar=False))
    (tmp_path / "w.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(tmp_path / "w.py"), str(model_file), str(tmp_path / "ref.npz"), str(weights),
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    (js,) = (tmp_path / "out").glob("eval-*.json")
    result = json.loads(js.read_text())
    (npz,) = (tmp_path / "out").glob("eval-*-2step.npz")
    z = np.load(npz)
    assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (5, 8, 8, 3) and z["arr_1"].tolist() == [0, 1, 2, 0, 1]
    single, _ = E.generate(load_official(model_file), np.arange(5), 2, seed=5)
    assert np.array_equal(z["arr_0"], single.permute(0, 2, 3, 1).numpy())
    fid = result["results"]["2"]["fid"]
    assert fid > 0 and f"FID {fid}" in p.stdout and result["results"]["2"]["made_now"] == 5
    (cache,) = (tmp_path / "out").glob("eval-cache/*/2step")
    feats = E._gather_shards(cache, 5, 2)["inception"]
    mu_r, s_r, _ = E.load_statistics(tmp_path / "ref.npz")
    assert fid == pytest.approx(_fd_eigh(*M.feature_statistics(feats), mu_r, s_r), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The whole pipeline with the (random) Inception network
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_evaluate_end_to_end(model_file, weights, tmp_path, capsys):
    """evaluate() against a reference made of the samples themselves, given as an ADM-layout file (uint8 NHWC arr_0):
    the reference statistics equal the samples' and FID(X, X) ~ 0; the json holds settings, hashes and metrics.
    (FID > 0 against other statistics: the gloo test; resuming: run_shards. Each FID is a 2048x2048 sqrtm, slow on
    a small CPU, so this test computes one.)"""
    from imm_fast.checkpoints import load_official
    from imm_fast._files import file_sha256

    model = load_official(model_file)
    x1, _ = E.generate(model, np.arange(4), 1, seed=0)
    np.savez(tmp_path / "ref_images.npz", arr_0=x1.permute(0, 2, 3, 1).numpy())  # ADM sample-batch layout
    out = tmp_path / "out"
    r = E.evaluate(model_file, tmp_path / "ref_images.npz", num=4, steps=(1,), batch=3, shard_size=3,
                   inception=str(weights), out_dir=str(out), keep_cache=True, progress=False)
    assert "| 1 | 1 |" in capsys.readouterr().out
    saved = json.loads(Path(r["json"]).read_text())
    assert saved["checkpoint_sha256"] == file_sha256(model_file)
    assert saved["inception_sha256"] == file_sha256(weights)
    assert saved["settings"]["num"] == 4 and saved["settings"]["steps"] == [1]
    assert saved["reference"]["num_images"] == 4 and saved["reference"]["kind"] == "array"
    row = saved["results"]["1"]
    assert row["images"] == 4 and row["made_now"] == 4 and row["seconds"] > 0 and row["is_mean"] >= 1 - 1e-9
    (ref_file,) = (out / "eval-cache").glob("reference-*.npz")
    assert r["reference"]["path"] == str(ref_file)  # computed once from the images, cached beside the results
    mu_r, s_r, _ = E.load_statistics(ref_file)
    (cache,) = (out / "eval-cache").glob("*/1step")
    feats = E._gather_shards(cache, 4, 3)["inception"]
    mu, s = M.feature_statistics(feats)
    assert s.std() > 1e-3  # the random network's features differ between images
    np.testing.assert_allclose(mu, mu_r, rtol=1e-5, atol=1e-6 * np.abs(mu_r).max())
    np.testing.assert_allclose(s, s_r, rtol=1e-4, atol=1e-5 * np.abs(s_r).max())
    assert abs(row["fid"]) < 1e-5 * np.trace(s_r)
    alone = load_feature_net("inception", str(weights))(x1[3:])["inception"][0]  # sample 3 by itself
    torch.testing.assert_close(torch.from_numpy(feats[3]).double(), alone, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_train_time_fid(model_file, weights, tmp_path):
    from imm_fast.checkpoints import load_official
    from imm_fast.config import TrainConfig, DataConfig

    model = load_official(model_file).train()  # the loop's EMA may be in train mode: it is restored after
    rng = np.random.RandomState(2)
    E.save_statistics(tmp_path / "ref.npz", rng.randn(2048) * 0.1, np.cov(rng.randn(10, 2048) * 0.1, rowvar=False))
    cfg = TrainConfig(data=DataConfig(source="cifar10", path=str(tmp_path)), eval_num=2, eval_steps=(1,),
                      eval_ref=str(tmp_path / "ref.npz"), inception=str(weights), batch_size=8)
    out = E.train_time_fid(model, cfg, "cpu", 10)
    assert set(out) == {"fid_1step", "is_1step", "fid_num", "fid_step", "fid_seconds"} and out["fid_1step"] > 0
    assert model.training
    lat = TrainConfig(data=DataConfig(source="latents", path=str(tmp_path)), batch_size=8)
    assert "vae_path" in E.train_time_fid(model, lat, "cpu", 10)["message"]
    with pytest.raises(ValueError, match="eval_num"):
        TrainConfig(eval_num=1)
    with pytest.raises(ValueError, match="eval_ref"):
        TrainConfig(eval_ref="")


# ---------------------------------------------------------------------------------------------------------------
# DINOv2 (FD_DINOv2): a random tiny ViT saved in facebookresearch/dinov2's state-dict format
# ---------------------------------------------------------------------------------------------------------------
def _dinov2_keys(depth):
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
             "mlp.fc2.bias", "ls2.gamma"]
    return {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
            "norm.bias"} | {f"blocks.{i}.{k}" for i in range(depth) for k in block}


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory):
    """Random weights of a 2-block, 128-wide DINOv2 ViT/14 with a 4x4 position grid, saved as a torch.save'd state
    dict under the real file's name (the keys of facebookresearch/dinov2's ViT, checked below)."""
    from imm_fast.features import DINOv2

    torch.manual_seed(0)
    net = DINOv2(width=128, depth=2, patch=14, grid=4, mlp_hidden=256)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vitl14_pretrain.pth"
    torch.save(net.state_dict(), path)
    return path


def _dinov2_reference(sd, images):
    """The DINOv2 forward written out op by op (explicit softmax attention, functional layer norms), for the test."""
    import torch.nn.functional as F

    x = F.interpolate(images.double(), size=(224, 224), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).double().view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).double().view(1, 3, 1, 1)
    sd = {k: v.double() for k, v in sd.items()}
    c = sd["cls_token"].shape[-1]
    tok = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    pos = sd["pos_embed"][:, 1:].reshape(1, grid, grid, c).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, scale_factor=((16 + 0.1) / grid,) * 2, mode="bicubic").permute(0, 2, 3, 1)
    tok = torch.cat([sd["cls_token"].expand(len(x), -1, -1), tok], 1)
    tok = tok + torch.cat([sd["pos_embed"][:, :1], pos.reshape(1, -1, c)], 1)
    ln = lambda t, p: F.layer_norm(t, (c,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)  # noqa: E731
    for i in range(1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))):
        b = f"blocks.{i}."
        h = ln(tok, b + "norm1") @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]
        q, k, v = h.reshape(len(x), -1, 3, c // 64, 64).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / 8.0, -1) @ v
        a = a.transpose(1, 2).reshape(len(x), -1, c) @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        tok = tok + a * sd[b + "ls1.gamma"]
        m = F.gelu(ln(tok, b + "norm2") @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
        tok = tok + (m @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]) * sd[b + "ls2.gamma"]
    return ln(tok, "norm")[:, 0]


def test_dinov2_features_offline(dinov2_file, tmp_path, monkeypatch):
    from imm_fast.features import find_dinov2, load_feature_net

    sd = torch.load(dinov2_file, weights_only=True)
    assert set(sd) == _dinov2_keys(2)
    net = load_feature_net("dinov2", str(dinov2_file))
    assert net.name == "dinov2" and net.outputs == {"dinov2": 128} and net.weights == dinov2_file
    images = torch.randint(0, 256, (3, 3, 32, 48), dtype=torch.uint8)
    got = net(images)["dinov2"]
    assert got.dtype == torch.float64 and got.shape == (3, 128) and got.std() > 0.01
    torch.testing.assert_close(got, _dinov2_reference(sd, images), rtol=1e-4, atol=1e-4)
    gray = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)  # 1 channel: repeated to RGB
    torch.testing.assert_close(net(gray)["dinov2"], net(gray.expand(-1, 3, -1, -1))["dinov2"])
    import re

    chunked = {re.sub(r"^blocks\.(\d+)\.", r"blocks.0.\1.", k): v for k, v in sd.items()}  # block_chunks=1 layout
    torch.save(chunked, tmp_path / "c.pth")
    torch.testing.assert_close(load_feature_net("dinov2", str(tmp_path / "c.pth"))(images)["dinov2"], got)
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a DINOv2"):
        load_feature_net("dinov2", str(tmp_path / "bad.pth"))
    monkeypatch.delenv("IMM_FAST_DINOV2", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="--dinov2 PATH.*IMM_FAST_DINOV2.*dinov2_vitl14_pretrain.pth"):
        find_dinov2()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "dinov2_vitl14_pretrain.pth").write_bytes(dinov2_file.read_bytes())
    assert find_dinov2() == tmp_path / "hub" / "checkpoints" / "dinov2_vitl14_pretrain.pth"  # the torch hub cache


def test_fd_dinov2_and_precision_recall_are_one_entry_each(model_file, weights, dinov2_file, tmp_path, capsys):
    """evaluate() with metrics that did not exist before: FD_DINOv2 (no Inception loaded at all) and precision /
    recall, against references made of the samples themselves (distance ~0, precision = recall = 1)."""
    from imm_fast.checkpoints import load_official

    x, _ = E.generate(load_official(model_file), np.arange(5), 1, seed=0)
    np.savez(tmp_path / "ref.npz", arr_0=x.permute(0, 2, 3, 1).numpy())
    r = E.evaluate(model_file, tmp_path / "ref.npz", num=5, steps=(1,), batch=5, metrics=("fd_dinov2",),
                   dinov2=str(dinov2_file), out_dir=str(tmp_path / "o1"), progress=False)
    assert set(r["networks"]) == {"dinov2"} and "| FD_DINOv2 |" in capsys.readouterr().out
    assert abs(r["results"]["1"]["fd_dinov2"]) < 1e-3 and "fid" not in r["results"]["1"]
    saved = json.loads(Path(r["json"]).read_text())
    assert saved["results"]["1"]["fd_dinov2"] == r["results"]["1"]["fd_dinov2"]
    r = E.evaluate(model_file, tmp_path / "ref.npz", num=5, steps=(1,), batch=5, metrics=("pr",),
                   inception=str(weights), out_dir=str(tmp_path / "o2"), progress=False)
    assert (r["results"]["1"]["precision"], r["results"]["1"]["recall"]) == (1.0, 1.0)
    assert "| precision | recall |" in capsys.readouterr().out
    E.save_statistics(tmp_path / "stats.npz", np.zeros(2048), np.eye(2048))
    with pytest.raises(ValueError, match="precision/recall needs reference features"):
        E.evaluate(model_file, tmp_path / "stats.npz", num=5, steps=(1,), metrics=("pr",), inception=str(weights),
                   out_dir=str(tmp_path / "o3"), progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Hostile inputs: references, guidance, non-finite samples, two evaluations at once
# ---------------------------------------------------------------------------------------------------------------
def test_reference_is_checked_before_any_sample(model_file, weights, tmp_path, monkeypatch):
    import zipfile

    def never(*a, **k):
        raise AssertionError("sampled before the reference was checked")

    monkeypatch.setattr(E, "run_shards", never)
    monkeypatch.setattr(E, "generate", never)
    rng = np.random.RandomState(0)
    mu, sigma = rng.randn(2048) * 0.1, np.cov(rng.randn(10, 2048) * 0.1, rowvar=False)
    bad_sigma = sigma.copy()
    bad_sigma[3, 5] = np.inf
    cases = {"NaN": (mu * np.nan, sigma), "NaN/inf": (mu, bad_sigma), "2048 wide": (mu[:5], sigma[:5, :5]),
             "not symmetric": (mu, sigma + np.triu(np.full_like(sigma, 0.5), 1)),
             "not positive semi-definite": (mu, sigma - 0.1 * np.eye(2048))}
    for i, (match, (m, s)) in enumerate(cases.items()):
        np.savez(tmp_path / f"r{i}.npz", mu=m, sigma=s)
        with pytest.raises(ValueError, match=match):
            E.evaluate(model_file, tmp_path / f"r{i}.npz", num=4, steps=(1,), inception=str(weights),
                       out_dir=str(tmp_path / "out"), progress=False)
    import io

    head = io.BytesIO()  # a 3 KB file declaring a 20000 x 20000 float64 sigma (3.2 GB inflated)
    np.lib.format.write_array_header_1_0(head, {"descr": "<f8", "fortran_order": False, "shape": (20000, 20000)})
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("mu.npy", io.BytesIO(np.save(b := io.BytesIO(), mu) or b.getvalue()).getvalue())
        zf.writestr("sigma.npy", head.getvalue() + b"\0" * 2000)
    with pytest.raises(ValueError, match="zip bomb|2048"):
        E.evaluate(model_file, tmp_path / "bomb.npz", num=4, steps=(1,), inception=str(weights),
                   out_dir=str(tmp_path / "out"), progress=False)
    assert not list((tmp_path / "out").glob("eval-*.json"))


def test_reference_cache_is_keyed_by_the_source_content(weights, tmp_path):
    """Replacing the reference images at the same path (same size, same mtime) gives new statistics, not the
    cached ones of the old file."""
    from imm_fast.features import load_feature_net

    nets = [load_feature_net("inception", str(weights))]
    rng = np.random.RandomState(0)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=rng.randint(0, 256, (3, 8, 8, 3), dtype=np.uint8))
    first = E.load_reference(ref, nets, ("fid",), cache_dir=tmp_path / "cache", progress=False)
    again = E.load_reference(ref, nets, ("fid",), cache_dir=tmp_path / "cache", progress=False)
    assert again.info["path"] == first.info["path"] and again.info["path"].startswith(str(tmp_path / "cache"))
    assert np.array_equal(again.stats["inception"][0], first.stats["inception"][0])
    st = ref.stat()
    np.savez(ref, arr_0=rng.randint(0, 256, (3, 8, 8, 3), dtype=np.uint8))  # other images, same size
    os.utime(ref, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ref.stat().st_size == st.st_size and ref.stat().st_mtime_ns == st.st_mtime_ns
    new = E.load_reference(ref, nets, ("fid",), cache_dir=tmp_path / "cache", progress=False)
    fresh = E.load_reference(ref, nets, ("fid",), cache_dir=None, progress=False)
    assert not np.allclose(new.stats["inception"][0], first.stats["inception"][0])
    assert np.array_equal(new.stats["inception"][0], fresh.stats["inception"][0])


def test_eval_refuses_nonfinite_guidance(model_file, tmp_path):
    from imm_fast.__main__ import main

    for w in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="cfg_scale"):
            E.evaluate(model_file, tmp_path / "ref.npz", num=4, steps=(1,), cfg_scale=w, out_dir=str(tmp_path))
    assert main(["eval", str(model_file), "--ref", str(tmp_path / "r.npz"), "--cfg-scale", "nan"]) == 2


def test_nonfinite_samples_are_never_scored(weights, tmp_path):
    from imm_fast.checkpoints import save_model

    model = random_model(**TINY)
    with torch.no_grad():
        next(p for p in model.parameters() if p.dim() > 1).fill_(float("nan"))
    save_model(tmp_path / "nan.safetensors", model)
    np.savez(tmp_path / "ref.npz", arr_0=np.random.RandomState(0).randint(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(E.NonFiniteSamplesError, match=r"2-step samples 0\.\.1 of .*nan\.safetensors.*cfg_scale=1.5"):
        E.evaluate(tmp_path / "nan.safetensors", tmp_path / "ref.npz", num=4, steps=(2,), batch=2, cfg_scale=1.5,
                   metrics=("is",), inception=str(weights), out_dir=str(tmp_path / "out"), progress=False)
    assert not list((tmp_path / "out").glob("eval-*.json")) and not list((tmp_path / "out").rglob("shard-*"))


def test_result_files_are_strict_json_and_never_overwritten(tmp_path):
    stamp = "20260101-000000"  # two evaluations finishing in the same second
    a = E._write_record(tmp_path, stamp, {"results": {"1": {"fid": float("nan"), "is_mean": 2.0}}})
    b = E._write_record(tmp_path, stamp, {"results": {"1": {"fid": 3.0, "is_mean": float("inf")}}})
    assert a != b and a.name == f"eval-{stamp}.json" and b.name == f"eval-{stamp}-2.json"

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))

    ra, rb = strict(a.read_text()), strict(b.read_text())
    assert ra["results"]["1"]["fid"] is None and "nan" in ra["nonfinite"]["results.1.fid"]
    assert rb["results"]["1"]["fid"] == 3.0 and "inf" in rb["nonfinite"]["results.1.is_mean"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_two_evaluations_never_delete_each_others_cache(model_file, weights, tmp_path):
    kw = dict(num=4, steps=(1,), batch=4, shard_size=2, metrics=("is",), inception=str(weights), progress=False,
              out_dir=str(tmp_path), verbose=False)
    np.savez(tmp_path / "ref.npz", arr_0=np.random.RandomState(0).randint(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    first = E.evaluate(model_file, tmp_path / "ref.npz", keep_cache=True, **kw)
    (folder,) = [p for p in (tmp_path / "eval-cache").iterdir() if p.is_dir()]
    other = tmp_path / "eval-cache" / "0123456789abcdef" / "1step"  # another evaluation's shards
    other.mkdir(parents=True)
    (other / "shard-000000.npz").write_bytes(b"x")
    held = E._CacheLock(folder).__enter__()  # an evaluation of the same settings is running
    try:
        with pytest.raises(E.EvalBusyError, match=f"pid {os.getpid()}.*--out-dir"):
            E.evaluate(model_file, tmp_path / "ref.npz", **kw)
        assert (folder / "1step" / "shard-000000.npz").is_file()  # its shards are untouched
    finally:
        held.__exit__(None, None, None)
    second = E.evaluate(model_file, tmp_path / "ref.npz", **kw)  # resumes from the shards, then removes them
    assert second["results"]["1"]["made_now"] == 0 and second["results"]["1"]["is_mean"] == first["results"]["1"][
        "is_mean"]
    assert not folder.exists() and (other / "shard-000000.npz").is_file()
    assert second["json"] != first["json"]


# ---------------------------------------------------------------------------------------------------------------
# Digits without --ref, offline downloads, shared pieces written once
# ---------------------------------------------------------------------------------------------------------------
def _digits_checkpoint(folder):
    """A verified training checkpoint (manifest included) of a tiny digits model at <run>/checkpoints/<folder>."""
    from imm_fast.checkpoints import save_checkpoint

    torch.manual_seed(0)
    model = random_model(img_resolution=8, img_channels=1, label_dim=10, patch_size=2, hidden_size=32, depth=1,
                         num_heads=2)
    cfg = {"seed": 0, "eval_samples": 30, "eval_steps": [1, 2], "data": {"source": "digits"},
           "sample": {"cfg_scale": 2.0, "sampler": "pushforward"}}
    step = int(folder.name.split("-")[-1])
    assert save_checkpoint(folder.parent.parent, step, model, model.state_dict(), {}, cfg) == folder
    return model


def test_digits_run_evaluates_without_ref(tmp_path, monkeypatch, capsys):
    from imm_fast.__main__ import main

    torch.manual_seed(1)
    clf = M.DigitsClassifier().eval()
    monkeypatch.setattr(M, "digits_classifier", lambda refresh=False: clf)  # any classifier: the same one both ways
    ck = tmp_path / "run" / "checkpoints" / "step-0000400"
    model = _digits_checkpoint(ck)
    assert E.pixel_kind_of(ck) == "digits" and E.pixel_kind_of(ck / "ema.safetensors") == "digits"
    r = E.evaluate(ck, None, steps=(1,), num=20, verbose=False)
    want = M.digits_report(model, (1,), 2.0, 20, 0, "pushforward")
    assert r["digits"]["1"] == pytest.approx(want[1]) and Path(r["json"]).parent == ck
    assert main(["eval", str(ck)]) == 0  # the run's own settings: eval_samples 30, eval_steps 1, 2
    out = capsys.readouterr().out
    assert "| 2 |" in out and "accuracy (w=2.0)" in out
    full = M.digits_report(model, (1, 2), 2.0, 30, 0, "pushforward")
    assert f"{full[2]['fd']:.3f}" in out
    (tmp_path / "img").mkdir()
    from imm_fast.checkpoints import save_model

    save_model(tmp_path / "img" / "ema.safetensors", random_model(**TINY))
    assert main(["eval", str(tmp_path / "img")]) == 2
    err = capsys.readouterr().err
    assert "ref is required" in err and "digits run" in err and "--ref" in err


def test_inception_download_offline_says_what_to_do(monkeypatch, model_file, tmp_path, capsys):
    import urllib.error

    from imm_fast.__main__ import main

    def offline(*a, **k):
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="offline.*--inception PATH"):
        find_weights("download")
    np.savez(tmp_path / "r.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    assert main(["eval", str(model_file), "--ref", str(tmp_path / "r.npz"), "--inception", "download"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--inception PATH" in err and "urlopen error" not in err


def test_shared_pieces_are_written_once(model_file):
    """One restart sampler (evaluation samples through imm_fast.sample with per-sample generators), one module of
    rank / device / progress helpers used by training and evaluation."""
    import inspect

    from imm_fast import _dist, training
    from imm_fast.checkpoints import load_official

    for name in ("barrier", "broadcast_object", "init_distributed", "resolve_device", "Progress"):
        assert getattr(_dist, name) in vars(training).values() and getattr(_dist, name) in vars(E).values()
    assert "alpha_sigma" not in inspect.getsource(E)  # no restart step of its own
    model = load_official(model_file)
    px, labels = E.generate(model, np.arange(3), 3, "restart", seed=4)
    gens = [torch.Generator().manual_seed(4 + i) for i in range(3)]
    noise = torch.stack([torch.randn(3, 8, 8, generator=g) for g in gens]) * model.sigma_data
    x = imm_fast.sample(model, noise, 3, "restart", class_labels=labels, generator=gens)
    assert torch.equal(px, E.decode(model, x))


def test_eval_of_a_digits_checkpoint_recomputes_the_training_table(tmp_path, monkeypatch, capsys):
    """`eval CHECKPOINT` (no --ref) on a trained digits run prints the very table training printed at its end."""
    pytest.importorskip("sklearn")
    from imm_fast.__main__ import main

    torch.manual_seed(1)
    clf = M.DigitsClassifier().eval()  # any fixed classifier (training the real one takes longer)
    monkeypatch.setattr(M, "digits_classifier", lambda refresh=False: clf)
    run = imm_fast.train("digits", max_steps=4, batch_size=16, progress=False, out_dir=str(tmp_path), device="cpu",
                         **{"model.depth": 1, "model.hidden_size": 32, "model.num_heads": 2, "eval_samples": 20,
                            "eval_steps": [1, 2], "sample.num_images": 10, "sample.steps": [1], "threads": 1})
    capsys.readouterr()
    assert main(["eval", str(run.checkpoint)]) == 0
    assert run.metrics["table"] in capsys.readouterr().out
