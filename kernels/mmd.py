"""Fused grouped MMD (the IMM loss's MMD^2 estimate; formula in imm_fast.mmd_loss_ref): one Triton launch gives
MMD2_g and, when asked, dMMD2_g/dx and dMMD2_g/dy.

Shapes: B rows = G groups x M particles (group g owns rows g*M .. g*M+M-1), D values per row, MP = next power of
two >= M. The group's tile Z is [X_g; Y_g] padded to 2*MP rows: x rows at 0..M-1, y rows at MP..MP+M-1
(padded rows are zeros and masked out), sigma_a = +1 for x rows and -1 for y rows, so
  MMD2_g = (1/M^2) sum_ab sigma_a sigma_b k(z_a, z_b)
  dMMD2_g/dz_a = sum_b W_ab (z_a - z_b),  W_ab = (2/M^2) sigma_a sigma_b k'(d_ab)  (k' = dk/dz_a / (z_a - z_b))
Distances and gradients are both formed from differences (never ||a||^2 + ||b||^2 - 2ab, nor rowsum(W) z_a - W Z):
both cancel when particles are close, which is the normal state late in IMM training.

At the memory floor by construction. A program owns whole groups (persistent: program p takes groups p, p + P, ..)
and reads each group twice: pass 1 (all of D) sums the squared distances, then the kernel values and W are formed,
then pass 2 (D in reverse, so the columns read last are the likeliest still in L2) writes the gradient rows.
The D axis lies across lanes and warps and every pair is accumulated per lane: the loops hold no cross-lane
reduction (no shuffles, no barriers); the reduction over lanes follows pass 1. The number of programs is sized
so that the groups in flight fit in half of L2, so pass 2 finds its rows there: HBM traffic is read x and y once,
write each gradient once (3N elements with N = B*D in the IMM case, gradient for x only; 4N for both).
The gradient is written already scaled by c_g, the caller's expected dL/dMMD2_g (mmd_loss's grad_hint: 1/G for
mmd_loss(...).backward(), w(s,t)/G in IMM training), so the backward (mmd_rescale_) moves no bytes where the hint
was right: forward plus backward then move 3N. Where it was not, it scales those groups' rows in place (+2N).

Pair structure (groups of up to 8 particles, `_mmd_fwd_kernel`): the 2*MP rows are paired level by level,
level h pairing rows (2aK + k, 2aK + K + l) with K = 2^h: levels below the top pair x with x and y with y, the
top level pairs x with y, and together they hold every unordered pair once (MP (2MP - 1) pairs, no redundant
half). The level views are reshapes of the register tile (rows live in each thread), so they cost no data
movement; after pass 1 the pair terms go through a per-program scratch (2 x 2MP x 2MP fp32, L1): the MMD2 sum
is taken row by row over the square (k(x_i, x_j) - k(x_i, y_j) cancel early when y ~ x) and pass 2 reads W from
it each step rather than holding it in registers. Larger groups (`_mmd_rows_kernel`): one work item per (group,
row), summing that row against all 2MP rows (both orders of a pair, one program per row to stay within the
registers): no shuffles in the loops either, but each row's program re-reads the group from L2 (2MP-fold L2
traffic; HBM still sees each value once while the items of a group run together), so M > 8 is compute- and
L2-bound rather than at the HBM floor.

Compiler versions: the loop structure above (no shuffles or barriers in the D loops, no spills) is what triton
3.9 compiles for sm_80 and sm_90. triton 3.6 compiles the same kernels correctly, but lowers the register views
(join / permute / split) through shared memory: its D loops hold barriers (up to 48 per step at M = 4) and the
finiteness sum a few shuffles. The interpreter runs under both.

Non-finite input: a NaN or +-inf anywhere in a group's rows makes MMD2_g NaN and every entry of that group's
gradient rows NaN (as the C++/CUDA kernels and mmd_loss_ref do); other groups are untouched.
No atomics: several row blocks of one group write one partial each, summed by the launcher in a fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._launch import device_guard, target_arch

_MAX_MP_PAIRS = 8      # groups of up to this many particles use the pair-level kernel
_PAIR_REGS = 128       # per-thread fp32 pair accumulators aimed at (pairs x columns per thread); more spills
_ROWS_REGS = 32        # the same for the rows kernel (its pass 2 also holds a (BM, 2MP) W); 64 spilled at MP = 16
_WARPS = 8
_OLD_TRITON = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7)  # register allocation differs
_L2_SHARE = 0.5        # of the L2 the groups in flight may fill (the gradient rows written also pass through it)
_PROGRAMS_PER_SM = 8   # at most; fewer when the groups in flight would not fit in L2
# Used when the device cannot be asked (meta tensors for the compile gate, the CPU interpreter): an H100 SXM.
_DEFAULT_SMS, _DEFAULT_L2 = 132, 50 * 2**20


# ----------------------------------------------------------------------------------------------------------------
# Tiles

@triton.jit
def _load_rows(ptr, row0, stride, M, offs_d, D, MP: tl.constexpr, POLICY: tl.constexpr):
    """Rows row0 .. row0+M-1 of ptr at columns offs_d as fp32, (MP, BLOCK_D); 0 for padded rows and columns."""
    r = tl.arange(0, MP)
    real = r < M
    rows = (row0 + tl.where(real, r, 0)).to(tl.int64)  # 0 where masked: no out-of-range offsets
    z = tl.load(ptr + rows[:, None] * stride + offs_d[None, :], mask=real[:, None] & (offs_d < D)[None, :],
                other=0.0, eviction_policy=POLICY)
    return z.to(tl.float32)


@triton.jit
def _stack(zx, zy, MP: tl.constexpr, BLOCK_D: tl.constexpr):
    """[zx; zy]: (2MP, BLOCK_D), rows live in each thread, so this moves no data."""
    return tl.reshape(tl.permute(tl.join(zx, zy), (2, 0, 1)), (2 * MP, BLOCK_D))


@triton.jit
def _halves(z, A: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows of z (2AK, BLOCK_D) as lo[a, k] = z[2aK + k] and hi[a, l] = z[2aK + K + l], each (A, K, BLOCK_D)."""
    return tl.split(tl.permute(tl.reshape(z, (A, 2, K, BLOCK_D)), (0, 2, 3, 1)))


@triton.jit
def _unhalves(lo, hi, A: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Inverse of _halves: (2AK, BLOCK_D)."""
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 3, 1, 2)), (2 * A * K, BLOCK_D))


@triton.jit
def _level_diff(z, N: tl.constexpr, H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Level H of the N rows of z: z[2aK + k] - z[2aK + K + l] with K = 2^H, (N / 2K, K, K, BLOCK_D)."""
    lo, hi = _halves(z, N >> (H + 1), 1 << H, BLOCK_D)
    return lo[:, :, None, :] - hi[:, None, :, :]


@triton.jit
def _level_zeros(N: tl.constexpr, H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass-1 accumulator of level H of N rows, or a (1, 1, 1, BLOCK_D) stand-in when N has no level H."""
    if (2 << H) <= N:
        return tl.zeros((N >> (H + 1), 1 << H, 1 << H, BLOCK_D), dtype=tl.float32)
    else:
        return tl.zeros((1, 1, 1, BLOCK_D), dtype=tl.float32)


@triton.jit
def _level_acc(acc, z, N: tl.constexpr, H: tl.constexpr, BLOCK_D: tl.constexpr):
    """acc + (squared differences of level H), per lane: no reduction over D here."""
    if (2 << H) <= N:
        d = _level_diff(z, N, H, BLOCK_D)
        acc += d * d
    return acc


# ----------------------------------------------------------------------------------------------------------------
# Kernel values and gradient coefficients (shared by both kernels)

@triton.jit
def _expm1(u):
    """exp(u) - 1 without cancellation for small |u| (Kahan: (e - 1) * u / log(e) with e = exp(u))."""
    e = tl.exp(u)
    safe_e = tl.where((e == 1.0) | (e == 0.0), 2.0, e)  # keeps the unused branch free of 0/0 and log(0)
    small = (e - 1.0) * u / tl.log(safe_e)
    return tl.where(e == 1.0, u, tl.where(u < -10.0, e - 1.0, small))


@triton.jit
def _pair_terms(q, s, inv_D, eps, RBF: tl.constexpr, LIBDEVICE: tl.constexpr):
    """For squared distances q: (k - 1, coef) with dk(a, b)/da = coef (a - b); coef is 0 inside the floor.
    Summing k - 1 instead of k gives the same MMD2 (sum_ab sigma_a sigma_b = 0) without the cancellation of
    ~1-sized terms when the particles are close."""
    if RBF:
        u = -s * inv_D * tl.maximum(q, eps * eps, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN
    else:
        dist = tl.sqrt_rn(q)  # IEEE sqrt (tl.sqrt is sqrt.approx); only once per pair
        u = -s * inv_D * tl.maximum(dist, eps, propagate_nan=tl.PropagateNan.ALL)
    if LIBDEVICE:
        k = libdevice.exp(u)
        em1 = libdevice.expm1(u)
    else:
        k = tl.exp(u)
        em1 = _expm1(u)
    if RBF:
        coef = tl.where(q > eps * eps, -2.0 * s * inv_D * k, 0.0)
    else:
        coef = tl.where(dist > eps, tl.div_rn(-s * inv_D * k, tl.where(dist > eps, dist, 1.0)), 0.0)
    return em1, coef


@triton.jit
def _safe_coef(c):
    """The coefficient a kernel folds: c, or 1 where c is 0, subnormal, infinite or NaN (a stored gradient scaled
    by such a c would lose its information). imm_fast.ops.mmd.safe_coef is the same rule in torch."""
    a = tl.abs(c)
    return tl.where((a >= 1.1754943508222875e-38) & (a <= 3.4028234663852886e38), c, 1.0)


@triton.jit
def _level_terms(acc, bad, scr_ptr, M, s, c, inv_D, inv_m2, eps, N: tl.constexpr, H: tl.constexpr,
                 RBF: tl.constexpr, LIBDEVICE: tl.constexpr):
    """Level H of the 2MP = N stacked rows after pass 1: writes sigma_a sigma_b (k - 1) of its pairs, both orders,
    into the scratch's first (N, N) square and c W_ij (i < j; NaN when the group is bad) into its second."""
    A: tl.constexpr = N >> (H + 1)
    K: tl.constexpr = 1 << H
    MP: tl.constexpr = N // 2
    q = tl.sum(acc, axis=3)  # (A, K, K): the reduction over lanes
    a = tl.arange(0, A)[:, None, None]
    i = a * (2 * K) + tl.arange(0, K)[None, :, None]      # rows of lo
    j = a * (2 * K) + K + tl.arange(0, K)[None, None, :]  # rows of hi
    valid = (tl.where(i < MP, i, i - MP) < M) & (tl.where(j < MP, j, j - MP) < M)  # (A, K, K)
    sign = tl.where((i < MP) == (j < MP), 1.0, -1.0)
    em1, coef = _pair_terms(q, s, inv_D, eps, RBF, LIBDEVICE)
    term = tl.where(valid, sign * em1, 0.0)
    tl.store(scr_ptr + i * N + j, term)
    tl.store(scr_ptr + j * N + i, term)
    w = tl.where(bad, float("nan"), tl.where(valid, (2.0 * inv_m2 * c) * sign * coef, 0.0))
    tl.store(scr_ptr + N * N + i * N + j, w)  # W is symmetric; pass 2 reads the entries it needs


@triton.jit
def _w_level(scr_ptr, half, MP: tl.constexpr, H: tl.constexpr):
    """W of level H's pairs within one half (0: x rows, 1: y rows), (A, K, K), from the scratch."""
    A: tl.constexpr = MP >> (H + 1)
    K: tl.constexpr = 1 << H
    i = half * MP + tl.arange(0, A)[:, None, None] * (2 * K) + tl.arange(0, K)[None, :, None]
    j = half * MP + tl.arange(0, A)[:, None, None] * (2 * K) + K + tl.arange(0, K)[None, None, :]
    return tl.load(scr_ptr + (2 * MP) * (2 * MP) + i * (2 * MP) + j)


@triton.jit
def _level_grad(g, z, scr_ptr, half, MP: tl.constexpr, H: tl.constexpr, BLOCK_D: tl.constexpr):
    """g + the gradient terms of level H's pairs within one half: row i gets W_ij (z_i - z_j), row j gets
    W_ij (z_j - z_i), from one difference per pair. W comes from the scratch (L1) each step: held in registers
    next to the tiles it would spill at MP = 8."""
    if (2 << H) <= MP:
        A: tl.constexpr = MP >> (H + 1)
        K: tl.constexpr = 1 << H
        w = _w_level(scr_ptr, half, MP, H)             # (A, K, K)
        d = _level_diff(z, MP, H, BLOCK_D)             # (A, K, K, BLOCK_D)
        g_lo = tl.sum(w[:, :, :, None] * d, axis=2)    # (A, K, BLOCK_D)
        g_hi = tl.sum((-w)[:, :, :, None] * d, axis=1)  # (A, K, BLOCK_D)
        g += _unhalves(g_lo, g_hi, A, K, BLOCK_D)
    return g


@triton.jit
def _store_rows(ptr, row0, M, offs_d, D, grad, MP: tl.constexpr):
    """Rows row0 .. row0+M-1 of the contiguous (B, D) gradient ptr, in its dtype; written once, not reused."""
    r = tl.arange(0, MP)
    rows = (row0 + tl.where(r < M, r, 0)).to(tl.int64)
    tl.store(ptr + rows[:, None] * D + offs_d[None, :], grad.to(ptr.dtype.element_ty),
             mask=(r < M)[:, None] & (offs_d < D)[None, :], eviction_policy="evict_first")


# ----------------------------------------------------------------------------------------------------------------
# Groups of up to 8 particles: every unordered pair once, per lane

@triton.jit
def _mmd_fwd_kernel(
    x_ptr,        # (B, D) student rows, any float dtype; row stride stride_x, column stride 1
    y_ptr,        # (B, D) target rows; row stride stride_y, column stride 1
    gx_ptr,       # (B, D) out, contiguous, dtype of x: c_g dMMD2_g/dx (untouched unless NEED_GX)
    gy_ptr,       # (B, D) out, contiguous, dtype of y: c_g dMMD2_g/dy (untouched unless NEED_GY)
    mmd_ptr,      # (G,) out fp32: MMD2_g (unscaled)
    scale_ptr,    # (G,) fp32: kernel scale s_g (w~ in the paper)
    coef_ptr,     # (G,) fp32: c_g, folded into the gradients written (safe_coef(c_g) dMMD2_g/dx; 1: the plain one)
    scr_ptr,      # (programs, 2, 2MP, 2MP) fp32 scratch: one group's sigma_a sigma_b (k(z_a, z_b) - 1), then W
    stride_x,     # elements between rows of x
    stride_y,     # elements between rows of y
    D,            # values per row
    M,            # particles per group
    G,            # groups
    inv_D,        # 1/D (normalize_dim) or 1.0
    inv_m2,       # 1/M^2
    eps,          # distance floor: max(||a-b||, eps) (laplace) or max(||a-b||^2, eps^2) (rbf)
    RBF: tl.constexpr,        # kernel: exp(-s d^2 / D) instead of exp(-s d / D)
    LIBDEVICE: tl.constexpr,  # CUDA: libdevice exp/expm1 (tl.exp is ex2.approx, ~1e-6 relative at |u| ~ 10);
                              # the CPU interpreter has no libdevice and its tl.exp is numpy's
    NEED_GX: tl.constexpr,    # write dMMD2/dx
    NEED_GY: tl.constexpr,    # write dMMD2/dy
    MP: tl.constexpr,         # next power of two >= M, at most 8
    BLOCK_D: tl.constexpr,    # columns per step: 32 * num_warps * VEC
    VEC: tl.constexpr,        # contiguous columns per thread (one vector load per row)
    N_D: tl.constexpr,        # 0 (compiled), or cdiv(D, BLOCK_D) for the CPU interpreter (one group per program)
):
    N: tl.constexpr = 2 * MP
    # Columns in runs of VEC per thread: the loads' layout then keeps every row in each thread (the pair views
    # are register renames, no shared-memory round trip).
    arange_d = tl.max_contiguous(tl.arange(0, BLOCK_D), VEC)
    # Compiled: persistent programs. The CPU interpreter (N_D > 0): one group per program and Python ints as loop
    # bounds, written inline: triton 3.6's interpreter turns every assigned value into a tensor that range()
    # cannot take.
    for it in range(0 if N_D > 0 else tl.program_id(0), 1 if N_D > 0 else G, 1 if N_D > 0 else tl.num_programs(0)):
        g = tl.program_id(0) if N_D > 0 else it
        row0 = g * M
        # Pass 1: per-lane squared distances of every pair (levels 0..3 of up to 16 stacked rows), and
        # chk = sum z * 0: 0, or NaN when the group holds a NaN or an inf.
        acc0 = _level_zeros(N, 0, BLOCK_D)
        acc1 = _level_zeros(N, 1, BLOCK_D)
        acc2 = _level_zeros(N, 2, BLOCK_D)
        acc3 = _level_zeros(N, 3, BLOCK_D)
        chk = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for t in range(0, N_D if N_D > 0 else tl.cdiv(D, BLOCK_D)):
            offs_d = t * BLOCK_D + arange_d
            z = _stack(_load_rows(x_ptr, row0, stride_x, M, offs_d, D, MP, "evict_last"),
                       _load_rows(y_ptr, row0, stride_y, M, offs_d, D, MP, "evict_last"), MP, BLOCK_D)
            chk += tl.sum(z * 0.0, axis=0)
            acc0 = _level_acc(acc0, z, N, 0, BLOCK_D)
            acc1 = _level_acc(acc1, z, N, 1, BLOCK_D)
            acc2 = _level_acc(acc2, z, N, 2, BLOCK_D)
            acc3 = _level_acc(acc3, z, N, 3, BLOCK_D)

        # Kernel values and coefficients per level. The MMD2 sum runs over the (N, N) square of sigma sigma (k - 1)
        # (through a per-program scratch) row by row: k(x_i, x_j) - k(x_i, y_j) cancel early when y ~ x, where
        # summing level by level would add O(1) partial sums whose difference is the ~1e-7 result.
        s = tl.load(scale_ptr + g)
        c = _safe_coef(tl.load(coef_ptr + g))
        bad = tl.sum(chk, axis=0) != 0.0  # NaN != 0
        scr = scr_ptr + tl.program_id(0) * (2 * N * N)
        rows = tl.arange(0, N)
        tl.debug_barrier()  # every thread is done reading the previous group's scratch
        em1_0, _ = _pair_terms(tl.zeros((N,), dtype=tl.float32), s, inv_D, eps, RBF, LIBDEVICE)  # distance 0
        tl.store(scr + rows * (N + 1), tl.where(tl.where(rows < MP, rows, rows - MP) < M, em1_0, 0.0))
        _level_terms(acc0, bad, scr, M, s, c, inv_D, inv_m2, eps, N, 0, RBF, LIBDEVICE)
        if N >= 4:
            _level_terms(acc1, bad, scr, M, s, c, inv_D, inv_m2, eps, N, 1, RBF, LIBDEVICE)
        if N >= 8:
            _level_terms(acc2, bad, scr, M, s, c, inv_D, inv_m2, eps, N, 2, RBF, LIBDEVICE)
        if N >= 16:
            _level_terms(acc3, bad, scr, M, s, c, inv_D, inv_m2, eps, N, 3, RBF, LIBDEVICE)
        tl.debug_barrier()  # the squares are written by all threads
        total = tl.sum(tl.sum(tl.load(scr + rows[:, None] * N + rows[None, :]), axis=1), axis=0) * inv_m2
        tl.store(mmd_ptr + g, tl.where(bad, float("nan"), total))

        if NEED_GX or NEED_GY:
            _grad_pass(x_ptr, y_ptr, gx_ptr, gy_ptr, scr, row0, stride_x, stride_y, D, M,
                       N_D if N_D > 0 else tl.cdiv(D, BLOCK_D), arange_d, NEED_GX, NEED_GY, MP, BLOCK_D)


@triton.jit
def _grad_pass(x_ptr, y_ptr, gx_ptr, gy_ptr, scr_ptr, row0, stride_x, stride_y, D, M, n_d, arange_d,
               NEED_GX: tl.constexpr, NEED_GY: tl.constexpr, MP: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 2 of one group: gradient rows from differences, D in reverse (the last columns of pass 1 are the
    likeliest still in L2), each written once; one sweep per gradient. W from the scratch's second square."""
    N: tl.constexpr = 2 * MP
    i_x = tl.arange(0, MP)[:, None]
    j_y = MP + tl.arange(0, MP)[None, :]
    if NEED_GX:
        for t in range(0, n_d):
            offs_d = (n_d - 1 - t) * BLOCK_D + arange_d
            zx = _load_rows(x_ptr, row0, stride_x, M, offs_d, D, MP, "evict_last")  # (MP, BLOCK_D)
            zy = _load_rows(y_ptr, row0, stride_y, M, offs_d, D, MP, "evict_first" if NEED_GY else "evict_last")
            w_xy = tl.load(scr_ptr + N * N + i_x * N + j_y)  # (MP, MP): W of (x_i, y_j)
            gx = tl.sum(w_xy[:, :, None] * (zx[:, None, :] - zy[None, :, :]), axis=1)  # W_ij (x_i - y_j)
            gx = _level_grad(gx, zx, scr_ptr, 0, MP, 0, BLOCK_D)
            gx = _level_grad(gx, zx, scr_ptr, 0, MP, 1, BLOCK_D)
            gx = _level_grad(gx, zx, scr_ptr, 0, MP, 2, BLOCK_D)
            _store_rows(gx_ptr, row0, M, offs_d, D, gx, MP)
    if NEED_GY:
        for t in range(0, n_d):
            offs_d = (n_d - 1 - t) * BLOCK_D + arange_d
            zx = _load_rows(x_ptr, row0, stride_x, M, offs_d, D, MP, "evict_first")
            zy = _load_rows(y_ptr, row0, stride_y, M, offs_d, D, MP, "evict_first")
            w_xy = tl.load(scr_ptr + N * N + i_x * N + j_y)
            gy = -tl.sum(w_xy[:, :, None] * (zx[:, None, :] - zy[None, :, :]), axis=0)  # W_ij (y_j - x_i)
            gy = _level_grad(gy, zy, scr_ptr, 1, MP, 0, BLOCK_D)
            gy = _level_grad(gy, zy, scr_ptr, 1, MP, 1, BLOCK_D)
            gy = _level_grad(gy, zy, scr_ptr, 1, MP, 2, BLOCK_D)
            _store_rows(gy_ptr, row0, M, offs_d, D, gy, MP)


# ----------------------------------------------------------------------------------------------------------------
# Larger groups: blocks of BM rows against all 2MP rows

@triton.jit
def _mmd_rows_kernel(
    x_ptr, y_ptr, gx_ptr, gy_ptr,  # as in _mmd_fwd_kernel
    part_ptr,     # (G, NB) out fp32: row block ib's share of MMD2_g
    scale_ptr,    # (G,) fp32: s_g
    coef_ptr,     # (G,) fp32: c_g, folded into the gradients
    scr_ptr,      # unused (the pair kernel's scratch; one argument list for both)
    stride_x, stride_y, D, M, G, inv_D, inv_m2, eps,  # as in _mmd_fwd_kernel
    RBF: tl.constexpr, LIBDEVICE: tl.constexpr, NEED_GX: tl.constexpr, NEED_GY: tl.constexpr,
    MP: tl.constexpr,       # next power of two >= M
    BM: tl.constexpr,       # rows per block; NB = 2MP / BM blocks per group, each wholly x rows or y rows
    BLOCK_D: tl.constexpr,  # columns per step: 32 * num_warps * VEC
    VEC: tl.constexpr,      # contiguous columns per thread
    N_D: tl.constexpr,      # as in _mmd_fwd_kernel
):
    N: tl.constexpr = 2 * MP
    NB: tl.constexpr = N // BM
    arange_d = tl.max_contiguous(tl.arange(0, BLOCK_D), VEC)
    rows_j = tl.arange(0, N)
    real_j = tl.where(rows_j < MP, rows_j, rows_j - MP) < M
    # Items (g, ib) in order: the programs running at one time share a group, whose rows then come from L2.
    # Loop bounds as in _mmd_fwd_kernel.
    for it in range(0 if N_D > 0 else tl.program_id(0), 1 if N_D > 0 else G * NB,
                    1 if N_D > 0 else tl.num_programs(0)):
        item = tl.program_id(0) if N_D > 0 else it
        g = item // NB
        ib = item % NB
        row0 = g * M
        is_x = ib * BM < MP
        blk0 = tl.where(is_x, ib * BM, ib * BM - MP)  # first row of the block within its half
        rows_i = ib * BM + tl.arange(0, BM)            # indices into the stacked rows
        acc = tl.zeros((BM, N, BLOCK_D), dtype=tl.float32)
        chk = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for t in range(0, N_D if N_D > 0 else tl.cdiv(D, BLOCK_D)):
            offs_d = t * BLOCK_D + arange_d
            zj = _stack(_load_rows(x_ptr, row0, stride_x, M, offs_d, D, MP, "evict_last"),
                        _load_rows(y_ptr, row0, stride_y, M, offs_d, D, MP, "evict_last"), MP, BLOCK_D)
            zi = _block_rows(x_ptr, y_ptr, row0, blk0, is_x, stride_x, stride_y, M, offs_d, D, BM)
            chk += tl.sum(zj * 0.0, axis=0)
            d = zi[:, None, :] - zj[None, :, :]
            acc += d * d
        s = tl.load(scale_ptr + g)
        c = _safe_coef(tl.load(coef_ptr + g))
        bad = tl.sum(chk, axis=0) != 0.0
        q = tl.sum(acc, axis=2)  # (BM, N), diagonal included (distance 0, floored)
        real_i = (blk0 + tl.arange(0, BM)) < M
        valid = real_i[:, None] & real_j[None, :]
        sign = tl.where((rows_i < MP)[:, None] == (rows_j < MP)[None, :], 1.0, -1.0)
        em1, coef = _pair_terms(q, s, inv_D, eps, RBF, LIBDEVICE)
        part = tl.sum(tl.sum(tl.where(valid, sign * em1, 0.0), axis=1), axis=0) * inv_m2
        tl.store(part_ptr + item, tl.where(bad, float("nan"), part))
        w = tl.where(bad, float("nan"), tl.where(valid, (2.0 * inv_m2 * c) * sign * coef, 0.0))  # (BM, N)
        if NEED_GX:
            if is_x:
                _block_grad(x_ptr, y_ptr, gx_ptr, w, row0, blk0, is_x, stride_x, stride_y, M, D,
                            N_D if N_D > 0 else tl.cdiv(D, BLOCK_D), arange_d, MP, BM, BLOCK_D)
        if NEED_GY:
            if not is_x:
                _block_grad(x_ptr, y_ptr, gy_ptr, w, row0, blk0, is_x, stride_x, stride_y, M, D,
                            N_D if N_D > 0 else tl.cdiv(D, BLOCK_D), arange_d, MP, BM, BLOCK_D)


@triton.jit
def _block_grad(x_ptr, y_ptr, g_ptr, w, row0, blk0, is_x, stride_x, stride_y, M, D, n_d, arange_d,
                MP: tl.constexpr, BM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 2 of one row block: grad_i = sum_j W_ij (z_i - z_j) into g_ptr's rows, D in reverse."""
    for t in range(0, n_d):
        offs_d = (n_d - 1 - t) * BLOCK_D + arange_d
        zj = _stack(_load_rows(x_ptr, row0, stride_x, M, offs_d, D, MP, "evict_first"),
                    _load_rows(y_ptr, row0, stride_y, M, offs_d, D, MP, "evict_first"), MP, BLOCK_D)
        zi = _block_rows(x_ptr, y_ptr, row0, blk0, is_x, stride_x, stride_y, M, offs_d, D, BM)
        grad = tl.sum(w[:, :, None] * (zi[:, None, :] - zj[None, :, :]), axis=1)  # (BM, BLOCK_D)
        _store_rows(g_ptr, row0 + blk0, M - blk0, offs_d, D, grad, BM)


@triton.jit
def _block_rows(x_ptr, y_ptr, row0, blk0, is_x, stride_x, stride_y, M, offs_d, D, BM: tl.constexpr):
    """The block's BM rows (x rows when is_x, else y rows) from blk0 on, (BM, BLOCK_D) fp32."""
    zx = _load_rows(x_ptr, row0 + blk0, stride_x, tl.where(is_x, M - blk0, 0), offs_d, D, BM, "evict_last")
    zy = _load_rows(y_ptr, row0 + blk0, stride_y, tl.where(is_x, 0, M - blk0), offs_d, D, BM, "evict_last")
    return tl.where(is_x, zx, zy)


# ----------------------------------------------------------------------------------------------------------------
# Launcher

def plan(M: int, D: int, itemsize: int, arch: int = 90):
    """Launch shape for group size M, row length D, input element size and compile target: a dict with the kernel
    ("pairs" or "rows"), MP, BM (rows kernel), VEC, BLOCK_D and num_warps."""
    MP = triton.next_power_of_2(M)
    vec_max = 16 // itemsize  # one 16-byte load per row and thread
    if MP <= _MAX_MP_PAIRS:
        pairs, BM = MP * (2 * MP - 1), None
        kernel = "pairs"
    else:
        BM = max(1, _ROWS_REGS // (2 * MP))
        pairs, kernel = BM * 2 * MP, "rows"
    # Compiled for sm_80 at M = 4, triton 3.6 spills 4-8 B per thread with 4 columns and none with 2, while triton
    # 3.9 spills 24-28 B with 2 (it caps them at 128 registers) and none with 4: half the budget on 3.6's sm_80 only.
    budget = (_PAIR_REGS if kernel == "pairs" else _ROWS_REGS) // (2 if arch < 90 and _OLD_TRITON else 1)
    cols = max(1, min(vec_max, budget // pairs))
    cols = 1 << (cols.bit_length() - 1)  # a power of two
    # Small D: fewer warps rather than idle lanes (each row still spans the warps' lanes once).
    warps = max(1, min(_WARPS, triton.next_power_of_2(triton.cdiv(D, 32 * cols))))
    return {"kernel": kernel, "MP": MP, "BM": BM, "VEC": 1, "BLOCK_D": 32 * warps * cols, "num_warps": warps}


def _programs(device: torch.device, items: int, group_bytes: int) -> int:
    """Persistent programs: enough to fill the SMs, few enough that the groups in flight fit in L2's share."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        sms, l2 = props.multi_processor_count, getattr(props, "L2_cache_size", _DEFAULT_L2)
    else:
        sms, l2 = _DEFAULT_SMS, _DEFAULT_L2
    per_sm = max(1, min(_PROGRAMS_PER_SM, int(_L2_SHARE * l2 // max(1, sms * group_bytes))))
    return max(1, min(items, sms * per_sm))


def hbm_elements(B: int, D: int, need_gx: bool, need_gy: bool) -> int:
    """Elements this design moves through HBM (the model's count): read x and y once, write each gradient asked
    for once; pass 2 re-reads from L2 (the launcher sizes the programs in flight for it)."""
    return B * D * (2 + int(bool(need_gx)) + int(bool(need_gy)))


def _rows_view(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"{name} must be a (B, D) view, got shape {tuple(t.shape)}")
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


def mmd_fwd(x2d, y2d, group_size, scale, eps, rbf, normalize_dim, need_gx, need_gy, *, coef=None):
    """Launcher: (mmd2 (G,) fp32 unweighted, gx (B, D) dtype of x or absent, gy (B, D) dtype of y or absent).

    x2d, y2d: (B, D) with any row stride (a unit column stride is made if missing); scale: (G,) s_g.
    coef: None or (G,) c_g, folded into the gradients: gx = c_g dMMD2_g/dx (so a backward whose dL/dMMD2_g is c
    has nothing left to do: mmd_rescale_). Gradients not asked for are (0,) tensors (imm_fast._backend.absent),
    like every backend and the fake.
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
    coef = torch.ones_like(scale) if coef is None else coef.reshape(G).to(scale).contiguous()
    p = plan(M, D, max(x2d.element_size(), y2d.element_size()), target_arch(x2d.device))
    gx = torch.empty((B, D), device=x2d.device, dtype=x2d.dtype) if need_gx else x2d.new_empty(0)
    gy = torch.empty((B, D), device=y2d.device, dtype=y2d.dtype) if need_gy else y2d.new_empty(0)
    nb = 1 if p["kernel"] == "pairs" else 2 * p["MP"] // p["BM"]
    out = torch.empty((G * nb,), device=x2d.device, dtype=torch.float32)  # (G,) or (G, NB) partials
    group_bytes = 2 * M * D * max(x2d.element_size(), y2d.element_size())
    interpret = x2d.device.type == "cpu"  # the Triton interpreter: one program per work item, Python loop bounds
    grid = (G * nb,) if interpret else (_programs(x2d.device, G * nb, group_bytes),)
    N = 2 * p["MP"]
    scratch = torch.empty((grid[0] * 2 * N * N if nb == 1 else 1,), device=x2d.device, dtype=torch.float32)
    args = (x2d, y2d, gx if need_gx else x2d, gy if need_gy else y2d, out, scale, coef, scratch,
            x2d.stride(0), y2d.stride(0), D, M, G, 1.0 / D if normalize_dim else 1.0, 1.0 / (M * M), float(eps))
    # libdevice on every GPU target (also meta tensors compiled for one); the CPU interpreter has none.
    meta = dict(RBF=bool(rbf), LIBDEVICE=x2d.device.type != "cpu", NEED_GX=bool(need_gx), NEED_GY=bool(need_gy),
                MP=p["MP"], BLOCK_D=p["BLOCK_D"], VEC=p["VEC"], num_warps=p["num_warps"],
                N_D=triton.cdiv(D, p["BLOCK_D"]) if interpret else 0)
    with device_guard(x2d):  # launch on the tensors' device, not whichever CUDA device is current
        if p["kernel"] == "pairs":
            _mmd_fwd_kernel[grid](*args, **meta)
        else:
            _mmd_rows_kernel[grid](*args, BM=p["BM"], **meta)
    mmd2 = out if nb == 1 else out.view(G, nb).sum(dim=1)  # (G,): a fresh tensor, not a view
    return mmd2, gx, gy


# ----------------------------------------------------------------------------------------------------------------
# The backward: the stored gradient rescaled in place, only where the folded coefficient was not dL/dMMD2_g

@triton.jit
def _mmd_rescale_kernel(
    g_ptr,        # (G, S) in/out, contiguous: group g's stored gradient c_g dMMD2_g/dz (S = M * D values)
    f_ptr,        # (G,) fp32: f_g = dL/dMMD2_g, what the gradient must be scaled by
    c_ptr,        # (G,) fp32: c_g, what it is scaled by now (the forward's coef, or an earlier backward's f)
    S,            # values per group
    SAFE_C: tl.constexpr,  # c is the forward's coef: apply the forward's _safe_coef rule to it
    BLOCK: tl.constexpr,   # values per program
):
    g = tl.program_id(0)
    f = tl.load(f_ptr + g)
    c = tl.load(c_ptr + g)
    if SAFE_C:
        c = _safe_coef(c)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # f == c (the caller's hint was right): the mask is all false and the program moves no bytes.
    todo = offs < tl.where(f != c, S, 0)
    ptr = g_ptr + g.to(tl.int64) * S + offs
    z = tl.load(ptr, mask=todo, other=0.0).to(tl.float32)
    tl.store(ptr, (z * tl.div_rn(f, c)).to(g_ptr.dtype.element_ty), mask=todo)


def mmd_rescale_(g: torch.Tensor, f: torch.Tensor, c: torch.Tensor, safe_c: bool = True) -> torch.Tensor:
    """In place: the rows of group g of the contiguous (B, D) gradient g times f_g / c_g, skipped (no bytes
    moved) where f_g == c_g (imm_fast.ops.mmd.rescale_factor is the same factor). Returns g. f, c: (G,);
    safe_c: c is the coef the forward folded (taken through the same _safe_coef rule), not an earlier f."""
    G = f.numel()
    if not g.is_contiguous() or g.numel() % max(G, 1):
        raise ValueError(f"g must be a contiguous gradient of G={G} equal groups, got shape {tuple(g.shape)}")
    S = g.numel() // G
    BLOCK = 4096
    f = f.reshape(G).to(device=g.device, dtype=torch.float32).contiguous()
    c = c.reshape(G).to(device=g.device, dtype=torch.float32).contiguous()
    with device_guard(g):
        _mmd_rescale_kernel[(G, triton.cdiv(S, BLOCK))](g, f, c, S, SAFE_C=bool(safe_c), BLOCK=BLOCK,
                                                         num_warps=4)
    return g
