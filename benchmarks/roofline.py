"""Static performance model of the Triton kernels: `python benchmarks/roofline.py` prints one table. Not a GPU
measurement: nothing here runs on a GPU.

Per kernel launch and shape, three bounds on its time on an H100 SXM and an H200:
  floor     what must move (the op's inputs read once, outputs written once) / HBM bandwidth, and the op's useful
            FLOPs / peak: no kernel can beat it.
  design    the bytes this design moves through HBM / HBM bandwidth. Counted, not typed in: the real launcher runs
            under the Triton interpreter (TRITON_INTERPRET=1) on the same shape with the batch axis cut down, every
            tl.load and tl.store adds the bytes of its unmasked elements, and every torch op the launcher runs (e.g.
            the sum of per-program partials) adds the bytes it reads and writes; totals scale linearly back to the
            batch. A value a program loads again is an L2 hit when its reuse distance fits: the bytes that program
            touched since it last loaded the value, times the programs in flight (the compiled grid, at most what
            fits on the SMs by warps, registers and shared memory), within L2_REUSE_SHARE of the card's L2 (LRU).
  loop      what the compiled loop implies: the launcher compiled for sm_90 (imm_fast/_compile_probe.py: meta
            tensors, stand-in driver), its PTX split into loops (a back-edge branch), shfl.sync / bar.sync / global
            loads counted per iteration; trip counts per program come from the interpreter run (the source loop each
            PTX loop's `.loc` lines fall in). Bound: dynamic warp shuffles / (SMs x clock x 1 warp shuffle per clock).
The model is generic over kernels: a changed kernel changes its counts (tests/test_compile_gate.py shows it).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from typing import Dict, List

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------------
# Named constants, each with its source


@dataclasses.dataclass(frozen=True)
class Card:
    name: str
    hbm: float        # bytes/s
    sms: int
    clock: float      # Hz, max boost
    fp32: float       # FLOP/s, non-tensor
    tc16: float       # FLOP/s, dense bf16/fp16 tensor core
    l2: float         # bytes of L2 cache
    source: str


CARDS = {
    "H100 SXM": Card("H100 SXM", 3.35e12, 132, 1.98e9, 67e12, 989e12, 50 * 2**20,
                     "NVIDIA H100 Tensor Core GPU datasheet (SXM5: 3.35 TB/s HBM3, 67 TFLOPS FP32, 989 TFLOPS "
                     "dense BF16); 132 SMs, 1980 MHz max boost and 50 MB L2: NVIDIA H100 whitepaper / datasheet"),
    "H200": Card("H200", 4.8e12, 132, 1.98e9, 67e12, 989e12, 50 * 2**20,
                 "NVIDIA H200 Tensor Core GPU datasheet (SXM: 4.8 TB/s HBM3e; the same GH100 die, SMs and 50 MB L2 "
                 "as the H100 SXM: the datasheet gives no L2 size of its own)"),
}
# Of L2, the share a program's re-reads may count on (an assumption, the one the MMD launcher sizes its programs
# in flight by): the rest holds the writes passing through, other streams and the two partitions' imbalance.
L2_REUSE_SHARE = 0.5
# Per SM on 8.x and 9.0 (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"): 64 warps,
# 64K 32-bit registers; shared memory per SM 228 KB on 9.0.
SM_WARPS, SM_REGS, SM_SMEM = 64, 65536, 233_472
# CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table: warp shuffle, 32 results per clock per SM
# on compute capability 8.x and 9.0, i.e. one warp-wide shfl.sync per clock per SM.
SHFL_WARP_PER_CLK_PER_SM = 1.0


# ----------------------------------------------------------------------------------------------------------------
# Cases: (op, shape) -> the launcher calls, the floor's bytes and FLOPs

_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _t(device, *shape, dtype):
    if device == "meta":
        return torch.empty(shape, device="meta", dtype=dtype)
    return torch.randn(shape, dtype=torch.float32).to(dtype)


def run_mmd(device, G, M, D, dt, grads="x", hint="right"):
    """Forward and backward of the op as mmd_loss runs them: the forward folds c_g = 1/G (mmd_loss(...).backward()
    with reduction="mean"), and the backward's dL/dMMD2_g equals it ("right": nothing to rescale) or not."""
    from imm_fast.kernels.mmd import mmd_fwd, mmd_rescale_

    x, y = _t(device, G * M, D, dtype=_DT[dt]), _t(device, G * M, D, dtype=_DT[dt])
    scale = torch.ones(G, device=device)
    c = torch.full((G,), 1.0 / G, device=device)
    _, gx, gy = mmd_fwd(x, y, M, scale, 1e-8, False, True, True, grads == "xy", coef=c)
    f = c if hint == "right" else torch.full((G,), 2.0 / G, device=device)
    for g in (gx, gy) if grads == "xy" else (gx,):
        mmd_rescale_(g, f, c)


def run_adaln(device, B, T, C, dt, direction):
    from imm_fast.kernels.adaln import adaln_bwd, adaln_fwd

    x, y = _t(device, B, T, C, dtype=_DT[dt]), _t(device, B, T, C, dtype=_DT[dt])
    gate, shift, scale = (_t(device, B, C, dtype=_DT[dt]) for _ in range(3))
    xnew, out, mean, rstd = adaln_fwd(x, gate, y, shift, scale, 1e-6, True, True)
    if direction == "bwd":
        _mark_backward()  # the model counts the backward alone
        adaln_bwd(torch.ones_like(out), torch.ones_like(xnew), xnew, y, gate, scale, mean, rstd, True, True,
                  x.dtype)


def run_attention(device, B, H, T, Dh, dt, direction):
    from imm_fast.kernels.attention import attention_bwd, attention_fwd

    qkv = _t(device, B, T, 3 * H * Dh, dtype=_DT[dt])
    norm = tuple(_t(device, Dh, dtype=torch.float32) for _ in range(4))
    o, lse = attention_fwd(qkv, H, norm)
    if direction == "bwd":
        _mark_backward()
        attention_bwd(torch.randn_like(o), qkv, o, lse, H, norm)


def _elem(dt):
    return torch.tensor([], dtype=_DT[dt]).element_size()


@dataclasses.dataclass
class Case:
    op: str
    label: str
    run: str             # name of the run_* function
    kwargs: dict         # its arguments (with the full batch)
    batch_key: str       # the argument scaled down for the interpreter count
    small: int           # its value there
    floor_bytes: float
    flops: float
    tensor_cores: bool   # FLOPs on tensor cores (else FP32 pipes)
    groups: tuple = ()   # the benchmark groups (bench_<op>.py) whose measured work includes exactly this case


def _bench_dtype(dt):
    return str(_DT[dt]).replace("torch.", "")


def cases() -> List[Case]:
    out = []
    # The two shapes, bench_mmd's second device-run shape (B=4096 rows, M=8, D=3072), and a wrong hint.
    for G, M, D, hint in ((1024, 4, 4096, "right"), (4096, 8, 4096, "right"), (512, 8, 3072, "right"),
                          (1024, 4, 4096, "wrong")):
        for dt in ("fp32", "bf16"):
            n = G * M * D
            # IMM: y is a stop-gradient target, so read x and y, write dx. FLOPs: (2M)^2/2 pair differences
            # squared and summed per value (3 each), and the gradient rows (2M per x value, 2 each).
            out.append(Case("mmd", f"G={G} M={M} D={D} {dt} grad x, fwd+bwd, hint {hint}", "run_mmd",
                            dict(G=G, M=M, D=D, dt=dt, hint=hint), "G", 2, 3 * n * _elem(dt),
                            3.0 * 2 * M * D * G * M + 2 * n * 2 * M, False,
                            # bench_mmd's forward+backward: mmd_loss(...).backward(), whose hint is right
                            (f"mmd-{G * M}x{M}x{D}-{_bench_dtype(dt)}-fwdbwd",) if hint == "right" else ()))
    for dt in ("bf16",):
        B, T, C = 256, 256, 1152
        n, e = B * T * C, _elem(dt)
        group = "adaln-XL-residual_adaln-"  # bench_adaln's DiT-XL shape, bf16
        out.append(Case("adaln", f"B={B} T={T} C={C} {dt} residual+modulate fwd", "run_adaln",
                        dict(B=B, T=T, C=C, dt=dt, direction="fwd"), "B", 2, 4 * n * e, 12 * n, False,
                        (group + "fwd", group + "fwdbwd")))
        out.append(Case("adaln", f"B={B} T={T} C={C} {dt} residual+modulate bwd", "run_adaln",
                        dict(B=B, T=T, C=C, dt=dt, direction="bwd"), "B", 2, 6 * n * e, 20 * n, False,
                        (group + "fwdbwd",)))
    for dt in ("bf16",):
        B, H, T, Dh = 256, 16, 256, 72
        e, C = _elem(dt), H * Dh
        fl = 4.0 * B * H * T * T * Dh
        out.append(Case("attention", f"B={B} H={H} T={T} Dh={Dh} {dt} qk-norm fwd", "run_attention",
                        dict(B=B, H=H, T=T, Dh=Dh, dt=dt, direction="fwd"), "B", 1, 4 * B * T * C * e, fl, True))
        out.append(Case("attention", f"B={B} H={H} T={T} Dh={Dh} {dt} qk-norm bwd", "run_attention",
                        dict(B=B, H=H, T=T, Dh=Dh, dt=dt, direction="bwd"), "B", 1, 8 * B * T * C * e,
                        2.5 * fl, True))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Counting under the interpreter (runs in a subprocess with TRITON_INTERPRET=1)

class _Counter:
    def __init__(self):
        self.reset()

    def reset(self):
        self.launches = []      # per launch: kernel, constexprs, grid programs, loaded, stored, line counts
        self.torch_bytes = 0


_COUNTER = _Counter()
_ON_MARK = []  # callbacks of the compiled side


def _mark_backward():
    """The forward ran only to make the backward's inputs: count from here."""
    _COUNTER.reset()
    for f in _ON_MARK:
        f()


def _launch_record(fn, grid, kwargs):
    n = 1
    for g in grid:
        n *= g
    consts = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, str)) and not isinstance(v, torch.Tensor)}
    rec = dict(kernel=fn.__name__, programs=n, consts=consts, loaded=0, stored=0, lines={}, reloads={})
    _COUNTER.launches.append(rec)
    return rec


_BUCKETS_PER_OCTAVE = 8


class _Reuse:
    """Per program of the interpreter run, LRU stack distances: for every value loaded again, the distinct bytes
    this program touched since it last touched the value, as a histogram {bucket: bytes re-read} (a bucket's
    distance is rounded up to 2^(bucket / 8) bytes, which errs towards misses). Accesses marked evict_first take
    no room: L2 evicts such lines before evict_normal and evict_last ones (PTX ISA, the .L2::evict_* qualifiers)."""

    def __init__(self):
        self.new_program()

    def new_program(self):
        self.last = {}                       # address -> time of its last access
        self.wt = np.zeros(1 << 16)          # bytes held by the access at each time (0 once re-touched)
        self.now = 0

    def touch(self, rec, addrs, nbytes, load, evict_first):
        addrs = addrs.tolist()
        n, now = len(addrs), self.now
        if now + n > len(self.wt):
            self.wt = np.concatenate([self.wt, np.zeros(max(len(self.wt), n))])
        prev = np.array([self.last.get(a, -1) for a in addrs], dtype=np.int64)
        seen = prev >= 0
        if load and seen.any():
            csum = np.concatenate([[0.0], np.cumsum(self.wt[:now])])  # csum[t] = bytes held by times < t
            dist = csum[now] - csum[prev[seen] + 1]
            buckets = np.ceil(np.log2(np.maximum(dist, 1.0)) * _BUCKETS_PER_OCTAVE).astype(np.int64)
            hist = rec["reloads"]
            for k, c in zip(*np.unique(buckets, return_counts=True)):
                hist[int(k)] = hist.get(int(k), 0) + int(c) * nbytes
        self.wt[prev[seen]] = 0.0
        self.wt[now:now + n] = 0.0 if evict_first else nbytes
        self.last.update(zip(addrs, range(now, now + n)))
        self.now = now + n


def bucket_bytes(bucket) -> float:
    return 2.0 ** (int(bucket) / _BUCKETS_PER_OCTAVE)


def _install_interpreter_hooks():
    """Count tl.load / tl.store bytes (unmasked elements) and the kernel file's executed lines per launch."""
    from triton.runtime import interpreter as I

    builder = I.interpreter_builder
    load, store, set_idx = builder.create_masked_load, builder.create_masked_store, builder.set_grid_idx
    current = {}
    reuse = _Reuse()

    def touched(ptrs, mask, is_load, policy):
        nbytes = ptrs.get_element_ty().primitive_bitwidth // 8
        m = np.broadcast_to(mask.data, ptrs.data.shape)
        rec = current["rec"]
        rec["loaded" if is_load else "stored"] += int(m.sum()) * nbytes
        reuse.touch(rec, ptrs.data[m], nbytes, is_load, policy == "evict_first")

    def masked_load(ptrs, mask, other, *a):
        touched(ptrs, mask, True, _eviction_policy())
        return load(ptrs, mask, other, *a)

    def masked_store(ptrs, value, mask, *a):
        touched(ptrs, mask, False, _eviction_policy())
        return store(ptrs, value, mask, *a)

    def set_grid_idx(*idx):
        reuse.new_program()
        return set_idx(*idx)

    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    builder.set_grid_idx = set_grid_idx
    call = I.GridExecutor.__call__

    def grid_call(self, *args, **kwargs):
        grid = self.grid(kwargs) if callable(self.grid) else self.grid
        rec = current["rec"] = _launch_record(self.fn, tuple(grid), kwargs)
        _TorchBytes.paused = True  # the interpreter's own host copies are not the launcher's traffic
        filename = inspect.getsourcefile(self.fn)

        def tracer(frame, event, arg):
            if frame.f_code.co_filename != filename:
                return None
            if event == "line":
                rec["lines"][frame.f_lineno] = rec["lines"].get(frame.f_lineno, 0) + 1
            return tracer

        sys.settrace(tracer)
        try:
            return call(self, *args, **kwargs)
        finally:
            sys.settrace(None)
            _TorchBytes.paused = False

    I.GridExecutor.__call__ = grid_call


def _eviction_policy() -> str:
    """The eviction_policy argument of the tl.load / tl.store being interpreted, read from its frame (the builder
    call below it drops the argument on triton 3.9 and passes it on 3.6)."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_name in ("load", "store") and f.f_code.co_filename.endswith(os.path.join("language", "core.py")):
            return str(f.f_locals.get("eviction_policy") or "")
        f = f.f_back
    return ""


class _TorchBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes read and written by the torch ops a launcher runs besides its kernels (allocation and views free)."""
    FREE = ("empty", "empty_like", "new_empty", "empty_strided", "view", "_unsafe_view", "as_strided", "detach",
            "alias", "slice", "select", "unsqueeze", "expand", "permute", "transpose", "t", "lift_fresh", "reshape",
            "_to_copy", "randn", "ones", "ones_like", "randn_like", "copy_", "normal_", "fill_")
    paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused and func.__name__.split(".")[0] not in self.FREE:
            flat = [a for a in torch.utils._pytree.tree_leaves((args, out)) if isinstance(a, torch.Tensor)]
            _COUNTER.torch_bytes += sum(a.numel() * a.element_size() for a in flat)
        return out


def count_worker(case: dict) -> dict:
    """Run one case's launcher at its reduced batch in the interpreter; returns the counts."""
    _install_interpreter_hooks()
    import imm_fast.kernels.adaln as A

    kw = dict(case["kwargs"], **{case["batch_key"]: case["small"]})
    # The adaLN backward sizes its row blocks from B and the SM count; scale the SMs with B so the cut-down run
    # makes the full shape's choice (checked against the compiled launches by constexprs).
    A.sm_count = lambda dev, default=132: 132 * case["small"] / case["kwargs"][case["batch_key"]]
    _COUNTER.reset()
    with _TorchBytes():
        globals()[case["run"]]("cpu", **kw)
    return dict(launches=_COUNTER.launches, torch_bytes=_COUNTER.torch_bytes)


def count(case: Case) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import roofline; print(json.dumps(roofline.count_worker(json.loads(sys.argv[1]))))")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(dataclasses.asdict(case))], env=env,
                       capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"interpreter count of {case.op} {case.label} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# The compiled loop: PTX loops and their counts

_LABEL = re.compile(r"^(\$L__\w+):")
_BRA = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)")
_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')
_LD = re.compile(r"\bld\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.[bfus](\d+)\b")
_CP = re.compile(r"\bcp\.async(?:\.\w+)*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-fA-F]+|\d+)")


def _instr_counts(lines) -> Dict[str, int]:
    c = dict(shfl=0, bar=0, ld_bytes=0)
    for ln in lines:
        if "shfl.sync" in ln:
            c["shfl"] += 1
        if re.search(r"\bbar\.sync\b|\bbarrier\.sync\b", ln):
            c["bar"] += 1
        m = _LD.search(ln)
        if m:
            c["ld_bytes"] += int(m.group(1) or 1) * int(m.group(2)) // 8
        m = _CP.search(ln)
        if m:
            c["ld_bytes"] += int(m.group(1), 0)
    return c


def ptx_loops(ptx: str, source_file: str):
    """[(first line, last line, counts per iteration per thread, source lines of source_file in the body)] for each
    back-edge loop, plus the counts of everything outside loops (once per program)."""
    lines = ptx.splitlines()
    files = {m.group(1): m.group(2) for m in map(_FILE.match, lines) if m}
    # By file name: Triton's cache keys on the source, so cached PTX may name another checkout's path.
    ids = {k for k, v in files.items() if os.path.basename(v) == os.path.basename(source_file)}
    labels = {m.group(1): i for i, m in enumerate(map(_LABEL.match, lines)) if m}
    loops = []
    for i, ln in enumerate(lines):
        m = _BRA.search(ln)
        if m and labels.get(m.group(1), i + 1) < i:
            loops.append((labels[m.group(1)], i))
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    out, inside = [], set()
    for a, b in inner:
        src = {int(m.group(2)) for m in map(_LOC.match, lines[a:b + 1]) if m and m.group(1) in ids}
        out.append((a, b, _instr_counts(lines[a:b + 1]), src))
        inside.update(range(a, b + 1))
    rest = _instr_counts(ln for i, ln in enumerate(lines) if i not in inside)
    return out, rest


def source_loops(fn) -> List[tuple]:
    """(first line, last line, first body line) of each `for` in the kernel function's source (absolute lines)."""
    src, start = inspect.getsourcelines(fn)
    tree = ast.parse(textwrap.dedent("".join(src)))
    off = start - 1
    return [(n.lineno + off, n.end_lineno + off, n.body[0].lineno + off) for n in ast.walk(tree)
            if isinstance(n, ast.For)]


def dynamic_counts(compiled, fn, line_counts: Dict[int, int], programs: int) -> dict:
    """Per program: executed shuffles, barriers and loaded bytes per thread, from PTX loops x trip counts."""
    loops, rest = ptx_loops(compiled.ptx, inspect.getsourcefile(fn))
    srcs = source_loops(fn)
    total = dict(rest)
    per_iter = []
    for a, b, c, src in loops:
        best = max(srcs, key=lambda s: len([x for x in src if s[0] <= x <= s[1]]), default=None)
        hits = best and any(best[0] <= x <= best[1] for x in src)
        trips = line_counts.get(best[2], 0) / programs if hits else 1.0
        per_iter.append(dict(c, trips=trips))
        for k in total:
            total[k] += trips * c[k]
    return dict(total=total, loops=per_iter)


# ----------------------------------------------------------------------------------------------------------------
# The model

def compiled_launches(case: Case):
    from imm_fast import _compile_probe as P

    start = [0]
    with P.compiling(P.TARGETS["sm_90"]) as launches:
        _ON_MARK.append(lambda: start.__setitem__(0, len(launches)))
        try:
            globals()[case.run]("meta", **case.kwargs)
        finally:
            _ON_MARK.pop()
    return launches[start[0]:]


def model(case: Case, counts=None) -> dict:
    counts = count(case) if counts is None else counts
    launches = compiled_launches(case)
    scale = case.kwargs[case.batch_key] / case.small
    if [l.compiled.kernel for l in launches] != [r["kernel"] for r in counts["launches"]]:
        raise RuntimeError(f"{case.label}: compiled launches {[l.compiled.kernel for l in launches]} differ from "
                           f"the interpreter's {[r['kernel'] for r in counts['launches']]}")
    rows = []
    for launch, rec in zip(launches, counts["launches"]):
        mismatch = {k: (v, launch.kwargs.get(k)) for k, v in rec["consts"].items()
                    if k in launch.kwargs and launch.kwargs[k] != v
                    and k not in ("UPCAST_DOT", "LIBDEVICE", "N_D")}  # switches that differ only under the interpreter
        if mismatch:
            raise RuntimeError(f"{case.label}: the cut-down run chose other constexprs: {mismatch}")
        programs = rec["programs"] * scale
        lines = {int(k): v for k, v in rec["lines"].items()}  # JSON keys are strings
        dyn = dynamic_counts(launch.compiled, launch.fn.fn, lines, rec["programs"])
        warps = launch.kwargs.get("num_warps", 4)
        rows.append(dict(kernel=launch.compiled.kernel, programs=programs, warps=warps,
                         bytes=(rec["loaded"] + rec["stored"]) * scale, loaded=rec["loaded"] * scale,
                         in_flight=in_flight(launch), reloads={int(k): v * scale for k, v in rec["reloads"].items()},
                         shfl_warp=programs * warps * dyn["total"]["shfl"],
                         bar_warp=programs * warps * dyn["total"]["bar"], loops=dyn["loops"]))
    return dict(case=case, rows=rows, torch_bytes=counts["torch_bytes"] * scale)


def in_flight(launch) -> int:
    """Programs of a compiled launch running at once: its grid, at most what fits on the SMs (warps, registers,
    shared memory per SM; the H100 and H200 have 132 SMs)."""
    grid = 1
    for g in launch.grid:
        grid *= g
    c, warps = launch.compiled, launch.kwargs.get("num_warps", 4)
    per_sm = min(SM_WARPS // warps, SM_REGS // max(1, c.registers * 32 * warps), SM_SMEM // max(1, c.shared))
    return max(1, min(grid, CARDS["H100 SXM"].sms * max(1, per_sm)))


def l2_hits(row: dict, card: Card) -> float:
    """Bytes of row's re-reads that L2 serves: reuse distance x programs in flight within the card's share."""
    budget = L2_REUSE_SHARE * card.l2
    return sum(v for b, v in row["reloads"].items() if bucket_bytes(b) * row["in_flight"] <= budget)


def bounds(m: dict, card: Card) -> dict:
    case = m["case"]
    hits = sum(l2_hits(r, card) for r in m["rows"])
    design = sum(r["bytes"] for r in m["rows"]) - hits + m["torch_bytes"]
    shfl = sum(r["shfl_warp"] for r in m["rows"])
    peak = card.tc16 if case.tensor_cores else card.fp32
    t_floor = max(case.floor_bytes / card.hbm, case.flops / peak)
    t_design = max(design / card.hbm, case.flops / peak)
    t_shfl = shfl / (card.sms * card.clock * SHFL_WARP_PER_CLK_PER_SM)
    t_bound = max(t_design, t_shfl)
    return dict(floor_us=t_floor * 1e6, design_bytes=design, l2_bytes=hits, design_us=t_design * 1e6,
                shfl_us=t_shfl * 1e6,
                bound_us=t_bound * 1e6, of_floor=t_floor / t_bound)


def _per_value(m):
    """Shuffles and barriers (warp instructions) per KB loaded by the kernels, over all launches."""
    kb = sum(r["loaded"] for r in m["rows"]) / 1024
    return sum(r["shfl_warp"] for r in m["rows"]) / kb, sum(r["bar_warp"] for r in m["rows"]) / kb


def table(models, cards=("H100 SXM", "H200")) -> str:
    rows = ["| op | shape | card | floor bytes (MB) | design bytes (MB) | L2 re-reads (MB) | floor (us) | design (us) "
            "| shuffle bound (us) | model bound (us) | floor / bound | shfl, bar per KB loaded |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m in models:
        s, b = _per_value(m)
        for name in cards:
            x = bounds(m, CARDS[name])
            rows.append(f"| {m['case'].op} | {m['case'].label} | {name} | {m['case'].floor_bytes / 1e6:.1f} | "
                        f"{x['design_bytes'] / 1e6:.1f} | {x['l2_bytes'] / 1e6:.1f} | {x['floor_us']:.1f} | "
                        f"{x['design_us']:.1f} | "
                        f"{x['shfl_us']:.1f} | {x['bound_us']:.1f} | {100 * x['of_floor']:.0f}% | {s:.1f}, {b:.1f} |")
    return "\n".join(rows)


def loop_table(models) -> str:
    rows = ["| kernel | case | PTX loop: trips per program, per iteration per thread: shfl / bar / loaded bytes |",
            "|---|---|---|"]
    for m in models:
        for r in m["rows"]:
            loops = "; ".join(f"{lp['trips']:.0f} x ({lp['shfl']} / {lp['bar']} / {lp['ld_bytes']} B)"
                              for lp in r["loops"]) or "no loop"
            rows.append(f"| {r['kernel']} | {m['case'].label} | {loops} |")
    return "\n".join(rows)


MODEL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "roofline_model.json")


def by_group(models) -> dict:
    """{bench group: {card: {"floor_us", "bound_us"}}}: the cases a group's measured work is made of, summed (a
    forward+backward group is its forward case plus its backward case). summarize.py sets measurements beside it."""
    out = {}
    for m in models:
        for group in m["case"].groups:
            for name, card in CARDS.items():
                x = bounds(m, card)
                slot = out.setdefault(group, {}).setdefault(name, {"floor_us": 0.0, "bound_us": 0.0, "cases": []})
                slot["floor_us"] += x["floor_us"]
                slot["bound_us"] += x["bound_us"]
                slot["cases"].append(f"{m['case'].op} {m['case'].label}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default="mmd,adaln,attention", help="comma-separated ops to model")
    ap.add_argument("--save", metavar="PATH", nargs="?", const=MODEL_FILE, default=None,
                    help=f"also write the per-benchmark-group floors and bounds (default path: {MODEL_FILE}), "
                         "which device_check.sh sets beside its measurements")
    args = ap.parse_args(argv)
    import triton

    models = [model(c) for c in cases() if c.op in args.ops.split(",")]
    if args.save:
        data = {"triton": triton.__version__, "torch": torch.__version__, "groups": by_group(models),
                "note": "static model (benchmarks/roofline.py), not a GPU measurement"}
        tmp = args.save + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, args.save)
    print(f"Static model (not a GPU measurement), triton {triton.__version__}; constants:")
    for card in CARDS.values():
        print(f"  {card.name}: {card.hbm / 1e12:.2f} TB/s, {card.sms} SMs, {card.clock / 1e9:.2f} GHz, "
              f"{card.fp32 / 1e12:.0f} / {card.tc16 / 1e12:.0f} TFLOPS fp32 / bf16 tensor: {card.source}")
    print(f"  warp shuffle: {SHFL_WARP_PER_CLK_PER_SM:.0f} warp instruction per clock per SM (CUDA C++ Programming "
          "Guide, arithmetic instruction throughput: 32 results/clock/SM on cc 8.x, 9.0)\n")
    print(table(models))
    print()
    print(loop_table(models))


if __name__ == "__main__":
    main()
