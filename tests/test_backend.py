"""The one backend registry (imm_fast/_backend.py): one rule for every op, one convention for absent outputs, the
fused/reference switch, checks before dispatch, and an import that loads no torch._dynamo."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported in this process

import pytest  # noqa: E402

from _backends import TOY, kernel_backends, skip_unless_runs, toys  # noqa: E402
from imm_fast import _backend  # noqa: E402
from imm_fast.ops.adaln import (adaln_modulate, adaln_modulate_ref, gated_residual_adaln,  # noqa: E402
                                gated_residual_adaln_ref)
from imm_fast.ops.attention import attention, attention_ref  # noqa: E402
from imm_fast.ops.mmd import mmd_loss, mmd_loss_ref  # noqa: E402

TRITON = _backend.triton_usable(torch.device("cpu"))


def _cpp():
    from imm_fast import _ext

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _ext.mmd_ext("cpu") is not None


# One call per op on CPU fp32 tensors: (name, run(backend) -> output, reference output).
def _calls():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    h = torch.randn(2, 3, 16, generator=g)
    shift, scale = torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g)
    qkv = torch.randn(1, 4, 3 * 2 * 8, generator=g)
    return [
        ("mmd", lambda b: mmd_loss(x, y, 4, backend=b), mmd_loss_ref(x, y, 4)),
        ("adaln", lambda b: adaln_modulate(h, shift, scale, backend=b), adaln_modulate_ref(h, shift, scale)),
        ("attention", lambda b: attention(qkv, 2, backend=b), attention_ref(qkv, 2)),
    ]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(_backend.ENV, raising=False)
    _backend._warned.clear()


def test_every_op_lists_its_backends_reference_last():
    for op in ("mmd", "adaln", "attention"):
        names = [i.name for i in _backend.impls(op)]
        assert names[-1] == "torch" and "triton" in names and len(set(names)) == len(names)
    assert [i.name for i in _backend.impls("mmd")] == ["triton", "cuda", "cpp", "torch"]


@pytest.mark.parametrize("op, run, want", _calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_precedence_argument_env_auto(op, run, want, monkeypatch):
    """argument > IMM_FAST_BACKEND > auto, the same for every op (auto on CPU never picks the interpreter)."""
    args = _backend.op_args("cpu", torch.float32, **({"Dh": 8} if op == "attention" else {}))
    auto = _backend.auto(op, args)
    assert auto == ("cpp" if op == "mmd" and _cpp() else "torch")
    torch.testing.assert_close(run(None), want, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv(_backend.ENV, "torch")
    assert _backend.select(op, None, "cpu", torch.float32, **dict(args.extra)) == "torch"
    assert torch.equal(run(None), want)  # the reference itself
    if TRITON:
        assert _backend.select(op, "triton", "cpu", torch.float32, **dict(args.extra)) == "triton"  # arg wins
        torch.testing.assert_close(run("triton"), want, rtol=1e-5, atol=1e-5)
        monkeypatch.setenv(_backend.ENV, "triton")
        assert _backend.select(op, None, "cpu", torch.float32, **dict(args.extra)) == "triton"


@pytest.mark.parametrize("op, run, want", _calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_explicit_backend_that_cannot_run_lists_every_reason(op, run, want):
    with pytest.raises(ValueError) as e:
        run("cuda")  # CPU tensors
    msg = str(e.value)
    assert f"{op}: backend='cuda' cannot run on cpu float32" in msg
    for name in ("torch", "triton", "cpp", "cuda"):
        assert f"\n  {name}: " in msg, (name, msg)
    assert "\n  torch: can run" in msg
    if op == "mmd":
        assert "\n  cuda: runs on cuda tensors, not cpu" in msg
    else:
        assert f"\n  cuda: not implemented for {op}" in msg


@pytest.mark.parametrize("op, run, want", _calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_env_backend_that_cannot_run_warns_once_and_goes_auto(op, run, want, monkeypatch):
    """The documented behaviour, identical for all ops: one warning per op and case, then auto."""
    monkeypatch.setenv(_backend.ENV, "cuda")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out1, out2 = run(None), run(None)
    mine = [x for x in w if f"IMM_FAST_BACKEND='cuda' cannot run {op}" in str(x.message)]
    assert len(mine) == 1, [str(x.message) for x in w]
    torch.testing.assert_close(out1, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out2, out1, rtol=0, atol=0)


def test_env_name_that_is_no_backend_raises(monkeypatch):
    monkeypatch.setenv(_backend.ENV, "numpy")
    for _, run, _ in _calls():
        with pytest.raises(ValueError, match="IMM_FAST_BACKEND='numpy' is not one of"):
            run(None)


def test_a_new_backend_is_one_registration():
    op = "toy_for_test"
    try:
        _backend.register(op, _backend.Impl("cpp", devices=("cpu",), dtypes=(torch.float32,),
                                            limits=lambda a: [] if a.get("n", 0) <= 4 else ["n > 4"],
                                            launcher=lambda device_type: None))
        assert [i.name for i in _backend.impls(op)] == ["cpp", "torch"]
        assert _backend.select(op, None, "cpu", torch.float32, n=3) == "cpp"
        assert _backend.select(op, None, "cpu", torch.float64, n=3) == "torch"  # auto falls back
        assert _backend.select(op, None, "cpu", torch.float32, n=9) == "torch"
        with pytest.raises(ValueError, match=r"(?s)cpp: takes float32, not float64.*torch: can run"):
            _backend.select(op, "cpp", "cpu", torch.float64, n=3)
        with pytest.raises(ValueError, match="cpp: n > 4"):
            _backend.select(op, "cpp", "cpu", torch.float32, n=9)
    finally:
        _backend.unregister(op, "cpp")
    with pytest.raises(KeyError, match="no backends registered for op 'toy_for_test'"):
        _backend.impls(op)


def test_any_well_formed_name_registers_and_bad_ones_are_named():
    op, launch = "named_for_test", (lambda device_type: None)
    try:
        _backend.register(op, _backend.Impl("my_kernels2", launcher=launch))
        assert _backend.names(op) == ("my_kernels2", "torch") and "my_kernels2" in _backend.names()
        _backend.register(op, _backend.Impl("my_kernels2", devices=("cuda",), launcher=launch))  # replaces in place
        assert _backend.names(op) == ("my_kernels2", "torch")
        assert _backend.impls(op)[0].devices == ("cuda",)
        for bad in ("Bad Name", "", "9lives", "x" * 40, None):
            with pytest.raises(ValueError, match="must be a short lowercase name"):
                _backend.register(op, _backend.Impl(bad, launcher=launch))
        with pytest.raises(ValueError, match="'torch' is the pure-torch reference"):
            _backend.register(op, _backend.Impl("torch", launcher=launch))
        with pytest.raises(ValueError, match="needs launcher="):
            _backend.register(op, _backend.Impl("nolauncher"))
        with pytest.raises(TypeError, match="must be an imm_fast._backend.Impl"):
            _backend.register(op, "my_kernels3")
        with pytest.raises(KeyError, match="no removable backend 'torch'"):
            _backend.unregister(op, "torch")
    finally:
        _backend.unregister(op, "my_kernels2")
    assert "my_kernels2" not in _backend.names()


def _toy_calls():
    """Per op with a toy backend (tests/_backends.py): run(backend) -> (output, its gradients), and the reference."""
    g = torch.Generator().manual_seed(3)
    h, y = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    mod = torch.randn(2, 3, 16, generator=g).unbind(1)  # gate, shift, scale (B, C)
    qkv = torch.randn(1, 5, 3 * 2 * 8, generator=g)
    norm = tuple(torch.randn(8, generator=g) for _ in range(4))

    def grads(fn, inputs):
        inputs = [t.clone().requires_grad_() for t in inputs]
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        gs = torch.autograd.grad(sum((o * (k + 1.5)).sum() for k, o in enumerate(outs)), inputs)
        return [o.detach() for o in outs] + list(gs)

    def adaln(b):
        fn = gated_residual_adaln_ref if b == "ref" else functools.partial(gated_residual_adaln, backend=b)
        return grads(lambda x, yy, gt, sh, sc: fn(x, gt, yy, sh, sc), [h, y, *mod])

    def attn(b):
        fn = attention_ref if b == "ref" else functools.partial(attention, backend=b)
        return grads(lambda x, *n: fn(x, 2, n), [qkv, *norm])

    return {"adaln": adaln, "attention": attn}


@pytest.mark.parametrize("op", ["adaln", "attention"])
def test_a_toy_backend_is_selected_run_and_removed(op, monkeypatch):
    """A backend under a new name is one registration: argument, IMM_FAST_BACKEND and auto pick it, the custom
    ops run its launchers (forward and backward), and unregistering removes every trace (no stale choice)."""
    run, calls = _toy_calls()[op], []
    want = run("ref")
    facts = {"Dh": 8} if op == "attention" else {}
    with toys(calls):
        assert _backend.names(op)[-2:] == (TOY, "torch")
        assert _backend.select(op, TOY, "cpu", torch.float32, **facts) == TOY
        assert _backend.auto(op, _backend.op_args("cpu", torch.float32, **facts)) == TOY  # triton: interpreter
        for got, ref in zip(run(TOY), want):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert calls.count((op, "cpu")) == 2  # forward and backward launchers, through _backend.launcher
        monkeypatch.setenv(_backend.ENV, TOY)
        assert _backend.select(op, None, "cpu", torch.float32, **facts) == TOY
        with warnings.catch_warnings(record=True) as w:  # mmd has no toy: one warning, then auto
            warnings.simplefilter("always")
            mmd_loss(torch.randn(4, 3), torch.randn(4, 3), 2)
        assert [str(x.message) for x in w if "IMM_FAST_BACKEND='toy' cannot run mmd" in str(x.message)]
        monkeypatch.delenv(_backend.ENV)
    assert TOY not in _backend.names()
    with pytest.raises(ValueError, match="backend='toy' is not one of the registered backends"):
        _backend.select(op, TOY, "cpu", torch.float32, **facts)  # the cached choice went with the registration
    monkeypatch.setenv(_backend.ENV, TOY)
    with pytest.raises(ValueError, match="IMM_FAST_BACKEND='toy' is not one of the registered backends"):
        run(None)


_OP_TESTS_WITH_TOY = r"""
import os, sys
sys.path.insert(0, {tests!r})
import _backends
_backends.register_toys()
import pytest
sys.exit(pytest.main([os.path.join({tests!r}, "test_adaln.py"), os.path.join({tests!r}, "test_attention.py"),
                      "-q", "-p", "no:cacheprovider", "-k", "toy and not 2x256x1152 and not compile",
                      "-rA", "--rootdir", {tests!r}]))
"""


@pytest.mark.slow
def test_op_tests_run_over_a_new_backend_without_editing_them(tmp_path):
    """With the toy backend registered before collection, the adaLN and attention tests parametrize over it and
    pass: no test list names backends."""
    tests = os.path.dirname(os.path.abspath(__file__))
    code = _OP_TESTS_WITH_TOY.format(tests=tests)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    passed = [line for line in r.stdout.splitlines() if line.startswith("PASSED") and "toy]" in line]
    for name in ("test_adaln.py::test_matches_float64_reference", "test_adaln.py::test_fakes_return_distinct",
                 "test_attention.py::test_fp32", "test_attention.py::test_half", "test_attention.py::test_opcheck"):
        assert any(name in line for line in passed), (name, r.stdout[-3000:])


def test_mmd_kernel_dtypes_and_grad_scale_are_reasons():
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    torch.testing.assert_close(mmd_loss(x, y, 4), mmd_loss_ref(x, y, 4))  # auto: the reference
    with pytest.raises(ValueError, match="takes float32/bfloat16/float16, not float64"):
        mmd_loss(x, y, 4, backend="cpp")
    s = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="scale that requires grad"):
        mmd_loss(x.float(), y.float(), 4, scale=s, backend="cpp")


# ---------------------------------------------------------------------------------------------------------------
# One convention for outputs not asked for: (0,) tensors, alike from launchers, C++ code and fakes

def _absent_ok(t, dtype):
    assert t.shape == (0,) and t.dtype == dtype, (t.shape, t.dtype)


def test_absent_outputs_mmd():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, y, s = torch.randn(6, 5), torch.randn(6, 5), torch.rand(3) + 0.5
    backends = (["triton"] if TRITON else []) + (["cpp"] if _cpp() else [])
    for b in backends:
        _, gx, gy = torch.ops.imm_fast.mmd_fwd(x, y, 2, s, 1e-4, False, True, True, False, b)
        assert gx.shape == x.shape
        _absent_ok(gy, torch.float32)
        with FakeTensorMode():
            fx, fy = torch.empty(6, 5, dtype=torch.bfloat16), torch.empty(6, 5, dtype=torch.bfloat16)
            _, fgx, fgy = torch.ops.imm_fast.mmd_fwd(fx, fy, 2, torch.empty(3), 1e-4, False, True, False, False, b)
        _absent_ok(fgx, torch.bfloat16)
        _absent_ok(fgy, torch.bfloat16)
    if _cpp():  # the C++ op itself and its fake
        _, gx, gy = torch.ops.imm_fast_C.mmd_fwd(x.double(), y.double(), 2, s.double(), 1e-4, False, True, False,
                                                 True)
        _absent_ok(gx, torch.float64)
        assert gy.shape == x.shape
        with FakeTensorMode():
            f = torch.empty(6, 5, dtype=torch.float64)
            _, fgx, _ = torch.ops.imm_fast_C.mmd_fwd(f, f, 2, torch.empty(3, dtype=torch.float64), 1e-4, False, True,
                                                     False, True)
        _absent_ok(fgx, torch.float64)


@pytest.mark.skipif(not TRITON, reason="triton interpreter not usable")
def test_absent_outputs_adaln_and_attention():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, g = torch.randn(2, 3, 16), torch.randn(2, 16)
    real = torch.ops.imm_fast.adaln_fwd(x, g, x, None, None, 0.0, "triton")  # residual only: out, mean, rstd absent
    with FakeTensorMode():
        fx, fg = torch.empty(2, 3, 16), torch.empty(2, 16)
        fake = torch.ops.imm_fast.adaln_fwd(fx, fg, fx, None, None, 0.0, "triton")
    for r, f in zip(real[1:], fake[1:]):
        _absent_ok(r, torch.float32)
        _absent_ok(f, torch.float32)
    from imm_fast.ops.attention import _attention_bwd_op, _attention_fwd_op

    qkv = torch.randn(1, 4, 48)
    o, lse = _attention_fwd_op(qkv, 2, None, None, None, None, 0.35, 1e-5, "triton")
    grads = _attention_bwd_op(torch.randn_like(o), qkv, o, lse, 2, None, None, None, None, 0.35, 1e-5, "triton")
    assert len(grads) == 5 and grads[0].shape == qkv.shape
    for t in grads[1:]:
        _absent_ok(t, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# The fused / reference switch

def test_resolve_fused_precedence(monkeypatch):
    rf = _backend.resolve_fused
    auto_cuda = _backend.has_triton()
    assert rf(None, "cpu") is False and rf(None, "cuda") is auto_cuda
    assert rf(True, "cpu") is True and rf(False, "cuda") is False  # an explicit fused wins over auto
    assert rf(True, "cuda", reference=True) is False  # reference wins over everything
    monkeypatch.setenv(_backend.ENV, "torch")
    assert rf(None, "cuda") is False  # the environment asks for the reference
    assert rf(True, "cuda") is True  # an explicit fused still wins over the environment
    with pytest.raises(TypeError, match="fused must be None, True or False, got 'yes'"):
        rf("yes", "cpu")
    assert _backend.reference_loss_backend(None, reference=True) == "torch"
    assert _backend.reference_loss_backend("cpp") == "cpp"


def test_dit_uses_the_one_resolution(monkeypatch):
    from imm_fast.models.dit import DiT

    calls = []
    real = _backend.resolve_fused
    monkeypatch.setattr(_backend, "resolve_fused", lambda *a, **k: calls.append(a) or real(*a, **k))
    m = DiT(8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=2)
    m(torch.randn(2, 1, 8, 8), torch.rand(2))
    assert calls and calls[-1][0] is None and calls[-1][1].type == "cpu"


# ---------------------------------------------------------------------------------------------------------------
# Checks before dispatch, infinities, double backward

@pytest.mark.parametrize("backend", [None, "torch"] + kernel_backends("mmd"))
def test_bad_arguments_fail_the_same_on_every_backend(backend):
    if backend is not None:
        skip_unless_runs("mmd", backend, "cpu")
    x, y = torch.randn(8, 5), torch.randn(8, 5)
    with pytest.raises(ValueError, match=r"at least one value per row \(D >= 1\)"):
        mmd_loss(torch.randn(8, 0), torch.randn(8, 0), 4, backend=backend)
    with pytest.raises(ValueError, match=r"scale=-1.0 must be a finite float >= 0"):
        mmd_loss(x, y, 4, scale=-1.0, backend=backend)
    with pytest.raises(TypeError, match="eps must be a positive float, got True"):
        mmd_loss(x, y, 4, eps=True, backend=backend)
    with pytest.raises(TypeError, match="eps must be a positive float, got '1e-4'"):
        mmd_loss(x, y, 4, eps="1e-4", backend=backend)
    with pytest.raises(ValueError, match="eps must be a positive finite float"):
        mmd_loss(x, y, 4, eps=float("inf"), backend=backend)


@pytest.mark.parametrize("backend", kernel_backends("mmd"))
@pytest.mark.parametrize("kernel", ["laplace", "rbf"])
@pytest.mark.parametrize("where, value", [("x", float("inf")), ("x", -float("inf")), ("y", float("inf"))])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside Triton's interpreter
def test_infinities_give_nan_like_the_reference(backend, kernel, where, value):
    """x[1,3] = inf: the reference gives NaN for that group (inf - inf on the diagonal); so must every backend."""
    skip_unless_runs("mmd", backend, "cpu")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    (x if where == "x" else y)[1, 3] = value
    want = mmd_loss_ref(x.double(), y.double(), 2, scale=2.0, kernel=kernel, reduction="none")
    xk = x.clone().requires_grad_()
    got = mmd_loss(xk, y, 2, scale=2.0, kernel=kernel, reduction="none", backend=backend)
    assert torch.isnan(want[0]) and torch.isnan(got[0])
    torch.testing.assert_close(got[1:].double(), want[1:], rtol=1e-5, atol=1e-7)
    (gx,) = torch.autograd.grad(got[1:].sum(), xk)  # the finite group's gradient stays finite
    assert torch.isfinite(gx[2:]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_double_backward_path_named_in_the_error_works(dtype):
    """The path the kernels' double-backward error names: mmd_loss_ref(..., twice_differentiable=True)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 6, generator=g).to(dtype).requires_grad_()
    y = torch.randn(8, 6, generator=g).to(dtype)
    s = torch.tensor([1.5, 0.7])
    for kernel in ("laplace", "rbf"):
        out = mmd_loss_ref(x, y, 4, scale=s, kernel=kernel, twice_differentiable=True)
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.square().sum(), x)
        assert ggx.dtype == dtype and torch.isfinite(ggx).all()
        x64 = x.detach().double().requires_grad_()
        ref = mmd_loss_ref(x64, y.double(), 4, scale=s.double(), kernel=kernel)  # the cdist version
        (gref,) = torch.autograd.grad(ref, x64)
        tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
        torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(gx.double(), gref, rtol=tol, atol=tol * gref.abs().max().item())
    if TRITON:
        xk = x.detach().float().requires_grad_()
        out = mmd_loss(xk, y.float(), 4, backend="triton")
        with pytest.raises(RuntimeError, match=r"mmd_loss_ref\(\.\.\., twice_differentiable=True\)"):
            torch.autograd.grad(out, xk, create_graph=True)


# ---------------------------------------------------------------------------------------------------------------

def test_import_loads_no_dynamo():
    code = ("import sys, imm_fast, imm_fast.ops.mmd, imm_fast.ops.adaln, imm_fast.ops.attention, imm_fast.models\n"
            "bad = [m for m in ('torch._dynamo', 'triton') if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_constant_mark_is_what_torch_sets():
    """constant_under_compile sets the attribute torch.compiler.assume_constant_result sets (so that a torch
    upgrade that changes it fails here, not silently under torch.compile)."""
    marked = torch.compiler.assume_constant_result(lambda: 0)
    assert getattr(marked, "_dynamo_marked_constant", False) is True
    assert getattr(_backend.select, "_dynamo_marked_constant", False) is True
