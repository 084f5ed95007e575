"""The compile gate: every Triton kernel compiled for sm_80 and sm_90 through its real launcher (meta tensors, a
stand-in Triton driver, launches turned into `JITFunction.run(..., warmup=True)`), with its registers, spills and
shared memory checked (imm_fast/_compile_probe.py). Needs no GPU; needs triton with its bundled ptxas.

The probe compiles jit functions, while this test session runs Triton under the interpreter (conftest sets
TRITON_INTERPRET=1), so every compile runs in a subprocess with TRITON_INTERPRET=0.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from imm_fast import _backend

needs_toolchain = pytest.mark.skipif(not _backend.has_triton() or torch.cuda.is_available(),
                                     reason="needs triton (its bundled ptxas); on a GPU the kernels run instead")


def probe(code: str, setup: str = "", timeout=1800):
    """Run setup + code (with `P` = imm_fast._compile_probe imported) in a jit-mode subprocess; returns what it
    prints as JSON on its last line."""
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    src = "import json, torch\nfrom imm_fast import _compile_probe as P\n" + setup + textwrap.dedent(code)
    r = subprocess.run([sys.executable, "-c", src], env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode and "ptxas" in r.stderr and "not found" in r.stderr:
        pytest.skip("no Triton CUDA toolchain here: " + r.stderr.strip().splitlines()[-1][:200])
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


_ATTENTION = """
import imm_fast.kernels.attention as K
def attention(target, Dh, dtype=torch.bfloat16, qk_norm=True):
    r = P.run_case(P.Case("attention", "x", lambda: P._attention_fwd_bwd(2, 256, 16, Dh, dtype, qk_norm)),
                   P.TARGETS[target])
    return dict(problems=r.problems, refused=r.refused, error=r.error,
                kernels={l.compiled.kernel: [l.compiled.registers, l.compiled.spill_stores, l.compiled.shared]
                         for l in r.launches})
"""


@needs_toolchain
@pytest.mark.slow
def test_gate_every_kernel_both_targets():
    """The whole gate (issue 18's shapes for MMD, adaLN and attention, sm_80 and sm_90): every kernel compiles,
    fits the target's shared memory, spills nothing; fp32 attention is refused with its reason."""
    out = probe("""
        import time
        t0 = time.perf_counter()
        results = P.run_gate()
        print(json.dumps(dict(problems=[p for r in results for p in r.problems], seconds=time.perf_counter() - t0,
                              launches=sum(len(r.launches) for r in results), kernels=len(P.distinct(results)),
                              refused=sum(bool(r.refused) for r in results),
                              ops=sorted({r.case.op for r in results if r.launches}))))
    """)
    assert out["problems"] == []
    assert out["ops"] == ["adaln", "attention", "mmd"]
    assert out["kernels"] > 100 and out["launches"] > out["kernels"]  # distinct configs compiled once each
    assert out["refused"] == 2 * 4 * 2 * 2  # fp32 attention: 2 targets x 4 head dims x 2 head counts x qk-norm
    print(f"gate: {out['launches']} launches, {out['kernels']} distinct kernels, {out['seconds']:.0f} s")


@needs_toolchain
@pytest.mark.slow
def test_gate_fails_on_oversized_and_spilling_configs():
    """The gate can fail: a 4-stage 256 x 128 forward at Dh=128 needs more shared memory than sm_80 has, and the
    sm_90 backward blocks (64 x 64, 8 warps) spill on sm_80 at Dh=72 with qk-norm (the configuration sm_80 used
    before it got its own)."""
    out = probe(setup=_ATTENTION, code="""
        K.FWD_CONFIGS[128] = (256, 128, 8, 4)
        big = attention("sm_80", 128, qk_norm=False)
        K.FWD_CONFIGS.clear()
        K.BWD_CONFIGS[72] = (64, 64, 8, 2)
        spill = attention("sm_80", 72)
        print(json.dumps(dict(big=big, spill=spill)))
    """)
    big, spill = out["big"], out["spill"]
    assert big["kernels"]["_attention_fwd_kernel"][2] > 166_912
    assert any("_attention_fwd_kernel: shared memory" in p and "166912 B" in p for p in big["problems"])
    assert spill["kernels"]["_attention_bwd_dkdv_kernel"][1] > 1000
    assert any("_attention_bwd_dkdv_kernel: spills" in p for p in spill["problems"])


@needs_toolchain
@pytest.mark.slow
def test_sm80_attention_backward_without_spills():
    """sm_80, bf16 and fp16 with qk-norm at Dh=72 (8 KB spills per thread before) and at the other odd split
    width 96: the launcher's own sm_80 configs compile without spills, forward and backward."""
    out = probe(setup=_ATTENTION, code="""
        print(json.dumps({f"{Dh} {dt}": attention("sm_80", Dh, getattr(torch, dt))
                          for Dh in (72, 96) for dt in ("bfloat16", "float16")}))
    """)
    for key, r in out.items():
        assert r["problems"] == [] and r["error"] is None, (key, r)
        assert set(r["kernels"]) >= {"_attention_fwd_kernel", "_attention_bwd_dkdv_kernel",
                                      "_attention_bwd_dq_kernel"}


def test_fp32_attention_refused_on_gpu_with_reason():
    """fp32 attention does not fit a GPU (spills; Dh 104-128 over sm_80's shared memory): the launcher refuses it
    on a GPU (meta) tensor before compiling, and the registry's why_not says why. The CPU interpreter takes it."""
    K = pytest.importorskip("imm_fast.kernels.attention")
    import imm_fast.ops.attention  # noqa: F401  (registers the op)

    qkv = torch.empty(2, 256, 3 * 16 * 128, device="meta", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"float32 on meta.*fp32 attention.*backend='torch'"):
        K.attention_fwd(qkv, 16)
    why = _backend.reasons("attention", _backend.op_args("cuda", torch.float32, Dh=64))["triton"]
    assert any("fp32" in w and "spills" in w for w in why)
    cpu = _backend.reasons("attention", _backend.op_args("cpu", torch.float32, Dh=64))["triton"]
    assert not any("fp32" in w for w in cpu)


@needs_toolchain
@pytest.mark.slow
def test_every_launch_runs_under_its_tensors_device():
    """Tensors on cuda:1 (fake tensors: no GPU needed): each Triton launch of attention, adaLN and MMD happens inside
    torch.cuda.device(1), so Triton launches on the tensors' device and not on whatever device is current."""
    out = probe("""
        import contextlib, types
        from torch._subclasses.fake_tensor import FakeTensorMode
        from triton.runtime.jit import JITFunction
        from imm_fast.kernels.adaln import adaln_bwd, adaln_fwd
        from imm_fast.kernels.attention import attention_bwd, attention_fwd
        current = [0]

        @contextlib.contextmanager
        def device(d):  # torch.cuda.device without CUDA: records the current index
            prev, current[0] = current[0], torch.device(d).index
            yield
            current[0] = prev

        torch.cuda.device = device
        torch.cuda.get_device_properties = lambda d: types.SimpleNamespace(multi_processor_count=132)
        seen = []
        with P.compiling(P.TARGETS["sm_90"]) as launches, FakeTensorMode(allow_non_fake_inputs=True):
            inner = JITFunction.run
            def run(self, *a, **k):
                seen.append((self.fn.__name__, current[0]))
                return inner(self, *a, **k)
            JITFunction.run = run
            qkv = torch.empty(2, 64, 3 * 128, device="cuda:1", dtype=torch.bfloat16)
            o, lse = attention_fwd(qkv, 2)
            attention_bwd(torch.empty_like(o), qkv, o, lse, 2)
            x = torch.empty(2, 64, 128, device="cuda:1", dtype=torch.bfloat16)
            v = torch.empty(2, 128, device="cuda:1", dtype=torch.bfloat16)
            xnew, out, mean, rstd = adaln_fwd(x, v, x, v, v, 1e-6, True, True)
            adaln_bwd(out, xnew, xnew, x, v, v, mean, rstd, True, True, x.dtype)
            from imm_fast.kernels.mmd import mmd_fwd
            xm = torch.empty(16, 256, device="cuda:1", dtype=torch.float32)
            mmd_fwd(xm, torch.empty_like(xm), 4, torch.empty(4, device="cuda:1"), 1e-8, False, True, True, False)
            JITFunction.run = inner
        print(json.dumps(seen))
    """)
    names = {n for n, _ in out}
    assert {"_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel",
            "_attention_bwd_preprocess_kernel", "_adaln_fwd_kernel", "_adaln_bwd_kernel", "_mmd_fwd_kernel"} <= names
    assert all(dev == 1 for _, dev in out), out


def _adaln_bwd_bytes(B, T, C, rows, elem):
    """(floor, partials) bytes of the fused residual + adaLN backward: read dout, dx_new, x_new, y and write dx, dy
    (elem bytes each); the partials are 3 fp32 (B, NT, C) tensors written by the kernel and read by the sum."""
    NT = -(-T // rows)
    return 6 * B * T * C * elem, 2 * 3 * 4 * B * NT * C


@pytest.mark.parametrize("C", [768, 1152])
@pytest.mark.parametrize("elem", [2, 4], ids=["bf16", "fp32"])
@pytest.mark.parametrize("sms", [108, 132])
def test_adaln_backward_partials_within_10_percent(C, elem, sms):
    """DiT-XL/B at batch 256, T=256 on an A100 (108 SMs) and an H100 (132): the backward's per-program partial
    sums cost at most 10% of its floor, and its grid still gives every SM at least two programs. (With 4 rows per
    program they cost 50% at C=1152 in bf16.)"""
    K = pytest.importorskip("imm_fast.kernels.adaln")
    B, T = 256, 256
    rows, block_t, _, _ = K._blocks(T, C, backward=True, B=B, sms=sms)
    floor, partials = _adaln_bwd_bytes(B, T, C, rows, elem)
    assert rows % block_t == 0 and partials <= 0.10 * floor, (rows, partials / floor)
    assert B * -(-T // rows) >= 2 * sms


def test_adaln_backward_rows_fill_the_gpu_at_small_batch():
    """A small batch keeps the smallest row blocks (more programs), a larger SM count never gets fewer programs."""
    K = pytest.importorskip("imm_fast.kernels.adaln")
    rows_small = K._blocks(256, 1152, backward=True, B=2, sms=132)[0]
    assert rows_small == K._blocks(256, 1152, backward=True, B=2, sms=132)[1]  # = BLOCK_T
    for B in (8, 32, 256):
        r108, r132 = (K._blocks(256, 1152, backward=True, B=B, sms=s)[0] for s in (108, 132))
        assert r132 <= r108


# ----------------------------------------------------------------------------------------------------------------
# The static performance model (benchmarks/roofline.py): its counts come from the code

_ROOFLINE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@needs_toolchain
@pytest.mark.slow
def test_roofline_bytes_equal_a_hand_count():
    """adaLN forward (residual + modulate), B=3 T=16 C=64 fp32, modelled from a B=1 interpreter run: the model's
    bytes equal the hand count: read x and y, gate/shift/scale once per program; write x_new and out, and the fp32
    mean and rstd per row."""
    out = probe(f"""
        import sys
        sys.path.insert(0, {_ROOFLINE!r})
        import roofline as R
        import imm_fast.kernels.adaln as A
        case = R.Case("adaln", "small", "run_adaln", dict(B=3, T=16, C=64, dt="fp32", direction="fwd"), "B", 1,
                      0, 0, False)
        m = R.model(case)
        rows = A._blocks(16, 64)[0]
        print(json.dumps(dict(rows=[dict(kernel=r["kernel"], bytes=r["bytes"], programs=r["programs"])
                                    for r in m["rows"]], torch_bytes=m["torch_bytes"], nt=-(-16 // rows))))
    """)
    B, T, C, e = 3, 16, 64, 4
    hand = 2 * B * T * C * e + 3 * B * out["nt"] * C * e + 2 * B * T * C * e + 2 * B * T * 4
    assert out["rows"] == [dict(kernel="_adaln_fwd_kernel", bytes=hand, programs=B * out["nt"])]
    assert out["torch_bytes"] == 0


@needs_toolchain
@pytest.mark.slow
def test_roofline_mmd_forward_backward_counts():
    """MMD forward + backward, G=8 M=4 D=512 fp32 from a G=2 interpreter run: the forward kernel reads x and y
    once from HBM and re-reads them from L2 in pass 2 (reuse distance within the card's share), writes dx once;
    the backward reads two floats per group when the hint is right and also reads + writes dx when it is not."""
    out = probe(f"""
        import sys
        sys.path.insert(0, {_ROOFLINE!r})
        import roofline as R
        res = {{}}
        for hint in ("right", "wrong"):
            case = R.Case("mmd", hint, "run_mmd", dict(G=8, M=4, D=512, dt="fp32", hint=hint), "G", 2, 0, 0, False)
            m = R.model(case)
            card = R.CARDS["H100 SXM"]
            res[hint] = dict(rows={{r["kernel"]: r["bytes"] for r in m["rows"]}},
                             hits=sum(R.l2_hits(r, card) for r in m["rows"]),
                             design=R.bounds(m, card)["design_bytes"])
        print(json.dumps(res))
    """)
    N, e = 8 * 4 * 512, 4
    right, wrong = out["right"], out["wrong"]
    fc = 8 * (4 + 4)  # each of the 8 groups' programs reads its f_g and c_g
    assert right["rows"]["_mmd_rescale_kernel"] == fc
    assert wrong["rows"]["_mmd_rescale_kernel"] == 2 * N * e + fc
    assert right["rows"]["_mmd_fwd_kernel"] == wrong["rows"]["_mmd_fwd_kernel"]
    assert right["hits"] >= 2 * N * e  # pass 2's re-reads of x and y (and the per-group scratch) hit L2
    scratch = right["rows"]["_mmd_fwd_kernel"] - 5 * N * e  # pass 1 and 2 loads, the store of dx
    assert 0 <= scratch < 0.25 * N * e
    # What reaches HBM: 3N values (and the scratch's first touches, the f_g / c_g reads, the launcher's (G,) ops).
    assert 3 * N * e <= right["design"] <= 3 * N * e + scratch + fc + 16 * 8
    assert wrong["design"] == pytest.approx(right["design"] + 2 * N * e, abs=256)  # + the wrong f_g made by torch


_TOY = '''
import triton
import triton.language as tl


@triton.jit
def toy(x_ptr, out_ptr, D, REDUCE_IN_LOOP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    total = 0.0
    for d0 in range(0, D, BLOCK):
        x = tl.load(x_ptr + d0 + offs, mask=d0 + offs < D, other=0.0)
        if REDUCE_IN_LOOP:
            total += tl.sum(x * x, axis=0)  # a cross-lane reduction every iteration
        else:
            acc += x * x  # per lane; reduced once below
    if not REDUCE_IN_LOOP:
        total = tl.sum(acc, axis=0)
    tl.store(out_ptr, total)
'''


@needs_toolchain
@pytest.mark.slow
def test_roofline_loop_counts_follow_the_kernel(tmp_path):
    """The model reads its per-iteration counts from the compiled PTX: the same loop with its reduction inside
    has warp shuffles and barriers in the loop body; accumulated per lane and reduced after the loop, it has none
    there, and the loop is matched to its source `for`."""
    (tmp_path / "toy_kernel.py").write_text(_TOY)
    out = probe(f"""
        import sys
        sys.path[:0] = [{str(tmp_path)!r}, {_ROOFLINE!r}]
        import roofline as R
        import toy_kernel
        res = {{}}
        for inside in (True, False):
            with P.compiling(P.TARGETS["sm_90"]) as launches:
                x = torch.empty(4096, device="meta")
                toy_kernel.toy[(1,)](x, x, 4096, REDUCE_IN_LOOP=inside, BLOCK=1024, num_warps=4)
            loops, rest = R.ptx_loops(launches[0].compiled.ptx, toy_kernel.__file__)
            src = R.source_loops(toy_kernel.toy.fn)
            res[str(inside)] = dict(loops=[c for _, _, c, _ in loops], rest=rest,
                                    matched=[any(s[0] <= l <= s[1] for l in lines for s in src)
                                             for _, _, _, lines in loops])
        print(json.dumps(res))
    """)
    inside, after = out["True"], out["False"]
    assert len(inside["loops"]) == 1 and len(after["loops"]) == 1
    assert inside["matched"] == [True] and after["matched"] == [True]
    assert inside["loops"][0]["shfl"] > 0 and inside["loops"][0]["bar"] > 0
    assert after["loops"][0]["shfl"] == 0 and after["loops"][0]["bar"] == 0 and after["rest"]["shfl"] > 0
    assert inside["loops"][0]["ld_bytes"] == after["loops"][0]["ld_bytes"] > 0


def test_adaln_wide_rows_refused_on_gpu_with_reason():
    """adaLN holds a row in registers: over C=4096 its backward spills on both targets (next test), so the
    registry's why_not refuses such widths on CUDA (auto takes the reference); the CPU interpreter takes any."""
    import imm_fast.ops.adaln  # noqa: F401  (registers the op)

    def why(device, C):
        return _backend.reasons("adaln", _backend.op_args(device, torch.bfloat16, C=C))["triton"]

    assert any("C=8192" in w and "spill" in w for w in why("cuda", 8192))
    assert not any("C=" in w for w in why("cuda", 4096) + why("cpu", 8192))


@needs_toolchain
@pytest.mark.slow
def test_adaln_spills_only_over_the_width_limit():
    """The width limit is where the compiled backward starts to spill: none at C=4096, some at C=8192."""
    out = probe("""
        spills = {}
        for C in (4096, 8192):
            r = P.run_case(P.Case("adaln", "x", lambda: P._adaln_fwd_bwd(8, 256, C, torch.bfloat16, torch.bfloat16,
                                                                         torch.bfloat16, "residual_adaln")),
                           P.TARGETS["sm_90"])
            spills[C] = max(l.compiled.spill_stores for l in r.launches)
        print(json.dumps(spills))
    """)
    assert out["4096"] == 0 and out["8192"] > 0
