import itertools
import math

import pytest
import torch

from imm_fast import schedule as sch
from imm_fast.config import LossConfig
from imm_fast.loss import draw_times, imm_loss
from imm_fast.ops.mmd import mmd_loss_ref, mmd_terms

from _helpers import NaNFirstGroup, random_model


def independent_mmd(x, y, M, scale, weight, eps, kernel, normalize_dim, reduction):
    """Loop-by-loop float64 MMD, written from the formula alone."""
    G = x.shape[0] // M
    X, Y = x.reshape(G, M, -1), y.reshape(G, M, -1)
    D = X.shape[-1] if normalize_dim else 1
    vals = []
    for g in range(G):
        def k(a, b):
            sq = ((a - b) ** 2).sum()
            if kernel == "laplace":  # below the clamp the kernel is constant (and sqrt has no derivative at 0)
                d = torch.sqrt(sq) if sq.item() > eps * eps else torch.tensor(eps, dtype=sq.dtype)
            else:
                d = sq if sq.item() > eps * eps else torch.tensor(eps * eps, dtype=sq.dtype)
            return torch.exp(-scale[g] * d / D)
        tot = 0
        for i, j in itertools.product(range(M), range(M)):
            tot = tot + k(X[g, i], X[g, j]) + k(Y[g, i], Y[g, j]) - 2 * k(X[g, i], Y[g, j])
        vals.append(weight[g] * tot / M**2)
    v = torch.stack(vals)
    return {"mean": v.mean(), "sum": v.sum(), "none": v}[reduction]


@pytest.mark.parametrize("kernel", ["laplace", "rbf"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("M,normalize_dim", [(1, True), (3, True), (4, False)])
def test_mmd_loss_ref_equals_independent_float64(kernel, reduction, M, normalize_dim):
    G, D = 3, 7
    x = torch.randn(G * M, D, dtype=torch.float64, requires_grad=True)
    y = torch.randn(G * M, D, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(G, dtype=torch.float64) * 3 + 0.1
    weight = torch.rand(G, dtype=torch.float64) + 0.5
    with torch.no_grad():
        y[1] = x[0]  # a zero distance (clamped)
    args = (M, scale, weight, 1e-4, kernel, normalize_dim, reduction)
    a = mmd_loss_ref(x, y, *args)
    b = independent_mmd(x, y, *args)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    ga = torch.autograd.grad(a.sum(), (x, y))
    gb = torch.autograd.grad(b.sum(), (x, y))
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-10)


def test_mmd_of_identical_sets_is_zero_and_terms():
    x = torch.randn(8, 5)
    assert float(mmd_loss_ref(x, x.clone(), 4).abs()) < 1e-7
    terms = mmd_terms(x, x + 1, 4, scale=2.0)
    assert terms.shape == (2, 3) and bool(((terms > 0) & (terms <= 1)).all())


def small_model(**kw):
    base = dict(img_resolution=8, img_channels=2, label_dim=3, patch_size=4, hidden_size=32, depth=2, num_heads=2)
    return random_model(**{**base, **kw}).train()


def test_imm_loss_matches_the_formula():
    m = small_model(dropout=0.0).train()
    cfg = LossConfig(group_size=4, a=1, b=5.0)
    x = torch.randn(8, 2, 8, 8) * 0.5
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    t = torch.tensor([0.9, 0.4], dtype=torch.float64)
    s = torch.tensor([0.3, 0.1], dtype=torch.float64)
    noise = torch.randn_like(x) * 0.5
    drop = torch.tensor([True, False, False, False, False, True, False, False])
    out = imm_loss(m, x, labels, cfg, t=t, s=s, noise=noise, drop_mask=drop, diagnostics=True)
    r = sch.r_of_st(s, t, cfg.k, 0.0, 0.994)
    torch.testing.assert_close(out.r, r)
    tp, sp, rp = (v.float().repeat_interleave(4) for v in (t, s, r))
    xt = (1 - tp).view(-1, 1, 1, 1) * x + tp.view(-1, 1, 1, 1) * noise
    xr = (1 - rp).view(-1, 1, 1, 1) * x + rp.view(-1, 1, 1, 1) * noise
    dropped = torch.where(drop, torch.full_like(labels, 3), labels)
    yt = m(xt, tp, sp, class_labels=dropped)
    with torch.no_grad():
        yr = m(xr, rp, sp, class_labels=labels)
    w = sch.weight(t, 1, 5.0)
    scale = 1 / (0.5 * (t - s))
    mmd = mmd_loss_ref(yt.reshape(8, -1), yr.reshape(8, -1), 4, scale=scale.float(), reduction="none")
    torch.testing.assert_close(out.loss, (w.float() * mmd).mean())
    torch.testing.assert_close(out.mmd, mmd.detach())
    assert out.kernel_means.shape == (2, 3)
    out.loss.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_target_reuses_the_student_dropout_masks():
    """With r = t, same labels and the RNG restored, student and target coincide: MMD is exactly zero."""
    m = small_model(dropout=0.5).train()
    cfg = LossConfig(group_size=2, target_labels="dropped")
    x = torch.randn(4, 2, 8, 8) * 0.5
    t = torch.tensor([0.7, 0.5], dtype=torch.float64)
    s = torch.tensor([0.2, 0.1], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0])
    out = imm_loss(m, x, labels, cfg, t=t, s=s, r=t)
    assert float(out.mmd.abs().max()) < 1e-12
    # Control: two passes with independent dropout masks are far apart.
    tp, sp = t.float().repeat_interleave(2), s.float().repeat_interleave(2)
    y1, y2 = m(x, tp, sp, class_labels=labels), m(x, tp, sp, class_labels=labels)
    assert float(mmd_loss_ref(y1.reshape(4, -1), y2.reshape(4, -1), 2, scale=5.0, reduction="none").max().detach()) > 1e-6


def test_nan_groups_become_zero():
    m = small_model()
    out = imm_loss(NaNFirstGroup(m), torch.randn(4, 2, 8, 8), None, LossConfig(group_size=2, backend="torch"))
    assert torch.isfinite(out.loss)
    assert torch.isnan(out.mmd[0]) and torch.isfinite(out.mmd[1])


@pytest.mark.parametrize("dist", ["uniform", "lognormal"])
@pytest.mark.parametrize("eps_t", [0.0, 0.006])
def test_drawn_times(dist, eps_t):
    m = small_model(eps=eps_t)
    g = torch.Generator().manual_seed(0)
    s, r, t = draw_times(4000, m, LossConfig(ts_dist=dist, k=12), generator=g)
    assert bool(((t >= eps_t) & (t <= 0.994)).all())
    assert bool(((s >= eps_t - 1e-12) & (s <= r) & (r <= t)).all()) and bool((r < t).float().mean() > 0.99)
    if dist == "lognormal":  # log eta_t ~ N(-1.1, 2): the median of eta_t is exp(-1.1), i.e. t ~ 0.25, not >= 0.5
        assert abs(float(t.median()) - math.exp(-1.1) / (1 + math.exp(-1.1))) < 0.03


def test_groups_share_their_times_and_bad_batch():
    m = small_model()
    out = imm_loss(m, torch.randn(6, 2, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2]), LossConfig(group_size=3))
    assert out.t.shape == (2,) and out.mmd.shape == (2,)
    with pytest.raises(ValueError, match="divisible"):
        imm_loss(m, torch.randn(5, 2, 8, 8), None, LossConfig(group_size=2))
