"""DiT adaLN kernels: gated residual, LayerNorm (no affine) + modulate, and both fused, forward and backward.

Shapes: B batch, T tokens, C width; x, y (B, T, C) with unit stride along C; gate, shift, scale (B, C) with unit
stride along C (the strided views of `.chunk(6, dim=1)` pass without copies: only their row stride is used).
One forward kernel covers the three ops through two switches:
  HAS_RES:  x_new = x + gate_b * y          (else x_new = x)
  HAS_NORM: out = LN(x_new) * (1 + scale_b) + shift_b, saving mean and rstd (fp32) per row
Program (b, tb) owns rows tb*ROWS .. tb*ROWS+ROWS-1 of sample b, so gate/shift/scale are loaded once per program
and the backward's per-sample sums (d shift, d scale, d gate) are per-program partials (B, NT, C) in fp32, reduced
in a fixed order by the launcher: deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import device_guard, sm_count


@triton.jit
def _adaln_fwd_kernel(
    x_ptr,       # (B, T, C) input; strides stride_xb, stride_xt, 1
    y_ptr,       # (B, T, C) branch output (HAS_RES); strides stride_yb, stride_yt, 1
    gate_ptr,    # (B, C) gate (HAS_RES); row stride stride_gb, column stride 1
    shift_ptr,   # (B, C) shift (HAS_NORM); row stride stride_sb
    scale_ptr,   # (B, C) scale (HAS_NORM); row stride stride_cb
    xnew_ptr,    # (B, T, C) out, contiguous: x + gate * y (HAS_RES)
    out_ptr,     # (B, T, C) out, contiguous: LN(x_new) * (1 + scale) + shift (HAS_NORM)
    mean_ptr,    # (B, T) out fp32: row means (HAS_NORM)
    rstd_ptr,    # (B, T) out fp32: 1 / sqrt(var + eps) (HAS_NORM)
    stride_xb, stride_xt,  # elements between samples / tokens of x
    stride_yb, stride_yt,  # elements between samples / tokens of y
    stride_gb,   # elements between samples of gate
    stride_sb,   # elements between samples of shift
    stride_cb,   # elements between samples of scale
    T, C,        # tokens, width
    eps,         # LayerNorm epsilon
    HAS_RES: tl.constexpr,
    HAS_NORM: tl.constexpr,
    ROWS: tl.constexpr,     # tokens per program (a multiple of BLOCK_T)
    BLOCK_T: tl.constexpr,  # tokens per step
    BLOCK_C: tl.constexpr,  # next power of two >= C
):
    b = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    if HAS_RES:
        gate = tl.load(gate_ptr + b * stride_gb + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_NORM:
        shift = tl.load(shift_ptr + b * stride_sb + cols, mask=cmask, other=0.0).to(tl.float32)
        scale1 = 1.0 + tl.load(scale_ptr + b * stride_cb + cols, mask=cmask, other=0.0).to(tl.float32)
    for t0 in range(tb * ROWS, tb * ROWS + ROWS, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        rmask = rows < T
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + b * stride_xb + rows[:, None] * stride_xt + cols[None, :], mask=mask, other=0.0)
        xn = x.to(tl.float32)
        o_off = (b * T + rows)[:, None] * C + cols[None, :]  # contiguous outputs
        if HAS_RES:
            y = tl.load(y_ptr + b * stride_yb + rows[:, None] * stride_yt + cols[None, :], mask=mask, other=0.0)
            # Round x_new to the storage dtype first: LN then sees exactly the x_new the caller gets back.
            xn = (xn + gate[None, :] * y.to(tl.float32)).to(xnew_ptr.dtype.element_ty)
            tl.store(xnew_ptr + o_off, xn, mask=mask)
            xn = xn.to(tl.float32)
        if HAS_NORM:
            mean = tl.sum(xn, axis=1) / C
            xc = tl.where(mask, xn - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
            out = xc * rstd[:, None] * scale1[None, :] + shift[None, :]
            tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(mean_ptr + b * T + rows, mean, mask=rmask)
            tl.store(rstd_ptr + b * T + rows, rstd, mask=rmask)


@triton.jit
def _adaln_bwd_kernel(
    dout_ptr,    # (B, T, C) contiguous: grad of out (HAS_NORM)
    dxnew_ptr,   # (B, T, C) contiguous: grad of x_new from outside (HAS_DXNEW)
    xn_ptr,      # (B, T, C) contiguous: the LayerNorm input x_new (or x) (HAS_NORM)
    y_ptr,       # (B, T, C) branch output (HAS_RES); strides stride_yb, stride_yt, 1
    gate_ptr,    # (B, C) gate (HAS_RES); row stride stride_gb
    scale_ptr,   # (B, C) scale (HAS_NORM); row stride stride_cb
    mean_ptr,    # (B, T) fp32 (HAS_NORM)
    rstd_ptr,    # (B, T) fp32 (HAS_NORM)
    dx_ptr,      # (B, T, C) out, contiguous: grad of x
    dy_ptr,      # (B, T, C) out, contiguous: grad of y (HAS_RES)
    pshift_ptr,  # (B, NT, C) out fp32: this program's sum over its rows of d out (HAS_NORM)
    pscale_ptr,  # (B, NT, C) out fp32: sum of d out * xhat (HAS_NORM)
    pgate_ptr,   # (B, NT, C) out fp32: sum of d x_new * y (HAS_RES)
    stride_yb, stride_yt, stride_gb, stride_cb,  # as in the forward
    T, C, NT,    # tokens, width, programs per sample
    HAS_RES: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_DXNEW: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_RES:
        gate = tl.load(gate_ptr + b * stride_gb + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_NORM:
        scale1 = 1.0 + tl.load(scale_ptr + b * stride_cb + cols, mask=cmask, other=0.0).to(tl.float32)
    for t0 in range(tb * ROWS, tb * ROWS + ROWS, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        rmask = rows < T
        mask = rmask[:, None] & cmask[None, :]
        off = (b * T + rows)[:, None] * C + cols[None, :]
        dxn = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        if HAS_DXNEW:
            dxn += tl.load(dxnew_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if HAS_NORM:
            do = tl.load(dout_ptr + off, mask=mask, other=0.0).to(tl.float32)
            xn = tl.load(xn_ptr + off, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + b * T + rows, mask=rmask, other=0.0)
            rstd = tl.load(rstd_ptr + b * T + rows, mask=rmask, other=0.0)
            xhat = tl.where(mask, (xn - mean[:, None]) * rstd[:, None], 0.0)
            acc_shift += tl.sum(do, axis=0)
            acc_scale += tl.sum(do * xhat, axis=0)
            g = do * scale1[None, :]  # d xhat
            mg = tl.sum(g, axis=1) / C
            mgx = tl.sum(g * xhat, axis=1) / C
            dxn += rstd[:, None] * (g - mg[:, None] - xhat * mgx[:, None])
        tl.store(dx_ptr + off, dxn.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_RES:
            y = tl.load(y_ptr + b * stride_yb + rows[:, None] * stride_yt + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            acc_gate += tl.sum(dxn * y, axis=0)
            tl.store(dy_ptr + off, (dxn * gate[None, :]).to(dy_ptr.dtype.element_ty), mask=mask)
    p_off = (b * NT + tb) * C + cols
    if HAS_NORM:
        tl.store(pshift_ptr + p_off, acc_shift, mask=cmask)
        tl.store(pscale_ptr + p_off, acc_scale, mask=cmask)
    if HAS_RES:
        tl.store(pgate_ptr + p_off, acc_gate, mask=cmask)


MAX_GPU_WIDTH = 4096  # a row is held whole in registers: at C > 4096 (BLOCK_C 8192) the backward spills


def width_problem(C, device_type: str):
    """Why these kernels refuse a width on a device type (None: they take it); the compile gate found the backward
    spilling 4-920 B per thread at C = 8192 on sm_80 and sm_90. The CPU interpreter takes any width."""
    if device_type != "cpu" and C is not None and C > MAX_GPU_WIDTH:
        return f"holds a row in registers: C={C} is over {MAX_GPU_WIDTH} on a GPU (it would spill)"
    return None


_BWD_PROGRAMS_PER_SM = 2  # the backward's grid keeps at least this many programs per SM (when B*T allows)


def _blocks(T, C, backward=False, B=1, sms=132):
    """(ROWS, BLOCK_T, BLOCK_C, num_warps): tiles of ~2K elements. The backward keeps three (BLOCK_C,)
    accumulators and about six live tiles, so it spreads them over more warps; the compile gate
    (tests/test_compile_gate.py) checks both for spills and shared memory on sm_80 and sm_90."""
    BLOCK_C = triton.next_power_of_2(C)
    BLOCK_T = max(1, min(triton.next_power_of_2(T), 2048 // BLOCK_C))
    if backward:
        return _bwd_rows(B, T, BLOCK_T, sms), BLOCK_T, BLOCK_C, min(16, max(4, BLOCK_C // 64))
    ROWS = BLOCK_T * max(1, min(4, triton.cdiv(T, BLOCK_T)))
    return ROWS, BLOCK_T, BLOCK_C, 8 if BLOCK_C >= 512 else 4


def _bwd_rows(B, T, BLOCK_T, sms):
    """Rows per backward program: as many as keep B * cdiv(T, ROWS) >= 2 programs per SM. Each program writes
    its (C,) partial sums of d shift, d scale and d gate in fp32, which are then read back: 2 * 3 * 4 * C bytes
    per ROWS rows against the backward's >= 12 * C bytes per row in bf16, so ROWS >= 32 keeps the partials under
    10% of the floor; the DiT-XL batch (B=256, T=256) on 132 SMs gets ROWS = 128."""
    rows = BLOCK_T
    while rows * 2 <= T and B * triton.cdiv(T, rows * 2) >= _BWD_PROGRAMS_PER_SM * sms:
        rows *= 2
    return rows


def _row_strides(v):
    """(B, C) modulation vector with unit column stride (copy only if needed: chunk views already qualify)."""
    if v.stride(1) != 1:
        v = v.contiguous()
    return v, v.stride(0)


def _bt_strides(v):
    if v.stride(2) != 1:
        v = v.contiguous()
    return v, v.stride(0), v.stride(1)


def adaln_fwd(x, gate, y, shift, scale, eps, has_res, has_norm, xnew_dtype=None, out_dtype=None):
    """Launcher: returns (x_new, out, mean, rstd); outputs that do not apply are (0,) tensors like x
    (imm_fast._backend.absent)."""
    B, T, C = x.shape
    x, sxb, sxt = _bt_strides(x)
    dummy = x
    syb = syt = sgb = ssb = scb = 0
    if has_res:
        y, syb, syt = _bt_strides(y)
        gate, sgb = _row_strides(gate)
    if has_norm:
        shift, ssb = _row_strides(shift)
        scale, scb = _row_strides(scale)
    xnew = torch.empty((B, T, C), dtype=xnew_dtype or x.dtype, device=x.device) if has_res else None
    out = torch.empty((B, T, C), dtype=out_dtype or x.dtype, device=x.device) if has_norm else None
    mean = torch.empty((B, T), dtype=torch.float32, device=x.device) if has_norm else None
    rstd = torch.empty((B, T), dtype=torch.float32, device=x.device) if has_norm else None
    ROWS, BLOCK_T, BLOCK_C, num_warps = _blocks(T, C)
    grid = (B, triton.cdiv(T, ROWS))
    with device_guard(x):  # Triton launches on the current device
        _adaln_fwd_kernel[grid](
            x, y if has_res else dummy, gate if has_res else dummy, shift if has_norm else dummy,
            scale if has_norm else dummy, xnew if has_res else dummy, out if has_norm else dummy,
            mean if has_norm else dummy, rstd if has_norm else dummy,
            sxb, sxt, syb, syt, sgb, ssb, scb, T, C, eps,
            HAS_RES=has_res, HAS_NORM=has_norm, ROWS=ROWS, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, num_warps=num_warps)
    return tuple(v if v is not None else x.new_empty(0) for v in (xnew, out, mean, rstd))


def adaln_bwd(dout, dxnew, xn, y, gate, scale, mean, rstd, has_res, has_norm, x_dtype):
    """Launcher: returns (dx, dgate, dy, dshift, dscale); per-sample sums in fp32; entries that do not apply
    are (0,) tensors like dx (imm_fast._backend.absent)."""
    ref = xn if xn is not None else y
    B, T, C = ref.shape
    dev = ref.device
    dummy = ref
    syb = syt = sgb = scb = 0
    if has_res:
        y, syb, syt = _bt_strides(y)
        gate, sgb = _row_strides(gate)
    if has_norm:
        scale, scb = _row_strides(scale)
        dout = dout.contiguous()
        xn = xn.contiguous()
    if dxnew is not None:
        dxnew = dxnew.contiguous()
    ROWS, BLOCK_T, BLOCK_C, num_warps = _blocks(T, C, backward=True, B=B, sms=sm_count(dev))
    NT = triton.cdiv(T, ROWS)
    dx = torch.empty((B, T, C), dtype=x_dtype, device=dev)
    dy = torch.empty((B, T, C), dtype=y.dtype, device=dev) if has_res else None
    f32 = dict(dtype=torch.float32, device=dev)
    pshift = torch.empty((B, NT, C), **f32) if has_norm else None
    pscale = torch.empty((B, NT, C), **f32) if has_norm else None
    pgate = torch.empty((B, NT, C), **f32) if has_res else None
    with device_guard(ref):
        _adaln_bwd_kernel[(B, NT)](
            dout if has_norm else dummy, dxnew if dxnew is not None else dummy, xn if has_norm else dummy,
            y if has_res else dummy, gate if has_res else dummy, scale if has_norm else dummy,
            mean if has_norm else dummy, rstd if has_norm else dummy, dx, dy if has_res else dummy,
            pshift if has_norm else dummy, pscale if has_norm else dummy, pgate if has_res else dummy,
            syb, syt, sgb, scb, T, C, NT,
            HAS_RES=has_res, HAS_NORM=has_norm, HAS_DXNEW=dxnew is not None, ROWS=ROWS, BLOCK_T=BLOCK_T,
            BLOCK_C=BLOCK_C, num_warps=num_warps)

    def red(p):  # the per-program partials, summed in a fixed order
        return dx.new_empty(0) if p is None else p.sum(dim=1)

    return dx, red(pgate), dy if dy is not None else dx.new_empty(0), red(pshift), red(pscale)
