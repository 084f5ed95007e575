"""Metrics: the Frechet distance, the cached digits classifier and the digits evaluation, FID availability."""
import numpy as np
import pytest
import torch

from imm_fast import metrics as M

pytest.importorskip("sklearn")


def test_frechet_distance_matches_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.RandomState(0)
    a = rng.randn(300, 6) @ rng.randn(6, 6)
    b = rng.randn(200, 6) @ rng.randn(6, 6) + 0.3
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert M.frechet_distance_features(a, b) == pytest.approx(ref, rel=1e-6)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    assert M.frechet_distance_features(a, a) == pytest.approx(0.0, abs=1e-6)
    assert M.frechet_distance_features(a, a + 1.0) == pytest.approx(6.0, rel=1e-6)  # a mean shift of 1 in 6 dims


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    import os

    old = os.environ.get("IMM_FAST_CACHE")
    os.environ["IMM_FAST_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        net = M.digits_classifier()
        assert (M.cache_dir() / f"digits_classifier_v{M.CLASSIFIER_VERSION}.safetensors").is_file()
        again = M.digits_classifier()  # from the cache: the same weights
        for k, v in net.state_dict().items():
            torch.testing.assert_close(again.state_dict()[k], v)
        yield net
    finally:
        if old is None:
            os.environ.pop("IMM_FAST_CACHE", None)
        else:
            os.environ["IMM_FAST_CACHE"] = old


def test_digits_eval_real_vs_corrupted(classifier):
    from imm_fast.data import load_digits_arrays

    x, y = load_digits_arrays("test")
    real = (torch.from_numpy(x) - 8) / 12
    r = M.digits_eval(real, torch.from_numpy(y), classifier)
    assert r["accuracy"] > 0.95  # the classifier is good on held-out digits
    assert r["fd"] < 1e-6 < r["fd_floor"]  # the held-out set against itself; the floor uses training digits
    g = torch.Generator().manual_seed(0)
    noisy = real + 0.3 * torch.randn(real.shape, generator=g)
    r2 = M.digits_eval(noisy, torch.from_numpy(y), classifier)
    assert r2["fd"] > 2 * r["fd_floor"]  # corrupted digits are far from the real ones
    shuffled = M.digits_eval(real, torch.from_numpy(y).roll(1), classifier)
    assert shuffled["accuracy"] < 0.3


def test_digits_report_on_a_tiny_model(classifier, monkeypatch):
    from imm_fast.models import build_model
    from imm_fast.config import ModelConfig

    monkeypatch.setattr(M, "digits_classifier", lambda refresh=False: classifier)
    model = build_model(ModelConfig(img_resolution=8, img_channels=1, label_dim=10, patch_size=2, hidden_size=32,
                                    depth=1, num_heads=2))
    table = M.digits_report(model, steps=(1, 2), cfg_scale=2.0, num_samples=50)
    assert set(table) == {1, 2}
    for row in table.values():
        assert set(row) == {"accuracy", "fd", "fd_floor", "accuracy_noguide", "fd_noguide"}
        assert 0 <= row["accuracy"] <= 1 and row["fd"] > row["fd_floor"]  # an untrained model is far off
    text = M.format_digits_table(table, 2.0)
    assert text.count("\n") == 3 and "| 2 |" in text


def test_fid_message_without_inception_weights(monkeypatch, tmp_path):
    monkeypatch.delenv("IMM_FAST_INCEPTION", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    ok, msg = M.fid_available()
    assert not ok and "--inception" in msg and "IMM_FAST_INCEPTION" in msg
    assert "FID skipped" in msg
    value, msg2 = M.fid(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    assert value is None and msg2 == msg
