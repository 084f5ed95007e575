"""C++ (CPU) and CUDA extension op torch.ops.imm_fast_C.mmd_fwd against mmd_loss_ref in float64.

Shapes: B = G*M rows (G groups of M particles), D values per row. The op returns MMD2_g (G,) and the
unweighted per-row gradients gx = d MMD2_g / d x_i, gy likewise (B, D); the reference gets them by autograd
through mmd_loss_ref(reduction="none").sum() (groups are independent).
"""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from imm_fast import _ext
from imm_fast.ops.mmd import mmd_loss_ref

EPS = 1e-4
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Per dtype: mmd2 (rtol, atol) and gradient (rtol, atol relative to max|g|, absolute atol floor). Low-precision
# inputs are compared with the float64 reference on the same (rounded) values, so the only extra error is the
# rounding of the returned gradient to bf16/fp16 (fp16: subnormal spacing 6e-8 for tiny gradients).
TOL = {
    torch.float64: dict(val=(1e-10, 1e-13), grad=(1e-9, 1e-11, 0.0)),
    torch.float32: dict(val=(1e-5, 1e-6), grad=(1e-4, 1e-5, 0.0)),
    torch.bfloat16: dict(val=(1e-5, 1e-6), grad=(1e-2, 2e-3, 0.0)),
    torch.float16: dict(val=(1e-5, 1e-6), grad=(2e-3, 1e-3, 1.2e-7)),
}


def _can_build() -> bool:
    return shutil.which("c++") is not None and shutil.which("ninja") is not None


@pytest.fixture(scope="module")
def ext():
    e = _ext.mmd_ext("cpu")
    if e is None:
        if _can_build():
            pytest.fail("a C++ compiler and ninja exist but the extension did not build (see the warning)")
        pytest.skip("no C++ compiler / ninja: the extension cannot be built here")
    return e


def reference(x, y, M, scale, kernel, normalize_dim=True):
    """float64 MMD2 (G,) and the gradients of its sum w.r.t. x and y (B, D)."""
    xd = x.detach().double().requires_grad_()
    yd = y.detach().double().requires_grad_()
    v = mmd_loss_ref(xd, yd, M, scale.double(), eps=EPS, kernel=kernel, normalize_dim=normalize_dim,
                     reduction="none")
    gx, gy = torch.autograd.grad(v.sum(), (xd, yd))
    return v.detach(), gx, gy


def check(got, want, dtype):
    (vr, va), (gr, ga, gfloor) = TOL[dtype]["val"], TOL[dtype]["grad"]
    m, gx, gy = got
    mw, gxw, gyw = want
    assert m.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(m.double(), mw, rtol=vr, atol=va)
    for g, gw in ((gx, gxw), (gy, gyw)):
        assert g.dtype == dtype and g.shape == gw.shape
        torch.testing.assert_close(g.double(), gw, rtol=gr, atol=ga * gw.abs().max().item() + gfloor)


def make(G, M, D, dtype, seed, near=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(G * M, D, generator=g, dtype=torch.float64)
    y = x + 0.5 * torch.randn(G * M, D, generator=g, dtype=torch.float64)  # targets near the students
    if near is not None:  # every row has a near-duplicate partner: ||a - b|| = near * ||a||
        x = x.view(G, M, D)
        x[:, 1::2] = x[:, 0::2][:, : x[:, 1::2].shape[1]] * (1 + near * torch.randn_like(x[:, 1::2]) / D ** 0.5)
        x = x.view(G * M, D)
        y = x + near * x.norm(dim=1, keepdim=True) * torch.randn(G * M, D, generator=g, dtype=torch.float64) / D ** 0.5
    scale = torch.rand(G, generator=g, dtype=torch.float64) + 0.5
    scale = scale if dtype == torch.float64 else scale.float()
    return x.to(dtype), y.to(dtype), scale


@pytest.mark.parametrize("kernel", ["laplace", "rbf"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("G", [1, 5])
@pytest.mark.parametrize("D", [1, 7, 64, 3072])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 8, 16])
def test_matches_reference(ext, M, D, G, dt, kernel):
    dtype = DTYPES[dt]
    x, y, scale = make(G, M, D, dtype, seed=1000 * M + 10 * D + G)
    got = ext.mmd_fwd(x, y, M, scale, EPS, kernel == "rbf", True, True, True)
    check(got, reference(x, y, M, scale, kernel), dtype)


@pytest.mark.parametrize("kernel", ["laplace", "rbf"])
@pytest.mark.parametrize("D", [1, 7])
def test_no_normalize_dim(ext, D, kernel):
    x, y, scale = make(3, 4, D, torch.float64, seed=7)
    x, y = 0.3 * x, 0.3 * y  # keep exp(-scale d) away from 0 without the 1/D
    got = ext.mmd_fwd(x, y, 4, scale, EPS, kernel == "rbf", False, True, True)
    check(got, reference(x, y, 4, scale, kernel, normalize_dim=False), torch.float64)


@pytest.mark.parametrize("dt", ["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["laplace", "rbf"])
def test_strided_rows(ext, dt, kernel):
    dtype = DTYPES[dt]
    G, M, D = 5, 4, 70
    xb, yb, scale = make(G, 2 * M, D + 3, dtype, seed=3)
    x = xb[::2, 1 : D + 1]  # row stride 2*(D+3), unit column stride
    y = yb[1::2, :D]
    assert not x.is_contiguous() and x.stride(1) == 1
    got = ext.mmd_fwd(x, y, M, scale[:G].contiguous(), EPS, kernel == "rbf", True, True, True)
    check(got, reference(x, y, M, scale[:G], kernel), dtype)


@pytest.mark.parametrize("dt", ["fp64", "fp32"])
@pytest.mark.parametrize("kernel", ["laplace", "rbf"])
def test_duplicates_and_clamp(ext, dt, kernel):
    """Exact duplicates (distance 0) and pairs closer than eps: clamped, no gradient through them."""
    dtype = DTYPES[dt]
    G, M, D = 2, 4, 64
    x, y, scale = make(G, M, D, torch.float64, seed=11)
    x[1] = x[0]               # x_0 == x_1
    y[2] = x[2]               # x_2 == y_2 (cross pair at distance 0)
    y[5] = y[4] + 0.3 * EPS / D ** 0.5  # 0 < ||y_4 - y_5|| < eps (rbf: below eps^2 too)
    x, y = x.to(dtype), y.to(dtype)
    got = ext.mmd_fwd(x, y, M, scale, EPS, kernel == "rbf", True, True, True)
    check(got, reference(x, y, M, scale, kernel), dtype)


@pytest.mark.parametrize("dt", ["fp64", "fp32"])
@pytest.mark.parametrize("kernel", ["laplace", "rbf"])
@pytest.mark.parametrize("D", [64, 3072])
def test_near_duplicates(ext, dt, kernel, D):
    """||a - b|| ~ 1e-3 ||a||: |a|^2 + |b|^2 - 2ab would lose about 6 digits here; differences do not."""
    dtype = DTYPES[dt]
    x, y, scale = make(3, 4, D, dtype, seed=5, near=1e-3)
    got = ext.mmd_fwd(x, y, 4, scale, EPS, kernel == "rbf", True, True, True)
    want = reference(x, y, 4, scale, kernel)
    if dtype == torch.float64:
        check(got, want, dtype)
        return
    # fp32: the rbf gradient sums nearly cancelling terms here, so compare with the error of the same-dtype
    # torch reference (err <= 2 * err_torch + atol), after a loose absolute check.
    xf, yf = x.clone().requires_grad_(), y.clone().requires_grad_()
    v = mmd_loss_ref(xf, yf, 4, scale, eps=EPS, kernel=kernel, reduction="none")
    torch_got = (v.detach(),) + torch.autograd.grad(v.sum(), (xf, yf))
    for i, (a, t, w) in enumerate(zip(got, torch_got, want)):
        scale_w = 1.0 if i == 0 else w.abs().max().item()  # kernel values are <= 1: absolute error for mmd2
        torch.testing.assert_close(a.double(), w, rtol=0, atol=1e-3 * scale_w if i else 1e-6)
        err, err_torch = (a.double() - w).abs().max().item(), (t.double() - w).abs().max().item()
        assert err <= 2 * err_torch + 1e-6 * scale_w, (err, err_torch)


def test_need_flags(ext):
    x, y, scale = make(5, 3, 33, torch.float32, seed=2)
    m_all, gx_all, gy_all = ext.mmd_fwd(x, y, 3, scale, EPS, False, True, True, True)
    m, gx, gy = ext.mmd_fwd(x, y, 3, scale, EPS, False, True, True, False)
    assert torch.equal(m, m_all) and torch.equal(gx, gx_all) and gy.numel() == 0
    m, gx, gy = ext.mmd_fwd(x, y, 3, scale, EPS, False, True, False, True)
    assert torch.equal(m, m_all) and torch.equal(gy, gy_all) and gx.numel() == 0
    m, gx, gy = ext.mmd_fwd(x, y, 3, scale, EPS, False, True, False, False)
    assert torch.equal(m, m_all) and gx.numel() == 0 and gy.numel() == 0


@pytest.mark.parametrize("G", [3, 6, 64])  # 6: whole groups with 1 thread, (group, chunk) items with 2
def test_deterministic_across_threads(ext, G):
    """Bit-identical whatever the thread count (groups vs (group, chunk) split) and on repeated calls."""
    x, y, scale = make(G, 4, 1500, torch.float32, seed=9)
    n0 = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 3, 2):
            torch.set_num_threads(nt)
            outs.append(ext.mmd_fwd(x, y, 4, scale, EPS, False, True, True, True))
    finally:
        torch.set_num_threads(n0)
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], o))


@pytest.mark.parametrize("dt", ["fp32", "fp64", "fp16"])
@pytest.mark.parametrize("kernel", ["laplace", "rbf"])
def test_baseline_isa(ext, monkeypatch, dt, kernel):
    """The baseline loops (IMM_FAST_CPU_ISA=base) agree with the reference too (the default may be AVX2)."""
    dtype = DTYPES[dt]
    monkeypatch.setenv("IMM_FAST_CPU_ISA", "base")
    x, y, scale = make(5, 8, 600, dtype, seed=4)
    got = ext.mmd_fwd(x, y, 8, scale, EPS, kernel == "rbf", True, True, True)
    check(got, reference(x, y, 8, scale, kernel), dtype)


def test_errors(ext):
    x, y, scale = make(2, 4, 8, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="group_size"):
        ext.mmd_fwd(x, y, 3, scale, EPS, False, True, True, True)
    with pytest.raises(RuntimeError, match="shape"):
        ext.mmd_fwd(x, y[:, :5], 4, scale, EPS, False, True, True, True)
    with pytest.raises(RuntimeError, match="scale"):
        ext.mmd_fwd(x, y, 4, scale[:1], EPS, False, True, True, True)
    with pytest.raises(RuntimeError, match="dtype"):
        ext.mmd_fwd(x, y.double(), 4, scale, EPS, False, True, True, True)
    with pytest.raises(RuntimeError, match="column stride"):
        ext.mmd_fwd(x.t().contiguous().t(), y, 4, scale, EPS, False, True, True, True)


def test_fake_impl(ext):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(12, 10, dtype=torch.bfloat16)
        m, gx, gy = ext.mmd_fwd(x, x, 4, torch.empty(3), EPS, False, True, True, False)
    assert m.shape == (3,) and m.dtype == torch.float32
    assert gx.shape == (12, 10) and gx.dtype == torch.bfloat16 and gy.numel() == 0


def test_unknown_device_type():
    assert _ext.mmd_ext("mps") is None


@pytest.mark.skipif(torch.version.cuda is not None, reason="CUDA build of torch: the GPU tier covers it")
def test_no_cuda_kernel_without_cuda_torch(ext):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the one-time "no CUDA kernel" notice
        assert _ext.mmd_ext("cuda") is None  # the CPU ops load, the CUDA lookup says unavailable


# ---- CUDA tier ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_ext():
    e = _ext.mmd_ext("cuda")
    if e is None:
        pytest.fail("CUDA is available but the extension has no CUDA kernel (CUDA toolkit missing?)")
    return e


@pytest.mark.parametrize("kernel", ["laplace", "rbf"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("G,M,D", [(1, 1, 7), (5, 3, 64), (5, 4, 3072), (2, 16, 1000), (3, 8, 1)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_reference(cuda_ext, G, M, D, dt, kernel):
    dtype = DTYPES[dt]
    x, y, scale = make(G, M, D, dtype, seed=G + M + D)
    got = cuda_ext.mmd_fwd(x.cuda(), y.cuda(), M, scale.cuda(), EPS, kernel == "rbf", True, True, True)
    check(tuple(t.cpu() for t in got), reference(x, y, M, scale, kernel), dtype)


@pytest.mark.parametrize("dt", ["fp32", "fp64"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_near_duplicates_strided_deterministic(cuda_ext, dt):
    dtype = DTYPES[dt]
    xb, yb, scale = make(3, 8, 3075, dtype, seed=5, near=1e-3)
    x, y = xb.cuda()[::2, :3072], yb.cuda()[1::2, 3:]
    a = cuda_ext.mmd_fwd(x, y, 4, scale.cuda(), EPS, False, True, True, True)
    b = cuda_ext.mmd_fwd(x, y, 4, scale.cuda(), EPS, False, True, True, True)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    check(tuple(t.cpu() for t in a), reference(x.cpu(), y.cpu(), 4, scale, "laplace"), dtype)


@pytest.mark.parametrize("kernel", ["laplace", "rbf"])
def test_nan_propagates_like_the_reference(ext, kernel):
    """A NaN particle makes its group's MMD2 (and gradients) NaN, as in mmd_loss_ref; other groups are untouched."""
    x, y = torch.randn(6, 9), torch.randn(6, 9)
    x[1, 4] = float("nan")
    scale = torch.full((3,), 2.0)
    mmd2, gx, gy = ext.mmd_fwd(x, y, 2, scale, 1e-4, kernel == "rbf", True, True, True)
    want = mmd_loss_ref(x.double(), y.double(), 2, scale=scale.double(), kernel=kernel, reduction="none")
    assert torch.isnan(mmd2[0]) and torch.isnan(want[0])
    torch.testing.assert_close(mmd2[1:].double(), want[1:], rtol=1e-5, atol=1e-7)
    assert torch.isnan(gx[:2]).any() and torch.isfinite(gx[2:]).all() and torch.isfinite(gy[2:]).all()


# ---- A CUDA toolkit whose major version differs from torch's ----------------------------------------------


@pytest.fixture
def cuda_11_toolkit_for_cuda_12_torch(monkeypatch):
    """The version probes say: torch built with CUDA 12.4, the toolkit at CUDA_HOME is CUDA 11.8."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/opt/fake-cuda-11.8")
    monkeypatch.setattr(_ext, "toolkit_cuda_version", lambda: "11.8")
    monkeypatch.setattr(_ext, "_MISMATCH", {})


def _one_line_naming_both(lines):
    mine = [line for line in lines if "11.8" in line and "12.4" in line]
    assert len(mine) == 1 and "\n" not in mine[0].strip(), lines
    return mine[0]


def _load_setup_py():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    spec = importlib.util.spec_from_file_location("imm_fast_setup_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines the functions; setup() runs only as __main__
    return mod


def test_setup_py_warns_once_and_builds_the_cpu_kernels_on_a_cuda_major_mismatch(
        cuda_11_toolkit_for_cuda_12_torch, monkeypatch, capsys):
    monkeypatch.delenv("IMM_FAST_BUILD_EXT", raising=False)
    [ext], cmdclass = _load_setup_py().ext_modules_and_cmdclass()
    assert ext.name == "imm_fast._C" and "build_ext" in cmdclass
    assert ext.sources and not [s for s in ext.sources if s.endswith(".cu")]  # the C++ CPU kernels alone
    err = capsys.readouterr().err.splitlines()
    assert "major versions differ" in _one_line_naming_both(err)
    monkeypatch.setattr(_ext, "toolkit_cuda_version", lambda: "12.1")  # same major: the CUDA kernels join
    monkeypatch.setattr(_ext, "_MISMATCH", {})
    [ext], _ = _load_setup_py().ext_modules_and_cmdclass()
    assert [s for s in ext.sources if s.endswith(".cu")]
    assert not [line for line in capsys.readouterr().err.splitlines() if "12.4" in line]


def test_jit_build_warns_once_builds_the_cpu_kernels_and_cuda_says_why(cuda_11_toolkit_for_cuda_12_torch,
                                                                      monkeypatch):
    import sys

    builds = []
    monkeypatch.setitem(sys.modules, "imm_fast._C", None)  # no prebuilt extension: the just-in-time path
    monkeypatch.delenv("IMM_FAST_BUILD_EXT", raising=False)
    monkeypatch.setattr(_ext, "_jit_build", builds.append)
    monkeypatch.setattr(_ext, "_has_kernel", lambda key: key == "CPU" and builds == [False])
    monkeypatch.setattr(_ext, "_register_fake", lambda: None)
    monkeypatch.setattr(_ext, "_loaded", None)
    monkeypatch.setattr(_ext, "_error", None)
    from imm_fast import _backend

    monkeypatch.setattr(_backend, "_warned", set())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert _ext.unavailable("cpu") is None and _ext.unavailable("cuda") is not None
        _ext.unavailable("cuda")
    assert builds == [False]  # the CUDA build is not attempted; the CPU one is
    _one_line_naming_both([str(x.message) for x in w])
    why = _ext.unavailable("cuda")
    assert "CUDA 11.8" in why and "CUDA 12.4" in why
    from imm_fast.ops import mmd  # noqa: F401  (registers mmd's backends)

    cuda = next(i for i in _backend.impls("mmd") if i.name == "cuda")
    assert any("CUDA 11.8" in r and "CUDA 12.4" in r for r in cuda.why_not(_backend.op_args("cuda", torch.float32)))
