"""The headline of a device run: one IMM training step of DiT-XL/2 (reference, fused, and each compiled) and
8-step guided sampling (reference, fused, fused + CUDA graph), one JSON line per case as it finishes
(benchmarks/results.py), eager cases first so a timeout costs the compiled ones.

Each case starts from a cold compiler (torch._dynamo.reset()) and reports its first call apart (first_call_s:
compile, autotune, graph capture; compile_s = first call - median step) from its run time (median_s over the
timed steps). The step builders are bench_train_step's and bench_sample's.

    python benchmarks/device_run.py                      # CUDA: DiT-XL/2, batch 64, latents 4x32x32
    python benchmarks/device_run.py --device cpu         # the dry run's shapes: a tiny DiT, batch 16
    IMM_FAST_BENCH_COMPILE_BACKEND=eager ...             # dynamo without inductor's code generation (dry run)
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results  # noqa: E402
from bench_sample import CFG_SCALE, get_model, make_sample_step  # noqa: E402
from bench_train_step import make_train_step  # noqa: E402

SHAPES = {"cuda": {"model": "XL/2", "batch": 64, "rounds": 5}, "cpu": {"model": "tiny", "batch": 16, "rounds": 3}}
TRAIN_PROVIDERS = ("reference", "fused", "fused+compile", "reference+compile")
SAMPLE_PROVIDERS = ("reference", "fused", "fused+graph")
SAMPLE_STEPS = 8


def use_compile_backend():
    """IMM_FAST_BENCH_COMPILE_BACKEND=eager|aot_eager: every torch.compile of this process uses that backend."""
    backend = os.environ.get("IMM_FAST_BENCH_COMPILE_BACKEND")
    if backend:
        compile_ = torch.compile
        torch.compile = lambda *a, **k: compile_(*a, **{"backend": backend, **k})
    return backend or "inductor"


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step, device, rounds):
    """(seconds of the first call, [seconds of each of `rounds` further calls])."""
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return first, times


def _figures(first, times, batch, device, compiled):
    med = statistics.median(times)
    out = {"first_call_s": first, "median_s": med, "min_s": min(times), "rounds": len(times),
           "per_s": batch / med, "compile_s": max(0.0, first - med) if compiled else None}
    if device == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def train_case(model, batch, provider, device, rounds):
    step, _, info = make_train_step(model, batch, provider, device)
    return {**info, "unit": "samples/s", **_figures(*timed(step, device, rounds), batch, device,
                                                     provider.endswith("+compile"))}


def sample_case(model, batch, provider, device, rounds):
    if provider == "fused+graph" and device != "cuda":
        return {"outcome": "skipped", "reason": "CUDA graphs need CUDA"}
    step = make_sample_step(get_model(model, device), batch, SAMPLE_STEPS, provider, device)
    return {"model": model, "batch": batch, "provider": provider, "steps": SAMPLE_STEPS, "cfg_scale": CFG_SCALE,
            "unit": "images/s", **_figures(*timed(step, device, rounds), batch, device, False)}


def run_case(kind, fn, model, batch, provider, device, rounds):
    """One case from a cold compiler and a clean allocator; its line is written before the next case starts."""
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    name = f"{kind} {model} b{batch} {provider}"
    t0 = time.perf_counter()
    try:
        rec = {"outcome": "passed", **fn(model, batch, provider, device, rounds)}
    except Exception as e:  # noqa: BLE001 - an OOM or a broken provider loses this case only
        rec = {"outcome": "failed", "reason": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
    rec.update(kind="headline", case=name, seconds=round(time.perf_counter() - t0, 3))
    results.append(rec)
    figure = f"{rec['per_s']:.1f} {rec['unit']}" if "per_s" in rec else rec.get("reason", "")
    print(f"{name}: {rec['outcome']} {figure} ({rec['seconds']:.1f} s"
          + (f", compile {rec['compile_s']:.1f} s)" if rec.get("compile_s") is not None else ")"), flush=True)
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("device_run: no CUDA device here (use --device cpu for the dry run's shapes)")
        return 2
    backend = use_compile_backend()
    shape = SHAPES[args.device]
    print(f"headline on {args.device}: DiT-{shape['model']} batch {shape['batch']}, compile backend {backend}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    # eager training first (the headline), then sampling, then the compiled cases (the longest, cold)
    order = ([("train_step", train_case, p) for p in TRAIN_PROVIDERS[:2]]
             + [("sample", sample_case, p) for p in SAMPLE_PROVIDERS]
             + [("train_step", train_case, p) for p in TRAIN_PROVIDERS[2:]])
    for kind, fn, provider in order:
        run_case(kind, fn, shape["model"], shape["batch"], provider, args.device, shape["rounds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
