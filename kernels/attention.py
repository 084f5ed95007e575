"""Triton flash attention that reads q, k, v straight from the packed QKV projection (no permute copies).

Shapes: B batch, T tokens, H heads, Dh head dim (any multiple of 8 up to 128), C = H*Dh.
  qkv  (B, T, 3*C)  the Linear output as it comes; per token laid out as (3, H, Dh): q of head h at column
                    h*Dh, k at C + h*Dh, v at 2*C + h*Dh. Batch and token strides are arguments, last dim stride 1.
  o    (B, T, C)    head h at columns h*Dh: ready for the output projection.
  lse  (B, H, T)    fp32 natural-log logsumexp of the scaled scores of each query row (saved for backward).
  dqkv (B, T, 3*C)  written packed, in qkv's layout.
Optional qk-norm: LayerNorm over Dh on q and on k (weights (Dh,)), computed in fp32 on load, fused in.

Forward: one program per (head, query block), flash-attention-2 online softmax in the log2 domain (exp2, the softmax
scale folded into qk_scale = scale*log2(e)), fp32 accumulation. The head dim is held as one power-of-two tile
(BLOCK_D0 >= Dh) or, where that wastes more, as two (SPLIT: 72 = 64 + 16, 96 = 64 + 32, 40 = 32 + 16) whose dot
products add up; columns >= Dh load as zeros under masks and are never stored. Dh is a compile-time constant so
the column masks and the head offsets h*Dh keep 16-byte vector loads.
Backward (FA2 structure, no atomics, deterministic): delta = rowsum(dO*O); a dK/dV kernel per key block looping
over query blocks; a dQ kernel per query block looping over key blocks. The qk-norm LayerNorm backward runs in
the epilogue of those kernels; weight/bias gradients are written as per-program partial sums and reduced after.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._backend import KERNEL_DTYPES  # the dtypes the registry declares for these kernels
from ._launch import device_guard
from ._launch import target_arch as _target_arch

LOG2E = 1.4426950408889634  # log2(e): scores go to the log2 domain (exp2), launchers fold it into qk_scale
_LOG2E = tl.constexpr(LOG2E)  # the same, usable inside kernels
_LN2 = tl.constexpr(1.0 / LOG2E)  # ln(2): log2-domain logsumexp back to natural log


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """a @ b with fp32 accumulation."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _load_tile(ptr, rows, row_stride, mask_rows, cols, Dh):
    """ptr[rows * row_stride + cols] as a (R, D) tile; rows >= T and cols >= Dh read as 0."""
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask_rows[:, None] & (cols < Dh)[None, :],
                   other=0.0)


@triton.jit
def _store_tile(ptr, rows, row_stride, mask_rows, cols, Dh, x):
    tl.store(ptr + rows[:, None] * row_stride + cols[None, :], x.to(ptr.dtype.element_ty),
             mask=mask_rows[:, None] & (cols < Dh)[None, :])


@triton.jit
def _program(T, H, BLOCK: tl.constexpr):
    """Decode the flat grid: (pid, pid_bh, b, h, block). Blocks of one (b, h) are adjacent, so they share its K/V
    in L2; one grid axis has no 65535 limit on B*H."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(T, BLOCK)
    pid_bh = pid // n_blocks
    return pid, pid_bh, pid_bh // H, pid_bh % H, pid % n_blocks


@triton.jit
def _head_ptrs(QKV, b, h, stride_xb, C, Dh: tl.constexpr):
    """Pointers to q, k and v of head h in batch b at token 0 (packed (3, H, Dh) per token)."""
    q = QKV + b.to(tl.int64) * stride_xb + h * Dh
    return q, q + C, q + 2 * C


@triton.jit
def _load_parts(ptr, rows, row_stride, mask_rows, cols0, cols1, Dh, SPLIT: tl.constexpr):
    """A (R, Dh) tile as its column parts [0, D0) and [D0, D0 + D1); the second is the first unless SPLIT."""
    x0 = _load_tile(ptr, rows, row_stride, mask_rows, cols0, Dh)
    x1 = x0
    if SPLIT:
        x1 = _load_tile(ptr, rows, row_stride, mask_rows, cols1, Dh)
    return x0, x1


@triton.jit
def _dot_parts(a0, b0, a1, b1, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, SPLIT: tl.constexpr):
    """a @ b over a head dim held in one or two column parts (the parts' products add up)."""
    s = _dot(a0, b0, DOT_PRECISION, UPCAST_DOT)
    if SPLIT:
        s += _dot(a1, b1, DOT_PRECISION, UPCAST_DOT)
    return s


@triton.jit
def _ln_fwd(x0, x1, W, Bias, cols0, cols1, Dh, eps, SPLIT: tl.constexpr):
    """LayerNorm over Dh of fp32 rows held in up to two column parts (x1 ignored unless SPLIT).

    Returns (y0, xhat0, y1, xhat1, rstd); masked columns of xhat and y are 0 (W, Bias read as 0 there).
    """
    m0 = cols0 < Dh
    w0 = tl.load(W + cols0, mask=m0, other=0.0).to(tl.float32)
    b0 = tl.load(Bias + cols0, mask=m0, other=0.0).to(tl.float32)
    s = tl.sum(x0, 1)
    if SPLIT:
        m1 = cols1 < Dh
        s += tl.sum(x1, 1)
    mean = s / Dh
    xc0 = tl.where(m0[None, :], x0 - mean[:, None], 0.0)
    var = tl.sum(xc0 * xc0, 1)
    if SPLIT:
        xc1 = tl.where(m1[None, :], x1 - mean[:, None], 0.0)
        var += tl.sum(xc1 * xc1, 1)
    rstd = 1.0 / tl.sqrt(var / Dh + eps)
    h0 = xc0 * rstd[:, None]
    y0 = h0 * w0[None, :] + b0[None, :]
    if SPLIT:
        w1 = tl.load(W + cols1, mask=m1, other=0.0).to(tl.float32)
        b1 = tl.load(Bias + cols1, mask=m1, other=0.0).to(tl.float32)
        h1 = xc1 * rstd[:, None]
        y1 = h1 * w1[None, :] + b1[None, :]
    else:  # placeholders, never used
        h1 = h0
        y1 = y0
    return y0, h0, y1, h1, rstd


@triton.jit
def _load_own_block(ptr, rows, row_stride, mask_rows, cols0, cols1, W, Bias, Dh, eps,
                    HAS_QK_NORM: tl.constexpr, SPLIT: tl.constexpr):
    """A backward program's own q or k block, normalized when HAS_QK_NORM: (x0, x1, xhat0, xhat1, rstd), x in the
    input dtype (the dot operand); xhat, rstd are the LayerNorm's saved values (placeholders without qk-norm)."""
    x0, x1 = _load_parts(ptr, rows, row_stride, mask_rows, cols0, cols1, Dh, SPLIT)
    h0 = x0.to(tl.float32)
    h1 = x1.to(tl.float32)
    rstd = tl.sum(h0, 1)  # placeholder of the right shape; replaced when HAS_QK_NORM
    if HAS_QK_NORM:
        y0, h0, y1, h1, rstd = _ln_fwd(h0, h1, W, Bias, cols0, cols1, Dh, eps, SPLIT)
        x0 = y0.to(x0.dtype)
        x1 = y1.to(x1.dtype)
    return x0, x1, h0, h1, rstd


@triton.jit
def _grad_epilogue(d0, d1, h0, h1, rstd, W, DW, DB, pid, sm_scale, mask_rows, cols0, cols1, Dh,
                   HAS_QK_NORM: tl.constexpr, SPLIT: tl.constexpr):
    """The accumulated dK or dQ block: the softmax scale, then with qk-norm the per-program weight/bias partials
    and the LayerNorm backward. Returns the column parts (d0, d1) to store (d1 = d0 unless SPLIT)."""
    d0 = d0 * sm_scale
    if SPLIT:
        d1 = d1 * sm_scale
    else:
        d1 = d0
    if HAS_QK_NORM:
        _store_norm_partials(DW, DB, pid.to(tl.int64) * Dh, d0, h0, d1, h1, mask_rows, cols0, cols1, Dh, SPLIT)
        d0, d1 = _ln_bwd(d0, h0, d1, h1, rstd, W, cols0, cols1, Dh, SPLIT)
    return d0, d1


@triton.jit
def _ln_apply(x0, x1, W, Bias, cols0, cols1, Dh, eps, SPLIT: tl.constexpr):
    """The normalized rows only, in x's dtype (the dot operand), from raw rows in x's dtype."""
    y0, _, y1, _, _ = _ln_fwd(x0.to(tl.float32), x1.to(tl.float32), W, Bias, cols0, cols1, Dh, eps, SPLIT)
    return y0.to(x0.dtype), y1.to(x0.dtype)


@triton.jit
def _ln_bwd(dy0, h0, dy1, h1, rstd, W, cols0, cols1, Dh, SPLIT: tl.constexpr):
    """d x of y = W*xhat + b from dy (fp32, two column parts as in _ln_fwd) -> (dx0, dx1)."""
    g0 = dy0 * tl.load(W + cols0, mask=cols0 < Dh, other=0.0).to(tl.float32)[None, :]
    mg = tl.sum(g0, 1)
    mgx = tl.sum(g0 * h0, 1)
    if SPLIT:
        g1 = dy1 * tl.load(W + cols1, mask=cols1 < Dh, other=0.0).to(tl.float32)[None, :]
        mg += tl.sum(g1, 1)
        mgx += tl.sum(g1 * h1, 1)
    mg = mg / Dh
    mgx = mgx / Dh
    dx0 = (g0 - mg[:, None] - h0 * mgx[:, None]) * rstd[:, None]
    if SPLIT:
        dx1 = (g1 - mg[:, None] - h1 * mgx[:, None]) * rstd[:, None]
    else:
        dx1 = dx0
    return dx0, dx1


@triton.jit
def _store_norm_partials(DW, DB, part, dy0, h0, dy1, h1, mask_rows, cols0, cols1, Dh, SPLIT: tl.constexpr):
    """Row sums of dy*xhat and dy (this program's share of the LayerNorm weight/bias gradients) -> DW/DB[part]."""
    r = mask_rows[:, None]  # padded rows normalize to the bias and carry a nonzero dy: keep them out
    tl.store(DW + part + cols0, tl.sum(tl.where(r, dy0 * h0, 0.0), 0), mask=cols0 < Dh)
    tl.store(DB + part + cols0, tl.sum(tl.where(r, dy0, 0.0), 0), mask=cols0 < Dh)
    if SPLIT:
        tl.store(DW + part + cols1, tl.sum(tl.where(r, dy1 * h1, 0.0), 0), mask=cols1 < Dh)
        tl.store(DB + part + cols1, tl.sum(tl.where(r, dy1, 0.0), 0), mask=cols1 < Dh)


@triton.jit
def _attention_fwd_kernel(
    QKV,  # (B, T, 3C) packed projection
    O,  # (B, T, C) output, contiguous
    LSE,  # (B, H, T) fp32 logsumexp out, contiguous
    QW, QB, KW, KB,  # (Dh,) qk-norm LayerNorm weight/bias of q and k (read only when HAS_QK_NORM)
    stride_xb, stride_xt,  # qkv strides (elements) of batch and token; the last dim is contiguous
    T, H, C,  # tokens, heads, width H*Dh
    Dh: tl.constexpr,  # head dim: a compile-time constant, so masks and offsets h*Dh keep 16-byte vectors
    qk_scale,  # softmax scale * log2(e)
    eps,  # qk-norm LayerNorm eps
    HAS_QK_NORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), else the default
    UPCAST_DOT: tl.constexpr,  # interpreter only: its tl.dot mishandles bf16, so multiply in fp32 (exact products)
    SPLIT: tl.constexpr,  # head dim in two parts [0, D0) + [D0, D0 + D1) (72 = 64 + 16) instead of one padded
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
):
    pid, pid_bh, b, h, pid_m = _program(T, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    cols0 = tl.arange(0, BLOCK_D0)
    cols1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    mask_m = offs_m < T
    qb_, kb_, vb_ = _head_ptrs(QKV, b, h, stride_xb, C, Dh)
    dt = QKV.dtype.element_ty

    q0, q1 = _load_parts(qb_, offs_m, stride_xt, mask_m, cols0, cols1, Dh, SPLIT)
    if HAS_QK_NORM:
        q0, q1 = _ln_apply(q0, q1, QW, QB, cols0, cols1, Dh, eps, SPLIT)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc0 = tl.zeros((BLOCK_M, BLOCK_D0), tl.float32)
    if SPLIT:
        acc1 = tl.zeros((BLOCK_M, BLOCK_D1), tl.float32)
    for start_n in range(0, T, BLOCK_N):
        n = start_n + offs_n
        mask_n = n < T
        k0, k1 = _load_parts(kb_, n, stride_xt, mask_n, cols0, cols1, Dh, SPLIT)
        v0, v1 = _load_parts(vb_, n, stride_xt, mask_n, cols0, cols1, Dh, SPLIT)
        if HAS_QK_NORM:
            k0, k1 = _ln_apply(k0, k1, KW, KB, cols0, cols1, Dh, eps, SPLIT)
        s = _dot_parts(q0, tl.trans(k0), q1, tl.trans(k1), DOT_PRECISION, UPCAST_DOT, SPLIT)  # (BLOCK_M, BLOCK_N)
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))  # log2 units; each key block has a real key
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(dt)
        acc0 = acc0 * alpha[:, None] + _dot(p, v0, DOT_PRECISION, UPCAST_DOT)
        if SPLIT:
            acc1 = acc1 * alpha[:, None] + _dot(p, v1, DOT_PRECISION, UPCAST_DOT)
        m_i = m_new

    ob_ = O + b.to(tl.int64) * T * C + h * Dh
    _store_tile(ob_, offs_m, C, mask_m, cols0, Dh, acc0 / l_i[:, None])
    if SPLIT:
        _store_tile(ob_, offs_m, C, mask_m, cols1, Dh, acc1 / l_i[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, (m_i + tl.log2(l_i)) * _LN2, mask=mask_m)


@triton.jit
def _attention_bwd_preprocess_kernel(
    O,  # (B, T, C) forward output, contiguous
    DO,  # (B, T, C) output gradient
    Delta,  # (B, H, T) fp32 out: rowsum(dO * O) per head
    stride_dob, stride_dot,  # dO strides (elements) of batch and token; last dim contiguous
    T, H, C,
    Dh: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid, pid_bh, b, h, pid_m = _program(T, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask_m = offs_m < T
    o = _load_tile(O + b.to(tl.int64) * T * C + h * Dh, offs_m, C, mask_m, cols, Dh)
    do = _load_tile(DO + b.to(tl.int64) * stride_dob + h * Dh, offs_m, stride_dot, mask_m, cols, Dh)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * T + offs_m, delta, mask=mask_m)


@triton.jit
def _attention_bwd_dkdv_kernel(
    QKV,  # (B, T, 3C) packed projection (forward input)
    DO,  # (B, T, C) output gradient
    LSE,  # (B, H, T) fp32 forward logsumexp (natural log)
    Delta,  # (B, H, T) fp32 rowsum(dO * O)
    DQKV,  # (B, T, 3C) gradient out, contiguous; this kernel writes the k and v columns
    KW, KB,  # (Dh,) k-norm weight/bias (HAS_QK_NORM)
    QW, QB,  # (Dh,) q-norm weight/bias, to renormalize q blocks (HAS_QK_NORM)
    DKW, DKB,  # (n_programs, Dh) fp32 partial sums of the k-norm weight/bias gradients (HAS_QK_NORM)
    stride_xb, stride_xt,  # qkv strides (elements) of batch and token
    stride_dob, stride_dot,  # dO strides (elements) of batch and token
    T, H, C,
    Dh: tl.constexpr,
    sm_scale,  # softmax scale
    qk_scale,  # softmax scale * log2(e)
    eps,
    HAS_QK_NORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
):
    pid, pid_bh, b, h, pid_n = _program(T, H, BLOCK_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    cols0 = tl.arange(0, BLOCK_D0)
    cols1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    mask_n = offs_n < T
    qb_, kb_, vb_ = _head_ptrs(QKV, b, h, stride_xb, C, Dh)
    dob_ = DO + b.to(tl.int64) * stride_dob + h * Dh
    row_ = pid_bh.to(tl.int64) * T  # this (b, h)'s row of LSE and Delta
    dt = QKV.dtype.element_ty

    k0, k1, kh0, kh1, krstd = _load_own_block(kb_, offs_n, stride_xt, mask_n, cols0, cols1, KW, KB, Dh, eps,
                                              HAS_QK_NORM, SPLIT)
    v0, v1 = _load_parts(vb_, offs_n, stride_xt, mask_n, cols0, cols1, Dh, SPLIT)

    dk0 = tl.zeros((BLOCK_N, BLOCK_D0), tl.float32)
    dv0 = tl.zeros((BLOCK_N, BLOCK_D0), tl.float32)
    dk1 = dk0  # the second column part only when SPLIT
    if SPLIT:
        dk1 = tl.zeros((BLOCK_N, BLOCK_D1), tl.float32)
        dv1 = tl.zeros((BLOCK_N, BLOCK_D1), tl.float32)
    for start_m in range(0, T, BLOCK_M):
        m = start_m + offs_m
        mask_m = m < T
        q0, q1 = _load_parts(qb_, m, stride_xt, mask_m, cols0, cols1, Dh, SPLIT)
        do0, do1 = _load_parts(dob_, m, stride_dot, mask_m, cols0, cols1, Dh, SPLIT)
        if HAS_QK_NORM:
            q0, q1 = _ln_apply(q0, q1, QW, QB, cols0, cols1, Dh, eps, SPLIT)
        lse2 = tl.load(LSE + row_ + m, mask=mask_m, other=0.0) * _LOG2E
        delta = tl.load(Delta + row_ + m, mask=mask_m, other=0.0)
        # Transposed scores (keys x queries), so dK and dV accumulate with plain (N, M) @ (M, D) products.
        sT = _dot_parts(k0, tl.trans(q0), k1, tl.trans(q1), DOT_PRECISION, UPCAST_DOT, SPLIT)
        dpT = _dot_parts(v0, tl.trans(do0), v1, tl.trans(do1), DOT_PRECISION, UPCAST_DOT, SPLIT)
        pT = tl.where(mask_m[None, :], tl.exp2(sT * qk_scale - lse2[None, :]), 0.0)  # padded queries: nothing
        dsT = (pT * (dpT - delta[None, :])).to(dt)
        pT = pT.to(dt)
        dv0 += _dot(pT, do0, DOT_PRECISION, UPCAST_DOT)
        dk0 += _dot(dsT, q0, DOT_PRECISION, UPCAST_DOT)
        if SPLIT:
            dv1 += _dot(pT, do1, DOT_PRECISION, UPCAST_DOT)
            dk1 += _dot(dsT, q1, DOT_PRECISION, UPCAST_DOT)
    dk0, dk1 = _grad_epilogue(dk0, dk1, kh0, kh1, krstd, KW, DKW, DKB, pid, sm_scale, mask_n, cols0, cols1, Dh,
                              HAS_QK_NORM, SPLIT)

    db_ = DQKV + b.to(tl.int64) * T * 3 * C + h * Dh
    _store_tile(db_ + C, offs_n, 3 * C, mask_n, cols0, Dh, dk0)
    _store_tile(db_ + 2 * C, offs_n, 3 * C, mask_n, cols0, Dh, dv0)
    if SPLIT:
        _store_tile(db_ + C, offs_n, 3 * C, mask_n, cols1, Dh, dk1)
        _store_tile(db_ + 2 * C, offs_n, 3 * C, mask_n, cols1, Dh, dv1)


@triton.jit
def _attention_bwd_dq_kernel(
    QKV,  # (B, T, 3C) packed projection (forward input)
    DO,  # (B, T, C) output gradient
    LSE,  # (B, H, T) fp32 forward logsumexp (natural log)
    Delta,  # (B, H, T) fp32 rowsum(dO * O)
    DQKV,  # (B, T, 3C) gradient out, contiguous; this kernel writes the q columns
    QW, QB,  # (Dh,) q-norm weight/bias (HAS_QK_NORM)
    KW, KB,  # (Dh,) k-norm weight/bias, to renormalize k blocks (HAS_QK_NORM)
    DQW, DQB,  # (n_programs, Dh) fp32 partial sums of the q-norm weight/bias gradients (HAS_QK_NORM)
    stride_xb, stride_xt,  # qkv strides (elements) of batch and token
    stride_dob, stride_dot,  # dO strides (elements) of batch and token
    T, H, C,
    Dh: tl.constexpr,
    sm_scale,  # softmax scale
    qk_scale,  # softmax scale * log2(e)
    eps,
    HAS_QK_NORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
):
    pid, pid_bh, b, h, pid_m = _program(T, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    cols0 = tl.arange(0, BLOCK_D0)
    cols1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    mask_m = offs_m < T
    qb_, kb_, vb_ = _head_ptrs(QKV, b, h, stride_xb, C, Dh)
    dob_ = DO + b.to(tl.int64) * stride_dob + h * Dh
    row_ = pid_bh.to(tl.int64) * T  # this (b, h)'s row of LSE and Delta
    dt = QKV.dtype.element_ty

    q0, q1, qh0, qh1, qrstd = _load_own_block(qb_, offs_m, stride_xt, mask_m, cols0, cols1, QW, QB, Dh, eps,
                                              HAS_QK_NORM, SPLIT)
    do0, do1 = _load_parts(dob_, offs_m, stride_dot, mask_m, cols0, cols1, Dh, SPLIT)
    lse2 = tl.load(LSE + row_ + offs_m, mask=mask_m, other=0.0) * _LOG2E
    delta = tl.load(Delta + row_ + offs_m, mask=mask_m, other=0.0)

    dq0 = tl.zeros((BLOCK_M, BLOCK_D0), tl.float32)
    dq1 = dq0  # the second column part only when SPLIT
    if SPLIT:
        dq1 = tl.zeros((BLOCK_M, BLOCK_D1), tl.float32)
    for start_n in range(0, T, BLOCK_N):
        n = start_n + offs_n
        mask_n = n < T
        k0, k1 = _load_parts(kb_, n, stride_xt, mask_n, cols0, cols1, Dh, SPLIT)
        v0, v1 = _load_parts(vb_, n, stride_xt, mask_n, cols0, cols1, Dh, SPLIT)
        if HAS_QK_NORM:
            k0, k1 = _ln_apply(k0, k1, KW, KB, cols0, cols1, Dh, eps, SPLIT)
        s = _dot_parts(q0, tl.trans(k0), q1, tl.trans(k1), DOT_PRECISION, UPCAST_DOT, SPLIT)
        dp = _dot_parts(do0, tl.trans(v0), do1, tl.trans(v1), DOT_PRECISION, UPCAST_DOT, SPLIT)
        p = tl.where(mask_n[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)  # padded keys: no probability
        ds = (p * (dp - delta[:, None])).to(dt)
        dq0 += _dot(ds, k0, DOT_PRECISION, UPCAST_DOT)
        if SPLIT:
            dq1 += _dot(ds, k1, DOT_PRECISION, UPCAST_DOT)
    dq0, dq1 = _grad_epilogue(dq0, dq1, qh0, qh1, qrstd, QW, DQW, DQB, pid, sm_scale, mask_m, cols0, cols1, Dh,
                              HAS_QK_NORM, SPLIT)

    db_ = DQKV + b.to(tl.int64) * T * 3 * C + h * Dh
    _store_tile(db_, offs_m, 3 * C, mask_m, cols0, Dh, dq0)
    if SPLIT:
        _store_tile(db_, offs_m, 3 * C, mask_m, cols1, Dh, dq1)


# ----------------------------------------------------------------------------------------------------------------
# Launchers


def _head_split(Dh):
    """(SPLIT, BLOCK_D0, BLOCK_D1): the head dim as one power-of-two tile, or as two (72 -> 64 + 16, 96 -> 64 + 32)
    when that computes fewer padded columns. tl.dot needs >= 16 along every dim."""
    whole = max(16, triton.next_power_of_2(Dh))
    d0 = max(16, 1 << (Dh.bit_length() - 1))  # largest power of two <= Dh
    d1 = max(16, triton.next_power_of_2(Dh - d0)) if Dh > d0 else 0
    if d1 and d0 + d1 < whole:
        return True, d0, d1
    return False, whole, 16  # BLOCK_D1 unused


# Launch configurations (BLOCK_M, BLOCK_N, num_warps, num_stages), keyed by head dim: overrides for tuning
# (`python benchmarks/bench_attention.py --tune` sweeps them and prints entries for these). Not tuned on a GPU
# yet; the defaults below are the ones the compile gate (tests/test_compile_gate.py) finds spill-free and within
# shared memory on each target.
FWD_CONFIGS = {}
BWD_CONFIGS = {}


def _padded_width(Dh):
    sp, d0, d1 = _head_split(Dh)
    return d0 + (d1 if sp else 0)


def _fwd_config(Dh, T, arch=90):
    if Dh in FWD_CONFIGS:
        return FWD_CONFIGS[Dh]
    if arch < 90:  # no wgmma on sm_80: mma.sync accumulators live in registers, so 8 warps share them
        return 64, 32 if _padded_width(Dh) == 96 else 64, 8, 2
    bm = 128 if Dh <= 64 and T > 64 else 64
    return bm, 64, 8 if bm == 128 else 4, 3


def _bwd_config(Dh, T, arch=90, dkdv_norm=False):
    """Blocks of the dQ kernel, and of the dK/dV kernel (BLOCK_N keys held, BLOCK_M queries streamed): the same
    unless dkdv_norm (the dK/dV kernel with qk-norm, whose LayerNorm epilogue adds to the held block's registers).
    sm_80 keeps k, v, dk, dv of its key block in registers: 64 x 64 blocks spilled there (8 KB per thread at
    Dh=72 with qk-norm), so it streams 16 queries past 64 keys, 32 past 32 above 96. sm_90 with qk-norm above
    Dh 64 streams 32 queries in dK/dV (64 spilled 8-24 B)."""
    if Dh in BWD_CONFIGS:
        return BWD_CONFIGS[Dh]
    if arch < 90:
        if dkdv_norm and _dkdv_whole_tile(Dh, arch):
            return 32, 32, 8, 2
        return (16, 64, 8, 2) if _padded_width(Dh) <= 96 else (32, 32, 8, 2)
    if dkdv_norm and _padded_width(Dh) > 64:
        return 32, 64, 8, 2
    return 64, 64, 4 if Dh <= 64 else 8, 2


def _dkdv_whole_tile(Dh, arch):
    """sm_80's dK/dV kernel with qk-norm holds a 64 + 32 column head (Dh 88, 96) as one 128-column tile: split,
    it spilled 8 B per thread under triton 3.6 in every block shape tried; whole, it spills none."""
    return arch < 90 and _padded_width(Dh) == 96


def _dot_args(qkv):
    fp32 = qkv.dtype == torch.float32
    interp = qkv.device.type == "cpu"  # CPU tensors only reach a Triton kernel under TRITON_INTERPRET=1
    return dict(DOT_PRECISION="ieee" if fp32 else "tf32", UPCAST_DOT=interp and qkv.dtype == torch.bfloat16)


def head_dim_problem(Dh: int):
    """The kernels' head-dim limit, stated once (ops/attention.py registers it as the triton backend's limit)."""
    if Dh % 8 or Dh > 128 or Dh == 0:
        return f"needs a head dim that is a multiple of 8 up to 128, got Dh={Dh}"
    return None


def dtype_problem(dtype, device_type: str):
    """Why these kernels refuse a dtype on a device type (None: they take it). fp32 on a GPU: an fp32 tl.dot is
    FMA-only, so its tiles live in registers: every fp32 kernel spilled 13-41 KB per thread on sm_80 and sm_90
    and Dh 104-128 needed 180,480 B of shared memory (sm_80 allows 166,912 B). The CPU interpreter (tests) takes
    fp32; on a GPU the torch backend (SDPA) runs fp32."""
    if dtype == torch.float32 and device_type != "cpu":
        return "fp32 attention is not compiled for GPUs (it spills registers); use backend='torch' (SDPA) for fp32"
    return None


def _check(qkv, num_heads):
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be (B, T, 3*C), got shape {tuple(qkv.shape)}")
    B, T, C3 = qkv.shape
    if C3 % (3 * num_heads):
        raise ValueError(f"qkv's last dim {C3} must be 3 * num_heads * Dh with num_heads={num_heads}")
    Dh = C3 // (3 * num_heads)
    why = head_dim_problem(Dh)
    if why:
        raise ValueError(f"the triton attention {why}")
    if qkv.dtype not in KERNEL_DTYPES:
        raise TypeError(f"qkv must be one of {KERNEL_DTYPES}, got {qkv.dtype}")
    why = dtype_problem(qkv.dtype, qkv.device.type)
    if why:
        raise ValueError(f"the triton attention got qkv of dtype {qkv.dtype} on {qkv.device}: {why}")
    return B, T, C3 // 3, Dh


def _norm_args(qk_norm, device):
    """The 4 qk-norm tensors (contiguous), or one dummy that is never read when qk_norm is None."""
    if qk_norm is None:
        d = torch.empty(1, device=device, dtype=torch.float32)
        return d, d, d, d
    return tuple(t.contiguous() for t in qk_norm)


def attention_fwd(qkv, num_heads, qk_norm=None, scale=None, eps=1e-5, split=None):
    """qkv (B, T, 3C) -> (o (B, T, C), lse (B, H, T) fp32). qk_norm None or (qw, qb, kw, kb), each (Dh,).

    split: None (automatic, see _head_split) or False (one padded power-of-two tile; for tests and tuning)."""
    B, T, C, Dh = _check(qkv, num_heads)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    H = num_heads
    scale = 1.0 / math.sqrt(Dh) if scale is None else float(scale)
    o = torch.empty((B, T, C), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((B, H, T), device=qkv.device, dtype=torch.float32)
    if B * T == 0:
        return o, lse
    with device_guard(qkv):  # Triton launches on the current device
        qw, qb, kw, kb = _norm_args(qk_norm, qkv.device)
        sp, d0, d1 = _head_split(Dh) if split is None else (False, max(16, triton.next_power_of_2(Dh)), 16)
        bm, bn, warps, stages = _fwd_config(Dh, T, _target_arch(qkv.device))
        _attention_fwd_kernel[(triton.cdiv(T, bm) * B * H,)](
            qkv, o, lse, qw, qb, kw, kb, qkv.stride(0), qkv.stride(1), T, H, C, Dh, scale * LOG2E, eps,
            HAS_QK_NORM=qk_norm is not None, **_dot_args(qkv), SPLIT=sp,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D0=d0, BLOCK_D1=d1, num_warps=warps, num_stages=stages)
    return o, lse


def attention_bwd(do, qkv, o, lse, num_heads, qk_norm=None, scale=None, eps=1e-5, split=None):
    """Gradients of attention_fwd: (dqkv (B, T, 3C), dqw, dqb, dkw, dkb); the last four fp32 (Dh,), or (0,)
    fp32 tensors without qk_norm (imm_fast._backend.absent: outputs not asked for)."""
    B, T, C, Dh = _check(qkv, num_heads)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if do.stride(-1) != 1:
        do = do.contiguous()
    o = o.contiguous()
    H = num_heads
    scale = 1.0 / math.sqrt(Dh) if scale is None else float(scale)
    has_norm = qk_norm is not None
    dqkv = torch.empty((B, T, 3 * C), device=qkv.device, dtype=qkv.dtype)
    if B * T == 0:
        dqkv.zero_()
        return (dqkv,) + tuple(torch.zeros(Dh if has_norm else 0, device=qkv.device, dtype=torch.float32)
                               for _ in range(4))
    with device_guard(qkv):
        sp, d0, d1 = _head_split(Dh) if split is None else (False, max(16, triton.next_power_of_2(Dh)), 16)
        arch = _target_arch(qkv.device)
        bm, bn, warps, stages = _bwd_config(Dh, T, arch)
        kv_bm, kv_bn, kv_warps, kv_stages = _bwd_config(Dh, T, arch, dkdv_norm=has_norm)
        delta = torch.empty((B, H, T), device=qkv.device, dtype=torch.float32)
        _attention_bwd_preprocess_kernel[(triton.cdiv(T, bm) * B * H,)](
            o, do, delta, do.stride(0), do.stride(1), T, H, C, Dh, BLOCK_M=bm,
            BLOCK_D=max(16, triton.next_power_of_2(Dh)))
        qw, qb, kw, kb = _norm_args(qk_norm, qkv.device)
        n_kblocks, n_qblocks = triton.cdiv(T, kv_bn), triton.cdiv(T, bm)
        if has_norm:  # per-program partial sums, reduced below: deterministic, no atomics
            dkw_p = torch.empty((B * H * n_kblocks, Dh), device=qkv.device, dtype=torch.float32)
            dkb_p = torch.empty_like(dkw_p)
            dqw_p = torch.empty((B * H * n_qblocks, Dh), device=qkv.device, dtype=torch.float32)
            dqb_p = torch.empty_like(dqw_p)
        else:
            dkw_p = dkb_p = dqw_p = dqb_p = qw
        common = dict(HAS_QK_NORM=has_norm, **_dot_args(qkv))
        kv_split = (False, 128, 16) if has_norm and split is None and _dkdv_whole_tile(Dh, arch) else (sp, d0, d1)
        _attention_bwd_dkdv_kernel[(n_kblocks * B * H,)](
            qkv, do, lse, delta, dqkv, kw, kb, qw, qb, dkw_p, dkb_p, qkv.stride(0), qkv.stride(1),
            do.stride(0), do.stride(1), T, H, C, Dh, scale, scale * LOG2E, eps, **common,
            SPLIT=kv_split[0], BLOCK_D0=kv_split[1], BLOCK_D1=kv_split[2],
            BLOCK_M=kv_bm, BLOCK_N=kv_bn, num_warps=kv_warps, num_stages=kv_stages)
        _attention_bwd_dq_kernel[(n_qblocks * B * H,)](
            qkv, do, lse, delta, dqkv, qw, qb, kw, kb, dqw_p, dqb_p, qkv.stride(0), qkv.stride(1),
            do.stride(0), do.stride(1), T, H, C, Dh, scale, scale * LOG2E, eps, **common,
            SPLIT=sp, BLOCK_D0=d0, BLOCK_D1=d1, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    if not has_norm:
        return (dqkv,) + tuple(qkv.new_empty(0, dtype=torch.float32) for _ in range(4))
    return dqkv, dqw_p.sum(0), dqb_p.sum(0), dkw_p.sum(0), dkb_p.sum(0)
