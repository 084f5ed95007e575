"""Benchmarks of the DiT adaLN ops, forward and forward+backward, at DiT-XL/2 and DiT-B/2 shapes.

Shapes: (B, T, C) residual stream; the modulation vectors are strided (B, C) views of a (B, 6C) tensor.
Providers: ref (eager `<op>_ref`), compile (torch.compile of the same ref), triton (the fused kernels, CUDA only).
extra_info: GB/s over the memory-traffic floor (N = B*T*C elements of the stream):
  modulate        fwd: read x, write out = 2N;            bwd adds read d out, x, write dx = 3N
  residual        fwd: read x, y, write x_new = 3N;       bwd adds read d x_new, y, write dx, dy = 4N
  residual_adaln  fwd: read x, y, write x_new, out = 4N;  bwd adds read d out, d x_new, x_new, y, write dx, dy = 6N
and floor_frac = that rate / the device's measured copy bandwidth; peak memory on CUDA.

    pytest benchmarks/bench_adaln.py            # CPU tier (ref vs compile) here; GPU shapes need CUDA
Ratio tests (test_adaln_gpu_ratio, benchmarks/ratio_gate.py): ref, compile and triton interleaved, triton's
speed-ups gated against a stored baseline (--ratio-baseline). No CPU ratio test: no imm_fast kernel runs there.
"""
from __future__ import annotations

import functools
import os
import time

import pytest
import torch

from imm_fast.ops.adaln import (adaln_modulate, adaln_modulate_ref, gated_residual, gated_residual_adaln,
                                gated_residual_adaln_ref, gated_residual_ref)

CUDA = torch.cuda.is_available()
GPU_SHAPES = {"XL": (256, 256, 1152), "B": (256, 256, 768)}
if os.environ.get("IMM_FAST_BENCH_QUICK", "0") == "1":  # the device run's budget: DiT-XL/2 only
    GPU_SHAPES = {"XL": GPU_SHAPES["XL"]}
CPU_SHAPES = {"cpu": (8, 64, 256)}
TRAFFIC = {"modulate": (2, 3), "residual": (3, 4), "residual_adaln": (4, 6)}  # (fwd, bwd) in units of N


def _call(op, provider):
    ref = {"modulate": lambda x, y, m: adaln_modulate_ref(x, m[0], m[1]),
           "residual": lambda x, y, m: gated_residual_ref(x, m[2], y),
           "residual_adaln": lambda x, y, m: gated_residual_adaln_ref(x, m[2], y, m[0], m[1])}[op]
    if provider == "ref":
        return ref
    if provider == "compile":
        return _compiled(op)
    return {"modulate": lambda x, y, m: adaln_modulate(x, m[0], m[1], backend="triton"),
            "residual": lambda x, y, m: gated_residual(x, m[2], y, backend="triton"),
            "residual_adaln": lambda x, y, m: gated_residual_adaln(x, m[2], y, m[0], m[1], backend="triton")}[op]


def _compiled(op):
    """A compiled function per case (reset between cases by benchmarks/conftest.py): no recompile-limit fallback."""
    return torch.compile(_call(op, "ref"))


@functools.lru_cache(maxsize=None)
def _copy_gbps(device):
    n = (256 if device == "cuda" else 32) * 2**20 // 4
    a = torch.empty(n, device=device).uniform_()
    b = torch.empty_like(a).fill_(1.0)
    best = float("inf")
    for _ in range(10):
        _sync(device)
        t = time.perf_counter()
        b.copy_(a)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best / 1e9


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def make_step(shape, dtype, device, op, mode, provider):
    """(step, x): step() runs `op` (forward, or forward+backward) of `provider` once and synchronizes.
    dtype "mixed": the DiT under bf16 autocast: fp32 residual stream x, bf16 branch output y and modulation."""
    B, T, C = shape
    x_dtype, branch_dtype = (torch.float32, torch.bfloat16) if dtype == "mixed" else (dtype, dtype)
    x = torch.randn(B, T, C, device=device, dtype=x_dtype, requires_grad=mode == "fwdbwd")
    y = torch.randn(B, T, C, device=device, dtype=branch_dtype, requires_grad=mode == "fwdbwd")
    mod = (torch.randn(B, 6 * C, device=device, dtype=branch_dtype) * 0.5).requires_grad_(mode == "fwdbwd")
    chunks = mod.chunk(6, dim=1)
    f = _call(op, provider)
    grads = [torch.randn(B, T, C, device=device, dtype=x_dtype) for _ in range(2)]  # outputs take x's dtype

    def step():
        outs = f(x, y, chunks)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if mode == "fwdbwd":
            torch.autograd.backward(outs, grads[: len(outs)])
            x.grad = y.grad = mod.grad = None
        _sync(device)

    return step, x


def _run(benchmark, name, shape, dtype, device, op, mode, provider):
    if provider == "triton" and device != "cuda":
        pytest.skip("the Triton kernels are benchmarked on CUDA (the CPU interpreter is not a speed)")
    step, x = make_step(shape, dtype, device, op, mode, provider)
    t0 = time.perf_counter()
    step()  # compile / autotune: reported apart from run time
    first = time.perf_counter() - t0
    for _ in range(2):  # warm-up
        step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = f"adaln-{name}-{op}-{mode}"
    benchmark(step)
    if benchmark.disabled:
        return
    fwd, bwd = TRAFFIC[op]
    nbytes = (fwd + (bwd if mode == "fwdbwd" else 0)) * x.numel() * x.element_size()  # mixed: counted as fp32
    gbps = nbytes / benchmark.stats.stats.mean / 1e9
    benchmark.extra_info.update(gbps=gbps, floor_frac=gbps / _copy_gbps(device), floor_mb=nbytes / 1e6,
                                first_call_s=first, compile_s=max(0.0, first - benchmark.stats.stats.median))
    if device == "cuda":
        benchmark.extra_info["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("provider", ["ref", "compile", "triton"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("op", list(TRAFFIC))
@pytest.mark.parametrize("name", list(GPU_SHAPES))
def test_adaln_gpu(benchmark, name, op, mode, provider):
    _run(benchmark, name, GPU_SHAPES[name], torch.bfloat16, "cuda", op, mode, provider)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("provider", ["ref", "compile", "triton"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("op", ["residual", "residual_adaln"])
def test_adaln_gpu_mixed(benchmark, op, mode, provider):
    """The DiT-XL/2 block under bf16 autocast: fp32 residual stream, bf16 branch output and modulation."""
    _run(benchmark, "XL-mixed", GPU_SHAPES["XL"], "mixed", "cuda", op, mode, provider)


@pytest.mark.parametrize("provider", ["ref", "compile"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("op", ["residual_adaln"])
def test_adaln_cpu(benchmark, op, mode, provider):
    _run(benchmark, "cpu", CPU_SHAPES["cpu"], torch.float32, "cpu", op, mode, provider)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("op", list(TRAFFIC))
@pytest.mark.parametrize("name", list(GPU_SHAPES))
def test_adaln_gpu_ratio(ratio_bench, name, op, mode):
    kw = dict(shape=list(GPU_SHAPES[name]), dtype="bfloat16", op=op, mode=mode, device="cuda")
    ratio_bench(f"adaln-{name}-{op}-{mode}", ratio_providers(**kw), baselines=("ref", "compile"), rounds=10,
                warmup=3, device="cuda", recipe=(__file__, "ratio_providers", kw))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("op", ["residual", "residual_adaln"])
def test_adaln_gpu_mixed_ratio(ratio_bench, op, mode):
    kw = dict(shape=list(GPU_SHAPES["XL"]), dtype="mixed", op=op, mode=mode, device="cuda")
    ratio_bench(f"adaln-XL-mixed-{op}-{mode}", ratio_providers(**kw), baselines=("ref", "compile"), rounds=10,
                warmup=3, device="cuda", recipe=(__file__, "ratio_providers", kw))


def ratio_providers(shape, dtype, op, mode, device):
    """{provider: step} of one ratio case (the recipe --ratio-against rebuilds with another commit's code)."""
    dt = dtype if dtype == "mixed" else getattr(torch, dtype)
    return {p: make_step(tuple(shape), dt, device, op, mode, p)[0] for p in ("ref", "compile", "triton")}
