"""Every registered backend, for the op tests: parametrize over `kernel_backends(op)` (read from the registry, so
a backend registered before collection is tested without editing any list) and skip a case a backend cannot
run here with its own reasons (`skip_unless_runs`).

Also the "toy" backend of each op: launchers with the op's launcher contract written in plain torch (fp32 inside),
used by tests/test_backend.py to show that a new backend is one registration and that the op tests pick it up.
Shapes: B batch, T tokens, C width, H heads, Dh head dim.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from imm_fast import _backend

TOY = "toy"


def kernel_backends(op: str):
    """op's registered backends except the reference "torch", in auto order."""
    import imm_fast.ops.adaln  # noqa: F401  (each op module registers its backends when imported)
    import imm_fast.ops.attention  # noqa: F401
    import imm_fast.ops.mmd  # noqa: F401

    return [n for n in _backend.names(op) if n != "torch"]


def skip_unless_runs(op: str, backend: str, device, dtype=torch.float32, **facts) -> None:
    """pytest.skip with backend's own reasons when it cannot run op on these tensors here."""
    why = _backend.reasons(op, _backend.op_args(device, dtype, **facts)).get(backend, ["not registered"])
    if why:
        pytest.skip(f"{backend} cannot run {op} on {torch.device(device).type} {dtype} here: {'; '.join(why)}")


# ----------------------------------------------------------------------------------------------------------------
# The toy backend: the launcher contracts of imm_fast/ops/adaln.py and attention.py in plain torch

def _toy_adaln_fwd(x, gate, y, shift, scale, eps, has_res, has_norm, xnew_dtype, out_dtype):
    absent = _backend.absent
    xnew = (x.float() + gate.float().unsqueeze(1) * y.float()).to(xnew_dtype) if has_res else absent(x, xnew_dtype)
    if not has_norm:
        return xnew, absent(x, xnew_dtype), absent(x, xnew_dtype), absent(x, xnew_dtype)
    h = (xnew if has_res else x).float()  # (B, T, C)
    mean = h.mean(-1)  # (B, T)
    rstd = torch.rsqrt(h.var(-1, unbiased=False) + eps)  # (B, T)
    xhat = (h - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    out = xhat * (1 + scale.float().unsqueeze(1)) + shift.float().unsqueeze(1)
    return xnew, out.to(out_dtype), mean, rstd


def _toy_adaln_bwd(dout, dxnew, xn, y, gate, scale, mean, rstd, has_res, has_norm, x_dtype):
    ref = xn if xn is not None else y
    B, T, C = ref.shape
    d = dxnew.to(torch.float32, copy=True) if dxnew is not None else ref.new_zeros((B, T, C), dtype=torch.float32)
    dshift = dscale = None
    if has_norm:  # LayerNorm backward from the saved statistics
        xhat = (xn.float() - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
        g = dout.float() * (1 + scale.float().unsqueeze(1))
        d = d + rstd.unsqueeze(-1) * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
        dshift, dscale = dout.float().sum(1), (dout.float() * xhat).sum(1)
    dx = d.to(x_dtype)

    def absent():
        return _backend.absent(dx)

    dgate = (d * y.float()).sum(1) if has_res else absent()
    dy = (d * gate.float().unsqueeze(1)).to(y.dtype) if has_res else absent()
    return dx, dgate, dy, dshift if has_norm else absent(), dscale if has_norm else absent()


def _toy_qk(qkv, num_heads, norm, eps):
    """q, k, v (B, H, T, Dh) fp32 and, with qk-norm, the normalized q^, k^ and their rstd (B, H, T, 1)."""
    B, T, C3 = qkv.shape
    Dh = C3 // (3 * num_heads)
    q, k, v = qkv.float().reshape(B, T, 3, num_heads, Dh).permute(2, 0, 3, 1, 4).unbind(0)
    if norm is None:
        return q, k, v, None

    def hat(z):
        rstd = torch.rsqrt(z.var(-1, unbiased=False, keepdim=True) + eps)
        return (z - z.mean(-1, keepdim=True)) * rstd, rstd

    (qh, rq), (kh, rk) = hat(q), hat(k)
    qw, qb, kw, kb = (t.float() for t in norm)
    return qh * qw + qb, kh * kw + kb, v, (qh, rq, kh, rk)


def _toy_attention_fwd(qkv, num_heads, norm, scale, eps):
    B, T, C3 = qkv.shape
    q, k, v, _ = _toy_qk(qkv, num_heads, norm, eps)
    s = q @ k.transpose(-1, -2) * scale  # (B, H, T, T)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, T)
    o = torch.exp(s - lse.unsqueeze(-1)) @ v  # (B, H, T, Dh)
    return o.transpose(1, 2).reshape(B, T, C3 // 3).to(qkv.dtype), lse


def _toy_attention_bwd(do, qkv, o, lse, num_heads, norm, scale, eps):
    B, T, C3 = qkv.shape
    q, k, v, hats = _toy_qk(qkv, num_heads, norm, eps)
    dO = do.float().reshape(B, T, num_heads, -1).transpose(1, 2)  # (B, H, T, Dh)
    p = torch.exp(q @ k.transpose(-1, -2) * scale - lse.unsqueeze(-1))  # (B, H, T, T)
    dv = p.transpose(-1, -2) @ dO
    dp = dO @ v.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
    dq, dk = ds @ k, ds.transpose(-1, -2) @ q
    dnorm = [_backend.absent(qkv, torch.float32) for _ in range(4)]
    if hats is not None:  # LayerNorm over Dh (weights w, biases b) backward
        qh, rq, kh, rk = hats
        qw, kw = norm[0].float(), norm[2].float()
        dnorm = [(dq * qh).sum((0, 1, 2)), dq.sum((0, 1, 2)), (dk * kh).sum((0, 1, 2)), dk.sum((0, 1, 2))]

        def ln_bwd(dy, h, rstd):
            return rstd * (dy - dy.mean(-1, keepdim=True) - h * (dy * h).mean(-1, keepdim=True))

        dq, dk = ln_bwd(dq * qw, qh, rq), ln_bwd(dk * kw, kh, rk)
    dqkv = torch.stack([dq, dk, dv]).permute(1, 3, 0, 2, 4).reshape(B, T, C3)  # (3, B, H, T, Dh) -> (B, T, 3C)
    return (dqkv.to(qkv.dtype).contiguous(), *dnorm)


TOY_LAUNCHERS = {
    "adaln": (_toy_adaln_fwd, _toy_adaln_bwd),
    "attention": (_toy_attention_fwd, _toy_attention_bwd),
}


def register_toys(calls=None) -> None:
    """Register the toy backend for adaln and attention (CPU, any floating dtype); calls, if given, collects
    (op, device type) each time a custom op asks for a toy launcher."""
    for op, pair in TOY_LAUNCHERS.items():
        def launcher(device_type, op=op, pair=pair):
            if calls is not None:
                calls.append((op, device_type))
            return pair

        _backend.register(op, _backend.Impl(TOY, devices=("cpu",), launcher=launcher))


@contextlib.contextmanager
def toys(calls=None):
    """The toy backends registered for the duration of the block."""
    kernel_backends("adaln")  # the op modules first: their own backends keep their places
    register_toys(calls)
    try:
        yield
    finally:
        for op in TOY_LAUNCHERS:
            _backend.unregister(op, TOY)

