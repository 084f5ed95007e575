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


# ---------------------------------------------------------------------------------------------------------------
# Precision / recall, checked statistics, non-finite input, the metric table
# ---------------------------------------------------------------------------------------------------------------
def _pr_brute_force(real, fake, k):
    """Kynkaanniemi et al. 2019 with explicit pairwise differences in numpy float64."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    r_real = np.sort(dist(real, real), axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    precision = (dist(fake, real) <= r_real[None, :]).any(1).mean()
    recall = (dist(real, fake) <= r_fake[None, :]).any(1).mean()
    return precision, recall


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
    rng = np.random.RandomState(k)
    real = rng.randn(60, 7) * 2.0 + 100.0  # a large offset: the |a|^2 + |b|^2 - 2ab expansion must not cancel
    fake = rng.randn(45, 7) * 1.5 + 101.5
    fake[:5] = real[:5]  # duplicates: distance exactly 0
    got = M.precision_recall(real, fake, k=k, chunk=16)
    want = _pr_brute_force(real, fake, k)
    assert got == pytest.approx(want, abs=0)
    assert 0 < got[0] < 1 and 0 < got[1] < 1  # neither trivially 0 nor 1 on these sets
    assert M.precision_recall(real.astype(np.float32), real.astype(np.float32), k=k) == (1.0, 1.0)
    with pytest.raises(ValueError, match="k="):
        M.precision_recall(real[:3], fake, k=3)
    with pytest.raises(ValueError, match="NaN"):
        M.precision_recall(real, np.where(fake > 101, np.nan, fake), k=k)


def test_frechet_distance_refuses_nonfinite_input_at_once():
    import time

    rng = np.random.RandomState(0)
    f = rng.randn(100, 300)
    mu, s = M.feature_statistics(f)
    for name, args in (("mu2", (mu, s, mu * np.nan, s)), ("sigma2", (mu, s, mu, np.where(s > 0.2, np.inf, s))),
                       ("sigma1", (mu, np.where(s > 0.2, np.nan, s), mu, s))):
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match=name):
            M.frechet_distance(*args)
        assert time.perf_counter() - t0 < 1.0


def test_check_statistics_refuses_invalid_covariances():
    rng = np.random.RandomState(1)
    mu, s = M.feature_statistics(rng.randn(10, 16))  # rank 9 < 16: PSD up to round-off, accepted
    M.check_statistics(mu, s, 16)
    cases = {"width 16": (mu[:8], s[:8, :8]), "NaN": (mu * np.nan, s), "NaN/inf": (mu, s + np.inf),
             "not symmetric": (mu, s + np.triu(np.ones((16, 16)), 1)), "positive semi-definite": (mu, s - np.eye(16))}
    for match, (m, c) in cases.items():
        with pytest.raises(ValueError, match=match):
            M.check_statistics(m, c, 16, "ref")


def test_metric_table_is_the_one_place_of_metrics():
    """Every metric is one entry: its columns, its reads and its reference need; adding one is one entry."""
    assert set(M.METRICS) >= {"fid", "is", "pr", "fd_dinov2"}
    assert M.METRICS["pr"].reference == ("inception", "features")
    assert M.METRICS["fd_dinov2"].reads == ("dinov2",) and M.METRICS["fd_dinov2"].reference == ("dinov2", "stats")
    assert [c.key for c in M.metric_columns(("fid", "pr"))] == ["fid", "precision", "recall"]
    with pytest.raises(ValueError, match="one of"):
        M.check_metrics(["fid", "kid"])
    rng = np.random.RandomState(2)
    real, fake = rng.randn(30, 5), rng.randn(20, 5) + 0.3

    class Ref:
        stats = {"inception": M.feature_statistics(real)}
        features = {"inception": real}

    row = M.compute_metrics(("fid", "pr"), {"inception": fake}, Ref)
    assert row["fid"] == pytest.approx(M.frechet_distance_features(fake, real))
    assert (row["precision"], row["recall"]) == M.precision_recall(real, fake, k=3)
