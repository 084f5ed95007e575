"""Benchmarks of the grouped MMD loss, forward and forward+backward (the IMM case: only x, the student, needs grad).

Shapes: (B, M, D) = B rows in G = B/M groups of M particles, D values per row; y = x + small noise (late training).
Providers: ref (mmd_loss_ref, eager), compile (torch.compile(mmd_loss_ref)), cpp (CPU extension), triton and cuda
(CUDA only). Extension providers skip when imm_fast._ext cannot load them.
extra_info: GB/s of the memory-traffic floor (forward reads x and y once; forward+backward also writes dL/dx
once) from the mean time (gbps) and the best time (gbps_best), floor_frac(_best) = that rate / the measured copy
bandwidth of the device (copy_gbps: best torch copy_ of a large tensor, read + write), peak memory on CUDA.
Ratio tests (test_mmd_*_ratio, benchmarks/ratio_gate.py): every available provider interleaved, the kernels'
speed-ups over ref and compile gated against a stored baseline (--ratio-baseline).

    pytest benchmarks/bench_mmd.py                  # CPU tier runs here (torch's threads as set by the user);
                                                    # GPU shapes skip without CUDA
    pytest benchmarks/bench_mmd.py -k gpu           # on a CUDA machine
"""
from __future__ import annotations

import functools
import math
import os

import pytest
import torch

from imm_fast.ops.mmd import mmd_loss, mmd_loss_ref

CUDA = torch.cuda.is_available()
CPU_SHAPES = [(512, 4, 3072)]
GPU_SHAPES = [(4096, 4, 4096), (4096, 8, 3072), (4096, 16, 4096), (1024, 4, 12288)]
if os.environ.get("IMM_FAST_BENCH_QUICK", "0") == "1":  # the device run's budget: the first two shapes
    GPU_SHAPES = GPU_SHAPES[:2]


def _ext_available(device_type):
    try:
        from imm_fast import _ext
    except ImportError:
        return False
    return _ext.mmd_ext(device_type) is not None


def _compiled_ref():
    """A compiled function per case: the case-by-case torch._dynamo.reset() (benchmarks/conftest.py) keeps each
    case's compile cold and under the recompile limit, so "compile" never silently falls back to eager."""
    return torch.compile(mmd_loss_ref, fullgraph=True)


@functools.lru_cache(maxsize=None)
def _copy_gbps(device):
    """Achievable bandwidth (read + write GB/s) of a large torch copy on this device: the floor's yardstick."""
    import time

    n = (256 if device == "cuda" else 64) * 2**20 // 4
    a = torch.empty(n, device=device).uniform_()
    b = torch.empty_like(a).fill_(1.0)  # preallocated and touched: no page faults in the timing
    best = math.inf
    for _ in range(10):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        b.copy_(a)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best / 1e9


def first_call_s(step):
    """Seconds of the first call (for "compile": the compile; for triton: its JIT compile and autotune)."""
    import time

    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def _make_fn(provider):
    if provider == "ref":
        return mmd_loss_ref
    if provider == "compile":
        return _compiled_ref()
    return functools.partial(mmd_loss, backend=provider)


def _skip_reason(provider, device):
    if provider in ("cpp", "cuda") and not _ext_available(device):
        return f"the {provider} extension is not available"
    if provider == "triton" and device != "cuda":
        return "triton is benchmarked on CUDA only"
    return None


def make_step(shape, provider, mode, dtype, device):
    """(step, x): step() runs one forward (or forward+backward, dL/dx only) of `provider` and synchronizes."""
    B, M, D = shape
    G = B // M
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, D, device=device, dtype=dtype, generator=gen)
    y = (x.float() + 0.1 * torch.randn(B, D, device=device, generator=gen)).to(dtype)
    scale = (0.5 + torch.rand(G, device=device, generator=gen)) * math.sqrt(D)  # (G,) exponent s d / D ~ O(1)
    weight = 0.5 + torch.rand(G, device=device, generator=gen)  # (G,)
    fn = _make_fn(provider)
    x = x.requires_grad_(mode == "fwdbwd")

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(x, y, M, scale=scale, weight=weight)
        else:
            x.grad = None
            fn(x, y, M, scale=scale, weight=weight).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    return step, x


def group_name(shape, dtype, mode):
    B, M, D = shape
    return f"mmd-{B}x{M}x{D}-{str(dtype).replace('torch.', '')}-{mode}"


def run_bench(benchmark, shape, provider, mode, dtype, device):
    B, M, D = shape
    reason = _skip_reason(provider, device)
    if reason:
        pytest.skip(reason)
    step, x = make_step(shape, provider, mode, dtype, device)
    first = first_call_s(step)  # compile, JIT build, Triton autotune/compile: reported apart from run time
    for _ in range(2):  # warm-up
        step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    benchmark.group = group_name(shape, dtype, mode)
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=1)
    if benchmark.disabled:
        return
    stats = benchmark.stats.stats
    nbytes = (2 + (1 if mode == "fwdbwd" else 0)) * B * D * x.element_size()  # read x, y once (+ write dL/dx)
    copy = _copy_gbps(device)
    # mean: the usual figure; best (min): what a shared, loaded CPU can still show about the code itself.
    benchmark.extra_info.update(first_call_s=first, compile_s=max(0.0, first - stats.median))
    benchmark.extra_info.update(provider=provider, dtype=str(dtype).replace("torch.", ""), B=B, M=M, D=D,
                                mode=mode, threads=torch.get_num_threads(), copy_gbps=copy,
                                gbps=nbytes / stats.mean / 1e9, floor_frac=nbytes / stats.mean / 1e9 / copy,
                                gbps_best=nbytes / stats.min / 1e9, floor_frac_best=nbytes / stats.min / 1e9 / copy)
    if device == "cuda":
        benchmark.extra_info["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("provider", ["ref", "compile", "cpp"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_mmd_cpu(benchmark, shape, provider, mode):
    run_bench(benchmark, shape, provider, mode, torch.float32, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider", ["ref", "compile", "triton", "cuda"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_mmd_gpu(benchmark, shape, provider, dtype, mode):
    run_bench(benchmark, shape, provider, mode, dtype, "cuda")


def ratio_providers(shape, mode, dtype, device, providers):
    """{provider: step} of one ratio case (the recipe --ratio-against rebuilds with another commit's code)."""
    dt = getattr(torch, dtype)
    return {p: make_step(tuple(shape), p, mode, dt, device)[0] for p in providers if not _skip_reason(p, device)}


def run_ratio(ratio_bench, shape, mode, dtype, device, providers, rounds):
    kw = dict(shape=list(shape), mode=mode, dtype=str(dtype).replace("torch.", ""), device=device,
              providers=list(providers))
    steps = ratio_providers(**kw)
    if len(steps) < 2 or "ref" not in steps:
        pytest.skip(f"no kernel to compare with the reference on {device}")
    ratio_bench(group_name(shape, dtype, mode), steps, baselines=("ref", "compile"), rounds=rounds, warmup=3,
                device=device, recipe=(__file__, "ratio_providers", kw))


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_mmd_cpu_ratio(ratio_bench, shape, mode):
    run_ratio(ratio_bench, shape, mode, torch.float32, "cpu", ("ref", "compile", "cpp"), rounds=20)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_mmd_gpu_ratio(ratio_bench, shape, dtype, mode):
    run_ratio(ratio_bench, shape, mode, dtype, "cuda", ("ref", "compile", "triton", "cuda"), rounds=10)
