"""The IMM objective (IMM paper, Sec. 4: the simplified formulation used in practice): one loss for a batch of
B = G groups x M particles.

Per group g one (s, r, t) shared by its M particles; per particle x_t = alpha_t x + sigma_t eps and
x_r = alpha_r x + sigma_r eps with the same (x, eps); student y_t = f_theta(x_t, s, t) with dropped labels;
target y_r = f_theta(x_r, s, r) under no_grad, fp32, with the RNG state restored so dropout masks match;
loss = mean_g w(s,t) MMD2_g(y_t, y_r) with the Laplace kernel scale w~(s,t). Non-finite groups contribute 0 to the
loss AND exactly 0 to the gradient (the authors' training drops NaN losses; see _masked_group_mmd), and are counted.

Shapes: B batch, G groups, M particles, (Cin, R, R) per sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import schedule as sch
from .config import LossConfig
from .ops.mmd import mmd_loss, mmd_terms


@dataclass
class IMMLossOutput:
    loss: torch.Tensor            # scalar: mean_g w_g MMD2_g
    mmd: torch.Tensor             # (G,) unweighted MMD2_g (detached)
    weight: torch.Tensor          # (G,) w(s,t)
    scale: torch.Tensor           # (G,) kernel scale w~(s,t)
    t: torch.Tensor               # (G,)
    s: torch.Tensor               # (G,)
    r: torch.Tensor               # (G,)
    kernel_means: Optional[torch.Tensor] = None  # (G, 3): student-student, target-target, cross
    nonfinite_groups: Optional[torch.Tensor] = None  # () int64 on x's device: groups masked out (no host sync)


def _truncated_normal(n, mean, std, lo, hi, generator, device):
    """Inverse-CDF sampling of N(mean, std^2) truncated to [lo, hi] (lo may be -inf); float64."""
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64))
    lo = torch.as_tensor(lo, dtype=torch.float64)
    hi = torch.as_tensor(hi, dtype=torch.float64)
    cdf_lo, cdf_hi = normal.cdf(lo), normal.cdf(hi)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    z = normal.icdf((cdf_lo + u * (cdf_hi - cdf_lo)).clamp(1e-300, 1 - 1e-16))
    return torch.minimum(torch.maximum(z, lo), hi).to(device)


def draw_times(num_groups, model, cfg: LossConfig, generator=None, device="cpu"):
    """(s, r, t), each (G,) float64, one per group."""
    ns, eps_t, T = model.noise_schedule, model.eps, model.T
    G = num_groups
    if cfg.ts_dist == "uniform":
        t = eps_t + (T - eps_t) * torch.rand(G, generator=generator, dtype=torch.float64)
        s = eps_t + (t - eps_t) * torch.rand(G, generator=generator, dtype=torch.float64)
    else:
        eta_min, eta_max = sch.eta_bounds(eps_t, T, ns)
        log_lo = math.log(eta_min) if eta_min > 0 else -math.inf
        log_eta_t = _truncated_normal(G, cfg.lognormal_mean, cfg.lognormal_std, log_lo, math.log(eta_max),
                                      generator, "cpu")
        log_eta_s = _truncated_normal(G, cfg.lognormal_mean, cfg.lognormal_std, math.log(max(eta_min, 1e-8)),
                                      log_eta_t, generator, "cpu")
        t = sch.t_of_eta(log_eta_t.exp(), ns)
        s = torch.minimum(sch.t_of_eta(log_eta_s.exp(), ns), t)
    r = sch.r_of_st(s, t, cfg.k, eps_t, T, ns)
    return s.to(device), r.to(device), t.to(device)


def drop_labels(labels, mask, label_dim):
    """Labels with the rows in `mask` replaced by the null class (id label_dim / an all-zero one-hot row)."""
    if labels is None or mask is None:
        return labels
    if labels.is_floating_point() or labels.dim() > 1:  # one-hot rows
        return labels * (~mask).to(labels.dtype).reshape(-1, *([1] * (labels.dim() - 1)))
    return torch.where(mask, torch.full_like(labels, label_dim), labels)


def _rng_states(device):
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states, device):
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def _group_times(G, core, cfg, generator, dev, t, s, r):
    """(s, r, t), each (G,) float64: drawn per group, or the explicit ones a test gives."""
    if (t is None) != (s is None) or (r is not None and t is None):
        raise ValueError("give t and s together (and r only with them)")
    if t is None:
        return draw_times(G, core, cfg, generator, dev)
    t, s = (torch.as_tensor(v, dtype=torch.float64, device=dev).reshape(G) for v in (t, s))
    r = sch.r_of_st(s, t, cfg.k, core.eps, core.T, core.noise_schedule) if r is None else \
        torch.as_tensor(r, dtype=torch.float64, device=dev).reshape(G)
    return s, r, t


def _finite_rows(x, noise):
    """Non-finite guard, part 1: a particle whose data or noise holds NaN/inf is replaced by zeros (its group is
    masked later). Masking the loss alone is not enough: a NaN that entered the network reaches every weight
    gradient through 0 * NaN in the backward of each layer. torch.where keeps finite batches bit-identical."""
    bshape = (x.shape[0],) + (1,) * (x.dim() - 1)
    row_ok = torch.isfinite(x).flatten(1).all(1) & torch.isfinite(noise).flatten(1).all(1)  # (B,)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    x = torch.where(row_ok.reshape(bshape), x, zero)
    noise = torch.where(row_ok.reshape(bshape), noise, zero.to(noise.dtype))
    return x, noise, row_ok


def _masked_group_mmd(y_t, y_r, row_ok, w, scale, M, cfg, grad_accum=1):
    """w(s,t) MMD2_g per group (G,), with part 2 of the guard: a group with bad inputs or a non-finite
    student/target output enters the MMD as zeros, and groups whose weighted MMD is still non-finite are
    selected away: torch.where's backward sends exactly zero to the masked entries (nan_to_num would zero the
    loss, but 0 * NaN in the MMD backward would still reach y_t). Returns (per_group, mmd, group_ok, ok)."""
    B = y_t.shape[0]
    G = B // M
    group_ok = (row_ok & torch.isfinite(y_t.detach()).all(1) & torch.isfinite(y_r).all(1)).reshape(G, M).all(1)
    rows = group_ok.repeat_interleave(M)[:, None]  # (B, 1)
    zero_y = torch.zeros((), dtype=y_t.dtype, device=y_t.device)
    w_dt = w.to(y_t.dtype)  # (G,) in mmd's dtype
    mmd = mmd_loss(torch.where(rows, y_t, zero_y), torch.where(rows, y_r.to(y_t.dtype), zero_y), M,
                   scale=scale.float(), eps=cfg.kernel_eps, kernel=cfg.kernel, reduction="none",
                   backend=cfg.backend, grad_hint=w_dt * _mean_grad(G, grad_accum, y_t.dtype))  # (G,)
    contrib = w_dt * mmd  # (G,)
    ok = group_ok & torch.isfinite(contrib)  # (G,)
    per_group = torch.where(ok, contrib, torch.zeros((), dtype=contrib.dtype, device=contrib.device))
    return per_group, mmd, group_ok, ok


def _mean_grad(G, grad_accum, dtype) -> float:
    """What (loss / grad_accum).backward() brings to each per-group term of imm_loss's mean, in dtype and in the
    operations autograd runs (divide, then the mean's divide), worked out on the CPU: times w(s,t) it is the hint
    that lets mmd_loss's kernel store its gradient already scaled (a wrong hint costs a pass, never a value)."""
    g = torch.ones((), dtype=dtype)
    if grad_accum != 1:
        g = g / grad_accum
    return (g / G).item()


def imm_loss(model, x, labels=None, cfg: LossConfig = LossConfig(), *, target_model=None, generator=None,
             t=None, s=None, r=None, noise=None, drop_mask=None, diagnostics=False,
             grad_accum=1) -> IMMLossOutput:
    """The IMM loss of a batch x (B, Cin, R, R) with labels (ids (B,) or one-hot (B, label_dim), or None).

    model: the IMM wrapper being trained (or a DDP wrapper of it); target_model: the module used for the
    no-grad target pass (default: model; pass the unwrapped module under DDP). generator: a CPU torch.Generator
    for (s, r, t), eps and the label-drop mask (default: the global RNG). For tests, t, s, r (G,), noise (B, ...)
    and drop_mask (B,) bool may be given explicitly. grad_accum: the caller backpropagates loss / grad_accum
    (only a hint for the MMD kernels' stored gradient; the values never depend on it). Returns IMMLossOutput
    (loss + per-group diagnostics).
    """
    core = getattr(model, "module", model)
    target_model = model if target_model is None else target_model
    M = cfg.group_size
    B = x.shape[0]
    if B % M:
        raise ValueError(f"batch size {B} must be divisible by group_size M={M}")
    G = B // M
    dev = x.device
    s, r, t = _group_times(G, core, cfg, generator, dev, t, s, r)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(dev) * core.sigma_data
    elif noise.shape != x.shape:
        raise ValueError(f"noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
    if drop_mask is None and labels is not None and cfg.label_dropout > 0 and core.label_dim > 0:
        drop_mask = (torch.rand(B, generator=generator) < cfg.label_dropout).to(dev)
    x, noise, row_ok = _finite_rows(x, noise)
    student_labels = drop_labels(labels, drop_mask, core.label_dim)
    target_labels = student_labels if cfg.target_labels == "dropped" else labels

    # Per-particle times: every particle of group g shares (s_g, r_g, t_g).
    bshape = (B,) + (1,) * (x.dim() - 1)
    tp, sp, rp = (v.to(x.dtype).repeat_interleave(M) for v in (t, s, r))  # (B,)
    alpha_t, sigma_t = core.alpha_sigma(tp.reshape(bshape))
    alpha_r, sigma_r = core.alpha_sigma(rp.reshape(bshape))
    x_t = alpha_t * x + sigma_t * noise
    x_r = alpha_r * x + sigma_r * noise

    rng = _rng_states(dev)
    with torch.no_grad():
        y_r = target_model(x_r, rp, sp, class_labels=target_labels, force_fp32=cfg.target_fp32).float()
    _set_rng_states(rng, dev)  # the student pass draws the same dropout masks
    y_t = model(x_t, tp, sp, class_labels=student_labels)

    w = sch.weight(t, cfg.a, cfg.b, core.noise_schedule)  # (G,) float64
    scale = sch.kernel_scale(s, t, core.f_type, core.noise_schedule, core.sigma_data)  # (G,)
    y_t, y_r = y_t.reshape(B, -1), y_r.reshape(B, -1)  # (B, D)
    per_group, mmd, group_ok, ok = _masked_group_mmd(y_t, y_r, row_ok, w, scale, M, cfg, grad_accum)
    out = IMMLossOutput(loss=per_group.mean(), mmd=torch.where(group_ok, mmd.detach(), float("nan")), weight=w,
                        scale=scale, t=t, s=s, r=r, nonfinite_groups=(~ok).sum())
    if diagnostics:
        out.kernel_means = mmd_terms(y_t.detach(), y_r, M, scale=scale.float(),
                                     eps=cfg.kernel_eps, kernel=cfg.kernel)
    return out
