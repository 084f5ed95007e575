"""Tests of the fused DiT attention (imm_fast.ops.attention) against attention_ref in float64.

Shapes: B batch, T tokens, H heads, Dh head dim, C = H*Dh; qkv (B, T, 3C) -> (B, T, C).
Accuracy rule (flash-attention's): err(kernel) <= 2 * err(torch in the same dtype) + atol, errors being max abs
differences to the float64 reference, for the output, d qkv and the qk-norm weight/bias gradients.
CPU tier: the Triton kernels under TRITON_INTERPRET=1 (small B, H; each T in {1, 7, 64, 129, 256} and each Dh in
{32, 64, 72, 128} covered at least once). GPU tier: DiT sizes, skipped without CUDA.
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import pytest  # noqa: E402

from _backends import kernel_backends, skip_unless_runs  # noqa: E402
from imm_fast import _backend  # noqa: E402
from imm_fast.ops.attention import attention, attention_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = kernel_backends("attention")  # every registered backend but the reference: a new one is tested here too
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
needs_triton = pytest.mark.skipif(not _backend.triton_usable(torch.device(DEV)), reason="triton not usable here")
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def make_inputs(B, H, T, Dh, dtype, qk_norm, device=DEV, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, 3 * H * Dh, generator=g, dtype=torch.float64)
    do = torch.randn(B, T, H * Dh, generator=g, dtype=torch.float64)
    norm = None
    if qk_norm:  # non-trivial affine parameters so their gradients and their effect are both exercised
        norm = tuple(torch.randn(Dh, generator=g, dtype=torch.float64) * 0.3 + (1.0 if i % 2 == 0 else 0.0)
                     for i in range(4))
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return to(qkv), to(do), None if norm is None else tuple(to(w) for w in norm)


def run(fn, qkv, do, norm, **kw):
    """Output and gradients (d qkv, then d of each qk-norm tensor) of fn, all as float64."""
    x = qkv.detach().clone().requires_grad_(True)
    w = None if norm is None else tuple(t.detach().clone().requires_grad_(True) for t in norm)
    out = fn(x, kw.pop("H"), w, **kw)
    grads = torch.autograd.grad(out, [x] + (list(w) if w else []), do)
    return [out.double()] + [g.double() for g in grads]


def check_fa_rule(B, H, T, Dh, dtype, qk_norm, scale=None, backend="triton"):
    skip_unless_runs("attention", backend, DEV, dtype, Dh=Dh)
    qkv, do, norm = make_inputs(B, H, T, Dh, dtype, qk_norm)
    d = lambda t: t.double()  # noqa: E731
    ref = run(attention_ref, d(qkv), d(do), None if norm is None else tuple(map(d, norm)), H=H, scale=scale)
    same = run(attention_ref, qkv, do, norm, H=H, scale=scale)
    kern = run(attention, qkv, do, norm, H=H, scale=scale, backend=backend)
    names = ["out", "dqkv", "dq_weight", "dq_bias", "dk_weight", "dk_bias"]
    for name, r, s, k in zip(names, ref, same, kern):
        assert k.shape == r.shape, name
        assert torch.isfinite(k).all(), name
        err_k = (k - r).abs().max().item()
        err_t = (s - r).abs().max().item()
        scale_r = max(1.0, r.abs().max().item())  # weight gradients sum over B*T rows: tolerance by magnitude
        assert err_k <= 2 * err_t + ATOL[dtype] * scale_r, f"{name}: kernel err {err_k:.3g} vs torch {err_t:.3g}"


# ------------------------------------------------------------------------------------------------ CPU tier

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,H,T,Dh,qk_norm", [
    (1, 2, 1, 32, False),  # a single token
    (2, 1, 7, 72, True),  # DiT-XL head dim, T below one block, qk-norm
    (1, 2, 64, 64, False),  # exactly one block
    (1, 1, 129, 128, True),  # one past two blocks, widest head
    (1, 1, 256, 72, False),  # the DiT token count
    (1, 1, 129, 32, True),
    (1, 2, 7, 24, True),  # one padded power-of-two tile (24 -> 32)
    (1, 1, 64, 96, True),  # head dim in two tiles, 64 + 32
])
def test_fp32(B, H, T, Dh, qk_norm, backend):
    check_fa_rule(B, H, T, Dh, torch.float32, qk_norm, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("B,H,T,Dh,qk_norm", [(1, 2, 64, 72, True), (2, 1, 129, 64, False)])
def test_half(B, H, T, Dh, qk_norm, dtype, backend):
    check_fa_rule(B, H, T, Dh, dtype, qk_norm, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_scale_and_none_norm_entries(backend):
    check_fa_rule(1, 2, 7, 40, torch.float32, False, scale=0.3, backend=backend)  # Dh 40: not a power of 2
    qkv, do, norm = make_inputs(1, 2, 7, 40, torch.float32, True)
    part = (norm[0], None, None, norm[3])  # None = weight 1 / bias 0, as F.layer_norm reads it
    ref = attention_ref(qkv.double(), 2, tuple(None if t is None else t.double() for t in part))
    torch.testing.assert_close(attention(qkv, 2, part, backend=backend).double(), ref, atol=2e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("qk_norm", [False, True])
def test_one_padded_tile_at_72(qk_norm):
    """Dh 72 runs as 64 + 16 by default; the single padded 128-wide tile (split=False) must agree too."""
    from imm_fast.kernels.attention import _head_split, attention_bwd, attention_fwd

    assert _head_split(72) == (True, 64, 16)
    qkv, do, norm = make_inputs(2, 1, 70, 72, torch.float32, qk_norm, seed=5)
    ref = run(attention_ref, qkv.double(), do.double(), None if norm is None else tuple(t.double() for t in norm),
              H=1)
    o, lse = attention_fwd(qkv, 1, norm, split=False)
    grads = attention_bwd(do, qkv, o, lse, 1, norm, split=False)
    got = [o] + [g for g in grads if g.numel()]  # absent (0,) tensors without qk-norm
    assert len(got) == len(ref)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g.double(), r, atol=2e-5 * max(1.0, r.abs().max().item()), rtol=1e-5)


@needs_triton
def test_lse_and_strided_input():
    """The saved logsumexp is the natural-log one; qkv may be a strided view (e.g. a slice of a wider buffer)."""
    from imm_fast.kernels.attention import attention_fwd

    B, H, T, Dh = 2, 2, 65, 32
    wide = torch.randn(B, T, 3 * H * Dh + 24, dtype=torch.float32, device=DEV)
    qkv = wide[..., 8:8 + 3 * H * Dh]  # token stride 3C + 24
    o, lse = attention_fwd(qkv, H)
    ref = attention_ref(qkv.double(), H)
    torch.testing.assert_close(o.double(), ref, atol=2e-5, rtol=1e-5)
    q, k, _ = qkv.double().reshape(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)
    lse_ref = torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(Dh), dim=-1)  # (B, H, T)
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-5, rtol=1e-5)
    wide.requires_grad_(True)
    do = torch.randn(B, T, H * Dh, device=DEV)
    (g,) = torch.autograd.grad(attention(wide[..., 8:8 + 3 * H * Dh], H, backend="triton"), wide, do)
    x = qkv.detach().double().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(attention_ref(x, H), x, do.double())
    assert (g[..., :8] == 0).all() and (g[..., 8 + 3 * H * Dh:] == 0).all()
    g = g[..., 8:8 + 3 * H * Dh]
    torch.testing.assert_close(g.double(), g_ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_deterministic(backend):
    skip_unless_runs("attention", backend, DEV, Dh=32)
    qkv, do, norm = make_inputs(1, 2, 129, 32, torch.float32, True, seed=3)
    a = run(attention, qkv, do, norm, H=2, backend=backend)
    b = run(attention, qkv, do, norm, H=2, backend=backend)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """The custom op's fake impl, schema and autograd registration agree with the real kernel."""
    from imm_fast.ops.attention import _attention_fwd_op

    skip_unless_runs("attention", backend, DEV, Dh=32)
    qkv, _, norm = make_inputs(1, 1, 7, 32, torch.float32, True)
    torch.library.opcheck(_attention_fwd_op, (qkv.requires_grad_(True), 1, *norm, 0.2, 1e-5, backend),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_fakes_return_distinct_outputs_like_the_real_op(backend, qk_norm):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from imm_fast.ops.attention import _attention_bwd_op, _attention_fwd_op

    skip_unless_runs("attention", backend, DEV, Dh=32)
    qkv, do, norm = make_inputs(1, 2, 7, 32, torch.float32, qk_norm)
    norm = norm or (None,) * 4

    def both(qkv, do, norm):
        o, lse = _attention_fwd_op(qkv, 2, *norm, 0.2, 1e-5, backend)
        return (o, lse), _attention_bwd_op(do, qkv, o, lse, 2, *norm, 0.2, 1e-5, backend)

    real = both(qkv, do, norm)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fnorm = tuple(None if t is None else mode.from_tensor(t) for t in norm)
        fake = both(mode.from_tensor(qkv), mode.from_tensor(do), fnorm)
    for r, f in zip(real, fake):
        assert len({id(t) for t in r}) == len(r) and len({id(t) for t in f}) == len(f)
        assert [(t.shape, t.dtype) for t in r] == [(t.shape, t.dtype) for t in f]


_SM90_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import imm_fast.kernels.attention as K

def compile_sm90(fn, dtype, consts, warps, stages):
    # What a launch at the DiT sizes specializes: pointers, strides, T and C divisible by 16.
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            continue
        if p.name in ("T", "H", "C") or p.name.startswith("stride"):
            sig[p.name] = "i32"
        elif p.name in ("QKV", "O", "DO", "DQKV"):
            sig[p.name] = "*" + dtype
        else:
            sig[p.name] = "*fp32" if p.name[0].isupper() else "fp32"
        if sig[p.name][0] == "*" or p.name in ("T", "C") or p.name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 64), options=dict(num_warps=warps, num_stages=stages))

for Dh, norm, dtype in ((72, True, "bf16"), (64, False, "fp16")):
    split, d0, d1 = K._head_split(Dh)
    base = dict(Dh=Dh, HAS_QK_NORM=norm, DOT_PRECISION="tf32", UPCAST_DOT=False, SPLIT=split, BLOCK_D0=d0,
                BLOCK_D1=d1)
    bm, bn, w, st = K._fwd_config(Dh, 256)
    compile_sm90(K._attention_fwd_kernel, dtype, dict(base, BLOCK_M=bm, BLOCK_N=bn), w, st)
    bm, bn, w, st = K._bwd_config(Dh, 256)
    for fn in (K._attention_bwd_dkdv_kernel, K._attention_bwd_dq_kernel):
        compile_sm90(fn, dtype, dict(base, BLOCK_M=bm, BLOCK_N=bn), w, st)
        if norm:  # non-square blocks: loop-carried values must keep their shapes
            compile_sm90(fn, dtype, dict(base, BLOCK_M=32, BLOCK_N=64), 4, 2)
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tier runs the kernels themselves")
def test_kernels_compile_for_sm90():
    """The interpreter does not check GPU constraints (dot shapes, shared memory): compile each kernel ahead of
    time for an H100 (sm_90) with the launch configuration used at the DiT sizes. Needs no GPU."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")  # jit functions, not interpreted ones
    r = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode and ("ptxas" in r.stderr and "not found" in r.stderr or "No module named" in r.stderr):
        pytest.skip("no Triton CUDA toolchain here: " + r.stderr.strip().splitlines()[-1][:200])
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    """The fused path traces as one custom op each way (no graph break), forward and backward (aot_eager)."""
    skip_unless_runs("attention", backend, DEV, Dh=40)
    qkv, do, norm = make_inputs(1, 2, 7, 40, torch.float32, True, seed=7)
    fn = torch.compile(lambda x, n: attention(x, 2, n, backend=backend), backend="aot_eager", fullgraph=True)
    got = run(lambda x, H, n: fn(x, n), qkv, do, norm, H=2)
    ref = run(attention_ref, qkv.double(), do.double(), tuple(t.double() for t in norm), H=2)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=2e-5 * max(1.0, r.abs().max().item()), rtol=1e-5)


def test_cpu_auto_is_reference():
    """Auto on CPU must not pick the interpreter: it is attention_ref itself (bitwise)."""
    qkv, _, norm = make_inputs(2, 2, 9, 24, torch.float32, True, device="cpu")
    env = os.environ.pop("IMM_FAST_BACKEND", None)
    try:
        assert torch.equal(attention(qkv, 2, norm), attention_ref(qkv, 2, norm))
    finally:
        if env is not None:
            os.environ["IMM_FAST_BACKEND"] = env


def test_errors():
    qkv = torch.randn(1, 4, 3 * 2 * 12)
    with pytest.raises(ValueError, match="backend"):
        attention(qkv, 2, backend="cuda")
    with pytest.raises(ValueError, match="num_heads"):
        attention(qkv, 5)
    with pytest.raises(ValueError, match="qkv"):
        attention(qkv[0], 2)
    with pytest.raises(ValueError, match="q_weight"):
        attention(qkv, 2, qk_norm=(torch.ones(5), None, None, None))
    with pytest.raises(TypeError, match="qk_norm"):
        attention(qkv, 2, qk_norm=(torch.ones(12),))
    if _backend.triton_usable(qkv.device):
        with pytest.raises(ValueError, match="Dh=12"):
            attention(qkv, 2, backend="triton")  # Dh 12 is not a multiple of 8


# ------------------------------------------------------------------------------------------------ GPU tier

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,H,T,Dh,qk_norm", [(4, 16, 256, 72, False), (4, 12, 256, 64, True),
                                               (2, 4, 1000, 128, True), (3, 2, 77, 32, False)])
def test_gpu_dit_sizes(B, H, T, Dh, qk_norm, dtype, backend):
    check_fa_rule(B, H, T, Dh, dtype, qk_norm, backend=backend)


for _m in gpu:
    test_gpu_dit_sizes = _m(test_gpu_dit_sizes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_auto_matches_table():
    from imm_fast.ops.attention import _CUDA_TABLE

    qkv, _, _ = make_inputs(2, 16, 256, 72, torch.bfloat16, False)
    out = attention(qkv, 16)
    want = attention(qkv, 16, backend=_CUDA_TABLE.get((72, torch.bfloat16), "torch"))
    assert torch.equal(out, want)
