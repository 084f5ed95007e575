"""Few-step IMM sampling (spec section 4), numerically the authors' generate_images.py.

The state between steps is kept in float64; network calls run in float32 (or the model's autocast).
Pushforward: x <- f(x, s = t_{i+1}, t = t_i) along the grid. Restart: x_hat = f(x, eps_t, t_i), then re-noise
to t_{i+1} with fresh noise. Grids: "uniform", "edm" (rho = 7 in eta) or a list of middle eta values.

Shapes: N images, (Cin, R, R) each.
"""
from __future__ import annotations

import torch

from . import schedule as sch

SAMPLERS = ("pushforward", "restart")


def time_grid(model, steps, grid="uniform", device=None):
    """float64 times T = t_0 > ... > t_N = eps_t (N = steps, or len(middle etas) + 1 for an explicit list)."""
    T, eps, ns = model.T, model.eps, model.noise_schedule
    if isinstance(grid, str):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if grid == "uniform":
            return torch.linspace(T, eps, steps + 1, dtype=torch.float64, device=device)
        if grid == "edm":
            eta_min, eta_max = sch.eta_bounds(eps, T, ns)
            rho = 7
            i = torch.arange(steps + 1, dtype=torch.float64, device=device)
            etas = (eta_max ** (1 / rho) + i / steps * (eta_min ** (1 / rho) - eta_max ** (1 / rho))) ** rho
            return sch.t_of_eta(etas, ns)
        raise ValueError(f"grid={grid!r} is not 'uniform', 'edm' or a list of middle eta values")
    try:
        mid = [float(v) for v in grid]
    except TypeError:
        raise TypeError(f"grid must be 'uniform', 'edm' or a list of middle eta values, got {grid!r}") from None
    if any(v <= 0 for v in mid):
        raise ValueError(f"grid's middle eta values must be positive, got {mid}")
    # As the authors: each eta goes through a default-dtype (float32) tensor before becoming a float64 time.
    mid_t = [sch.t_of_eta(torch.as_tensor(v), ns).item() for v in mid]
    return torch.tensor([T] + mid_t + [eps], dtype=torch.float64, device=device)


@torch.no_grad()
def pushforward(model, noise, t_steps, class_labels=None, cfg_scale=None):
    x = noise.to(torch.float64)
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        x = model(x, t_cur, t_next, class_labels=class_labels, cfg_scale=cfg_scale).to(torch.float64)
    return x


@torch.no_grad()
def restart(model, noise, t_steps, class_labels=None, cfg_scale=None, generator=None):
    x = noise.to(torch.float64)
    t_steps = t_steps[:-1]
    for i, t_cur in enumerate(t_steps):
        x = model(x, t_cur, torch.ones_like(t_cur) * model.eps, class_labels=class_labels,
                  cfg_scale=cfg_scale).to(torch.float64)
        if i < len(t_steps) - 1:
            if generator is None:
                eps = torch.randn_like(x)
            else:
                eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            alpha, sigma = sch.alpha_sigma(t_steps[i + 1], model.noise_schedule)
            x = alpha * x + sigma * (eps * model.sigma_data)
    return x


def sample(model, noise, steps=1, sampler="pushforward", grid="uniform", class_labels=None, cfg_scale=None,
           generator=None):
    """Generate from prior noise x ~ N(0, sigma_d^2 I) of shape (N, Cin, R, R); returns the float64 sample.

    steps: network evaluations (x2 with guidance); ignored when grid is an explicit list of middle eta values.
    sampler: "pushforward" or "restart" (restart draws fresh noise with torch.randn_like, in the authors'
    order, or from `generator`). class_labels: int ids (N,) with label_dim = null class, or one-hot rows.
    cfg_scale: classifier-free guidance weight w (G = G_u + w (G_c - G_u)), None = off.
    The model is used as it is: call model.eval() first for deterministic sampling.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
    if not isinstance(noise, torch.Tensor) or noise.dim() < 2:
        raise ValueError(f"noise must be a (N, C, H, W) tensor, got {type(noise).__name__} "
                         f"{tuple(getattr(noise, 'shape', ()))}")
    expected = (model.img_channels, model.img_resolution, model.img_resolution)
    if tuple(noise.shape[1:]) != expected:
        raise ValueError(f"noise must have shape (N, {', '.join(map(str, expected))}), got {tuple(noise.shape)}")
    if cfg_scale is not None and model.label_dim == 0:
        raise ValueError("cfg_scale needs a class-conditional model (label_dim > 0)")
    t_steps = time_grid(model, steps, grid, noise.device)
    if sampler == "pushforward":
        return pushforward(model, noise, t_steps, class_labels, cfg_scale)
    return restart(model, noise, t_steps, class_labels, cfg_scale, generator)
