import math

import pytest
import torch

from imm_fast import schedule as sch

SCHED = ["fm", "vp_cosine"]


@pytest.mark.parametrize("ns", SCHED)
def test_t_of_eta_inverts_eta(ns):
    t = torch.rand(1000, dtype=torch.float64) * 0.98 + 0.01
    torch.testing.assert_close(sch.t_of_eta(sch.eta(t, ns), ns), t, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ns", SCHED)
def test_eta_is_sigma_over_alpha_and_logsnr(ns):
    t = torch.rand(100, dtype=torch.float64) * 0.98 + 0.01
    a, s = sch.alpha_sigma(t, ns)
    torch.testing.assert_close(sch.eta(t, ns), s / a)
    torch.testing.assert_close(sch.logsnr(t, ns), torch.log(a**2 / s**2))


@pytest.mark.parametrize("ns", SCHED)
def test_neg_dlogsnr_matches_finite_difference(ns):
    t = torch.rand(50, dtype=torch.float64) * 0.9 + 0.05
    h = 1e-6
    fd = -(sch.logsnr(t + h, ns) - sch.logsnr(t - h, ns)) / (2 * h)
    torch.testing.assert_close(sch.neg_dlogsnr_dt(t, ns), fd, rtol=1e-6, atol=0)


@pytest.mark.parametrize("ns", SCHED)
def test_ddim_reproduces_the_interpolant(ns):
    x, eps = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    t = torch.rand(8, 1, dtype=torch.float64) * 0.9 + 0.05
    s = t * torch.rand(8, 1, dtype=torch.float64)
    a_t, s_t = sch.alpha_sigma(t, ns)
    a_s, s_s = sch.alpha_sigma(s, ns)
    torch.testing.assert_close(sch.ddim(a_t * x + s_t * eps, x, s, t, ns), a_s * x + s_s * eps)


@pytest.mark.parametrize("ns", SCHED)
@pytest.mark.parametrize("k", [0, 4, 12, 15])
def test_r_between_s_and_t(ns, k):
    eps_t, T = 0.006, 0.994
    t = eps_t + (T - eps_t) * torch.rand(2000, dtype=torch.float64)
    s = eps_t + (t - eps_t) * torch.rand(2000, dtype=torch.float64)
    r = sch.r_of_st(s, t, k, eps_t, T, ns)
    assert bool((s <= r).all()) and bool((r < t).all())
    eta_min, eta_max = sch.eta_bounds(eps_t, T, ns)
    expect = torch.maximum(s, sch.t_of_eta((sch.eta(t, ns) - (eta_max - eta_min) / 2**k).clamp_min(0), ns))
    torch.testing.assert_close(r, expect)


def test_weight_formula_fm():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    for a, b in [(1, 5.0), (2, 4.0)]:
        lam = 2 * torch.log((1 - t) / t)
        expect = 0.5 * torch.sigmoid(b - lam) * 2 / (t * (1 - t)) * (1 - t) ** a / ((1 - t) ** 2 + t**2)
        torch.testing.assert_close(sch.weight(t, a, b, "fm"), expect)


def test_kernel_scale_euler_fm():
    s, t = torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.9])
    torch.testing.assert_close(sch.kernel_scale(s, t, "euler_fm", "fm", 0.5), 1 / (0.5 * (t - s)))


@pytest.mark.parametrize("f_type,ns", [("euler_fm", "fm"), ("simple_edm", "fm"), ("simple_edm", "vp_cosine"),
                                       ("identity", "fm"), ("identity", "vp_cosine")])
def test_c_skip_out_identity_at_s_equals_t(f_type, ns):
    t = torch.rand(10, dtype=torch.float64) * 0.9 + 0.05
    c_skip, c_out = sch.c_skip_out(t, t, f_type, ns)
    torch.testing.assert_close(c_skip, torch.ones_like(t))
    torch.testing.assert_close(c_out, torch.zeros_like(t))


def test_bad_schedule_name():
    with pytest.raises(ValueError, match="noise_schedule"):
        sch.alpha_sigma(torch.tensor(0.5), "cosine")
    assert math.isfinite(sch.eta_bounds(0.0, 0.994)[1])
