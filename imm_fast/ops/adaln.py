"""DiT adaLN ops: LayerNorm (no affine) + modulate, the gated residual, and both fused at a block boundary.

Shapes: B batch, T tokens, C width. x, y (B, T, C); shift/scale/gate (B, C), often strided views from
`.chunk(6, dim=1)` (used without copies). Layering: `<op>_ref` (pure torch, the spec) | kernels/adaln.py
(`_adaln_fwd_kernel`/`_adaln_bwd_kernel`, launchers `adaln_fwd`/`adaln_bwd`) | custom ops imm_fast::adaln_fwd and
imm_fast::adaln_bwd (fake impls + autograd), which run the chosen backend's launchers (`_backend.launcher`) | the
public functions with backend dispatch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend


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


# ----------------------------------------------------------------------------------------------------------------
# Custom ops (the kernels behind one schema; absent inputs select the op: gate/y -> residual, shift/scale -> norm)
#
# Launcher contract: a backend registers launcher(device_type) -> (adaln_fwd, adaln_bwd) with
#   adaln_fwd(x, gate, y, shift, scale, eps, has_res, has_norm, xnew_dtype, out_dtype) -> (x_new, out, mean, rstd)
#   adaln_bwd(dout, dxnew, xn, y, gate, scale, mean, rstd, has_res, has_norm, x_dtype)
#       -> (dx, dgate, dy, dshift, dscale)
# x, y, x_new, out (B, T, C); gate, shift, scale (B, C), maybe strided; mean, rstd (B, T) fp32 statistics of the
# LayerNorm input (x_new with the residual, else x); dgate, dshift, dscale fp32 (B, C); xn is that LayerNorm
# input (None without the norm). Every output is a fresh tensor; one that does not apply is _backend.absent
# (x_new's dtype in the forward, x_dtype in the backward), a distinct tensor per output.
# ----------------------------------------------------------------------------------------------------------------
_empty = _backend.absent  # outputs not asked for (one convention for every launcher and fake)


def _dtypes(x, gate, y, shift, scale):
    """Result dtypes as torch's type promotion gives them in the reference."""
    xnew_dtype = torch.promote_types(torch.promote_types(x.dtype, gate.dtype), y.dtype) if gate is not None else x.dtype
    out_dtype = None
    if shift is not None:
        out_dtype = torch.promote_types(torch.promote_types(xnew_dtype, shift.dtype), scale.dtype)
    return xnew_dtype, out_dtype


@torch.library.custom_op("imm_fast::adaln_fwd", mutates_args=())
def _adaln_fwd_op(x: Tensor, gate: Optional[Tensor], y: Optional[Tensor], shift: Optional[Tensor],
                  scale: Optional[Tensor], eps: float, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    adaln_fwd, _ = _backend.launcher("adaln", backend, x.device.type)
    has_res, has_norm = gate is not None, shift is not None
    xnew_dtype, out_dtype = _dtypes(x, gate, y, shift, scale)
    xnew, out, mean, rstd = adaln_fwd(x.to(xnew_dtype) if has_res else x, gate, y, shift, scale, eps, has_res,
                                      has_norm, xnew_dtype, out_dtype)
    return xnew, out, mean, rstd


@_adaln_fwd_op.register_fake
def _(x, gate, y, shift, scale, eps, backend):
    B, T, C = x.shape
    xnew_dtype, out_dtype = _dtypes(x, gate, y, shift, scale)

    def none():  # as the launcher: absent(the kernel's x, in x_new's dtype), a new tensor each time
        return _empty(x, xnew_dtype)

    xnew = x.new_empty((B, T, C), dtype=xnew_dtype) if gate is not None else none()
    if shift is None:
        return xnew, none(), none(), none()
    return (xnew, x.new_empty((B, T, C), dtype=out_dtype), x.new_empty((B, T), dtype=torch.float32),
            x.new_empty((B, T), dtype=torch.float32))


@torch.library.custom_op("imm_fast::adaln_bwd", mutates_args=())
def _adaln_bwd_op(dout: Optional[Tensor], dxnew: Optional[Tensor], xn: Optional[Tensor], y: Optional[Tensor],
                  gate: Optional[Tensor], scale: Optional[Tensor], mean: Optional[Tensor], rstd: Optional[Tensor],
                  x_dtype: torch.dtype, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    ref = xn if xn is not None else y
    _, adaln_bwd = _backend.launcher("adaln", backend, ref.device.type)
    has_res, has_norm = gate is not None, scale is not None
    dx, dgate, dy, dshift, dscale = adaln_bwd(dout, dxnew, xn, y, gate, scale, mean, rstd, has_res, has_norm,
                                              x_dtype)
    return dx, dgate, dy, dshift, dscale


@_adaln_bwd_op.register_fake
def _(dout, dxnew, xn, y, gate, scale, mean, rstd, x_dtype, backend):
    ref = xn if xn is not None else y
    B, T, C = ref.shape

    def vec(present):  # a per-sample fp32 sum, or absent(dx) as the real op returns it; a new tensor each time
        return ref.new_empty((B, C), dtype=torch.float32) if present else _empty(ref, x_dtype)

    dy = ref.new_empty((B, T, C), dtype=y.dtype) if y is not None else _empty(ref, x_dtype)
    return (ref.new_empty((B, T, C), dtype=x_dtype), vec(gate is not None), dy, vec(scale is not None),
            vec(scale is not None))


def _setup_context(ctx, inputs, output):
    x, gate, y, shift, scale, eps, backend = inputs
    xnew, out, mean, rstd = output
    ctx.has_res, ctx.has_norm, ctx.backend = gate is not None, shift is not None, backend
    ctx.dtypes = (x.dtype, None if gate is None else gate.dtype, None if shift is None else shift.dtype,
                  None if scale is None else scale.dtype)
    # The LayerNorm input: x_new (an output, so saving it is free) or x itself.
    xn = (xnew if ctx.has_res else x) if ctx.has_norm else None
    ctx.save_for_backward(xn, y, gate, scale, mean if ctx.has_norm else None, rstd if ctx.has_norm else None)
    ctx.set_materialize_grads(False)


def _backward(ctx, d_xnew, d_out, d_mean, d_rstd):
    xn, y, gate, scale, mean, rstd = ctx.saved_tensors
    x_dtype, gate_dtype, shift_dtype, scale_dtype = ctx.dtypes
    if ctx.has_norm and d_out is None:  # the modulated output went unused
        d_out = torch.zeros_like(xn)
    if not ctx.has_res:
        d_xnew = None
    if d_out is None and d_xnew is None:
        return None, None, None, None, None, None, None
    dx, dgate, dy, dshift, dscale = torch.ops.imm_fast.adaln_bwd(
        d_out if ctx.has_norm else None, d_xnew, xn, y, gate, scale, mean, rstd, x_dtype, ctx.backend)
    return (dx, dgate.to(gate_dtype) if ctx.has_res else None, dy if ctx.has_res else None,
            dshift.to(shift_dtype) if ctx.has_norm else None, dscale.to(scale_dtype) if ctx.has_norm else None,
            None, None)


_adaln_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------
def _check(x, y=None, **vecs):
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (B, T, C) tensor, got {getattr(x, 'dtype', type(x).__name__)} "
                         f"of shape {tuple(getattr(x, 'shape', ()))}")
    B, T, C = x.shape
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(getattr(y, 'shape', ()))}")
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}")
    for name, v in vecs.items():
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != (B, C):
            raise ValueError(f"{name} must be a (B, C) = ({B}, {C}) tensor, got {tuple(getattr(v, 'shape', ()))}")
        if v.device != x.device:
            raise ValueError(f"{name} is on {v.device} but x is on {x.device}")


def _triton_launchers(device_type):
    from ..kernels.adaln import adaln_bwd, adaln_fwd

    return adaln_fwd, adaln_bwd


def _triton_limits(args):
    if args.device == "cpu" or not _backend.has_triton():
        return []  # the interpreter takes any width; without triton `ready` says so
    from ..kernels.adaln import width_problem

    why = width_problem(args.get("C"), args.device)
    return [why] if why else []


_backend.register("adaln", _backend.Impl("triton", devices=("cuda", "cpu"), dtypes=_backend.KERNEL_DTYPES,
                                         ready=_backend.triton_ready, limits=_triton_limits,
                                         auto_skip=_backend.interpreter_not_auto,
                                         launcher=_triton_launchers))


def _pick(backend, x, *vecs) -> str:
    """The rule of imm_fast._backend (argument > IMM_FAST_BACKEND > auto) for these tensors."""
    dtype = x.dtype
    for v in vecs:
        dtype = torch.promote_types(dtype, v.dtype)
    return _backend.select("adaln", backend, x.device.type, dtype, C=x.shape[-1])


def adaln_modulate(x, shift, scale, eps=1e-6, backend=None):
    """LayerNorm(x, no affine) * (1 + scale[:, None]) + shift[:, None] in one pass; backend None (auto) or a
    name of imm_fast._backend.names("adaln") ("torch": the reference)."""
    _check(x, shift=shift, scale=scale)
    impl = _pick(backend, x, shift, scale)
    if impl == "torch":
        return adaln_modulate_ref(x, shift, scale, eps)
    return torch.ops.imm_fast.adaln_fwd(x, None, None, shift, scale, float(eps), impl)[1]


def gated_residual(x, gate, y, backend=None):
    """x + gate[:, None] * y in one pass."""
    _check(x, y, gate=gate)
    impl = _pick(backend, x, gate, y)
    if impl == "torch":
        return gated_residual_ref(x, gate, y)
    return torch.ops.imm_fast.adaln_fwd(x, gate, y, None, None, 0.0, impl)[0]


def gated_residual_adaln(x, gate, y, shift, scale, eps=1e-6, backend=None):
    """(x_new, adaln_modulate(x_new, shift, scale)), x_new = x + gate[:, None] * y: a block boundary in one pass."""
    _check(x, y, gate=gate, shift=shift, scale=scale)
    impl = _pick(backend, x, gate, y, shift, scale)
    if impl == "torch":
        return gated_residual_adaln_ref(x, gate, y, shift, scale, eps)
    xnew, out, _, _ = torch.ops.imm_fast.adaln_fwd(x, gate, y, shift, scale, float(eps), impl)
    return xnew, out
