"""torch.profiler breakdown of one IMM training step (DiT-XL/2, bf16 autocast, latents 4x32x32), so the next
bottleneck is visible: prints key_averages sorted by device (CUDA) time, top 25 ops, plus the step's wall time.

The step is bench_train_step's (imm_loss + backward + AdamW step + zero_grad), warmed up twice before the
profiled step. Without CUDA it prints a message and exits 0, unless --device cpu asks for a CPU profile (sorted
by CPU time; use --model tiny there).

    python benchmarks/profile_train_step.py                          # XL/2, batch 64, fused provider
    python benchmarks/profile_train_step.py --provider reference --trace /tmp/trace.json
    python benchmarks/profile_train_step.py --device cpu --model tiny --batch 16
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import PROVIDERS, make_train_step  # noqa: E402


def profile_step(name, batch, provider, device, row_limit=25, trace=None, warmup=2):
    """The key_averages table (str) of one training step after `warmup` steps, and the step's seconds."""
    step, model, _ = make_train_step(name, batch, provider, device)
    for _ in range(warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()  # synchronizes on CUDA
        seconds = time.perf_counter() - t0
    if trace:
        prof.export_chrome_trace(trace)
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=row_limit), seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="XL/2", help="S/2, B/2, L/2, XL/2 (any dit_config name) or tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--provider", default="fused", choices=PROVIDERS)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--trace", default=None, help="also write a chrome trace (JSON) here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("profile_train_step: no CUDA device here; nothing to profile (use --device cpu for a CPU profile)")
        return 0
    table, seconds = profile_step(args.model, args.batch, args.provider, args.device, args.rows, args.trace)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"IMM training step: DiT-{args.model} batch {args.batch} provider {args.provider} on {where}, "
          f"torch {torch.__version__}: {seconds * 1e3:.1f} ms ({args.batch / seconds:.1f} samples/s, profiled)")
    if args.device == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
