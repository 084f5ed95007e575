"""adaLN kernels of every registered backend (Triton under the interpreter on the CPU) against the float64
reference: outputs and every gradient; the custom ops' fakes against the real ops."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _backends import kernel_backends, skip_unless_runs  # noqa: E402
from imm_fast import _backend  # noqa: E402
from imm_fast.ops.adaln import (adaln_modulate, adaln_modulate_ref, gated_residual, gated_residual_adaln,  # noqa: E402
                                gated_residual_adaln_ref, gated_residual_ref)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = kernel_backends("adaln")  # every registered backend but the reference: a new one is tested here too
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
SHAPES = [(2, 16, 64), (3, 1, 72), (2, 16, 37), (2, 256, 1152)]  # (B, T, C): odd width, T = 1, DiT-XL width


def inputs(B, T, C, dtype):
    x = torch.randn(B, T, C, device=DEV).to(dtype).requires_grad_()
    y = torch.randn(B, T, C, device=DEV).to(dtype).requires_grad_()
    mod = (torch.randn(B, 6 * C, device=DEV) * 0.5).to(dtype).requires_grad_()  # chunk(6) gives strided views
    return x, y, mod


def run(op, x, y, mod, backend, weights):
    """Outputs and gradients of sum(out * weight) w.r.t. x, y and the (B, 6C) modulation tensor."""
    shift, scale, gate = mod.chunk(6, dim=1)[:3]
    if op == "modulate":
        outs = ((adaln_modulate_ref if backend == "ref" else adaln_modulate)(x, shift, scale,
                **({} if backend == "ref" else {"backend": backend})),)
        wrt = (x, mod)
    elif op == "residual":
        outs = ((gated_residual_ref if backend == "ref" else gated_residual)(x, gate, y,
                **({} if backend == "ref" else {"backend": backend})),)
        wrt = (x, y, mod)
    else:
        outs = (gated_residual_adaln_ref if backend == "ref" else gated_residual_adaln)(
            x, gate, y, shift, scale, **({} if backend == "ref" else {"backend": backend}))
        wrt = (x, y, mod)
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    return [o.detach().double() for o in outs], [g.double() for g in torch.autograd.grad(loss, wrt)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["modulate", "residual", "residual_adaln"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(op, dt, shape, backend):
    dtype = DTYPES[dt]
    skip_unless_runs("adaln", backend, DEV, dtype)
    x, y, mod = inputs(*shape, dtype)
    weights = [torch.randn(shape, device=DEV, dtype=torch.float64) for _ in range(2)]
    got = run(op, x, y, mod, backend, weights)
    same = run(op, x, y, mod, "ref", weights)  # torch in the same dtype
    x64, y64, m64 = (v.detach().double().requires_grad_() for v in (x, y, mod))
    want = run(op, x64, y64, m64, "ref", weights)
    for g, s, w in zip(got[0] + got[1], same[0] + same[1], want[0] + want[1]):
        assert g.shape == w.shape
        err, err_torch = (g - w).abs().max().item(), (s - w).abs().max().item()
        scale = w.abs().max().item() + 1.0
        assert err <= 2 * err_torch + ATOL[dtype] * scale, (err, err_torch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_tight_and_deterministic(backend):
    skip_unless_runs("adaln", backend, DEV)
    x, y, mod = inputs(2, 16, 72, torch.float32)
    shift, scale, gate = mod.chunk(6, dim=1)[:3]
    a = gated_residual_adaln(x, gate, y, shift, scale, backend=backend)
    b = gated_residual_adaln_ref(x, gate, y, shift, scale)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(a[1])
    g1 = torch.autograd.grad((a[1] * w).sum() + a[0].sum(), (x, y, mod), retain_graph=True)
    g2 = torch.autograd.grad((a[1] * w).sum() + a[0].sum(), (x, y, mod))
    for u, v in zip(g1, g2):
        assert torch.equal(u, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_output_and_modulation_dtype_promotion(backend):
    """Only x_new used (the modulated output unused); fp32 modulation on a bf16 stream promotes like torch."""
    skip_unless_runs("adaln", backend, DEV)
    x, y, mod = inputs(2, 8, 64, torch.bfloat16)
    m32 = mod.detach().float().requires_grad_()
    shift, scale, gate = m32.chunk(6, dim=1)[:3]
    xn, out = gated_residual_adaln(x, gate, y, shift, scale, backend=backend)
    rn, rout = gated_residual_adaln_ref(x, gate, y, shift, scale)
    assert xn.dtype == rn.dtype == torch.float32 and out.dtype == rout.dtype
    gx, gm = torch.autograd.grad(xn.sum(), (x, m32))
    rx, rm = torch.autograd.grad(rn.sum(), (x, m32))
    assert gx.dtype == torch.bfloat16 and gm.dtype == torch.float32
    torch.testing.assert_close(gm, rm, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gx, rx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_trace_under_compile(backend):
    skip_unless_runs("adaln", backend, DEV)
    x, y, mod = inputs(2, 4, 32, torch.float32)
    shift, scale, gate = (v.detach() for v in mod.chunk(6, dim=1)[:3])

    def f(x, y):
        xn, h = gated_residual_adaln(x, gate, y, shift, scale, backend=backend)
        return gated_residual(xn, gate, h, backend=backend).sum() + adaln_modulate(h, shift, scale,
                                                                                    backend=backend).sum()

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, y)
    torch.testing.assert_close(got, f(x, y))
    torch.library.opcheck(torch.ops.imm_fast.adaln_fwd.default,
                          (x.detach(), gate, y.detach(), shift, scale, 1e-6, backend))


# The three forms of the one schema (residual only, norm only, both) and the backward of each.
_FORMS = {"residual": (True, False), "modulate": (False, True), "residual_adaln": (True, True)}


def _fwd_args(form, x, y, gate, shift, scale, backend):
    res, norm = _FORMS[form]
    return (x, gate if res else None, y if res else None, shift if norm else None, scale if norm else None, 1e-6,
            backend)


def _bwd_args(form, outs, x, y, gate, scale, backend):
    res, norm = _FORMS[form]
    xnew, out, mean, rstd = outs
    xn = (xnew if res else x) if norm else None
    return (torch.ones_like(out) if norm else None, torch.ones_like(xnew) if res else None, xn, y if res else None,
            gate if res else None, scale if norm else None, mean if norm else None, rstd if norm else None, x.dtype,
            backend)


def _distinct(outs):
    return len({id(t) for t in outs}) == len(outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", list(_FORMS))
def test_fakes_return_distinct_outputs_like_the_real_op(form, backend):
    """Each output is its own tensor (absent ones too), in the real ops and in their fakes (FakeTensorMode and
    the graph torch.compile traces), with the same shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    skip_unless_runs("adaln", backend, DEV)
    x, y, mod = (t.detach() for t in inputs(2, 4, 32, torch.float32))
    shift, scale, gate = mod.chunk(6, dim=1)[:3]
    fwd, bwd = torch.ops.imm_fast.adaln_fwd, torch.ops.imm_fast.adaln_bwd
    real = fwd(*_fwd_args(form, x, y, gate, shift, scale, backend))
    real_b = bwd(*_bwd_args(form, real, x, y, gate, scale, backend))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx, fy, fm = (mode.from_tensor(t) for t in (x, y, mod))
        fshift, fscale, fgate = fm.chunk(6, dim=1)[:3]
        fake = fwd(*_fwd_args(form, fx, fy, fgate, fshift, fscale, backend))
        fake_b = bwd(*_bwd_args(form, fake, fx, fy, fgate, fscale, backend))
    for r, f in ((real, fake), (real_b, fake_b)):
        assert _distinct(r) and _distinct(f)
        assert [(t.shape, t.dtype) for t in r] == [(t.shape, t.dtype) for t in f]

    seen = []

    def spy(gm, example_inputs):  # the outputs of the traced fake call are distinct nodes' values
        for node in gm.graph.nodes:
            if node.op == "call_function" and "adaln_fwd" in str(node.target):
                seen.append(node.meta["example_value"])
        return gm

    args = _fwd_args(form, x, y, gate, shift, scale, backend)
    torch.compile(lambda *a: fwd(*a), backend=spy, fullgraph=True)(*args)
    assert len(seen) == 1 and _distinct(seen[0])


def test_bad_inputs():
    x, y, mod = inputs(2, 4, 32, torch.float32)
    shift, scale, gate = mod.chunk(6, dim=1)[:3]
    with pytest.raises(ValueError, match="x must"):
        adaln_modulate(x[0], shift, scale)
    with pytest.raises(ValueError, match="shift"):
        adaln_modulate(x, shift[:, :16], scale)
    with pytest.raises(ValueError, match="y must"):
        gated_residual(x, gate, y[:, :2])
    with pytest.raises(ValueError, match="backend"):
        gated_residual(x, gate, y, backend="cuda")


def test_auto_on_cpu_is_the_reference():
    if DEV != "cpu":
        pytest.skip("CPU only")
    x, y, mod = inputs(2, 4, 32, torch.float32)
    shift, scale, gate = mod.chunk(6, dim=1)[:3]
    assert torch.equal(adaln_modulate(x, shift, scale), adaln_modulate_ref(x, shift, scale))


_SM90_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import imm_fast.kernels.adaln as K

F32 = {"mean_ptr", "rstd_ptr", "pshift_ptr", "pscale_ptr", "pgate_ptr"}

def compile_sm90(fn, dtype, consts, warps):
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*fp32" if p.name in F32 else "*" + dtype
        else:
            sig[p.name] = "fp32" if p.name == "eps" else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 64), options=dict(num_warps=warps))

for T, C in ((256, 1152), (256, 768)):
    for res, norm in ((False, True), (True, False), (True, True)):
        rows, bt, bc, warps = K._blocks(T, C)
        compile_sm90(K._adaln_fwd_kernel, "bf16", dict(HAS_RES=res, HAS_NORM=norm, ROWS=rows, BLOCK_T=bt,
                                                       BLOCK_C=bc), warps)
        rows, bt, bc, warps = K._blocks(T, C, backward=True)
        compile_sm90(K._adaln_bwd_kernel, "bf16", dict(HAS_RES=res, HAS_NORM=norm, HAS_DXNEW=res, ROWS=rows,
                                                       BLOCK_T=bt, BLOCK_C=bc), warps)
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the kernels themselves")
def test_kernels_compile_for_sm90():
    """The interpreter checks no GPU constraint: compile both kernels ahead of time for an H100 (sm_90) with the
    launch configurations of the DiT-XL/2 and B/2 widths. Needs no GPU."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode and ("ptxas" in r.stderr and "not found" in r.stderr):
        pytest.skip("no Triton CUDA toolchain here: " + r.stderr.strip().splitlines()[-1][:200])
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
