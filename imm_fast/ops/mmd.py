"""Grouped MMD loss of IMM (the kernel MMD^2 of the training loss; formula in mmd_loss_ref).

Shapes: B rows = G groups x M particles (group g is rows g*M .. g*M+M-1), D values per row.

Layering: mmd_loss_ref (pure torch, the spec) | kernels/mmd.py mmd_fwd (Triton) and imm_fast._ext (C++/CUDA)
share one contract, mmd_fwd(x2d, y2d, M, scale, eps, rbf, normalize_dim, need_gx, need_gy) -> (MMD2_g, gx, gy),
wrapped by the custom op imm_fast::mmd_fwd (fake impl + autograd) | mmd_loss applies weight and reduction to the
(G,) vector in torch and picks the backend. A launcher that takes `coef` (Triton) stores c_g dMMD2_g/dz with c_g the
expected dL/dMMD2_g (from grad_hint, weight and reduction), so the backward returns it untouched where the
expectation was right and rescales only the other groups (in place on eager CUDA tensors).
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import Optional

import torch

from .. import _backend

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
    if x[0].numel() == 0:
        raise ValueError(f"x must have at least one value per row (D >= 1), got shape {tuple(x.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a positive float, got {eps!r} ({type(eps).__name__})")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")
    G = x.shape[0] // group_size
    for name, v in (("scale", scale), ("weight", weight)):
        if isinstance(v, torch.Tensor):
            if v.device != x.device:
                raise ValueError(f"{name} is on {v.device} but x is on {x.device}")
            if v.numel() != G and v.dim() != 0:
                raise ValueError(f"{name} must have G={G} values (one per group), got shape {tuple(v.shape)}")
        elif v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise TypeError(f"{name} must be a float or a tensor of shape ({G},), got {type(v).__name__}")
    # A float scale is checked here; a tensor scale's values are not read (that would wait for the device).
    if isinstance(scale, (int, float)) and not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale={scale!r} must be a finite float >= 0 (the kernel is exp(-scale * distance / D))")
    return G


def _pair_dist(a, b, eps, kernel, twice_differentiable):
    """Floored pair distances (G, M, M): max(||a-b||, eps) (laplace) or max(||a-b||^2, eps^2) (rbf)."""
    if twice_differentiable:  # broadcast differences (G*M*M*D memory); floored before the square root
        d2 = (a[:, :, None, :] - b[:, None, :, :]).square().sum(-1)  # (G, M, M)
        return d2.clamp_min(eps * eps).sqrt() if kernel == "laplace" else d2.clamp_min(eps * eps)
    d = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")  # (G, M, M)
    return d.clamp_min(eps) if kernel == "laplace" else (d * d).clamp_min(eps * eps)


# Distances accumulate in float32 for fp16/bf16/fp32 rows; from this many values per row on, in float64
# (float32 sums over 2^22 values were measured 0.2-22% off float64).
F64_FROM_D = 2**20


def mmd_loss_ref(x, y, group_size, scale=1.0, weight=None, eps=1e-4, kernel="laplace",
                 normalize_dim=True, reduction="mean", *, twice_differentiable=False):
    """Grouped MMD^2 of IMM (Zhou, Ermon, Song 2025, "Inductive Moment Matching", the training loss's kernel
    MMD estimate with its Laplace kernel), in plain torch: the spec, the CPU fallback and the tests' baseline.

    x (student), y (target): (B, ...) with B = G * group_size; group g is rows g*M .. g*M+M-1 (M = group_size),
    each row flattened to D values. With s_g = scale_g (the paper's w~(s,t)) and D -> 1 if not normalize_dim:
      k(a, b) = exp(-s_g * max(||a - b||_2, eps) / D)          kernel="laplace" (the paper's kernel)
      k(a, b) = exp(-s_g * max(||a - b||_2^2, eps^2) / D)      kernel="rbf"
      MMD2_g = (1/M^2) sum_{i,j} [k(x_i, x_j) + k(y_i, y_j) - 2 k(x_i, y_j)]   (V-statistic, diagonal included)
    Returns: reduction "mean" -> mean_g(weight_g MMD2_g), a 0-d tensor; "sum" -> sum_g(...), 0-d; "none" ->
    the (G,) vector weight_g MMD2_g. The dtype is the promoted dtype of x and y; weight defaults to 1.
    Accumulation: float32 for fp16/bf16/fp32 inputs (float64 rows stay float64), float64 once D >= 2^20, so
    every dtype runs on every device and agrees with the kernels. Non-finite input: a NaN or +-inf in any row of
    group g makes MMD2_g NaN and every gradient entry of group g's rows NaN (all backends alike); other groups
    are unaffected. Distances come from differences (cdist without the matrix-product shortcut), which does not
    cancel when particles are close. twice_differentiable=True forms them from broadcast differences instead
    (G*M*M*D memory): differentiable twice (create_graph=True; cdist's backward is not).
    """
    G = check_mmd_args(x, y, group_size, scale, weight, eps, kernel, reduction)
    M = group_size
    X = x.reshape(G, M, -1)  # (G, M, D)
    Y = y.reshape(G, M, -1)  # (G, M, D)
    D = X.shape[-1] if normalize_dim else 1
    dt = torch.promote_types(x.dtype, y.dtype)
    cdt = torch.float64 if dt == torch.float64 or X.shape[-1] >= F64_FROM_D else torch.float32
    X, Y = X.to(cdt), Y.to(cdt)
    s = _as_group_vector(scale, G, "scale", X).view(G, 1, 1)  # (G, 1, 1)

    def k(a, b):
        return torch.exp(-s * _pair_dist(a, b, eps, kernel, twice_differentiable) / D)

    mmd2 = (k(X, X) + k(Y, Y) - 2 * k(X, Y)).mean(dim=(1, 2))  # (G,)
    mmd2 = mmd2 + _nonfinite_poison(X, Y)
    if weight is not None:
        mmd2 = mmd2 * _as_group_vector(weight, G, "weight", mmd2)
    out = mmd2.mean() if reduction == "mean" else mmd2.sum() if reduction == "sum" else mmd2
    return out.to(dt)


def _nonfinite_poison(X, Y):
    """(G,): 0 for groups whose rows are finite, NaN otherwise, with gradient 0 (finite groups) or NaN (every
    entry of a non-finite group's rows): the semantics the kernels implement. Without it autograd leaves a
    mixture (finite entries beside NaN ones) that differs from backend to backend."""
    finite = torch.isfinite(X).flatten(1).all(1) & torch.isfinite(Y).flatten(1).all(1)  # (G,)
    poison = torch.where(finite, 0.0, float("nan")).to(X.dtype).view(-1, 1, 1)
    # X * 0 = 0 for finite values (no overflow, unlike 0 * sum); d/dX = poison.
    return (X * poison).sum(dim=(1, 2)) + (Y * poison).sum(dim=(1, 2))


@torch.no_grad()
def mmd_terms(x, y, group_size, scale=1.0, eps=1e-4, kernel="laplace", normalize_dim=True):
    """Per-group diagnostics (G, 3): the kernel means student-student, target-target and cross."""
    G = check_mmd_args(x, y, group_size, scale, None, eps, kernel, "none")
    X = x.reshape(G, group_size, -1).float()
    Y = y.reshape(G, group_size, -1).float()
    D = X.shape[-1] if normalize_dim else 1
    s = _as_group_vector(scale, G, "scale", X).view(G, 1, 1)

    def kmean(a, b):
        return torch.exp(-s * _pair_dist(a, b, eps, kernel, False) / D).mean(dim=(1, 2))

    return torch.stack([kmean(X, X), kmean(Y, Y), kmean(X, Y)], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Kernel backends behind one custom op

def _ext_module(device_type: str):
    """The C++/CUDA extension for this device type, or None (no extension module yet, or it failed to build)."""
    from .. import _ext

    return _ext.mmd_ext(device_type)


def _ext_ready(device_type: str):
    from .. import _ext

    return _ext.unavailable(device_type)


def _register():
    """mmd's implementations, auto order first to last. CUDA: "triton" before the CUDA extension until device
    measurements (benchmarks/bench_mmd.py) say otherwise; CPU: the C++ extension."""
    def scale_grad(args):
        return ["a scale that requires grad needs the reference (the kernels give no dL/dscale)"] \
            if args.get("scale_grad") else []

    def triton_launcher(device_type):
        from ..kernels.mmd import mmd_fwd

        return mmd_fwd

    def ext_launcher(device_type):
        return _ext_module(device_type).mmd_fwd

    Impl, dtypes = _backend.Impl, _backend.KERNEL_DTYPES
    _backend.register("mmd", Impl("triton", devices=("cuda", "cpu"), dtypes=dtypes, ready=_backend.triton_ready,
                                  limits=scale_grad, auto_skip=_backend.interpreter_not_auto,
                                  launcher=triton_launcher))
    _backend.register("mmd", Impl("cuda", devices=("cuda",), dtypes=dtypes, ready=_ext_ready, limits=scale_grad,
                                  launcher=ext_launcher))
    _backend.register("mmd", Impl("cpp", devices=("cpu",), dtypes=dtypes, ready=_ext_ready, limits=scale_grad,
                                  launcher=ext_launcher))


_register()


def _usable(name: str, device_type: str) -> bool:
    """Backend name can run fp32 mmd_loss on tensors of this device type here."""
    impl = next((i for i in _backend.impls("mmd") if i.name == name), None)
    return impl is not None and not impl.why_not(_backend.op_args(device_type, torch.float32))


def _pick_backend(backend, device_type: str, dtype=torch.float32) -> str:
    """argument > IMM_FAST_BACKEND > auto, for fp32 tensors of device_type (see imm_fast._backend)."""
    return _backend.select("mmd", backend, device_type, dtype)


@functools.lru_cache(maxsize=None)
def _folds(fn) -> bool:
    """A launcher that takes `coef` folds c_g into the gradients it stores; the others store dMMD2_g/dz."""
    try:
        return "coef" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin (the C++/CUDA ops) has no Python signature
        return False


def _launch(backend: str, x2d, y2d, group_size, scale, eps, rbf, normalize_dim, need_gx, need_gy, coef):
    mmd_fwd = _backend.launcher("mmd", backend, x2d.device.type)
    extra = {"coef": coef} if coef is not None and _folds(mmd_fwd) else {}
    return mmd_fwd(x2d, y2d, group_size, scale, eps, rbf, normalize_dim, need_gx, need_gy, **extra)


@torch.library.custom_op("imm_fast::mmd_fwd", mutates_args=())
def _mmd_fwd_op(x2d: torch.Tensor, y2d: torch.Tensor, group_size: int, scale: torch.Tensor, eps: float, rbf: bool,
                normalize_dim: bool, need_gx: bool, need_gy: bool, backend: str,
                coef: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(MMD2_g (G,) fp32 unweighted, dMMD2_g/dx (B, D) or empty, dMMD2_g/dy (B, D) or empty); with coef (G,),
    a launcher that folds it returns c_g dMMD2_g/dx and c_g dMMD2_g/dy (the backward then knows what it holds)."""
    # Launchers return fresh tensors (a custom op may not return views) and _backend.absent for gradients not
    # asked for, as the fake implementation does.
    return _launch(backend, x2d, y2d, group_size, scale, eps, rbf, normalize_dim, need_gx, need_gy, coef)


@_mmd_fwd_op.register_fake
def _(x2d, y2d, group_size, scale, eps, rbf, normalize_dim, need_gx, need_gy, backend, coef=None):
    B, D = x2d.shape
    mmd2 = x2d.new_empty((B // group_size,), dtype=torch.float32)
    gx = x2d.new_empty((B, D)) if need_gx else _backend.absent(x2d)
    gy = y2d.new_empty((B, D)) if need_gy else _backend.absent(y2d)
    return mmd2, gx, gy


def _setup_context(ctx, inputs, output):
    _, gx, gy = output
    ctx.save_for_backward(gx, gy)
    ctx.need = inputs[7:9]  # need_gx, need_gy
    coef, backend, device_type = inputs[10], inputs[9], inputs[0].device.type
    # c_g, what the stored gradients are scaled by now (None: 1). Kept on ctx, not saved: an in-place backward
    # replaces it, and saved tensors may not change.
    ctx.folded = coef if coef is not None and _folds(_backend.launcher("mmd", backend, device_type)) else None
    ctx.safe = True  # ctx.folded is the forward's coef, folded through the safe_coef rule
    ctx.mark_non_differentiable(gx, gy)
    ctx.set_materialize_grads(False)  # else autograd fills (B, D) zeros for the unused grads of gx and gy


_TINY, _MAX = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max


def safe_coef(c: torch.Tensor) -> torch.Tensor:
    """The coefficient the kernels fold: c, or 1 where c is 0, subnormal, infinite or NaN (a gradient scaled by
    such a c would lose its information); kernels/mmd.py's _safe_coef is the same rule."""
    a = c.abs()
    return torch.where((a >= _TINY) & (a <= _MAX), c, torch.ones_like(c))


def rescale_factor(f: torch.Tensor, c: torch.Tensor, safe_c: bool = True) -> torch.Tensor:
    """(G,) fp32: what the backward multiplies group g's stored gradient by: 1 where f_g == c_g, else f_g / c_g,
    with c through safe_coef when it is the forward's coef (kernels/mmd.py's mmd_rescale_ does the same in
    place)."""
    f, c = f.float(), c.float()
    c = safe_coef(c) if safe_c else c
    return torch.where(f == c, torch.ones_like(f), f / c)


def _in_place_ok(*ts) -> bool:
    """Eager CUDA tensors with Triton here: the backward may rescale the stored gradients in place. Traced
    backwards (torch.compile, make_fx: fake, functional or mode-dispatched tensors) take the functional path."""
    return (all(type(t) is torch.Tensor and t.is_cuda and not torch._C._is_functional_tensor(t) for t in ts)
            and torch._C._len_torch_dispatch_stack() == 0 and not torch.compiler.is_compiling()
            and _backend.triton_ready("cuda") is None)


def _backward(ctx, g_mmd2, g_gx, g_gy):
    """dL/dx = f_g dMMD2_g/dx with f_g = dL/dMMD2_g (the same for y). The stored gradient holds c_g dMMD2_g/dx:
    where f_g == c_g (the caller's hint was right) it is returned as it is, with no pass over it; elsewhere it is
    scaled by f_g / c_g, in place on eager CUDA tensors (then c_g := f_g, so a second backward through a
    retained graph starts from what is stored), else into a new tensor."""
    if torch.is_grad_enabled():
        raise RuntimeError("mmd_loss kernels have no double backward (create_graph=True); use "
                           "imm_fast.ops.mmd.mmd_loss_ref(..., twice_differentiable=True), which runs on every "
                           "device and dtype")
    gx, gy = ctx.saved_tensors
    if g_mmd2 is None:  # grads are not materialized: nothing flowed into MMD2_g
        return (None,) * 11
    G = g_mmd2.shape[0]
    f = g_mmd2.float()
    c = torch.ones_like(f) if ctx.folded is None else ctx.folded
    stored = [gz for gz, need in zip((gx, gy), ctx.need) if need]
    if _in_place_ok(f, *stored):
        from ..kernels.mmd import mmd_rescale_

        for gz in stored:
            mmd_rescale_(gz, f, c, ctx.safe)
        ctx.folded, ctx.safe = f, False
        out = iter(stored)
    else:
        k = rescale_factor(f, c, ctx.safe).view(G, 1)
        # In fp32, rounded once to the gradient's dtype, as the in-place kernel does.
        out = iter([(gz.view(G, -1).float() * k).to(gz.dtype).view(gz.shape) for gz in stored])
    return tuple(next(out) if need else None for need in ctx.need) + (None,) * 9


_mmd_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _rows(t, B):
    """(B, D) view of t with a unit column stride, copying only when no such view exists."""
    t2 = t.reshape(B, -1)
    return t2 if t2.stride(1) == 1 or t2.shape[1] == 1 else t2.contiguous()


def mmd_loss(x, y, group_size, scale=1.0, weight=None, eps=1e-4, kernel="laplace", normalize_dim=True,
             reduction="mean", backend=None, *, grad_hint=1.0):
    """Grouped Laplace/RBF-kernel MMD^2 between x (student) and y (target): the formula, the return shape per
    reduction and the semantics of non-finite input are in imm_fast.mmd_loss_ref's docstring.

    x, y: (B, ...) with B = G * group_size; scale, weight: floats or (G,) tensors.
    backend: None (auto: the fastest available for the tensors' device: CUDA triton, CPU cpp, else torch),
    "torch" (the reference), "triton", "cpp" or "cuda"; chosen by imm_fast._backend's one rule (argument >
    IMM_FAST_BACKEND > auto; under torch.compile the choice is made once, when the function is traced).
    Gradients flow to x and y when they require grad (and to weight). The kernels take fp32/bf16/fp16 and
    accumulate in fp32; float64 inputs and a scale that requires grad run on the reference ("torch": asking for
    a kernel backend then raises with the reasons); for double backward see mmd_loss_ref(twice_differentiable).
    grad_hint: the gradient the backward is expected to bring to the returned value (a float, or for
    reduction="none" a (G,) tensor); 1.0 fits `mmd_loss(...).backward()`. The Triton kernel writes its gradient
    already scaled for it, so where the hint is right (bit for bit) the backward moves no bytes; where it is not,
    the backward scales the stored gradient once more (one pass over it, the cost without a hint). The values
    never depend on it.
    """
    G = check_mmd_args(x, y, group_size, scale, weight, eps, kernel, reduction)
    if isinstance(grad_hint, bool) or not isinstance(grad_hint, (numbers.Real, torch.Tensor)):
        raise TypeError(f"grad_hint must be a float or a tensor, got {type(grad_hint).__name__}")
    impl = _backend.select("mmd", backend, x.device.type, torch.promote_types(x.dtype, y.dtype),
                           scale_grad=isinstance(scale, torch.Tensor) and scale.requires_grad)
    if impl == "torch":
        return mmd_loss_ref(x, y, group_size, scale, weight, eps, kernel, normalize_dim, reduction)
    B = x.shape[0]
    dt = torch.promote_types(x.dtype, y.dtype)
    # One dtype per launch, as in the reference. fp16 runs in fp32: its gradients (~1e-6 at D = 3072, below
    # fp16's normal range) would lose digits if stored in fp16 before the backward's scaling.
    kdt = torch.float32 if dt == torch.float16 else dt
    x, y = x.to(kdt), y.to(kdt)  # no-ops when they agree
    s = _as_group_vector(scale, G, "scale", x.new_empty(0, dtype=torch.float32)).contiguous()  # (G,) fp32
    grad = torch.is_grad_enabled()
    need_gx, need_gy = grad and x.requires_grad, grad and y.requires_grad
    w = None if weight is None else _as_group_vector(weight, G, "weight", s)  # (G,) fp32
    coef = _expected_grad(grad_hint, w, G, dt, reduction, s) if need_gx or need_gy else None
    mmd2, _, _ = torch.ops.imm_fast.mmd_fwd(
        _rows(x, B), _rows(y, B), group_size, s, float(eps), kernel == "rbf", bool(normalize_dim),
        need_gx, need_gy, impl, coef)  # mmd2: (G,) fp32
    if w is not None:
        mmd2 = mmd2 * w
    out = mmd2.mean() if reduction == "mean" else mmd2.sum() if reduction == "sum" else mmd2
    return out.to(dt)


def _expected_grad(grad_hint, w, G, dt, reduction, like):
    """(G,) fp32: dL/dMMD2_g if the returned value's gradient is grad_hint, computed with the operations autograd
    runs backward through mmd_loss's last lines, so a right hint matches bit for bit (the kernels replace a 0 or
    non-finite value by 1). A number: its share per group is worked out on the CPU, then one fill (and one product
    with weight) on the device."""
    if isinstance(grad_hint, torch.Tensor):
        if reduction != "none" and grad_hint.numel() != 1:
            raise ValueError(f"grad_hint must be a float for reduction={reduction!r}, got shape "
                             f"{tuple(grad_hint.shape)}")
        c = _as_group_vector(grad_hint.detach(), G, "grad_hint", like.new_empty(0, dtype=dt)).float()
        c = c / G if reduction == "mean" else c
    else:
        h = torch.tensor(float(grad_hint), dtype=dt).float()  # the ToCopy of out.to(dt), backward
        h = h / G if reduction == "mean" else h
        c = torch.full((G,), h.item(), dtype=torch.float32, device=like.device)
    return c if w is None else c * w
