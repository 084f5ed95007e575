"""Benchmarks of the DiT attention step: packed qkv (B, T, 3C) -> (B, T, C), forward and forward+backward.

Shapes: B batch, T tokens, H heads, Dh head dim, C = H*Dh.
Providers: attention_ref with each SDPA backend (flash, efficient, cudnn; skipped where the backend refuses the
shape), torch.compile(attention_ref), triton (the fused kernel). GPU shapes (bf16) skip without CUDA; a small
fp32 CPU shape runs ref vs compile. extra_info: TFLOP/s (4*B*H*T^2*Dh forward, 3.5x that forward+backward),
GB/s of the minimal traffic (forward reads qkv, writes o: 4*B*T*C elements; backward also reads qkv, o, dO and
writes dqkv: 8 more) and peak memory (CUDA).

    pytest benchmarks/bench_attention.py                  # pytest-benchmark table
                                                          # (+ test_attention_gpu_ratio: the ratio gate,
                                                          # benchmarks/ratio_gate.py; no kernel on the CPU)
    python benchmarks/bench_attention.py --tune           # CUDA: sweep the kernels' launch configurations,
                                                          # printed as FWD_CONFIGS/BWD_CONFIGS entries
    python benchmarks/bench_attention.py --table          # CUDA: triton vs fastest SDPA per (Dh, dtype),
                                                          # printed as _CUDA_TABLE entries for ops/attention.py
"""
import contextlib
import functools
import os
import sys
import time

import pytest
import torch

from imm_fast.ops.attention import attention, attention_ref

CUDA = torch.cuda.is_available()
GPU_SHAPES = {"dit-xl": (256, 16, 256, 72), "dit-b": (256, 12, 256, 64)}  # (B, H, T, Dh)
if os.environ.get("IMM_FAST_BENCH_QUICK", "0") == "1":  # the device run's budget: DiT-XL/2 only
    GPU_SHAPES = {"dit-xl": GPU_SHAPES["dit-xl"]}
CPU_SHAPES = {"cpu-small": (4, 4, 64, 72)}
PROVIDERS = ("ref-flash", "ref-efficient", "ref-cudnn", "compile", "triton")


def sdpa_context(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([backend])


def compiled_ref():
    """A compiled function per case (reset between cases by benchmarks/conftest.py): no recompile-limit fallback."""
    return torch.compile(attention_ref)


def make_step(provider, H, mode):
    """A callable qkv, do -> None running one step (forward, or forward+backward) of `provider`."""
    if provider.startswith("ref-"):
        ctx = functools.partial(sdpa_context, provider[4:])
        fn = attention_ref
    elif provider == "ref":
        ctx, fn = contextlib.nullcontext, attention_ref
    elif provider == "compile":
        ctx, fn = contextlib.nullcontext, compiled_ref()
    else:
        ctx, fn = contextlib.nullcontext, functools.partial(attention, backend="triton")

    def step(qkv, do):
        with ctx():
            if mode == "fwd":
                with torch.no_grad():
                    fn(qkv, H)
            else:
                qkv.grad = None
                fn(qkv, H).backward(do)
        if qkv.is_cuda:
            torch.cuda.synchronize()

    return step


def make_inputs(shape, mode, dtype, device):
    """(qkv (B, T, 3C), do (B, T, C)): fresh random inputs, qkv requiring grad for forward+backward."""
    B, H, T, Dh = shape
    C = H * Dh
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(B, T, 3 * C, device=device, dtype=dtype, generator=g).requires_grad_(mode == "fwdbwd")
    do = torch.randn(B, T, C, device=device, dtype=dtype, generator=g)
    return qkv, do


def run_bench(benchmark, shape_name, shape, provider, mode, dtype, device):
    B, H, T, Dh = shape
    C = H * Dh
    qkv, do = make_inputs(shape, mode, dtype, device)
    step = make_step(provider, H, mode)
    try:
        t0 = time.perf_counter()
        step(qkv, do)  # compile / autotune / backend choice: reported apart from run time
        first = time.perf_counter() - t0
        for _ in range(2):  # warm-up
            step(qkv, do)
    except RuntimeError as e:  # an SDPA backend that does not take this shape/dtype
        pytest.skip(f"{provider} unavailable for {shape_name} {dtype}: {str(e).splitlines()[0][:120]}")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    benchmark.group = f"attention-{shape_name}-{mode}"
    benchmark.pedantic(step, args=(qkv, do), rounds=20 if device == "cuda" else 10, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: the step ran once, untimed
        return
    t = benchmark.stats.stats.mean
    flops = 4 * B * H * T * T * Dh * (3.5 if mode == "fwdbwd" else 1.0)
    nbytes = (12 if mode == "fwdbwd" else 4) * B * T * C * qkv.element_size()
    benchmark.extra_info.update(provider=provider, dtype=str(dtype).replace("torch.", ""), B=B, H=H, T=T, Dh=Dh,
                                tflops=flops / t / 1e12, gbps=nbytes / t / 1e9, first_call_s=first,
                                compile_s=max(0.0, first - benchmark.stats.stats.median))
    if device == "cuda":
        benchmark.extra_info["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_name", list(GPU_SHAPES))
def test_attention_gpu(benchmark, shape_name, provider, mode):
    run_bench(benchmark, shape_name, GPU_SHAPES[shape_name], provider, mode, torch.bfloat16, "cuda")


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("provider", ["ref", "compile"])
@pytest.mark.parametrize("shape_name", list(CPU_SHAPES))
def test_attention_cpu(benchmark, shape_name, provider, mode):
    run_bench(benchmark, shape_name, CPU_SHAPES[shape_name], provider, mode, torch.float32, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape_name", list(GPU_SHAPES))
def test_attention_gpu_ratio(ratio_bench, shape_name, mode):
    """triton against every SDPA backend that takes the shape and torch.compile(attention_ref), interleaved."""
    kw = dict(shape=list(GPU_SHAPES[shape_name]), mode=mode, dtype="bfloat16", device="cuda")
    ratio_bench(f"attention-{shape_name}-{mode}", ratio_providers(**kw),
                baselines=tuple(p for p in PROVIDERS if p != "triton"), rounds=10, warmup=3, device="cuda",
                recipe=(__file__, "ratio_providers", kw))


def ratio_providers(shape, mode, dtype, device):
    """{provider: step} of one ratio case, leaving out an SDPA backend that refuses the shape or dtype (the
    recipe --ratio-against rebuilds with another commit's code)."""
    H = shape[1]
    qkv, do = make_inputs(tuple(shape), mode, getattr(torch, dtype), device)
    steps = {}
    for p in PROVIDERS:
        step = make_step(p, H, mode)
        try:
            step(qkv, do)
        except RuntimeError:  # an SDPA backend that does not take this shape/dtype: not a baseline here
            continue
        steps[p] = functools.partial(step, qkv, do)
    return steps


def _do_bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=100)


def measure_table(dtypes=(torch.bfloat16, torch.float16), head_dims=(64, 72), B=256, T=256, device="cuda",
                  bench=_do_bench):
    """Per (Dh, dtype), as each is measured: (Dh, dtype, pick, {provider: forward+backward ms}) -> table entries
    (a generator, so a run cut short still has the rows it measured)."""
    for Dh in head_dims:
        H = {64: 12, 72: 16}.get(Dh, 1152 // Dh)
        for dtype in dtypes:
            qkv = torch.randn(B, T, 3 * H * Dh, device=device, dtype=dtype, requires_grad=True)
            do = torch.randn(B, T, H * Dh, device=device, dtype=dtype)
            ms = {}
            for p in ("ref-flash", "ref-efficient", "ref-cudnn", "triton"):
                step = make_step(p, H, "fwdbwd")
                try:
                    step(qkv, do)
                except RuntimeError:
                    continue
                ms[p] = bench(lambda: step(qkv, do))
            best_sdpa = min(v for k, v in ms.items() if k != "triton")
            pick = "triton" if ms.get("triton", float("inf")) < best_sdpa else "torch"
            yield Dh, dtype, pick, ms


FWD_SWEEP = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3),
             (128, 128, 8, 2)]
BWD_SWEEP = [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 128, 8, 2), (128, 64, 8, 2),
             (64, 128, 8, 2), (128, 128, 8, 2)]


def tune(head_dims=(64, 72), dtype=torch.bfloat16, B=256, T=256, device="cuda", bench=_do_bench):
    """Best (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim for the forward and the backward kernels, at
    B 256, T 256 (the DiT shapes); configurations that fail to compile or launch are skipped."""
    import imm_fast.kernels.attention as K

    best = {}
    for Dh in head_dims:
        H = {64: 12, 72: 16}.get(Dh, 1152 // Dh)
        qkv = torch.randn(B, T, 3 * H * Dh, device=device, dtype=dtype)
        do = torch.randn(B, T, H * Dh, device=device, dtype=dtype)
        o, lse = K.attention_fwd(qkv, H)
        for kind, sweep, table, call in (
                ("fwd", FWD_SWEEP, K.FWD_CONFIGS, lambda: K.attention_fwd(qkv, H)),
                ("bwd", BWD_SWEEP, K.BWD_CONFIGS, lambda: K.attention_bwd(do, qkv, o, lse, H))):
            ms = {}
            for cfg in sweep:
                table[Dh] = cfg
                try:
                    call()
                    ms[cfg] = bench(call)
                except Exception as e:  # noqa: BLE001 - out of resources etc.: not a candidate
                    print(f"# {kind} Dh {Dh} {cfg}: {type(e).__name__}")
            table.pop(Dh)
            best[(kind, Dh)] = min(ms, key=ms.get)
            ranked = sorted(ms.items(), key=lambda x: x[1])
            print(f"# {kind} Dh {Dh}: " + ", ".join(f"{c} {t:.3f}ms" for c, t in ranked))
        if K._head_split(Dh)[0]:  # the 64 + 16 split against one padded tile, default configurations
            for split in (None, False):
                f = bench(lambda: K.attention_fwd(qkv, H, split=split))
                b = bench(lambda: K.attention_bwd(do, qkv, o, lse, H, split=split))
                print(f"# Dh {Dh} {'split' if split is None else 'one padded tile'}: fwd {f:.3f}ms bwd {b:.3f}ms")
    return best


if __name__ == "__main__":
    if "--tune" in sys.argv:
        if not CUDA:
            sys.exit("--tune needs CUDA")
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
        for (kind, Dh), cfg in tune().items():
            print(f"{kind.upper()}_CONFIGS[{Dh}] = {cfg}")
    elif "--table" in sys.argv:
        if not CUDA:
            sys.exit("--table needs CUDA")
        dev = torch.cuda.get_device_name()
        print(f"# measured on {dev}, torch {torch.__version__}, B 256, T 256, forward+backward (ms)")
        from results import append  # one JSON line per row under IMM_FAST_RESULTS (the device run)

        for Dh, dtype, pick, ms in measure_table():
            times = ", ".join(f"{k} {v:.3f}" for k, v in ms.items())
            print(f"    ({Dh}, {dtype}): {pick!r},  # {times}", flush=True)
            append({"kind": "attention-table", "case": f"Dh {Dh} {dtype}", "pick": pick, "ms": ms})
    else:
        sys.exit(pytest.main([os.path.abspath(__file__)] + sys.argv[1:]))
