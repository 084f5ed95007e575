"""Ranks, devices and progress lines: the helpers training and evaluation share.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a process group is joined only when WORLD_SIZE > 1 (nccl on CUDA,
gloo on the CPU). Every collective here is a no-op in a single process, so callers need no `if world > 1`.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import dataclass

import torch

# Long enough for rank 0 to compute reference statistics or write a checkpoint while the others wait.
TIMEOUT = datetime.timedelta(hours=2)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False  # this process created the group (and destroys it)

    @property
    def main(self):
        return self.rank == 0


def world():
    """(rank, world size) of the current process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device=None) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1; nccl for a CUDA device (None: CUDA when present)."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(*world(), local_rank=local)
    here = False
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        here = True
    return Dist(dist.get_rank(), dist.get_world_size(), local, here)


def resolve_device(spec=None, local_rank=None) -> torch.device:
    """spec None or "auto": cuda:LOCAL_RANK when CUDA is present, else the CPU. "cuda" without CUDA is an error."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    if spec is None or spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={spec!r} is not a device (cpu, cuda, cuda:1, auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={spec!r} but CUDA is not available here; use device=cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def _collective_device():
    import torch.distributed as dist

    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def barrier(d=None):
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj, d=None):
    """Rank 0's `obj` on every rank."""
    if world()[1] == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a CPU tensor (moved to the collective's device and back)."""
    if world()[1] == 1:
        return t
    import torch.distributed as dist

    out = t.to(_collective_device())
    dist.all_reduce(out)
    return out.cpu()


def sum_over_ranks(v) -> int:
    return int(round(all_reduce_sum(torch.tensor([float(v)], dtype=torch.float64)).item()))


def any_rank(flag: bool) -> bool:
    """True on every rank when any rank's flag is True (all ranks stop together)."""
    return sum_over_ranks(int(bool(flag))) > 0


class Progress:
    """One status line on stderr: done / total, rate and ETA, plus `info`. A terminal gets a line that redraws
    itself (at most every 0.5 s); a log file gets a line every 30 s and at the end.

    update(done, info) takes the absolute count; resumed=True marks work found done (it does not count toward the
    rate, so a resumed evaluation shows its true speed).
    """

    def __init__(self, enabled, total, initial=0, label="", unit="steps"):
        self.enabled, self.total, self.label, self.unit = enabled, total, label, unit
        self.done = self.base = initial
        self.t0, self.last = time.perf_counter(), 0.0
        self.tty = sys.stderr.isatty()
        self.drawn = False

    def update(self, done, info=None, resumed=False):
        self.done = done
        now = time.perf_counter()
        if resumed:
            self.base, self.t0 = done, now
        if not self.enabled or (now - self.last < (0.5 if self.tty else 30) and done < self.total):
            return
        self.last = now
        rate = (done - self.base) / max(now - self.t0, 1e-9)
        eta = f"{(self.total - done) / rate:.0f} s" if rate > 0 else "?"
        extra = "" if not info else " " + " ".join(f"{k}={v}" for k, v in info.items())
        line = (f"{self.label + ': ' if self.label else ''}{min(done, self.total)}/{self.total} {self.unit}, "
                f"{rate:.2f} {self.unit}/s, ETA {eta}{extra}")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        self.drawn = True

    def close(self):
        if self.enabled and self.tty and self.drawn:
            print(file=sys.stderr, flush=True)
            self.drawn = False
