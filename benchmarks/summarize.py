"""Print one table from pytest-benchmark JSON files: per group, each provider's median and speed-up vs the reference.

Usage: python benchmarks/summarize.py RESULTS.json [MORE.json ...]
"""
from __future__ import annotations

import json
import sys

BASELINES = ("ref", "reference", "torch", "eager", "ref_eager")
PROVIDER_KEYS = ("provider", "impl", "backend", "mode_provider")


def provider_of(bench):
    params = bench.get("params") or {}
    for key in PROVIDER_KEYS:
        if key in params:
            return str(params[key])
    name = bench.get("name", "")
    return name[name.find("[") + 1:name.find("]")] if "[" in name else name


def rows(benches):
    groups = {}
    for b in benches:
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


def main(paths):
    benches = []
    machine = None
    for p in paths:
        with open(p) as f:
            data = json.load(f)
        benches += data.get("benchmarks", [])
        machine = machine or data.get("machine_info", {})
    print("| group | provider | median (us) | x reference | extra |")
    print("|---|---|---:|---:|---|")
    for group, prov, med_us, speedup, extra in rows(benches):
        print(f"| {group} | {prov} | {med_us:.1f} | {speedup:.2f} | {extra} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
