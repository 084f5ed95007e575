"""IMM schedules (the IMM paper's interpolants and weighting): alpha_t, sigma_t, eta_t, t(eta), lambda_t, DDIM,
r(s,t), w(s,t), w~(s,t).

All functions take tensors (any shape, broadcasting) and keep their dtype, computing log-SNR in float64 as the
authors' code does. `schedule` is "fm" (alpha = 1 - t, sigma = t) or "vp_cosine" (cos, sin of pi t / 2).
"""
from __future__ import annotations

import math

import torch

NOISE_SCHEDULES = ("fm", "vp_cosine")             # interpolants: alpha_t, sigma_t below
F_TYPES = ("euler_fm", "simple_edm", "identity")  # output functions (c_skip_out below, models/imm.py)
SCHEDULES = NOISE_SCHEDULES


def _check(schedule):
    if schedule not in SCHEDULES:
        raise ValueError(f"noise_schedule={schedule!r} is not one of {SCHEDULES}")


def alpha_sigma(t, schedule="fm"):
    """(alpha_t, sigma_t)."""
    _check(schedule)
    if schedule == "fm":
        return 1 - t, t
    return torch.cos(t * (math.pi * 0.5)), torch.sin(t * (math.pi * 0.5))


def logsnr(t, schedule="fm"):
    """lambda_t = log(alpha_t^2 / sigma_t^2), computed in float64."""
    _check(schedule)
    dtype = t.dtype
    t = t.to(torch.float64)
    if schedule == "fm":
        lam = 2 * ((1 - t).log() - t.log())
    else:
        lam = -2 * torch.log(torch.tan(t * torch.pi * 0.5))
    return lam.to(dtype)


def eta(t, schedule="fm"):
    """eta_t = sigma_t / alpha_t = exp(-lambda_t / 2)."""
    return (-0.5 * logsnr(t, schedule)).exp()


def t_of_eta(nt, schedule="fm"):
    """The inverse of eta: t(eta); NaN (eta = inf) maps to 1 as in the authors' code."""
    _check(schedule)
    dtype = nt.dtype
    nt = nt.to(torch.float64)
    t = nt / (1 + nt) if schedule == "fm" else torch.arctan(nt) / (torch.pi * 0.5)
    return torch.nan_to_num(t, nan=1).to(dtype)


def neg_dlogsnr_dt(t, schedule="fm"):
    """-d lambda / dt: fm 2/(t(1-t)); vp_cosine 2 pi / sin(pi t)."""
    _check(schedule)
    if schedule == "fm":
        return 2 / (t * (1 - t))
    return 2 * math.pi / torch.sin(math.pi * t)


def ddim(x_t, x, s, t, schedule="fm"):
    """DDIM interpolant (s < t): (alpha_s - alpha_t sigma_s / sigma_t) x + (sigma_s / sigma_t) x_t."""
    alpha_t, sigma_t = alpha_sigma(t, schedule)
    alpha_s, sigma_s = alpha_sigma(s, schedule)
    return (alpha_s - alpha_t * sigma_s / sigma_t) * x + sigma_s / sigma_t * x_t


def c_skip_out(s, t, f_type, schedule="fm", sigma_data=0.5):
    """(c_skip, c_out) with f_{s,t}(x_t) = c_skip x_t + c_out G for each output function."""
    alpha_t, sigma_t = alpha_sigma(t, schedule)
    alpha_s, sigma_s = alpha_sigma(s, schedule)
    if f_type == "euler_fm":
        return torch.ones_like(t * s), -(t - s) * sigma_data
    if f_type == "simple_edm":
        c_skip = (alpha_t * alpha_s + sigma_t * sigma_s) / (alpha_t**2 + sigma_t**2)
        c_out = -(alpha_s * sigma_t - alpha_t * sigma_s) * (alpha_t**2 + sigma_t**2).rsqrt() * sigma_data
        return c_skip, c_out
    if f_type == "identity":
        return sigma_s / sigma_t, alpha_s - alpha_t * sigma_s / sigma_t
    raise ValueError(f"f_type={f_type!r} is not one of {F_TYPES}")


def kernel_scale(s, t, f_type, schedule="fm", sigma_data=0.5):
    """w~(s,t) = 1 / |c_out(s,t)|, the Laplace kernel's scale (euler_fm: 1 / (sigma_d |t - s|))."""
    return 1.0 / c_skip_out(s, t, f_type, schedule, sigma_data)[1].abs()


def weight(t, a=2, b=4.0, schedule="fm"):
    """w(s,t) = 1/2 sigmoid(b - lambda_t) (-d lambda/dt) alpha_t^a / (alpha_t^2 + sigma_t^2)."""
    alpha_t, sigma_t = alpha_sigma(t, schedule)
    return 0.5 * torch.sigmoid(b - logsnr(t, schedule)) * neg_dlogsnr_dt(t, schedule) * alpha_t**a / (
        alpha_t**2 + sigma_t**2)


def eta_bounds(eps, T, schedule="fm"):
    """(eta_min, eta_max) = (eta(eps_t), eta(T)) as Python floats (float64)."""
    e = eta(torch.tensor([eps, T], dtype=torch.float64), schedule)
    return e[0].item(), e[1].item()


def r_of_st(s, t, k, eps, T, schedule="fm"):
    """r = max(s, t(eta_t - delta)), delta = (eta_max - eta_min) / 2^k, clamped so s <= r <= t (r < t if s < t)."""
    eta_min, eta_max = eta_bounds(eps, T, schedule)
    delta = (eta_max - eta_min) / 2**k
    r = t_of_eta((eta(t, schedule) - delta).clamp_min(0), schedule)  # eta < 0 has no time: r falls back to s
    return torch.minimum(torch.maximum(s, r), t)
