"""Grouped MMD loss of IMM (spec section 3).

Shapes: B rows = G groups x M particles (group g is rows g*M .. g*M+M-1), D values per row.
"""
from __future__ import annotations

import math

import torch

KERNELS = ("laplace", "rbf")
REDUCTIONS = ("mean", "sum", "none")


def _as_group_vector(v, G, name, like):
    """A float or a (G,)/(G,1..) tensor -> a (G,) float64-or-like tensor on like's device."""
    if v is None:
        return None
    if isinstance(v, (int, float)):
        if not math.isfinite(float(v)):
            raise ValueError(f"{name}={v!r} must be finite")
        return torch.full((G,), float(v), dtype=like.dtype, device=like.device)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a float or a tensor of shape ({G},), got {type(v).__name__}")
    if v.device != like.device:
        raise ValueError(f"{name} is on {v.device} but x is on {like.device}")
    if v.numel() == 1 and v.dim() == 0:
        return v.to(like.dtype).expand(G)
    if v.numel() != G:
        raise ValueError(f"{name} must have G={G} values (one per group), got shape {tuple(v.shape)}")
    return v.reshape(G).to(like.dtype)


def check_mmd_args(x, y, group_size, scale, weight, eps, kernel, reduction):
    """Validate mmd_loss arguments (shared by every backend); returns G."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be tensors")
    if x.shape != y.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on one device, got x on {x.device} and y on {y.device}")
    if not x.is_floating_point() or not y.is_floating_point():
        raise TypeError(f"x and y must be floating point, got {x.dtype} and {y.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if x.shape[0] % group_size:
        raise ValueError(f"group_size={group_size} must divide the batch size B={x.shape[0]}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {KERNELS}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    G = x.shape[0] // group_size
    for name, v in (("scale", scale), ("weight", weight)):
        if isinstance(v, torch.Tensor):
            if v.device != x.device:
                raise ValueError(f"{name} is on {v.device} but x is on {x.device}")
            if v.numel() != G and v.dim() != 0:
                raise ValueError(f"{name} must have G={G} values (one per group), got shape {tuple(v.shape)}")
        elif v is not None and not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a float or a tensor of shape ({G},), got {type(v).__name__}")
    return G


def mmd_loss_ref(x, y, group_size, scale=1.0, weight=None, eps=1e-4, kernel="laplace",
                 normalize_dim=True, reduction="mean"):
    """Grouped MMD^2 (V-statistic), the straightforward torch.cdist version.

    x, y: (B, ...) with B = G*M; each row flattened to D values.
    k(a, b) = exp(-scale_g * max(||a-b||_2, eps) / D)      kernel="laplace"
    k(a, b) = exp(-scale_g * max(||a-b||_2^2, eps^2) / D)  kernel="rbf"
    (D -> 1 when normalize_dim is False.)
    MMD2_g = (1/M^2) sum_ij [k(x_i, x_j) + k(y_i, y_j) - 2 k(x_i, y_j)]
    reduction: "mean" -> mean_g(weight_g MMD2_g); "sum" -> sum_g(...); "none" -> the (G,) vector weight_g MMD2_g.
    Distances come from differences (cdist without the matrix-product shortcut), which does not cancel when
    particles are close.
    """
    G = check_mmd_args(x, y, group_size, scale, weight, eps, kernel, reduction)
    M = group_size
    X = x.reshape(G, M, -1)  # (G, M, D)
    Y = y.reshape(G, M, -1)  # (G, M, D)
    D = X.shape[-1] if normalize_dim else 1
    dt = torch.promote_types(x.dtype, y.dtype)
    X, Y = X.to(dt), Y.to(dt)
    s = _as_group_vector(scale, G, "scale", X).view(G, 1, 1)  # (G, 1, 1)

    def k(a, b):
        d = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")  # (G, M, M)
        d = d.clamp_min(eps) if kernel == "laplace" else (d * d).clamp_min(eps * eps)
        return torch.exp(-s * d / D)

    mmd2 = (k(X, X) + k(Y, Y) - 2 * k(X, Y)).mean(dim=(1, 2))  # (G,)
    if weight is not None:
        mmd2 = mmd2 * _as_group_vector(weight, G, "weight", mmd2)
    if reduction == "mean":
        return mmd2.mean()
    if reduction == "sum":
        return mmd2.sum()
    return mmd2


@torch.no_grad()
def mmd_terms(x, y, group_size, scale=1.0, eps=1e-4, kernel="laplace", normalize_dim=True):
    """Per-group diagnostics (G, 3): the kernel means student-student, target-target and cross."""
    G = check_mmd_args(x, y, group_size, scale, None, eps, kernel, "none")
    X = x.reshape(G, group_size, -1).float()
    Y = y.reshape(G, group_size, -1).float()
    D = X.shape[-1] if normalize_dim else 1
    s = _as_group_vector(scale, G, "scale", X).view(G, 1, 1)

    def kmean(a, b):
        d = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
        d = d.clamp_min(eps) if kernel == "laplace" else (d * d).clamp_min(eps * eps)
        return torch.exp(-s * d / D).mean(dim=(1, 2))

    return torch.stack([kmean(X, X), kmean(Y, Y), kmean(X, Y)], dim=1)


def mmd_loss(x, y, group_size, scale=1.0, weight=None, eps=1e-4, kernel="laplace", normalize_dim=True,
             reduction="mean", backend=None):
    """Grouped Laplace/RBF-kernel MMD^2 between x (student) and y (target); see mmd_loss_ref for the formula.

    backend: None (auto: the fastest available for the tensors' device), "torch" (the reference),
    "triton", "cpp" or "cuda". IMM_FAST_BACKEND overrides auto. Gradients flow to x and y when they require grad.
    """
    from .. import _backend

    _backend.requested(backend, ("torch",))
    return mmd_loss_ref(x, y, group_size, scale, weight, eps, kernel, normalize_dim, reduction)
