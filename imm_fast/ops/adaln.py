"""DiT adaLN ops: LayerNorm (no affine) + modulate, and the gated residual.

Shapes: B batch, T tokens, C width. shift/scale/gate are (B, C), often strided views from `.chunk(6, dim=1)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def adaln_modulate_ref(x, shift, scale, eps=1e-6):
    """LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]; x (B, T, C), shift/scale (B, C)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual_ref(x, gate, y):
    """x + gate[:, None] * y; x, y (B, T, C), gate (B, C)."""
    return x + gate.unsqueeze(1) * y


def gated_residual_adaln_ref(x, gate, y, shift, scale, eps=1e-6):
    """(x_new, adaln_modulate(x_new, shift, scale)) with x_new = x + gate[:, None] * y."""
    x_new = gated_residual_ref(x, gate, y)
    return x_new, adaln_modulate_ref(x_new, shift, scale, eps)


def adaln_modulate(x, shift, scale, eps=1e-6, backend=None):
    from .. import _backend

    _backend.requested(backend, ("torch",))
    return adaln_modulate_ref(x, shift, scale, eps)


def gated_residual(x, gate, y, backend=None):
    from .. import _backend

    _backend.requested(backend, ("torch",))
    return gated_residual_ref(x, gate, y)


def gated_residual_adaln(x, gate, y, shift, scale, eps=1e-6, backend=None):
    from .. import _backend

    _backend.requested(backend, ("torch",))
    return gated_residual_adaln_ref(x, gate, y, shift, scale, eps)
