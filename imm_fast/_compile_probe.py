"""Compile the Triton kernels for sm_80 and sm_90 without a GPU, through their real launchers.

How: the launchers run on `device="meta"` tensors while a stand-in Triton driver reports the target
(`GPUTarget("cuda", 80 or 90, 32)`), and every `JITFunction.run` is turned into `run(..., warmup=True)`: Triton
specializes and compiles exactly what the launch would, down to the cubin, and launches nothing. Each compiled
kernel is then measured: registers and spill bytes from Triton's bundled `ptxas -v` on its PTX, shared memory
from its metadata, checked against the target's per-block limit. Triton caches a compiled kernel by its
specialization key (per target), so a config that many shapes share compiles once.

Needs TRITON_INTERPRET unset (jit functions, not interpreted ones): `python -m imm_fast._compile_probe` prints the
compile table of the gate's cases (tests/test_compile_gate.py runs it in CI). Nothing here is a GPU measurement.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    capability: int
    smem_limit: int  # bytes of shared memory one block may use (opt-in maximum)


# Per-block shared memory maximum: CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"
# (163 KB on 8.0, 227 KB on 9.0; 1 KB = 1024 B).
TARGETS = {"sm_80": Target("sm_80", 80, 166_912), "sm_90": Target("sm_90", 90, 232_448)}


@dataclasses.dataclass
class Compiled:
    """One distinct compiled kernel and its resources on one target."""
    kernel: str              # the @triton.jit function's name
    target: Target
    config: Dict[str, object]  # the constexprs and launch options it was specialized on
    dtypes: str              # the tensor arguments' dtypes, e.g. "bf16" or "fp32+bf16"
    registers: int           # per thread (ptxas -v)
    spill_stores: int        # bytes per thread (ptxas -v)
    spill_loads: int
    shared: int              # bytes of shared memory per block (Triton's allocation)
    ptx: str = dataclasses.field(repr=False, default="")

    @property
    def problems(self) -> List[str]:
        out = []
        if self.shared > self.target.smem_limit:
            out.append(f"shared memory {self.shared} B > {self.target.name}'s {self.target.smem_limit} B")
        if self.spill_stores or self.spill_loads:
            out.append(f"spills {self.spill_stores} B stores / {self.spill_loads} B loads per thread")
        return out


@dataclasses.dataclass
class Launch:
    """One kernel launch a launcher made (compiled, not run)."""
    fn: object               # the JITFunction
    grid: tuple
    args: tuple              # positional arguments as passed (tensors are meta)
    kwargs: dict
    compiled: Compiled


class _StandInDriver:
    """The part of a Triton GPU driver that compiling needs: a current target, device and stream. The device id is
    the capability, so JITFunction.device_caches keep one binder (and kernel cache) per target."""

    def __init__(self, target: Target):
        self.target = target

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", self.target.capability, 32)

    def get_current_device(self):
        return self.target.capability

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")

    def map_python_to_cpp_type(self, ty):  # the launcher stub is never built
        raise NotImplementedError("the stand-in driver compiles only")


def _driver_config():
    return sys.modules["triton.runtime.driver"].driver  # the DriverConfig (triton.runtime re-exports its name)


@contextlib.contextmanager
def compiling(target: Target):
    """Within: Triton launches compile for `target` and are recorded (yields the list of Launch), never run."""
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the compile probe needs TRITON_INTERPRET unset (jit functions, not interpreted ones)")
    cfg = _driver_config()
    saved_driver, saved_run = cfg._active, JITFunction.run
    launches: List[Launch] = []

    def run(self, *args, grid, warmup, **kwargs):
        kernel = saved_run(self, *args, grid=grid, warmup=True, **kwargs)
        launches.append(Launch(self, grid, args, kwargs, measure(self, kernel, target, args, kwargs)))
        return kernel

    cfg.set_active(_StandInDriver(target))
    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = saved_run
        cfg._active = saved_driver


# ----------------------------------------------------------------------------------------------------------------
# Resources of a compiled kernel

_MEASURED: Dict[tuple, Compiled] = {}  # (kernel hash, target) -> Compiled: ptxas runs once per distinct kernel


_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _dtypes(args) -> str:
    """The distinct dtypes of the (B, ...)-sized tensor arguments, in order (small fp32 side tensors left out)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() >= 2 and _SHORT.get(a.dtype, str(a.dtype)) not in out:
            out.append(_SHORT.get(a.dtype, str(a.dtype)))
    return "+".join(out)


def measure(fn, kernel, target: Target, args, kwargs) -> Compiled:
    key = (kernel.hash, target.name)
    if key not in _MEASURED:
        regs, st, ld = ptxas_resources(kernel.asm["ptx"], target)
        config = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        _MEASURED[key] = Compiled(fn.fn.__name__, target, config, _dtypes(args), regs, st, ld,
                                  int(kernel.metadata.shared), kernel.asm["ptx"])
    return _MEASURED[key]


@functools.lru_cache(maxsize=None)
def _ptxas_command(capability: int):
    """Triton's bundled ptxas for this target and the flags Triton's own make_cubin passes it."""
    from triton.backends.nvidia import compiler as nv

    ptxas = nv.get_ptxas(capability).path if "arch" in str(inspect.signature(nv.get_ptxas)) else nv.get_ptxas().path
    extra = ["--regAllocOptLevel=2"] if "regAllocOptLevel" in inspect.getsource(nv.CUDABackend.make_cubin) else []
    return [ptxas, "-lineinfo", "-v", *extra, f"--gpu-name={nv.sm_arch_from_capability(capability)}"]


_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_resources(ptx: str, target: Target):
    """(registers, spill store bytes, spill load bytes) per thread, from `ptxas -v` on the kernel's PTX."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "k.ptx")
        src.write_text(ptx)
        r = subprocess.run([*_ptxas_command(target.capability), str(src), "-o", str(Path(d, "k.o"))],
                           capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    if r.returncode:
        raise RuntimeError(f"ptxas failed for {target.name}:\n{log[-2000:]}")
    used, spill = _USED.findall(log), _SPILL.findall(log)
    if len(used) != 1 or len(spill) != 1:
        raise RuntimeError(f"unexpected ptxas -v output (one kernel per PTX expected):\n{log[-2000:]}")
    return int(used[0]), int(spill[0][0]), int(spill[0][1])


# ----------------------------------------------------------------------------------------------------------------
# The gate's cases: the shapes users run, through the real launchers

@dataclasses.dataclass
class Case:
    op: str
    label: str
    call: Callable[[], object]      # runs the launcher(s) on meta tensors
    refused: bool = False           # the launcher must refuse this case (ValueError/TypeError with a reason)


def _meta(*shape, dtype):
    return torch.empty(shape, device="meta", dtype=dtype)


_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _mmd_fwd_bwd(G, M, D, dt, grads):
    """mmd_fwd with a folded coefficient, then the backward's in-place rescale of each stored gradient."""
    from imm_fast.kernels.mmd import mmd_fwd, mmd_rescale_

    x, y = _meta(G * M, D, dtype=_DT[dt]), _meta(G * M, D, dtype=_DT[dt])
    c = _meta(G, dtype=torch.float32)
    _, gx, gy = mmd_fwd(x, y, M, _meta(G, dtype=torch.float32), 1e-8, False, True, True, grads == "xy", coef=c)
    for g in (gx, gy) if grads == "xy" else (gx,):
        mmd_rescale_(g, _meta(G, dtype=torch.float32), c)


def mmd_cases(Gs=(1024, 4096), Ms=(4, 8, 16), Ds=(3072, 4096, 16384), dtypes=("fp32", "bf16")):
    out = []
    for G in Gs:
        for M in Ms:
            for D in Ds:
                for dt in dtypes:
                    for grads in ("x", "xy"):
                        call = functools.partial(_mmd_fwd_bwd, G, M, D, dt, grads)
                        out.append(Case("mmd", f"G={G} M={M} D={D} {dt} grad {grads}", call))
    return out


def _adaln_fwd_bwd(B, T, C, x_dt, br_dt, mod_dt, op):
    """adaln_fwd then adaln_bwd as the custom op calls them for op in modulate / residual / residual_adaln."""
    from imm_fast.kernels.adaln import adaln_bwd, adaln_fwd

    has_res, has_norm = op != "modulate", op != "residual"
    x = _meta(B, T, C, dtype=x_dt)
    y = _meta(B, T, C, dtype=br_dt) if has_res else None
    mod = [_meta(B, C, dtype=mod_dt) if use else None for use in (has_res, has_norm, has_norm)]  # gate shift scale
    xnew_dt = torch.promote_types(torch.promote_types(x_dt, mod_dt), br_dt) if has_res else x_dt
    out_dt = torch.promote_types(xnew_dt, mod_dt) if has_norm else None
    xnew, out, mean, rstd = adaln_fwd(x, mod[0], y, mod[1], mod[2], 1e-6, has_res, has_norm, xnew_dt, out_dt)
    xn = (xnew if has_res else x) if has_norm else None
    dout = torch.empty_like(out) if has_norm else None
    dxnew = torch.empty_like(xnew) if has_res else None
    return adaln_bwd(dout, dxnew, xn, y, mod[0], mod[2], mean if has_norm else None, rstd if has_norm else None,
                     has_res, has_norm, x_dt)


def adaln_cases(Cs=(768, 1152), T=256, B=256):
    out = []
    kinds = {dt: (_DT[dt],) * 3 for dt in ("bf16", "fp16", "fp32")}
    kinds["mixed"] = (torch.float32, torch.bfloat16, torch.bfloat16)  # DiT under autocast: fp32 residual stream
    for C in Cs:
        for kind, (x_dt, br_dt, mod_dt) in kinds.items():
            for op in ("modulate", "residual", "residual_adaln"):
                call = functools.partial(_adaln_fwd_bwd, B, T, C, x_dt, br_dt, mod_dt, op)
                out.append(Case("adaln", f"C={C} T={T} {kind} {op} fwd+bwd", call))
    return out


def _attention_fwd_bwd(B, T, H, Dh, dtype, qk_norm):
    from imm_fast.kernels.attention import attention_bwd, attention_fwd

    qkv = _meta(B, T, 3 * H * Dh, dtype=dtype)
    norm = tuple(_meta(Dh, dtype=torch.float32) for _ in range(4)) if qk_norm else None
    o, lse = attention_fwd(qkv, H, norm)
    return attention_bwd(torch.empty_like(o), qkv, o, lse, H, norm)


def attention_cases(Dhs=(64, 72, 96, 128), Hs=(12, 16), T=256, B=2):
    out = []
    for Dh in Dhs:
        for H in Hs:
            for dt in ("bf16", "fp16", "fp32"):
                for qk_norm in (False, True):
                    call = functools.partial(_attention_fwd_bwd, B, T, H, Dh, _DT[dt], qk_norm)
                    label = f"Dh={Dh} H={H} T={T} {dt}{' qk-norm' if qk_norm else ''} fwd+bwd"
                    out.append(Case("attention", label, call, refused=not attention_accepts(_DT[dt])))
    return out


def attention_accepts(dtype) -> bool:
    """Whether the triton attention backend takes this dtype on CUDA (its registered limits say)."""
    from imm_fast import _backend
    import imm_fast.ops.attention  # noqa: F401  (registers the op)

    impl = next(i for i in _backend.impls("attention") if i.name == "triton")
    return not impl.limits(_backend.op_args("cuda", dtype, Dh=64))


def all_cases():
    return mmd_cases() + adaln_cases() + attention_cases()


# ----------------------------------------------------------------------------------------------------------------
# The gate

@dataclasses.dataclass
class Result:
    case: Case
    target: Target
    launches: List[Launch]
    error: Optional[str] = None     # an exception from the launcher or the compiler
    refused: Optional[str] = None   # the launcher's refusal (ValueError/TypeError message)

    @property
    def problems(self) -> List[str]:
        where = f"{self.case.op} {self.case.label} on {self.target.name}"
        if self.case.refused:
            return [] if self.refused else [f"{where}: the launcher must refuse this case but compiled it"]
        if self.error or self.refused:
            return [f"{where}: {self.error or 'refused: ' + self.refused}"]
        return [f"{where}: {l.compiled.kernel}: {p}" for l in self.launches for p in l.compiled.problems]


def run_case(case: Case, target: Target) -> Result:
    with compiling(target) as launches:
        try:
            case.call()
        except (ValueError, TypeError) as e:
            return Result(case, target, list(launches), refused=str(e))
        except Exception as e:  # a compile error or OutOfResources: the gate reports it as the case's failure
            return Result(case, target, list(launches), error=f"{type(e).__name__}: {str(e)[:500]}")
    return Result(case, target, list(launches))


def run_gate(cases=None, targets=None) -> List[Result]:
    cases = all_cases() if cases is None else cases
    targets = list(TARGETS.values()) if targets is None else targets
    return [run_case(c, t) for t in targets for c in cases]


def distinct(results: List[Result]) -> List[Compiled]:
    """Each compiled kernel once (first appearance order)."""
    seen, out = set(), []
    for r in results:
        for launch in r.launches:
            if id(launch.compiled) not in seen:
                seen.add(id(launch.compiled))
                out.append(launch.compiled)
    return out


def _config_text(c: Compiled) -> str:
    keep = ("BLOCK", "ROWS", "R", "BM", "SPLIT", "HAS", "NEED", "num_warps", "num_stages", "RBF", "Dh")
    items = [f"{k}={v}" for k, v in c.config.items() if k.startswith(keep) and k != "RBF"]
    return " ".join(items)


def table(results: List[Result]) -> str:
    """Markdown: one row per distinct compiled kernel."""
    rows = ["| kernel | target | dtypes | config | registers | spills (st/ld B) | shared (B) | limit (B) |",
            "|---|---|---|---|---:|---:|---:|---:|"]
    for c in distinct(results):
        rows.append(f"| {c.kernel} | {c.target.name} | {c.dtypes} | {_config_text(c)} | {c.registers} | "
                    f"{c.spill_stores}/{c.spill_loads} | {c.shared} | {c.target.smem_limit} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    import time

    import triton

    t0 = time.perf_counter()
    results = run_gate()
    dt = time.perf_counter() - t0
    print(table(results))
    problems = [p for r in results for p in r.problems]
    n_launch = sum(len(r.launches) for r in results)
    print(f"\ntriton {triton.__version__}: {len(results)} cases x targets, {n_launch} launches, "
          f"{len(distinct(results))} distinct kernels compiled, {dt:.0f} s; {len(problems)} problems")
    for p in problems:
        print("  " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
