"""Grouped MMD: every backend against mmd_loss_ref in float64 (value, dL/dx, dL/dy), dispatch, compile, errors.

Shapes: B = G groups x M particles, D values per row. Backends: "torch" (the reference itself), "triton" (on CPU
under TRITON_INTERPRET=1, small shapes), "cpp" / "cuda" (the extension; skipped while imm_fast._ext is absent
or cannot build). GPU-only tests are marked gpu and skip without CUDA.
"""
from __future__ import annotations

import functools
import math
import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported in this process

import pytest  # noqa: E402

from _backends import kernel_backends  # noqa: E402
from imm_fast import _backend  # noqa: E402
from imm_fast.ops import mmd as mmd_mod  # noqa: E402
from imm_fast.ops.mmd import mmd_loss, mmd_loss_ref  # noqa: E402

CUDA = torch.cuda.is_available()
KERNEL_BACKENDS = kernel_backends("mmd")  # every registered backend but the reference (cuda skips on the CPU)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# Max-norm relative error allowed for gradients, and value error in units of the weights' scale, per input dtype
# (bf16/fp16 gradients are rounded to the input dtype on output).
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
VALUE_TOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _ext(device_type):
    try:
        from imm_fast import _ext
    except ImportError:
        return None
    return _ext.mmd_ext(device_type)


def _skip_unless_usable(backend, device):
    if backend == "triton" and not _backend.triton_usable(torch.device(device)):
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    if backend in ("cpp", "cuda"):
        if (backend == "cpp") != (device == "cpu"):
            pytest.skip(f"{backend} does not run on {device}")
        if _ext(device) is None:
            pytest.skip(f"the {backend} extension is not available")
    if device == "cuda" and not CUDA:
        pytest.skip("needs a CUDA device")


def _inputs(G, M, D, dtype, device, case, gen):
    """x, y (B, D) in dtype: independent, duplicated particles, or near-duplicates (||x - y|| ~ 1e-3 ||x||)."""
    B = G * M
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)
    if case == "random":
        y = torch.randn(B, D, generator=gen, dtype=torch.float64) * 0.8 + 0.3
    elif case == "near":
        y = x + 1e-3 * torch.randn(B, D, generator=gen, dtype=torch.float64)
    elif case == "dup":  # distance exactly 0: within x, within y and across
        y = torch.randn(B, D, generator=gen, dtype=torch.float64)
        x.view(G, M, D)[:, -1] = x.view(G, M, D)[:, 0]
        y.view(G, M, D)[:, 0] = x.view(G, M, D)[:, 0]
        if M > 2:
            y.view(G, M, D)[:, 2] = y.view(G, M, D)[:, 1]
    else:
        raise AssertionError(case)
    return x.to(device, dtype), y.to(device, dtype)


def _same_dtype_ref(x, y, group_size, scale, weight, eps, kernel, reduction):
    """The formula of mmd_loss_ref computed by torch in the inputs' dtype (cdist has no bf16/fp16 on the CPU):
    distances from broadcast differences, floored before the square root so duplicates give zero gradient."""
    G, M = x.shape[0] // group_size, group_size
    X, Y = x.reshape(G, M, -1), y.reshape(G, M, -1)  # (G, M, D)
    s = scale.view(G, 1, 1)

    def k(a, b):
        d2 = ((a[:, :, None, :] - b[:, None, :, :]) ** 2).sum(-1)  # (G, M, M)
        tiny = torch.finfo(d2.dtype).tiny  # eps^2 underflows in fp16; sqrt'(0) would give NaN
        d = d2.clamp_min(tiny).sqrt().clamp_min(eps) if kernel == "laplace" else d2.clamp_min(eps * eps)
        return torch.exp(-s * d / X.shape[-1])

    v = (k(X, X) + k(Y, Y) - 2 * k(X, Y)).mean(dim=(1, 2))
    v = v if weight is None else v * weight
    return v.mean() if reduction == "mean" else v.sum() if reduction == "sum" else v


def _strided(t, gen):
    """The same values as t in a (B, D) view with a padded row stride (no copy needed by the kernels)."""
    B, D = t.shape
    base = torch.randn(B, D + 5, generator=gen).to(t.device, t.dtype)
    base[:, 2:D + 2] = t
    return base[:, 2:D + 2]


def _maxrel(a, ref, dtype):
    """Max-norm relative error of a, not counting the rounding step of dtype's subnormals (fp16 gradients of
    near-duplicates are ~1e-6, where fp16 keeps only a few bits)."""
    sub = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    return (((a.double() - ref).abs() - sub).clamp_min(0).max() / ref.abs().max().clamp_min(1e-300)).item()


def _run(fn, x, y, gout, need_y=True, **kw):
    """(value, dL/dx, dL/dy or None) of fn on leaf copies of x, y that keep their strides."""
    x = x.detach().requires_grad_()
    y = y.detach().requires_grad_(need_y)
    out = fn(x, y, **kw)
    grads = torch.autograd.grad(out, (x, y) if need_y else (x,), gout)
    return out.detach(), grads[0], grads[1] if need_y else None


def _check(backend, device, G, M, D, dtype=torch.float32, case="random", kernel="laplace", reduction="mean",
           weighted=True, strided=False, need_y=True, seed=0):
    """mmd_loss(backend) against mmd_loss_ref in float64 on the same rounded inputs: value, dL/dx, dL/dy."""
    gen = torch.Generator().manual_seed(1000 * seed + 97 * M + 13 * D + G)
    x, y = _inputs(G, M, D, dtype, device, case, gen)
    # Per-group scale so the exponent s d / D is O(1) at any D (laplace: d ~ sqrt(2D); rbf: d^2 ~ 2D).
    s = (0.5 + torch.rand(G, generator=gen, dtype=torch.float64)) * (math.sqrt(D) if kernel == "laplace" else 1.0)
    w = 0.5 + torch.rand(G, generator=gen, dtype=torch.float64) if weighted else None
    gout = torch.randn(G, generator=gen, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0)
    if strided:
        x, y = _strided(x, gen), _strided(y, gen)
        assert x.stride(0) == D + 5
    kw = dict(group_size=M, eps=1e-4, kernel=kernel, reduction=reduction)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731

    got = _run(mmd_loss, x, y, gout.to(device, dtype), need_y,
               scale=dev(s.float()), weight=dev(None if w is None else w.float()), backend=backend, **kw)
    ref = _run(mmd_loss_ref, x.double(), y.double(), gout.to(device), need_y, scale=dev(s), weight=dev(w), **kw)
    same = _run(_same_dtype_ref, x, y, gout.to(device, dtype), need_y,  # the same formula in torch, same dtype
                scale=dev(s.to(dtype)), weight=dev(None if w is None else w.to(dtype)), **kw)

    assert got[0].dtype == same[0].dtype and got[0].shape == ref[0].shape
    # Value: within VALUE_TOL of the weights' scale, and never more than 2x the same-dtype torch error
    # (+ 1 ulp of the output, which both round to dtype).
    wscale = 1.0 if w is None else (w.sum().item() if reduction == "sum" else w.abs().max().item())
    ulp = torch.finfo(dtype).eps
    err_v = (got[0].double().cpu() - ref[0].cpu()).abs().max().item()
    err_v_same = (same[0].double().cpu() - ref[0].cpu()).abs().max().item()
    assert err_v <= VALUE_TOL[dtype] * wscale, (err_v, err_v_same)
    assert err_v <= 2 * err_v_same + ulp * ref[0].abs().max().item() + 1e-7 * wscale, (err_v, err_v_same)
    for name, g, r, gs in (("dx", got[1], ref[1], same[1]), ("dy", got[2], ref[2], same[2])):
        if r is None:
            assert g is None
            continue
        assert g.dtype == dtype and g.shape == r.shape and g.device == r.device
        e, e_same = _maxrel(g.cpu(), r.cpu(), dtype), _maxrel(gs.cpu(), r.cpu(), dtype)
        # RBF on near-duplicates is ill-conditioned in any order of this formula: the gradient is ~1e-3 of its
        # terms (c_xx (x_i - x_j) and c_xy (x_i - y_j) nearly cancel), so fp32 rounding of k gives ~5e-5
        # relative in torch and here alike; only the 2x-of-torch rule applies there.
        if not (kernel == "rbf" and case == "near" and dtype == torch.float32):
            assert e <= GRAD_RTOL[dtype], (name, e, e_same)
        assert e <= 2 * e_same + (1e-6 if dtype == torch.float32 else ulp / 2), (name, e, e_same)


# ---------------------------------------------------------------------------------------------------------------
# Compiled backends on the CPU (cpp): the full grid of the issue

GRID = [(M, D, G) for M in (1, 2, 3, 4, 8, 16) for D in (1, 7, 64, 3072) for G in (1, 5)]


@pytest.mark.parametrize("M,D,G", GRID, ids=[f"M{m}-D{d}-G{g}" for m, d, g in GRID])
@pytest.mark.parametrize("case", ["random", "near", "dup"])
def test_cpp_grid(M, D, G, case):
    _skip_unless_usable("cpp", "cpu")
    # The IMM call: y (the target) is detached; here for the near-duplicate single-group cases.
    _check("cpp", "cpu", G, M, D, case=case, reduction=("mean", "sum", "none")[(M + D) % 3],
           need_y=not (case == "near" and G == 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kernel", ["laplace", "rbf"])
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
def test_cpp_dtypes_kernels_strides(dtype, kernel, strided):
    _skip_unless_usable("cpp", "cpu")
    for case in ("random", "near"):
        _check("cpp", "cpu", 5, 4, 64, dtype=dtype, case=case, kernel=kernel, strided=strided)
    _check("cpp", "cpu", 2, 8, 3072, dtype=torch.float32, case="near", kernel=kernel, strided=strided)


# ---------------------------------------------------------------------------------------------------------------
# Triton (interpreter on the CPU: small shapes, few cases; the full grid runs on CUDA in the gpu tier)

TRITON_CPU = [  # (M, D, G, case)
    (1, 7, 5, "random"), (2, 1, 5, "dup"), (3, 7, 5, "dup"), (4, 64, 5, "near"), (8, 7, 1, "near"),
    (16, 64, 1, "random"), (4, 3072, 1, "near"), (64, 5, 1, "dup"),  # M = 64: several row blocks per group
]


@pytest.mark.parametrize("M,D,G,case", TRITON_CPU, ids=[f"M{m}-D{d}-G{g}-{c}" for m, d, g, c in TRITON_CPU])
def test_triton_cpu(M, D, G, case):
    _skip_unless_usable("triton", "cpu")
    _check("triton", "cpu", G, M, D, case=case, reduction=("mean", "sum", "none")[(M + G) % 3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kernel", ["laplace", "rbf"])
def test_triton_cpu_dtypes_kernels_strided(dtype, kernel):
    _skip_unless_usable("triton", "cpu")
    _check("triton", "cpu", 3, 4, 33, dtype=dtype, case="near", kernel=kernel, strided=True, reduction="none")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_options(backend):
    """normalize_dim=False, no weight, only x requiring grad (the IMM target y is detached), float scale."""
    _skip_unless_usable(backend, "cpu")
    gen = torch.Generator().manual_seed(5)
    x, y = _inputs(3, 4, 9, torch.float32, "cpu", "random", gen)
    for kernel in ("laplace", "rbf"):
        kw = dict(group_size=4, scale=0.3, eps=1e-4, kernel=kernel, normalize_dim=False, reduction="none")
        xr = x.double().requires_grad_()
        ref = mmd_loss_ref(xr, y.double(), **kw)
        (gref,) = torch.autograd.grad(ref.sum(), xr)
        xk = x.clone().requires_grad_()
        out = mmd_loss(xk, y, backend=backend, **kw)
        (g,) = torch.autograd.grad(out.sum(), xk)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.double(), gref, rtol=1e-5, atol=1e-5 * gref.abs().max().item())
        # A weight that requires grad gets dL/dweight_g = MMD2_g (times the output gradient).
        wt = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
        wk = wt.float().requires_grad_()
        (gwk,) = torch.autograd.grad(mmd_loss(x, y, weight=wk, backend=backend, **kw).sum(), wk)
        wr = wt.clone().requires_grad_()
        (gwr,) = torch.autograd.grad(mmd_loss_ref(x.double(), y.double(), weight=wr, **kw).sum(), wr)
        torch.testing.assert_close(gwk.double(), gwr, rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # forward only: no gradient is computed or stored
            torch.testing.assert_close(mmd_loss(x, y, backend=backend, **kw).double(), ref.detach(),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_mixed_dtypes(backend):
    """x fp32 and y bf16 run in the promoted dtype, like the reference; dL/dy comes back in bf16."""
    _skip_unless_usable(backend, "cpu")
    gen = torch.Generator().manual_seed(8)
    x, y = _inputs(2, 4, 16, torch.float32, "cpu", "random", gen)
    y = y.bfloat16()
    xk, yk = x.clone().requires_grad_(), y.clone().requires_grad_()
    out = mmd_loss(xk, yk, 4, scale=2.0, backend=backend)
    gx, gy = torch.autograd.grad(out, (xk, yk))
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    ref = mmd_loss_ref(xr, yr, 4, scale=2.0)
    gxr, gyr = torch.autograd.grad(ref, (xr, yr))
    assert out.dtype == torch.float32 and gx.dtype == torch.float32 and gy.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx.double(), gxr, rtol=1e-5, atol=1e-5 * gxr.abs().max().item())
    torch.testing.assert_close(gy.double(), gyr, rtol=0, atol=4e-3 * gyr.abs().max().item())  # bf16 rounding


def test_triton_launcher_contract():
    """kernels.mmd.mmd_fwd: unweighted MMD2_g and d MMD2_g / d rows, empty tensors for gradients not asked for."""
    _skip_unless_usable("triton", "cpu")
    from imm_fast.kernels.mmd import mmd_fwd

    gen = torch.Generator().manual_seed(3)
    x, y = _inputs(2, 3, 10, torch.float32, "cpu", "random", gen)
    s = torch.rand(2, generator=gen) + 0.5
    mmd2, gx, gy = mmd_fwd(x, y, 3, s, 1e-4, False, True, True, False)
    assert mmd2.shape == (2,) and mmd2.dtype == torch.float32 and gx.shape == x.shape and gy.numel() == 0
    xr = x.double().requires_grad_()
    ref = mmd_loss_ref(xr, y.double(), 3, s.double(), reduction="none")
    (gref,) = torch.autograd.grad(ref.sum(), xr)
    torch.testing.assert_close(mmd2.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gx.double(), gref, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch, custom op, torch.compile

def test_auto_dispatch_cpu(monkeypatch):
    monkeypatch.delenv("IMM_FAST_BACKEND", raising=False)
    picked = mmd_mod._pick_backend(None, "cpu")
    # Never the Triton interpreter unless asked for, even with TRITON_INTERPRET=1 set.
    assert picked == ("cpp" if _ext("cpu") is not None else "torch")
    monkeypatch.setenv("IMM_FAST_BACKEND", "torch")
    assert mmd_mod._pick_backend(None, "cpu") == "torch"
    assert mmd_mod._pick_backend("torch", "cpu") == "torch"
    if _backend.triton_usable(torch.device("cpu")):
        monkeypatch.setenv("IMM_FAST_BACKEND", "triton")
        assert mmd_mod._pick_backend(None, "cpu") == "triton"
    monkeypatch.setenv("IMM_FAST_BACKEND", "cuda")  # not usable on CPU tensors: a warning, then auto
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert mmd_mod._pick_backend(None, "cpu") == picked


def test_dispatch_reaches_the_kernel(monkeypatch):
    """Each backend name runs its launcher through the custom op ("torch" none); auto on the CPU runs cpp when the
    extension loads; a row-strided input reaches the launcher as a view of the caller's storage (no copy)."""
    monkeypatch.delenv("IMM_FAST_BACKEND", raising=False)
    calls = []
    real = mmd_mod._launch

    def spy(backend, x2d, y2d, *a):
        calls.append((backend, x2d.untyped_storage().data_ptr(), x2d.stride()))
        return real(backend, x2d, y2d, *a)

    monkeypatch.setattr(mmd_mod, "_launch", spy)
    base = torch.randn(8, 9)
    x, y = base[:, 1:7], torch.randn(8, 6)  # x: row stride 9
    ref = mmd_loss(x, y, 4, backend="torch")
    assert calls == []
    expect = []
    for backend in ("triton", "cpp", None):
        name = backend or ("cpp" if _ext("cpu") is not None else "torch")
        if name == "torch" or not mmd_mod._usable(name, "cpu"):
            continue
        torch.testing.assert_close(mmd_loss(x, y, 4, backend=backend), ref, rtol=1e-5, atol=1e-7)
        expect.append((name, base.untyped_storage().data_ptr(), (9, 1)))
    assert calls == expect


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) (inductor) of a function calling mmd_loss: value and gradients match the
    float64 reference. With triton, y does not require grad (the IMM call); otherwise both gradients."""
    _skip_unless_usable(backend, "cpu")
    torch._dynamo.reset()

    def loss(x, y, w, fn=mmd_loss, **kw):
        return (fn(x * 1.5, y, 4, scale=2.0, kernel="laplace", reduction="none", **kw) * w).sum()

    gen = torch.Generator().manual_seed(11)
    x, y = torch.randn(12, 10, generator=gen), torch.randn(12, 10, generator=gen)
    w = torch.rand(3, generator=gen) + 0.5
    need_y = backend != "triton"
    compiled = torch.compile(functools.partial(loss, backend=backend), fullgraph=True)
    reference = functools.partial(loss, fn=mmd_loss_ref)
    outs = []
    for f, dt in ((compiled, torch.float32), (reference, torch.float64)):
        xx, yy = x.to(dt).requires_grad_(), y.to(dt).requires_grad_(need_y)
        out = f(xx, yy, w.to(dt))
        outs.append((out.detach(),) + torch.autograd.grad(out, (xx, yy) if need_y else (xx,)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("need", [(True, False), (True, True), (False, False)], ids=["gx", "gxgy", "none"])
def test_fake_impl_and_opcheck(backend, need):
    """The fake implementation and autograd registration agree with the real op (torch.library.opcheck)."""
    _skip_unless_usable(backend, "cpu")
    x, y = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=need[1])
    s = torch.rand(3) + 0.5
    torch.library.opcheck(torch.ops.imm_fast.mmd_fwd.default, (x, y, 2, s, 1e-4, False, True, *need, backend),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_static"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_with_coef(backend):
    """The op with a folded coefficient (what mmd_loss passes) also passes opcheck."""
    _skip_unless_usable(backend, "cpu")
    x, y = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5)
    s, c = torch.rand(3) + 0.5, torch.rand(3) + 0.1
    torch.library.opcheck(torch.ops.imm_fast.mmd_fwd.default, (x, y, 2, s, 1e-4, False, True, True, False, backend, c),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_static"))


def _spy_factors(monkeypatch):
    """Record each backward's rescale factors (all ones: the stored gradient was returned as it was)."""
    seen = []
    real = mmd_mod.rescale_factor

    def spy(f, c, *safe):
        k = real(f, c, *safe)
        seen.append(k)
        return k

    monkeypatch.setattr(mmd_mod, "rescale_factor", spy)
    return seen


HINT_CASES = [("mean", None, torch.float32), ("sum", None, torch.float32), ("none", None, torch.float32),
              ("mean", "w", torch.float32), ("none", "w", torch.bfloat16), ("mean", None, torch.float16)]


@pytest.mark.parametrize("reduction,weight,dtype", HINT_CASES, ids=[f"{r}-{w}-{str(d)[6:]}" for r, w, d in HINT_CASES])
def test_default_hint_is_exact(monkeypatch, reduction, weight, dtype):
    """mmd_loss(...).backward() (sum().backward() for "none"): the folded coefficient equals dL/dMMD2_g bit for
    bit, so the backward has nothing to scale; the gradient still matches the reference."""
    _skip_unless_usable("triton", "cpu")
    seen = _spy_factors(monkeypatch)
    gen = torch.Generator().manual_seed(7)
    G, M, D = 7, 4, 33
    x, y = _inputs(G, M, D, dtype, "cpu", "random", gen)
    w = torch.rand(G, generator=gen) * 3 if weight else None
    for fn, xx in ((functools.partial(mmd_loss, backend="triton"), x.clone().requires_grad_()),
                   (mmd_loss_ref, x.double().requires_grad_())):
        out = fn(xx, y.to(xx.dtype), M, weight=w, reduction=reduction)
        (out.sum() if reduction == "none" else out).backward()
        if fn is mmd_loss_ref:
            ref = xx.grad
        else:
            got = xx.grad
    assert len(seen) == 1 and bool((seen[0] == 1).all()), seen
    torch.testing.assert_close(got.double(), ref, rtol=GRAD_RTOL[dtype] * 10, atol=GRAD_RTOL[dtype] * ref.abs().max())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_wrong_hint_gives_the_same_gradient(backend):
    """A wrong grad_hint (or a backward that brings something else) costs a pass, never a value: loss * 3 with
    a hint of 0.5 per group, zero and non-finite hints included, against the reference in float64."""
    _skip_unless_usable(backend, "cpu")
    gen = torch.Generator().manual_seed(11)
    G, M, D = 5, 3, 17
    x, y = _inputs(G, M, D, torch.float32, "cpu", "near", gen)
    up = torch.rand(G, generator=gen) + 0.5
    hint = torch.tensor([0.5, 0.0, float("nan"), 1e38, -2.0])
    grads = []
    for xx, yy, kw in ((x.clone().requires_grad_(), y.clone().requires_grad_(), dict(backend=backend, grad_hint=hint)),
                       (x.double().requires_grad_(), y.double().requires_grad_(), dict(backend="torch"))):
        out = mmd_loss(xx, yy, M, reduction="none", **kw)
        (out * up.to(out.dtype)).sum().backward()
        grads.append((xx.grad.double(), yy.grad.double()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max())


def test_grad_hint_bad_input():
    x, y = torch.randn(8, 5, requires_grad=True), torch.randn(8, 5)
    with pytest.raises(TypeError, match="grad_hint"):
        mmd_loss(x, y, 4, grad_hint="1")
    with pytest.raises(ValueError, match="grad_hint"):
        mmd_loss(x, y, 4, grad_hint=torch.ones(2), backend="triton" if _backend.triton_interpret() else "cpp")


def test_in_place_backward_retained_graph(monkeypatch):
    """The eager-CUDA path (rescale the stored gradient in place, then remember what it holds), run here under the
    interpreter: two backwards through one retained graph with different dL/dMMD2_g, a third with the first again,
    each equal to the out-of-place result, and a group whose hint was right left untouched in memory."""
    _skip_unless_usable("triton", "cpu")
    calls = []
    from imm_fast.kernels import mmd as kmmd

    real = kmmd.mmd_rescale_

    def counting(g, f, c, *safe):
        calls.append((f.clone(), c.clone()))
        return real(g, f, c, *safe)

    monkeypatch.setattr(kmmd, "mmd_rescale_", counting)
    gen = torch.Generator().manual_seed(3)
    G, M, D = 4, 2, 9
    x, y = _inputs(G, M, D, torch.float32, "cpu", "random", gen)
    ups = [torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([3.0, 1.0, 1.0, -1.0])]
    expected = []
    for up in ups:  # the out-of-place path
        xx = x.clone().requires_grad_()
        (mmd_loss(xx, y, M, reduction="none", backend="triton") * up).sum().backward()
        expected.append(xx.grad.clone())
    monkeypatch.setattr(mmd_mod, "_in_place_ok", lambda *ts: True)
    xx = x.clone().requires_grad_()
    out = mmd_loss(xx, y, M, reduction="none", backend="triton")
    for k in (0, 1, 0):
        (g,) = torch.autograd.grad((out * ups[k]).sum(), xx, retain_graph=True)
        torch.testing.assert_close(g, expected[k], rtol=1e-6, atol=1e-7 * expected[k].abs().max())
    assert len(calls) == 3
    f0, c0 = calls[0]
    assert torch.equal(c0, torch.ones(G)) and torch.equal(f0, ups[0])  # hint 1: groups 0 and 3 were right
    torch.testing.assert_close(calls[1][1], ups[0])  # the second backward starts from what the first stored


def test_imm_loss_hint_is_exact(monkeypatch):
    """imm_loss's hint for (loss / grad_accum).backward() is dL/dMMD2_g bit for bit (fp32, grad_accum 1 and 3)."""
    _skip_unless_usable("triton", "cpu")
    from imm_fast.loss import _mean_grad

    gen = torch.Generator().manual_seed(5)
    G = 6
    w = torch.rand(G, generator=gen, dtype=torch.float64) * 10
    for A in (1, 3):
        mmd = torch.rand(G, requires_grad=True)
        contrib = w.to(mmd.dtype) * mmd
        ok = torch.tensor([True] * G)
        loss = torch.where(ok, contrib, torch.zeros(())).mean()
        (loss / A).backward()
        assert torch.equal(w.to(mmd.dtype) * _mean_grad(G, A, mmd.dtype), mmd.grad)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_imm_training_backward_has_nothing_to_rescale(monkeypatch, grad_accum):
    """The training step's (imm_loss(...).loss / grad_accum).backward() with the Triton MMD: every group's
    dL/dMMD2_g equals what the forward folded (the backward returns the stored gradient as it is), and the
    weights' gradients equal those of the reference MMD."""
    _skip_unless_usable("triton", "cpu")
    from _helpers import random_model
    from imm_fast.config import LossConfig
    from imm_fast.loss import imm_loss

    seen = _spy_factors(monkeypatch)
    m = random_model(img_resolution=8, img_channels=2, label_dim=0, patch_size=4, hidden_size=32, depth=1,
                     num_heads=2).train()
    x = torch.randn(8, 2, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    grads = []
    for backend in ("triton", "torch"):
        m.zero_grad(set_to_none=True)
        out = imm_loss(m, x, None, LossConfig(group_size=4, backend=backend),
                       generator=torch.Generator().manual_seed(2), grad_accum=grad_accum)
        (out.loss / grad_accum).backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    assert len(seen) == 1 and bool((seen[0] == 1).all()), seen
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6 * max(1.0, float(b.abs().max())))


def test_double_backward_raises():
    _skip_unless_usable("triton", "cpu")
    x = torch.randn(4, 3, requires_grad=True)
    out = mmd_loss(x, torch.randn(4, 3), 2, backend="triton")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, x, create_graph=True)


def test_float64_uses_reference():
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    assert mmd_loss(x, y, 4).dtype == torch.float64
    torch.testing.assert_close(mmd_loss(x, y, 4), mmd_loss_ref(x, y, 4))


# ---------------------------------------------------------------------------------------------------------------
# Bad input

@pytest.mark.parametrize("backend", [None, "torch"])
def test_bad_input(backend):
    x, y = torch.randn(8, 5), torch.randn(8, 5)
    with pytest.raises(ValueError, match="group_size"):
        mmd_loss(x, y, 3, backend=backend)
    with pytest.raises(ValueError, match="group_size"):
        mmd_loss(x, y, 0, backend=backend)
    with pytest.raises(ValueError, match="y must have x's shape"):
        mmd_loss(x, y[:, :4], 4, backend=backend)
    with pytest.raises(ValueError, match="device"):
        mmd_loss(x, torch.empty(8, 5, device="meta"), 4, backend=backend)
    with pytest.raises(ValueError, match="scale must have G=2"):
        mmd_loss(x, y, 4, scale=torch.ones(3), backend=backend)
    with pytest.raises(ValueError, match="weight must have G=2"):
        mmd_loss(x, y, 4, weight=torch.ones(5), backend=backend)
    with pytest.raises(ValueError, match="scale"):
        mmd_loss(x, y, 4, scale=float("nan"), backend=backend)
    with pytest.raises(ValueError, match="kernel"):
        mmd_loss(x, y, 4, kernel="gauss", backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        mmd_loss(x, y, 4, reduction="max", backend=backend)
    with pytest.raises(ValueError, match="eps"):
        mmd_loss(x, y, 4, eps=0.0, backend=backend)


def test_bad_backend():
    x, y = torch.randn(8, 5), torch.randn(8, 5)
    with pytest.raises(ValueError, match="backend"):
        mmd_loss(x, y, 4, backend="numpy")
    with pytest.raises(ValueError, match="backend='cuda'"):
        mmd_loss(x, y, 4, backend="cuda")  # CPU tensors


# ---------------------------------------------------------------------------------------------------------------
# GPU tier (skipped without CUDA)

GPU_GRID = [(M, D, G) for M in (1, 2, 3, 4, 8, 16) for D in (1, 7, 64, 3072) for G in (1, 5)] + [
    (4, 4096, 64), (8, 3072, 32), (16, 4096, 16), (4, 12288, 8), (64, 300, 3), (32, 77, 2)]


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("M,D,G", GPU_GRID, ids=[f"M{m}-D{d}-G{g}" for m, d, g in GPU_GRID])
def test_gpu_grid(backend, M, D, G):
    _skip_unless_usable(backend, "cuda")
    for i, case in enumerate(("random", "near", "dup")):
        _check(backend, "cuda", G, M, D, case=case, reduction=("mean", "sum", "none")[i], seed=i)


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kernel", ["laplace", "rbf"])
def test_gpu_dtypes_kernels_strided(backend, dtype, kernel):
    _skip_unless_usable(backend, "cuda")
    for strided in (False, True):
        for case in ("random", "near", "dup"):
            _check(backend, "cuda", 16, 4, 4096, dtype=dtype, case=case, kernel=kernel, strided=strided)


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_deterministic(backend):
    _skip_unless_usable(backend, "cuda")
    x = torch.randn(4096, 4096, device="cuda", requires_grad=True)
    y = torch.randn(4096, 4096, device="cuda")
    runs = []
    for _ in range(2):
        out = mmd_loss(x, y, 8, scale=64.0, backend=backend)
        runs.append((out.detach(), torch.autograd.grad(out, x)[0]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@gpu
@needs_cuda
def test_gpu_auto_dispatch():
    assert mmd_mod._pick_backend(None, "cuda") in ("triton", "cuda")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fp16_gradients_keep_their_digits(backend):
    """Unweighted gradients at D = 3072 are ~1e-6, below fp16's normal range: the kernels must not store them in
    fp16 before the backward scales them (fp16 inputs run in fp32; only the final gradient is rounded)."""
    _skip_unless_usable(backend, "cpu")
    G, M, D = (2, 4, 3072) if backend == "cpp" else (1, 2, 256)
    x = (torch.randn(G * M, D) * 0.5).half().requires_grad_()
    y = (torch.randn(G * M, D) * 0.5).half().requires_grad_()
    scale = torch.rand(G) * 20 + 1
    loss = mmd_loss(x, y, M, scale=scale, backend=backend)
    gx, gy = torch.autograd.grad(loss, (x, y))
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    want = torch.autograd.grad(mmd_loss_ref(x64, y64, M, scale=scale.double()), (x64, y64))
    for got, ref in zip((gx, gy), want):
        assert got.dtype == torch.float16
        err = (got.double() - ref).abs().max()
        err_round = (ref.half().double() - ref).abs().max()  # the best an fp16 gradient can do
        assert err <= 1.2 * err_round + 1e-9, (float(err), float(err_round))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("kernel", ["laplace", "rbf"])
def test_nan_particle_makes_its_group_nan(backend, kernel):
    """As in mmd_loss_ref: a NaN particle makes its group's MMD2 NaN (so the IMM loss's NaN guard sees it) and
    leaves the other groups untouched."""
    _skip_unless_usable(backend, "cpu")
    x, y = torch.randn(6, 9), torch.randn(6, 9)
    x[1, 4] = float("nan")
    got = mmd_loss(x, y, 2, scale=2.0, kernel=kernel, reduction="none", backend=backend)
    want = mmd_loss_ref(x.double(), y.double(), 2, scale=2.0, kernel=kernel, reduction="none")
    assert torch.isnan(got[0]) and torch.isnan(want[0])
    torch.testing.assert_close(got[1:].double(), want[1:], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# The reference as a fallback: every dtype, large D, non-finite input (the same answer on every backend)

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kernel", ["laplace", "rbf"])
def test_reference_runs_half_dtypes_on_cpu(dtype, kernel):
    """The torch fallback takes fp16/bf16 CPU tensors (accumulating in float32) and meets the kernels' tolerance
    against float64, for the value and both gradients."""
    for case in ("random", "near"):
        _check("torch", "cpu", 3, 4, 33, dtype=dtype, case=case, kernel=kernel, reduction="none")
    if _ext("cpu") is not None:  # and agrees with the C++ kernel on the same rounded inputs
        gen = torch.Generator().manual_seed(21)
        x, y = _inputs(3, 4, 65, dtype, "cpu", "random", gen)
        got = _run(mmd_loss, x, y, torch.ones((), dtype=dtype), group_size=4, scale=3.0, kernel=kernel,
                   backend="torch")
        cpp = _run(mmd_loss, x, y, torch.ones((), dtype=dtype), group_size=4, scale=3.0, kernel=kernel,
                   backend="cpp")
        torch.testing.assert_close(got[0].float(), cpp[0].float(), rtol=0, atol=VALUE_TOL[dtype])
        for g, c in zip(got[1:], cpp[1:]):
            assert g.dtype == dtype
            assert _maxrel(g, c.double(), dtype) <= 2 * GRAD_RTOL[dtype]


def test_reference_large_D_accumulates_in_float64():
    """D = 2^22 fp32 rows: float32 sums of 2^22 squares were 0.2-22% off; the reference now matches float64."""
    G, M, D = 1, 2, 2**22
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(G * M, D, generator=gen)
    y = torch.randn(G * M, D, generator=gen) * 0.9 + 0.05
    s = torch.tensor([math.sqrt(D) * 0.7])
    got = _run(mmd_loss_ref, x, y, torch.tensor(1.0), group_size=M, scale=s)
    ref = _run(mmd_loss_ref, x.double(), y.double(), torch.tensor(1.0, dtype=torch.float64), group_size=M,
               scale=s.double())
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0].double(), ref[0], rtol=2e-6, atol=1e-9)
    for g, r in zip(got[1:], ref[1:]):
        assert _maxrel(g, r, torch.float32) <= 2e-5


NONFINITE = [("x", 1, 2, float("inf")), ("x", 0, 0, -float("inf")), ("y", 3, 4, float("inf")),
             ("x", 2, 1, float("nan")), ("both", 1, 3, float("inf"))]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside Triton's interpreter
@pytest.mark.parametrize("kernel", ["laplace", "rbf"])
@pytest.mark.parametrize("where,row,col,value", NONFINITE, ids=[f"{w}{r}-{c}-{v}" for w, r, c, v in NONFINITE])
def test_nonfinite_input_same_on_every_backend(kernel, where, row, col, value):
    """A NaN or +-inf in a group's rows: MMD2_g is NaN and every gradient entry of that group's rows (x and y)
    is NaN, on torch, cpp and triton alike; the other groups keep their finite values and gradients."""
    gen = torch.Generator().manual_seed(9)
    G, M, D = 3, 2, 7
    x, y = _inputs(G, M, D, torch.float32, "cpu", "random", gen)
    if where in ("x", "both"):
        x[row, col] = value
    if where in ("y", "both"):
        y[row if where == "y" else row - 1, col] = value  # "both": two rows of group 0 share the inf column
    bad = row // M
    good = [g for g in range(G) if g != bad]
    rows_good = torch.tensor([g * M + i for g in good for i in range(M)])
    x64, y64 = x.double(), y.double()
    finite_ref = _run(mmd_loss_ref, x64[rows_good], y64[rows_good], torch.ones(len(good), dtype=torch.float64),
                      group_size=M, scale=2.0, kernel=kernel, reduction="none")
    for backend in ("torch", "cpp", "triton"):
        if backend != "torch" and not mmd_mod._usable(backend, "cpu"):
            continue
        out, gx, gy = _run(mmd_loss, x, y, torch.ones(G), group_size=M, scale=2.0, kernel=kernel, reduction="none",
                           backend=backend)
        assert torch.isnan(out[bad]), backend
        assert torch.isnan(gx.view(G, M, D)[bad]).all() and torch.isnan(gy.view(G, M, D)[bad]).all(), backend
        torch.testing.assert_close(out[good].double(), finite_ref[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gx[rows_good].double(), finite_ref[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gy[rows_good].double(), finite_ref[2], rtol=1e-5, atol=1e-6)


def test_mmd_loss_ref_is_public_with_its_formula():
    import imm_fast

    assert imm_fast.mmd_loss_ref is mmd_loss_ref and "mmd_loss_ref" in imm_fast.__all__
    doc = mmd_loss_ref.__doc__
    for part in ("MMD2_g = (1/M^2) sum_{i,j} [k(x_i, x_j) + k(y_i, y_j) - 2 k(x_i, y_j)]", "max(||a - b||_2, eps)",
                 "Returns:", "(G,)", "NaN"):
        assert part in doc, part
    assert "imm_fast.mmd_loss_ref" in mmd_loss.__doc__

