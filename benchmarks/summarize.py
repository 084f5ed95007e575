"""Print tables from pytest-benchmark JSON files and ratio baselines (benchmarks/ratio_gate.py).

Per-provider benchmarks: per group, each provider's median and speed-up vs the reference. Ratio tests (groups
"ratio-*" in pytest-benchmark JSON) and ratio baseline files (--ratio-save): each gated speed-up, measured in
interleaved rounds, with both providers' median times.

A device run's results.jsonl (one JSON line per finished case, benchmarks/results.py): the steps with their
status and seconds, the headline, the CUDA tests per file, and the benchmark and ratio cases, rebuilt from
whatever lines exist (a run cut short gives a shorter table, never none); on an H100 or H200, each kernel's
measured time beside the floor and the bound of the static model (benchmarks/roofline_model.json, written off the
device by `python benchmarks/roofline.py --save`) for the groups the model covers.

Usage: python benchmarks/summarize.py RESULTS.json|results.jsonl [MORE ...]
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # results.py beside this file

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


def _ms(v):
    return "-" if v is None else f"{v * 1e3:.1f}"


def _num(v, fmt=".1f"):
    return "-" if v is None else format(v, fmt)


def print_steps(recs):
    env = [r for r in recs if r.get("kind") == "env"]
    for e in env[-1:]:
        print(f"Run of {e.get('date')} on {e.get('device') or 'CPU (dry run)'}, host {e.get('host')}: torch "
              f"{e.get('torch')} (CUDA {e.get('cuda')}), triton {e.get('triton')}, Python {e.get('python')}\n")
    print("| step | status | seconds | timeout (s) |")
    print("|---|---|---:|---:|")
    for r in (r for r in recs if r.get("kind") == "step"):
        why = f" ({r['reason']})" if r.get("reason") else ""
        print(f"| {r['step']} | {r['status']}{why} | {r['seconds']} | {r.get('timeout_s', '-')} |")


def print_headline(recs):
    rows = [r for r in recs if r.get("kind") == "headline"]
    if not rows:
        return
    print("\n| headline case | outcome | throughput | median step (ms) | first call (s) | compile (s) | peak GiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        tp = f"{r['per_s']:.1f} {r['unit']}" if "per_s" in r else r.get("reason", "")
        print(f"| {r['case']} | {r['outcome']} | {tp} | {_ms(r.get('median_s'))} | {_num(r.get('first_call_s'))} "
              f"| {_num(r.get('compile_s'))} | {_num(r.get('peak_mem_gb'), '.2f')} |")


def print_tests(recs):
    files = {}
    for r in recs:
        if r.get("kind") == "test" and "group" not in r:
            f = files.setdefault(r["case"].split("::")[0], {"passed": 0, "failed": 0, "skipped": 0, "bad": []})
            f[r["outcome"]] = f.get(r["outcome"], 0) + 1
            if r["outcome"] == "failed":
                f["bad"].append(r["case"].split("::", 1)[-1])
    if files:
        print("\n| test file | passed | failed | skipped | failing |")
        print("|---|---:|---:|---:|---|")
        for name, f in files.items():
            print(f"| {name} | {f['passed']} | {f['failed']} | {f['skipped']} | {', '.join(f['bad'][:6])} |")


def jsonl_main(path):
    """The tables of one results.jsonl."""
    from results import read

    recs, torn = read(path)
    print_steps(recs)
    print_headline(recs)
    print_tests(recs)
    benches = [{"group": r["group"], "name": r["case"], "params": {}, "stats": {"median": r["median_s"]},
                "extra_info": r.get("extra_info") or {}} for r in recs if r.get("kind") == "test" and "group" in r]
    for b in benches:  # provider from the case's parameters ("...[shape-provider-mode]") or its extra_info
        b["params"]["provider"] = b["extra_info"].get("provider", provider_of(b))
    print_benches(benches, lead="\n")
    print_against_model(recs)
    if torn:
        print(f"\n({torn} line(s) of {path} were cut off by a kill and are left out)")


MODEL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "roofline_model.json")


def card_of(device_name):
    """The static model's card for a CUDA device name, or None (the model knows the H100 SXM and the H200)."""
    name = (device_name or "").upper()
    if "H200" in name:
        return "H200"
    if "H100" in name and "PCIE" not in name and "NVL" not in name:
        return "H100 SXM"
    return None


def measured_kernels(recs):
    """{(group, provider): median seconds} of the kernel providers (triton, cuda) of the benchmark and ratio
    cases in recs."""
    out = {}
    for r in recs:
        if r.get("kind") != "test" or "group" not in r:
            continue
        info, group = r.get("extra_info") or {}, r["group"]
        if group.startswith("ratio-"):  # one case, every provider's median over interleaved rounds
            for p, sec in (info.get("median_s") or {}).items():
                out[(group[len("ratio-"):], p)] = sec
        else:  # the provider from extra_info, else from the case id ("...[XL-residual-fwd-triton]")
            case_id = "-" + provider_of({"name": r.get("case", "")}) + "-"
            p = info.get("provider") or next((t for t in ("triton", "cuda") if f"-{t}-" in case_id), None)
            out[(group, p)] = r.get("median_s")
    return {k: v for k, v in out.items() if k[1] in ("triton", "cuda") and isinstance(v, (int, float))}


def print_against_model(recs, model_file=MODEL_FILE):
    env = [r for r in recs if r.get("kind") == "env"]
    card = card_of(env[-1].get("device") if env else None)
    if card is None or not os.path.exists(model_file):
        return
    with open(model_file) as f:
        model = json.load(f)
    rows = [(g, p, sec, model["groups"][g][card]) for (g, p), sec in sorted(measured_kernels(recs).items())
            if card in model["groups"].get(g, {})]
    if not rows:
        return
    print(f"\n{card}, measured beside the static model (triton {model.get('triton')} when modelled):")
    print("| group | provider | measured (us) | floor (us) | floor / measured | model bound (us) | model / measured |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for g, p, sec, m in rows:
        us = sec * 1e6
        print(f"| {g} | {p} | {us:.1f} | {m['floor_us']:.1f} | {100 * m['floor_us'] / us:.0f}% | "
              f"{m['bound_us']:.1f} | {100 * m['bound_us'] / us:.0f}% |")


def print_benches(benches, lead=""):
    """The throughput table of the non-ratio cases, then the ratio table."""
    if any(not is_ratio(b) for b in benches):
        print(f"{lead}| group | provider | median (us) | x reference | extra |")
        print("|---|---|---:|---:|---|")
        for group, prov, med_us, speedup, extra in rows(benches):
            print(f"| {group} | {prov} | {med_us:.1f} | {speedup:.2f} | {extra} |")
    rs = list(ratio_rows(benches))
    if rs:
        print_ratios(rs)


def main(paths):
    benches = []
    for p in paths:
        if p.endswith(".jsonl"):
            jsonl_main(p)
            continue
        with open(p) as f:
            data = json.load(f)
        if isinstance(data, dict) and data.get("format") == RATIO_FORMAT:
            print_ratios(list(baseline_rows(data)), data.get("machine"))
            continue
        benches += data.get("benchmarks", [])
    print_benches(benches)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
