"""Fused grouped MMD (spec section 3): one Triton launch gives MMD2_g and, when asked, dMMD2_g/dx and dMMD2_g/dy.

Shapes: B rows = G groups x M particles (group g owns rows g*M .. g*M+M-1), D values per row.
Z = [X_g; Y_g] is the group's 2M x D stack, R = next power of two >= 2M (padded rows are masked),
sigma_a = +1 for x rows and -1 for y rows, so MMD2_g = (1/M^2) sum_ab sigma_a sigma_b k(z_a, z_b) and
  dMMD2_g/dz_a = (2/M^2) sum_b sigma_a sigma_b k'(d_ab) (z_a - z_b)        (k' = dk/dz_a / (z_a - z_b))
Distances and gradients are both formed from differences z_a - z_b (never ||a||^2 + ||b||^2 - 2ab, nor
rowsum(W) z_a - W Z): both cancel when particles are close, which is the normal state late in IMM training.

Program (g, ib) owns the BM rows ib*BM .. ib*BM+BM-1 of Z (one program per group when 2M <= 32):
  pass 1 over D: acc[i, j] += sum_d (z_i - z_j)^2            (BM x R, fp32, registers)
  then       : kernel values, the group's partial MMD2, the coefficients W[i, j]
  pass 2 over D: grad_i = sum_j W[i, j] (z_i - z_j)          (written once, in the dtype of x / y)
No atomics: a group with several row blocks writes one partial per block, summed by the launcher in a fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Tile sizes. Register counts below are from compiling for sm_90 (cuobjdump -res-usage, fp32, gradient on, 8 warps);
# device timings are pending. 2M <= 32: one program per group, (BM, R, BLOCK_D) tile of 8192 elements (M=4: 103
# registers, M=16: 104). 2M > 32: row blocks of 8 and a 4096-element tile (M=64: 118 registers; BM=32 spilled).
_TILE_BUDGET = {True: 8192, False: 4096}  # keyed by "one program per group"
_MAX_R_ONE_BLOCK = 32
_BM_LARGE = 8


@triton.jit
def _load_z(x_ptr, y_ptr, g, r, offs_d, D, M, stride_x, stride_y):
    """Rows r (indices into Z) of group g at columns offs_d, as fp32; 0 for padded rows and columns."""
    in_x = r < M
    in_y = (r >= M) & (r < 2 * M)
    mask_d = offs_d < D
    row_x = tl.where(in_x, g * M + r, 0).to(tl.int64)      # row of x (0 where masked: no negative offsets)
    row_y = tl.where(in_y, g * M + r - M, 0).to(tl.int64)  # row of y
    zx = tl.load(x_ptr + row_x[:, None] * stride_x + offs_d[None, :],
                 mask=in_x[:, None] & mask_d[None, :], other=0.0)
    zy = tl.load(y_ptr + row_y[:, None] * stride_y + offs_d[None, :],
                 mask=in_y[:, None] & mask_d[None, :], other=0.0)
    return tl.where(in_x[:, None], zx.to(tl.float32), zy.to(tl.float32))


@triton.jit
def _pair_diff(x_ptr, y_ptr, g, rows_i, rows_j, offs_d, D, M, stride_x, stride_y, BM: tl.constexpr, R: tl.constexpr):
    """z_i - z_j for this program's rows i against all rows j of the group, (BM, R, BLOCK_D) fp32."""
    zj = _load_z(x_ptr, y_ptr, g, rows_j, offs_d, D, M, stride_x, stride_y)  # (R, BLOCK_D)
    if BM == R:
        zi = zj
    else:
        zi = _load_z(x_ptr, y_ptr, g, rows_i, offs_d, D, M, stride_x, stride_y)  # (BM, BLOCK_D)
    return zi[:, None, :] - zj[None, :, :]


@triton.jit
def _expm1(u):
    """exp(u) - 1 without cancellation for small |u| (Kahan: (e - 1) * u / log(e) with e = exp(u))."""
    e = tl.exp(u)
    safe_e = tl.where((e == 1.0) | (e == 0.0), 2.0, e)  # keeps the unused branch free of 0/0 and log(0)
    small = (e - 1.0) * u / tl.log(safe_e)
    return tl.where(e == 1.0, u, tl.where(u < -10.0, e - 1.0, small))


@triton.jit
def _mmd_fwd_kernel(
    x_ptr,        # (B, D) student rows, any float dtype; row stride stride_x, column stride 1
    y_ptr,        # (B, D) target rows; row stride stride_y, column stride 1
    gx_ptr,       # (B, D) out, contiguous, dtype of x: dMMD2_g/dx (untouched unless NEED_GX)
    gy_ptr,       # (B, D) out, contiguous, dtype of y: dMMD2_g/dy (untouched unless NEED_GY)
    part_ptr,     # (G, NB) out fp32: row block ib's share of MMD2_g
    scale_ptr,    # (G,) fp32: kernel scale s_g (w~ in the spec)
    stride_x,     # elements between rows of x
    stride_y,     # elements between rows of y
    D,            # values per row
    M,            # particles per group
    NB,           # row blocks per group (= cdiv(2M, BM))
    inv_D,        # 1/D (normalize_dim) or 1.0
    inv_m2,       # 1/M^2
    eps,          # distance floor: max(||a-b||, eps) (laplace) or max(||a-b||^2, eps^2) (rbf)
    RBF: tl.constexpr,      # kernel: exp(-s d^2 / D) instead of exp(-s d / D)
    LIBDEVICE: tl.constexpr,  # CUDA: libdevice exp/expm1 (tl.exp is ex2.approx, ~1e-6 relative at |u| ~ 10);
                              # the CPU interpreter has no libdevice and its tl.exp is numpy's
    NEED_GX: tl.constexpr,  # write dMMD2/dx
    NEED_GY: tl.constexpr,  # write dMMD2/dy
    R: tl.constexpr,        # next power of two >= 2M: the columns j of the pair tile
    BM: tl.constexpr,       # rows i of the pair tile owned by this program
    BLOCK_D: tl.constexpr,  # columns of D per step
):
    g = tl.program_id(0)
    ib = tl.program_id(1)
    rows_i = ib * BM + tl.arange(0, BM)  # (BM,) indices into Z
    rows_j = tl.arange(0, R)             # (R,)
    arange_d = tl.arange(0, BLOCK_D)

    # Pass 1: squared distances from differences, fp32.
    acc = tl.zeros((BM, R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + arange_d
        diff = _pair_diff(x_ptr, y_ptr, g, rows_i, rows_j, offs_d, D, M, stride_x, stride_y, BM, R)
        acc += tl.sum(diff * diff, axis=2)

    # Kernel values and derivative coefficients. dk(a, b)/da = coef * (a - b), zero where the floor is active.
    s = tl.load(scale_ptr + g)
    valid = (rows_i < 2 * M)[:, None] & (rows_j < 2 * M)[None, :]  # (BM, R)
    sign_i = tl.where(rows_i < M, 1.0, -1.0)
    sign_j = tl.where(rows_j < M, 1.0, -1.0)
    sign = tl.where(valid, sign_i[:, None] * sign_j[None, :], 0.0)  # (BM, R)
    if RBF:
        u = -s * inv_D * tl.maximum(acc, eps * eps, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in the reference
    else:
        dist = tl.sqrt_rn(acc)  # IEEE sqrt (tl.sqrt is sqrt.approx); only BM x R of them
        u = -s * inv_D * tl.maximum(dist, eps, propagate_nan=tl.PropagateNan.ALL)
    if LIBDEVICE:
        k = libdevice.exp(u)
        em1 = libdevice.expm1(u)
    else:
        k = tl.exp(u)
        em1 = _expm1(u)
    if RBF:
        coef = tl.where(acc > eps * eps, -2.0 * s * inv_D * k, 0.0)
    else:
        coef = tl.where(dist > eps, tl.div_rn(-s * inv_D * k, tl.where(dist > eps, dist, 1.0)), 0.0)
    # sum_ab sigma_a sigma_b = 0 (M x rows, M y rows), so summing k - 1 = expm1(u) gives the same MMD2 without
    # the cancellation of ~1-sized terms when the particles are close.
    part = tl.sum(tl.sum(sign * em1, axis=1), axis=0) * inv_m2
    tl.store(part_ptr + g * NB + ib, part)

    # Pass 2: gradient rows from differences, written once.
    if NEED_GX or NEED_GY:
        w = (2.0 * inv_m2) * sign * coef  # (BM, R)
        is_x = rows_i < M
        is_y = (rows_i >= M) & (rows_i < 2 * M)
        out_x = tl.where(is_x, g * M + rows_i, 0).to(tl.int64)      # row of gx
        out_y = tl.where(is_y, g * M + rows_i - M, 0).to(tl.int64)  # row of gy
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + arange_d
            mask_d = offs_d < D
            diff = _pair_diff(x_ptr, y_ptr, g, rows_i, rows_j, offs_d, D, M, stride_x, stride_y, BM, R)
            grad = tl.sum(w[:, :, None] * diff, axis=1)  # (BM, BLOCK_D)
            if NEED_GX:
                tl.store(gx_ptr + out_x[:, None] * D + offs_d[None, :], grad.to(gx_ptr.dtype.element_ty),
                         mask=is_x[:, None] & mask_d[None, :])
            if NEED_GY:
                tl.store(gy_ptr + out_y[:, None] * D + offs_d[None, :], grad.to(gy_ptr.dtype.element_ty),
                         mask=is_y[:, None] & mask_d[None, :])


def _blocks(M: int, D: int):
    """(R, BM, BLOCK_D, num_warps) for group size M and row length D."""
    R = triton.next_power_of_2(2 * M)
    one = R <= _MAX_R_ONE_BLOCK
    BM = R if one else _BM_LARGE
    block_d = max(1, min(_TILE_BUDGET[one] // (BM * R), triton.next_power_of_2(D)))
    num_warps = 4 if BM * R * block_d <= 2048 else 8
    return R, BM, block_d, num_warps


def _rows_view(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"{name} must be a (B, D) view, got shape {tuple(t.shape)}")
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


def mmd_fwd(x2d, y2d, group_size, scale, eps, rbf, normalize_dim, need_gx, need_gy):
    """Launcher: (mmd2 (G,) fp32 unweighted, gx (B, D) dtype of x or empty, gy (B, D) dtype of y or empty).

    x2d, y2d: (B, D) with any row stride (a unit column stride is made if missing); scale: (G,) s_g.
    """
    x2d = _rows_view(x2d, "x2d")
    y2d = _rows_view(y2d, "y2d")
    if x2d.shape != y2d.shape:
        raise ValueError(f"y2d must have x2d's shape {tuple(x2d.shape)}, got {tuple(y2d.shape)}")
    B, D = x2d.shape
    if D == 0:
        raise ValueError(f"rows need at least one value (D >= 1), got shape {tuple(x2d.shape)}")
    M = int(group_size)
    if M < 1 or B % M:
        raise ValueError(f"group_size={group_size} must be a positive divisor of B={B}")
    G = B // M
    scale = scale.reshape(G).to(device=x2d.device, dtype=torch.float32).contiguous()
    R, BM, block_d, num_warps = _blocks(M, D)
    NB = triton.cdiv(2 * M, BM)
    part = torch.empty((G * NB,), device=x2d.device, dtype=torch.float32)  # (G, NB) flat
    # Gradients not asked for: (0,) tensors (imm_fast._backend.absent), like every backend and fake.
    gx = torch.empty((B, D), device=x2d.device, dtype=x2d.dtype) if need_gx else x2d.new_empty(0)
    gy = torch.empty((B, D), device=y2d.device, dtype=y2d.dtype) if need_gy else y2d.new_empty(0)
    _mmd_fwd_kernel[(G, NB)](
        x2d, y2d, gx if need_gx else x2d, gy if need_gy else y2d, part, scale,
        x2d.stride(0), y2d.stride(0), D, M, NB,
        1.0 / D if normalize_dim else 1.0, 1.0 / (M * M), float(eps),
        RBF=bool(rbf), LIBDEVICE=x2d.is_cuda, NEED_GX=bool(need_gx), NEED_GY=bool(need_gy),
        R=R, BM=BM, BLOCK_D=block_d, num_warps=num_warps,
    )
    mmd2 = part if NB == 1 else part.view(G, NB).sum(dim=1)  # (G,): a fresh tensor, not a view
    return mmd2, gx, gy
