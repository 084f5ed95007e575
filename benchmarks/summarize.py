"""Print tables from pytest-benchmark JSON files and ratio baselines (benchmarks/ratio_gate.py).

Per-provider benchmarks: per group, each provider's median and speed-up vs the reference. Ratio tests (groups
"ratio-*" in pytest-benchmark JSON) and ratio baseline files (--ratio-save): each gated speed-up, measured in
interleaved rounds, with both providers' median times.

Usage: python benchmarks/summarize.py RESULTS.json [MORE.json ...]
"""
from __future__ import annotations

import json
import sys

BASELINES = ("ref", "reference", "torch", "eager", "ref_eager")
PROVIDER_KEYS = ("provider", "impl", "backend", "mode_provider")
RATIO_FORMAT = "imm_fast-ratio-baseline/1"


def provider_of(bench):
    params = bench.get("params") or {}
    for key in PROVIDER_KEYS:
        if key in params:
            return str(params[key])
    name = bench.get("name", "")
    return name[name.find("[") + 1:name.find("]")] if "[" in name else name


def is_ratio(bench):
    return str(bench.get("group") or "").startswith("ratio-")


def rows(benches):
    groups = {}
    for b in benches:
        if not is_ratio(b):
            groups.setdefault(b.get("group") or b.get("fullname", "?"), []).append(b)
    for group in sorted(groups):
        bs = groups[group]
        base = next((b for b in bs if provider_of(b) in BASELINES), None)
        for b in sorted(bs, key=lambda b: b["stats"]["median"]):
            med = b["stats"]["median"]
            speedup = base["stats"]["median"] / med if base else float("nan")
            extra = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in sorted((b.get("extra_info") or {}).items()))
            yield group, provider_of(b), med * 1e6, speedup, extra


def ratio_rows(benches):
    """(key, speed-up, speed-up of the minima, kernel median us, baseline median us, rounds) per gated pair."""
    for b in sorted((b for b in benches if is_ratio(b)), key=lambda b: b["group"]):
        info = b.get("extra_info") or {}
        for pair, s in sorted((info.get("speedup") or {}).items()):
            k, base = pair.split(" vs ")
            med = info.get("median_s", {})
            yield (f"{b['group'][len('ratio-'):]}: {pair}", s, info.get("speedup_min", {}).get(pair, float("nan")),
                   med.get(k, float("nan")) * 1e6, med.get(base, float("nan")) * 1e6, info.get("rounds"))


def baseline_rows(data):
    for key, e in sorted(data["ratios"].items()):
        yield (key, e["speedup"], e.get("speedup_min", float("nan")), e.get("kernel_median_s", float("nan")) * 1e6,
               e.get("baseline_median_s", float("nan")) * 1e6, e.get("rounds"))


def print_ratios(rs, machine=None):
    if machine:
        print(f"\nSpeed-ups (median over interleaved rounds of t_baseline / t_kernel): {machine.get('cuda_device') or ''}"
              f" {machine.get('cpu')}, {machine.get('threads')} torch threads, torch {machine.get('torch')}, "
              f"triton {machine.get('triton')}")
    print("\n| case: kernel vs baseline | speed-up | speed-up of minima | kernel median (us) | baseline median (us) "
          "| rounds |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, s, smin, kus, bus, rounds in rs:
        print(f"| {key} | {s:.2f} | {smin:.2f} | {kus:.1f} | {bus:.1f} | {rounds} |")


def main(paths):
    benches = []
    for p in paths:
        with open(p) as f:
            data = json.load(f)
        if isinstance(data, dict) and data.get("format") == RATIO_FORMAT:
            print_ratios(list(baseline_rows(data)), data.get("machine"))
            continue
        benches += data.get("benchmarks", [])
    if any(not is_ratio(b) for b in benches):
        print("| group | provider | median (us) | x reference | extra |")
        print("|---|---|---:|---:|---|")
        for group, prov, med_us, speedup, extra in rows(benches):
            print(f"| {group} | {prov} | {med_us:.1f} | {speedup:.2f} | {extra} |")
    rs = list(ratio_rows(benches))
    if rs:
        print_ratios(rs)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
