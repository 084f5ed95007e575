"""DiT self-attention from the packed QKV projection.

Shapes: B batch, T tokens, H heads, Dh head dim, C = H*Dh. qkv (B, T, 3*C) laid out as (3, H, Dh) per token.
The fused path (kernels/attention.py) reads q, k, v straight from qkv and writes (B, T, C): no permute copies.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _backend

# Auto dispatch on CUDA: (Dh, dtype) -> "triton" or "torch" (SDPA), whichever was measured faster for the whole
# forward+backward step (`python benchmarks/bench_attention.py --table` prints these entries). Device numbers are
# pending (no GPU in the task that wrote the kernel), so every entry is the conservative "torch" until measured:
# never a slower default.
_CUDA_TABLE = {
    (64, torch.bfloat16): "torch",
    (64, torch.float16): "torch",
    (72, torch.bfloat16): "torch",
    (72, torch.float16): "torch",
}


def attention_ref(qkv, num_heads, qk_norm=None, scale=None, qk_norm_eps=1e-5):
    """The reference DiT (timm) attention: split + permute, optional LayerNorm on q and k, SDPA, transpose back.

    qkv: (B, T, 3*C). qk_norm: None or (q_weight, q_bias, k_weight, k_bias), each (Dh,), a LayerNorm over Dh
    with eps qk_norm_eps. scale: None -> 1/sqrt(Dh). Returns (B, T, C).
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    Dh = C // num_heads
    q, k, v = qkv.reshape(B, T, 3, num_heads, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, Dh)
    if qk_norm is not None:
        qw, qb, kw, kb = qk_norm
        q = F.layer_norm(q, (Dh,), qw, qb, qk_norm_eps)
        k = F.layer_norm(k, (Dh,), kw, kb, qk_norm_eps)
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, H, T, Dh)
    return o.transpose(1, 2).reshape(B, T, C)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops (so torch.compile traces the fused path as one opaque node each way)
#
# Launcher contract: a backend registers launcher(device_type) -> (attention_fwd, attention_bwd) with
#   attention_fwd(qkv, num_heads, norm, scale, eps) -> (o (B, T, C), lse (B, H, T) fp32 natural-log logsumexp)
#   attention_bwd(do, qkv, o, lse, num_heads, norm, scale, eps) -> (dqkv, dqw, dqb, dkw, dkb)
# norm: None or (qw, qb, kw, kb), each fp32 (Dh,); dqkv (B, T, 3C) in qkv's dtype, contiguous; the qk-norm
# gradients fp32 (Dh,), or _backend.absent(qkv, fp32) without qk-norm. Every output is a fresh, distinct tensor.

@torch.library.custom_op("imm_fast::attention_fwd", mutates_args=())
def _attention_fwd_op(qkv: torch.Tensor, num_heads: int, qw: Optional[torch.Tensor], qb: Optional[torch.Tensor],
                      kw: Optional[torch.Tensor], kb: Optional[torch.Tensor], scale: float,
                      eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    attention_fwd, _ = _backend.launcher("attention", backend, qkv.device.type)
    norm = None if qw is None else (qw, qb, kw, kb)
    return attention_fwd(qkv, num_heads, norm, scale, eps)


@_attention_fwd_op.register_fake
def _(qkv, num_heads, qw, qb, kw, kb, scale, eps, backend):
    B, T, C3 = qkv.shape
    return qkv.new_empty((B, T, C3 // 3)), qkv.new_empty((B, num_heads, T), dtype=torch.float32)


@torch.library.custom_op("imm_fast::attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, num_heads: int,
                      qw: Optional[torch.Tensor], qb: Optional[torch.Tensor], kw: Optional[torch.Tensor],
                      kb: Optional[torch.Tensor], scale: float, eps: float,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dqkv, dqw, dqb, dkw, dkb): the qk-norm gradients fp32 (Dh,) with qk-norm, else _backend.absent."""
    _, attention_bwd = _backend.launcher("attention", backend, qkv.device.type)
    norm = None if qw is None else (qw, qb, kw, kb)
    return tuple(attention_bwd(do, qkv, o, lse, num_heads, norm, scale, eps))


@_attention_bwd_op.register_fake
def _(do, qkv, o, lse, num_heads, qw, qb, kw, kb, scale, eps, backend):
    dqkv = qkv.new_empty(qkv.shape)  # contiguous, as the kernel writes it
    if qw is None:
        return (dqkv,) + tuple(_backend.absent(qkv, torch.float32) for _ in range(4))
    return (dqkv,) + tuple(qkv.new_empty((qw.shape[0],), dtype=torch.float32) for _ in range(4))


def _setup_context(ctx, inputs, output):
    qkv, num_heads, qw, qb, kw, kb, scale, eps, backend = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse, qw, qb, kw, kb)
    ctx.num_heads, ctx.scale, ctx.eps, ctx.backend = num_heads, scale, eps, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, dlse):
    qkv, o, lse, qw, qb, kw, kb = ctx.saved_tensors
    grads = _attention_bwd_op(do, qkv, o, lse, ctx.num_heads, qw, qb, kw, kb, ctx.scale, ctx.eps, ctx.backend)
    dnorm = [None] * 4
    if qw is not None:
        dnorm = [g.to(w.dtype) for g, w in zip(grads[1:], (qw, qb, kw, kb))]
    return (grads[0], None, *dnorm, None, None, None)


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------

def _check_args(qkv, num_heads, qk_norm, scale, qk_norm_eps):
    """Validate (shared by every backend); returns Dh."""
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a tensor, got {type(qkv).__name__}")
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be (B, T, 3*C), got shape {tuple(qkv.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if qkv.shape[-1] % (3 * num_heads) or qkv.shape[-1] == 0:
        raise ValueError(f"qkv's last dim {qkv.shape[-1]} must be 3 * num_heads * Dh with num_heads={num_heads}")
    Dh = qkv.shape[-1] // (3 * num_heads)
    if qk_norm is not None:
        if not isinstance(qk_norm, (tuple, list)) or len(qk_norm) != 4:
            raise TypeError("qk_norm must be None or a tuple (q_weight, q_bias, k_weight, k_bias)")
        for name, t in zip(("q_weight", "q_bias", "k_weight", "k_bias"), qk_norm):
            if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (Dh,)):
                raise ValueError(f"qk_norm {name} must be None or a tensor of shape ({Dh},), got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be None or a finite float, got {scale!r}")
    if not (isinstance(qk_norm_eps, (int, float)) and qk_norm_eps > 0):
        raise ValueError(f"qk_norm_eps must be a positive float, got {qk_norm_eps!r}")
    return Dh


def _triton_limits(args):
    if not _backend.has_triton():
        return []  # `ready` says so
    from ..kernels.attention import dtype_problem, head_dim_problem

    return [w for w in (head_dim_problem(args.get("Dh")), dtype_problem(args.dtype, args.device)) if w]


def _triton_auto_skip(args):
    if args.device == "cpu":
        return _backend.interpreter_not_auto(args)
    if _CUDA_TABLE.get((args.get("Dh"), args.dtype), "torch") != "triton":
        return f"SDPA is measured as fast or faster for (Dh={args.get('Dh')}, {args.dtype}) (see _CUDA_TABLE)"
    return None


def _triton_launchers(device_type):
    from ..kernels.attention import attention_bwd, attention_fwd

    return attention_fwd, attention_bwd


_backend.register("attention", _backend.Impl(
    "triton", devices=("cuda", "cpu"), dtypes=_backend.KERNEL_DTYPES, ready=_backend.triton_ready,
    limits=_triton_limits, auto_skip=_triton_auto_skip, launcher=_triton_launchers))


def attention(qkv, num_heads, qk_norm=None, scale=None, qk_norm_eps=1e-5, backend=None):
    """Multi-head self-attention of the DiT block from the packed QKV projection; same math as attention_ref.

    qkv (B, T, 3*C) -> (B, T, C). qk_norm: None or (q_weight, q_bias, k_weight, k_bias), each (Dh,) (None
    entries mean weight 1 / bias 0), a LayerNorm over Dh with eps qk_norm_eps. scale: None -> 1/sqrt(Dh).
    backend: None (auto: on CUDA the faster of triton and SDPA for (Dh, dtype), see _CUDA_TABLE; on CPU
    "torch"), "torch" (attention_ref), "triton" (the fused kernel; Dh a multiple of 8 up to 128; on CPU only
    under TRITON_INTERPRET=1) or another name of imm_fast._backend.names("attention"); chosen by
    imm_fast._backend's one rule (argument > IMM_FAST_BACKEND > auto).
    """
    Dh = _check_args(qkv, num_heads, qk_norm, scale, qk_norm_eps)
    impl = _backend.select("attention", backend, qkv.device.type, qkv.dtype, Dh=Dh)
    if impl == "torch":
        return attention_ref(qkv, num_heads, qk_norm, scale, qk_norm_eps)
    if qk_norm is None:
        qw = qb = kw = kb = None
    else:
        ones = lambda: qkv.new_ones(Dh, dtype=torch.float32)  # noqa: E731
        zeros = lambda: qkv.new_zeros(Dh, dtype=torch.float32)  # noqa: E731
        qw, qb, kw, kb = (t if t is not None else (ones() if i % 2 == 0 else zeros()) for i, t in enumerate(qk_norm))
    scale = 1.0 / math.sqrt(Dh) if scale is None else float(scale)
    o, _ = _attention_fwd_op(qkv, num_heads, qw, qb, kw, kb, scale, float(qk_norm_eps), impl)
    return o
