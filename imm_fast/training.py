"""Training: `train(cfg)` runs the IMM objective with EMA, checkpoints, exact resume and data parallelism.

A run folder <out_dir>/<run_name>/ holds:
  config.json                      the resolved TrainConfig
  run.lock                         locked (fcntl.flock) by the process writing the folder, which it names
  metrics.jsonl                    one JSON object per logged step (loss, grad norm, lr, it/s, samples/s, skipped
                                   steps, non-finite groups) + evals; strict JSON (non-finite numbers become null)
  samples/step-<7-digit step>-<N>step.png sample grids of the EMA model at each step count N
  checkpoints/step-<7-digit step>/ model.safetensors, ema.safetensors, train_state.pt, config.json, manifest.json
  checkpoints/latest               the name of the newest complete checkpoint
  final_metrics.json               the metrics at the end (digits: accuracy and Frechet distance per step count)

`train` reads top to bottom: _setup (checks, the run folder under its lock, model, EMA, optimizer, generators,
resume), then per step _train_step (one optimizer step, or a skipped one), _update_ema, _log, and _checkpoint /
_sample / _evaluate when due. Checkpoint files, the `latest` resolver and the lock live in imm_fast.checkpoints.

A long run never lies: a step whose loss or global grad norm is non-finite (or whose groups imm_loss all masked)
is skipped (optimizer, EMA and lr schedule untouched; one device-to-host sync per step decides it) and counted;
after cfg.max_nonfinite_steps skips in a row the run stops with NonFiniteError naming the step, the last good
checkpoint and likely causes. Weights with NaN/inf are never checkpointed. A fresh run starts only in a folder that
holds no other run's files. SIGTERM / SIGINT end the run between two steps with a verified checkpoint of the last
applied step and the resume command (Preempted, exit 143 / 130); SIGUSR1 writes one and training carries on.

Randomness, and why resume and data parallelism are exact: every random draw of a step (the batch indices,
flips, the (s, r, t) of each group, the noise of each particle and the label-drop mask) is made for the GLOBAL batch
from generators that every rank holds in the same state; each rank then takes its slice of whole groups. The
global torch RNG only drives dropout (under DDP it is reseeded every step from (seed, rank, step)). All generator
states, the optimizer, the EMA and the numpy / python RNG states are checkpointed; train_state.pt holds only
tensors and plain values and loads with weights_only=True (no code runs when a checkpoint is read).

Shapes: B global batch, W ranks, A accumulation steps, b = B / (W A) per-rank micro-batch, M particles, G groups.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ._backend import reference_loss_backend, resolve_fused
from ._dist import Dist as _Dist, Progress as _Progress, barrier as _barrier, broadcast_object as _broadcast_object
from ._dist import init_distributed as _init_distributed, resolve_device as _resolve_device
from ._files import atomic_write_text, image_grid, write_png
from .checkpoints import (CKPT_PREFIX, NonFiniteError, RunFolderBusyError, RunLock, checkpoint_name, find_checkpoint,
                          list_checkpoints, nonfinite_entries, read_checkpoint, repair_run_folder, run_folder_of,
                          save_checkpoint, verify_checkpoint)
from .config import LossConfig, TrainConfig, check_fits, config_to_dict, load_train_config, read_config_file


@dataclass
class TrainResult:
    run_dir: Optional[Path]        # the run folder (None on ranks > 0)
    step: int                      # optimizer steps done
    metrics: dict = field(default_factory=dict)  # final metrics (rank 0)
    checkpoint: Optional[Path] = None            # the last checkpoint folder

    def __str__(self):
        return f"run folder: {self.run_dir}\nstep: {self.step}\nmetrics: {_dump(self.metrics, indent=1)}"


# ----------------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM / SIGINT stop with a verified checkpoint and the resume command; SIGUSR1 saves one
# ----------------------------------------------------------------------------------------------------------------
_SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT", signal.SIGUSR1: "SIGUSR1"}
_SAVE, _STOP = 1, 2  # what a signal asks for: save and carry on, save and stop (ordered: the larger wins)


class Preempted(SystemExit):
    """Training stopped by a signal. `code` is the conventional exit status 128 + signal number (143 for SIGTERM,
    130 for SIGINT), so an uncaught Preempted ends the process as the signal would have, without a traceback;
    `checkpoint` is the verified checkpoint of the last applied step (None when nothing was trained yet)."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path], message: str):
        super().__init__(128 + signum)
        self.signum, self.step, self.checkpoint, self.message = signum, step, checkpoint, message

    def __str__(self):
        return self.message


class _Interrupted(Exception):
    """Raised by the signal handler inside a phase that may be abandoned (setup, sample grids, evaluation)."""


class _Signals:
    """SIGTERM, SIGINT and SIGUSR1 while train() runs. The handler only records what was asked (a flag: the step
    being computed and a checkpoint being written are never cut in half, and a second signal changes nothing but
    the flag), except inside `abandonable()` phases, where a stop raises _Interrupted at once."""

    def __init__(self, usr1: str):
        self.usr1 = usr1             # "save" (carry on) or "exit"
        self.request = 0             # 0, _SAVE or _STOP
        self.signum = None           # the signal behind the request
        self.abandon = False         # inside an abandonable phase: a stop raises at once
        self.saving = False          # a preemption checkpoint is being written
        self._old = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signal.signal works in the main thread only; elsewhere the defaults stay
        for s in _SIGNAL_NAMES:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _handle(self, signum, frame):
        want = _SAVE if signum == signal.SIGUSR1 and self.usr1 == "save" else _STOP
        if self.saving or self.request == _STOP:  # os.write: print() may be mid-write in the interrupted frame
            os.write(2, f"imm_fast: {_SIGNAL_NAMES[signum]} received while already stopping: the step and its "
                        "checkpoint are being finished (kill -9 abandons them; the previous checkpoint stays "
                        "intact)\n".encode())
        if want > self.request:
            self.request, self.signum = want, signum
        if self.abandon and self.request == _STOP and not self.saving:
            raise _Interrupted()

    @contextlib.contextmanager
    def abandonable(self, enabled: bool = True):
        """A phase whose work may be dropped on a stop (nothing in it is half-written by a raise)."""
        prev, self.abandon = self.abandon, enabled
        try:
            if enabled and self.request == _STOP:
                raise _Interrupted()
            yield
        finally:
            self.abandon = prev


def _resume_command(run_dir: Path, world: int) -> str:
    launcher = f"torchrun --nproc_per_node {world} -m imm_fast" if world > 1 else "python -m imm_fast"
    return f"{launcher} train resume={shlex.quote(str(Path(run_dir).absolute()))}"


# ----------------------------------------------------------------------------------------------------------------
# Training state (its files: imm_fast.checkpoints)
# ----------------------------------------------------------------------------------------------------------------
def _rng_state():
    # Only tensors, ints, floats, strings and tuples: train_state.pt loads with torch.load(weights_only=True).
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(gauss)),
          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st):
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------------------------
def _json_safe(obj):
    """A copy that json.dumps(allow_nan=False) accepts: NaN/inf become None (null)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _dump(obj, **kw) -> str:
    return json.dumps(_json_safe(obj), allow_nan=False, **kw)


class _Logger:
    """metrics.jsonl on rank 0, plus the TensorBoard / W&B backends that cfg.log asks for (imm_fast.loggers)."""

    def __init__(self, run_dir: Optional[Path], resume_step: Optional[int], cfg: Optional[TrainConfig] = None):
        self.path = None if run_dir is None else run_dir / "metrics.jsonl"
        self.backends = None
        if self.path is None:
            return
        if self.path.is_symlink():  # appending would write into whatever it points at, outside the run
            raise ValueError(f"{str(self.path)!r} is a symbolic link (to {os.readlink(self.path)!r}); a run writes "
                             "its metrics only into its own folder: remove the link (or copy the file in its place)")
        if resume_step is not None and self.path.is_file():
            # Drop lines a killed run wrote after the checkpoint we resume from, so the log reads as one run.
            self.drop(lambda rec: rec.get("step", 0) > resume_step)
        if cfg is not None:
            from .loggers import LogBackends

            self.backends = LogBackends(cfg.log, run_dir, config_to_dict(cfg), resume_step)

    def drop(self, unwanted: Callable[[dict], bool]):
        """Rewrite metrics.jsonl without the records for which unwanted(record) is true (and unreadable lines)."""
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if not unwanted(json.loads(line)):
                    keep.append(line)
            except json.JSONDecodeError:
                pass
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def log(self, record: dict):
        if self.path is None:
            return
        # O_NOFOLLOW: a link put in place during the run is refused (ELOOP), never appended through.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        with open(fd, "a") as f:
            f.write(_dump(record) + "\n")
        if self.backends is not None:
            self.backends.scalars(record.get("step", 0), record)

    def image(self, step: int, tag: str, grid):
        if self.backends is not None and self.backends.active:
            self.backends.image(step, tag, grid)

    def close(self):
        if self.backends is not None:
            self.backends.close()


# ----------------------------------------------------------------------------------------------------------------
# Sampling and evaluation during training
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def save_sample_grids(run_dir: Path, step: int, ema, ds, cfg: TrainConfig, device, vae=None, logger=None):
    """One PNG per step count of cfg.sample.steps (fixed noise and labels, so grids compare across steps)."""
    from .sampling import sample

    n = cfg.sample.num_images
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    noise = torch.randn((n,) + ds.shape, generator=g) * ema.sigma_data
    labels = (torch.arange(n) % max(ema.label_dim, 1)).to(device) if ema.label_dim else None
    cfg_scale = cfg.sample.cfg_scale if ema.label_dim else None
    nrow = max(ema.label_dim, 1) if ema.label_dim and n % ema.label_dim == 0 else None
    paths = []
    for steps in cfg.sample.steps:
        x = sample(ema, noise.to(device), steps, cfg.sample.sampler, cfg.sample.grid, labels, cfg_scale).float()
        if cfg.data.source == "latents":
            if vae is None:
                out = run_dir / "samples" / f"{CKPT_PREFIX}{step:07d}-{steps}step.npy"
                out.parent.mkdir(parents=True, exist_ok=True)
                np.save(out, x.cpu().numpy())
                paths.append(out)
                continue
            from .vae import decode_latents

            pixels = decode_latents(vae, x)
        else:
            pixels = ds.to_pixels(x)
        grid = image_grid(pixels, nrow, max(1, 64 // ds.shape[-1]))
        paths.append(write_png(run_dir / "samples" / f"{CKPT_PREFIX}{step:07d}-{steps}step.png", grid))
        if logger is not None:
            logger.image(step, f"samples/{steps}step", grid)
    return paths


def evaluate(ema, ds, cfg: TrainConfig, device, step: int = 0) -> dict:
    """Metrics of the EMA model: digits -> accuracy / FD table; images -> FID / IS (imm_fast.evaluation)."""
    from . import metrics as M
    from .data import DIGITS_CLASSES, DIGITS_SHAPE

    if cfg.data.source == "digits" and ema.label_dim == DIGITS_CLASSES and ds.shape == DIGITS_SHAPE:
        table = M.digits_report(ema, cfg.eval_steps, cfg.sample.cfg_scale or 0.0, cfg.eval_samples, cfg.seed,
                                cfg.sample.sampler)
        return {"digits": {str(k): v for k, v in table.items()},
                "table": M.format_digits_table(table, cfg.sample.cfg_scale)}
    from .evaluation import train_time_fid

    return train_time_fid(ema, cfg, device, step, ds)


def _scalars(obj):
    """JSON-able copy without the pre-formatted table string."""
    if isinstance(obj, dict):
        return {k: _scalars(v) for k, v in obj.items() if k != "table"}
    return obj


# ----------------------------------------------------------------------------------------------------------------
# Setup: everything before step 0
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Window:
    """What the next metrics line averages: sums since the last line, on the device (no host sync per step)."""
    sums: torch.Tensor       # (2,) float64: loss, grad norm of the applied steps
    bad_groups: torch.Tensor  # () int64: groups masked out by imm_loss's non-finite guard (all attempts)
    steps: int = 0           # applied optimizer steps
    skipped: int = 0         # skipped steps (non-finite loss or grad norm)
    t0: float = 0.0          # perf_counter at the last line
    step0: int = 0           # step at the last line


@dataclass
class _Run:
    """The state of one run between steps."""
    cfg: TrainConfig
    d: _Dist
    device: torch.device
    ds: object                   # the dataset (imm_fast.data)
    model: torch.nn.Module       # the IMM model being trained
    net: torch.nn.Module         # model, or its DDP wrapper (what the loss calls)
    ema: torch.nn.Module         # the EMA of model's weights (sampling, evaluation)
    opt: torch.optim.Optimizer
    gens: dict                   # CPU generators, same state on every rank: "loss" ((s, r, t), noise, drops), "data"
    sampler: object              # data.EpochSampler: the data order
    lcfg: LossConfig             # cfg.loss after the reference switch
    run_dir: Path                # the run folder (only rank 0 writes)
    logger: _Logger
    progress: _Progress
    window: _Window
    signals: _Signals            # SIGTERM / SIGINT / SIGUSR1 received (preemption)
    vae: object = None           # latents: the decoder of sample grids (rank 0)
    step: int = 0                # optimizer steps applied
    last_ck: Optional[Path] = None  # the newest checkpoint written or resumed from
    skipped_in_a_row: int = 0
    agreed: int = 0              # world > 1: the signal request all ranks agreed on at the last step
    resumed: bool = False        # continued from a checkpoint


def _resolve(cfg, overrides) -> TrainConfig:
    overrides = dict(overrides)
    if cfg is None and overrides.get("resume"):
        # Continue the saved run with its own config (overrides such as max_steps still apply), read from the
        # checkpoint verified in full, and pin resume to it: config and weights come from the same checkpoint.
        RunLock(run_folder_of(overrides["resume"])).check_free()  # a busy run folder fails before any hashing
        ck = find_checkpoint(overrides["resume"], explain=os.environ.get("RANK", "0") == "0")
        saved = read_config_file(ck / "config.json")
        saved.pop("resume", None)
        return load_train_config(saved, {**overrides, "resume": str(ck)}, source=ck / "config.json")
    return load_train_config(cfg, overrides)


def _foreign_files(run_dir: Path) -> list:
    """What a folder holds besides its run.lock (a fresh run starts only in a folder without any)."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name != RunLock.NAME)


def _lock_is_held(run_dir: Path) -> bool:
    """Whether a live process holds <run_dir>/run.lock (probed read-only: nothing is written)."""
    import fcntl

    try:
        fd = os.open(run_dir / RunLock.NAME, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's shared lock


def _refuse_used_folder(run_dir: Path, files: list):
    if "checkpoints" in files:
        raise ValueError(f"run folder {str(run_dir)!r} already holds checkpoints: pass resume={str(run_dir)!r} "
                         "to continue it, or choose another run_name")
    raise ValueError(f"run folder {str(run_dir)!r} already holds another run's files ({', '.join(files[:4])}"
                     f"{', ...' if len(files) > 4 else ''}) and no checkpoint to resume: a new run never writes into "
                     "it (the two runs' metrics and configs would mix); choose another run_name or delete the folder")


def _fresh_run_folder(cfg: TrainConfig, stack: contextlib.ExitStack) -> Path:
    """A new run folder, locked, holding nothing but its lock. An explicit run_name that is taken is refused; the
    default <name>-<UTC time> gets a suffix (-2, -3, ...) when two runs start in the same second."""
    stamp = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    names = [cfg.run_name] if cfg.run_name else [stamp] + [f"{stamp}-{i}" for i in range(2, 100)]
    for name in names:
        run_dir = Path(cfg.out_dir) / name
        files = _foreign_files(run_dir)  # before the lock: a used folder is not touched at all
        if not files:
            try:
                lock = RunLock(run_dir).acquire()
            except RunFolderBusyError:
                if cfg.run_name:
                    raise
                continue
            files = _foreign_files(run_dir)  # again under the lock: another process may have started there
            if not files:
                stack.callback(lock.release)
                return run_dir
            lock.release()
        if cfg.run_name:
            if _lock_is_held(run_dir):  # a live run: name its holder (RunLock writes nothing when it fails)
                RunLock(run_dir).acquire().release()
            _refuse_used_folder(run_dir, files)
    raise ValueError(f"no free run folder name {stamp}[-N] in {cfg.out_dir!r}; pass run_name=")


def _claim_run_folder(cfg: TrainConfig, stack: contextlib.ExitStack):
    """Rank 0: (run folder, checkpoint to resume or None), decided while holding the folder's lock."""
    if not cfg.resume:
        return _fresh_run_folder(cfg, stack), None
    run_dir = run_folder_of(cfg.resume)
    stack.callback(RunLock(run_dir).acquire().release)
    ck = find_checkpoint(cfg.resume)  # again, under the lock; explains any fallback in one line
    step = int(ck.name[len(CKPT_PREFIX):]) if ck.name.startswith(CKPT_PREFIX) else -1
    later = [n for n in list_checkpoints(ck.parent)
             if int(n[len(CKPT_PREFIX):]) > step and verify_checkpoint(ck.parent / n) is None]
    if later:  # continuing would collide with (and must not overwrite) the later checkpoints
        raise ValueError(f"resume={str(ck)!r} is older than checkpoints {later} of the same run: resume from the "
                         "run folder (its newest checkpoint), or copy the checkpoint into a new run folder's "
                         "checkpoints/ to branch from it")
    _check_resume_config(cfg, read_config_file(ck / "config.json"), ck)
    for note in repair_run_folder(run_dir, ck):
        print(f"imm_fast: {note}", file=sys.stderr, flush=True)
    return run_dir, ck


# What a resume may not change silently: the RNG streams continue from the checkpoint (a new seed cannot take
# effect, and the recorded config would lie), the optimizer state belongs to its optimizer; the others change the
# draws of every later step (the batch, its groups, the per-rank dropout seeds).
_RESUME_REFUSED = ("seed", "optimizer")
_RESUME_INEXACT = ("batch_size", "loss.group_size", "grad_accum")


def _config_value(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _check_resume_config(cfg: TrainConfig, saved: dict, ck: Path):
    """Refuse a resume that changes seed or optimizer (with the way out)."""
    now = config_to_dict(cfg)
    bad = {k: (_config_value(saved, k), _config_value(now, k)) for k in _RESUME_REFUSED
           if _config_value(saved, k) is not None and _config_value(saved, k) != _config_value(now, k)}
    if bad:
        what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in bad.items())
        raise ValueError(f"resume={cfg.resume!r} changes {what}: the checkpoint {ck.name} continues its own random "
                         "streams and optimizer state, so the run would not be what its config says. Resume "
                         "without changing them, or start a new run")


def _resume_changes(cfg: TrainConfig, saved: dict, saved_world: Optional[int], world: int) -> dict:
    """{key: [before, after]} of the changes that a resume accepts but that make it differ from an uninterrupted
    run (batch, group size, accumulation, world size)."""
    now = config_to_dict(cfg)
    out = {k: [_config_value(saved, k), _config_value(now, k)] for k in _RESUME_INEXACT
           if _config_value(saved, k) != _config_value(now, k)}
    if saved_world is not None and saved_world != world:
        out["world_size"] = [saved_world, world]
    return out


def _open_run_folder(cfg: TrainConfig, d: _Dist, stack: contextlib.ExitStack):
    """(run folder, checkpoint to resume or None): rank 0 decides under the run lock, every rank learns it."""
    answer = None
    if d.main:
        try:
            answer = _claim_run_folder(cfg, stack)
        except Exception as e:  # tell the other ranks too, so that none waits forever
            answer = e
    shared = _broadcast_object(answer, d)
    if isinstance(answer, Exception):
        raise answer
    if isinstance(shared, Exception):
        raise shared
    return shared


def _restore(ck: Path, model, ema, opt, gens: dict, sampler):
    """Load everything _checkpoint saved into the live objects; returns (step, the world size that wrote it or
    None for checkpoints that do not record it)."""
    model_sd, ema_sd, state = read_checkpoint(ck)
    try:
        model.load_state_dict(model_sd)
        ema.load_state_dict(ema_sd)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {str(ck)!r} does not match the configured model: {e}") from e
    opt.load_state_dict(state["optimizer"])
    for k, g in gens.items():
        g.set_state(state["generators"][k])
    sampler.load_state_dict(state["sampler"])
    _set_rng_state(state["rng"])
    return int(state["step"]), state.get("world_size")


def _latent_decoder(cfg: TrainConfig, device):
    """latents with data.vae_path: the VAE that decodes sample grids (rank 0), else None."""
    if cfg.data.source != "latents" or not cfg.data.vae_path:
        return None
    from .vae import load_vae

    return load_vae(cfg.data.vae_path, device)


def _announce(cfg: TrainConfig, device, d: _Dist, run_dir: Path, model, samples: int, resumed_at: Optional[int]):
    """The start line (rank 0): what trains where, with how many CPU threads, into which folder."""
    print(f"imm_fast: training {cfg.name} on {device} (world {d.world}{_threads_note(device)}), run folder "
          f"{run_dir}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {samples} samples"
          + (f", resumed at step {resumed_at}" if resumed_at is not None else ""), file=sys.stderr, flush=True)


def _write_run_config(run_dir: Path, cfg: TrainConfig):
    """config.json: the config this process trains with (a resume may change max_steps, lr, ...; each checkpoint
    keeps its own). Rewritten only when it changed."""
    text = json.dumps({k: v for k, v in config_to_dict(cfg).items() if k != "resume"}, indent=1)
    path = run_dir / "config.json"
    if not (path.is_file() and not path.is_symlink() and path.read_text() == text):
        atomic_write_text(path, text)


def _record_resume(logger: "_Logger", cfg: TrainConfig, ck: Path, step: int, saved_world, world: int):
    """One warning line and one metrics.jsonl record naming what a resume changed that breaks exactness."""
    changes = _resume_changes(cfg, read_config_file(ck / "config.json"), saved_world, world)
    if changes:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())
        print(f"imm_fast: warning: this resume changes {what}: from step {step} on, the run is no longer the one "
              "an uninterrupted run would have been (recorded in metrics.jsonl)", file=sys.stderr, flush=True)
        logger.log({"step": step, "resumed_from": ck.name, "inexact_changes": changes})


def _setup(cfg: TrainConfig, device: torch.device, d: _Dist, stack: contextlib.ExitStack,
           signals: "_Signals") -> _Run:
    """Checks, dataset, the run folder (locked), model, EMA, optimizer, generators and the resume."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .data import EpochSampler, build_dataset, check_compatible
    from .models import build_model

    A, M, B = cfg.grad_accum, cfg.loss.group_size, cfg.batch_size
    if B % (d.world * A * M):
        raise ValueError(f"batch_size={B} must be divisible by world size x grad_accum x loss.group_size = "
                         f"{d.world} x {A} x {M} so that every rank gets whole groups")
    # bf16/fp16 autocast of the student pass on CUDA (the target pass stays fp32); the reference switch.
    mcfg, lcfg = cfg.model, cfg.loss
    if device.type == "cuda" and cfg.amp and mcfg.mixed_precision is None:
        mcfg = dataclasses.replace(mcfg, mixed_precision=cfg.amp)
    # reference=true outranks model.fused and loss.backend (the precedence: imm_fast._backend.resolve_fused). Only
    # then is fused pinned: otherwise None stays in the model's init kwargs, so a checkpoint picks per device.
    if cfg.reference and "fused" in mcfg.field_names():  # the DiT's switch; UNets have no fused path
        mcfg = dataclasses.replace(mcfg, fused=resolve_fused(mcfg.fused, device, reference=True))
    lcfg = dataclasses.replace(lcfg, backend=reference_loss_backend(lcfg.backend, cfg.reference))
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ds = build_dataset(cfg.data)
    check_compatible(ds, mcfg)
    run_dir, resume_ck = _open_run_folder(cfg, d, stack)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(mcfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.compile:
        model.model.compile_regions(cfg.compile)  # in place: parameter names and checkpoints unchanged
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.RAdam
    kw = {"decoupled_weight_decay": True} if cfg.optimizer == "radam" and cfg.weight_decay else {}
    opt = opt_cls(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **kw)
    gens = {"loss": torch.Generator().manual_seed(cfg.seed + 1), "data": torch.Generator().manual_seed(cfg.seed + 2)}
    sampler = EpochSampler(len(ds), cfg.seed)
    step, saved_world = (0, None) if resume_ck is None else _restore(resume_ck, model, ema, opt, gens, sampler)

    vae = None
    if d.main:
        _write_run_config(run_dir, cfg)
        vae = _latent_decoder(cfg, device)
        _announce(cfg, device, d, run_dir, model, len(ds), step if resume_ck else None)
    logger = _Logger(run_dir if d.main else None, step if resume_ck is not None else None, cfg)
    stack.callback(logger.close)
    if d.main and resume_ck is not None:
        _record_resume(logger, cfg, resume_ck, step, saved_world, d.world)
    progress = _Progress(cfg.progress and d.main, cfg.max_steps, step)
    stack.callback(progress.close)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if d.world > 1 else model
    window = _Window(torch.zeros(2, dtype=torch.float64, device=device),
                     torch.zeros((), dtype=torch.int64, device=device), t0=time.perf_counter(), step0=step)
    return _Run(cfg=cfg, d=d, device=device, ds=ds, model=model, net=net, ema=ema, opt=opt, gens=gens,
                sampler=sampler, lcfg=lcfg, run_dir=run_dir, logger=logger, progress=progress,
                window=window, signals=signals, vae=vae, step=step, last_ck=resume_ck, resumed=resume_ck is not None)


# ----------------------------------------------------------------------------------------------------------------
# One step, the EMA, the metrics line
# ----------------------------------------------------------------------------------------------------------------
def _lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def _due(every: int, step: int) -> bool:
    return every > 0 and step % every == 0


@dataclass
class _StepOut:
    applied: bool                 # False: skipped, nothing was updated
    lr: float
    loss: torch.Tensor            # () this rank's loss (device)
    grad_norm: torch.Tensor       # () global grad norm before clipping (device)


def _draw_global_batch(run: _Run):
    """The step's randomness for the GLOBAL batch, identical on every rank (the draw order is part of resume)."""
    from .loss import draw_times

    cfg, ds, g = run.cfg, run.ds, run.gens
    B, M = cfg.batch_size, cfg.loss.group_size
    idx = run.sampler.next(B)                                                              # (B,)
    flips = torch.rand(B, generator=g["data"]) < 0.5 if cfg.data.hflip else None
    s, r, t = draw_times(B // M, run.model, cfg.loss, g["loss"], "cpu")                    # (B/M,) each
    noise = torch.randn((B,) + ds.shape, generator=g["loss"]) * run.model.sigma_data
    drop = (torch.rand(B, generator=g["loss"]) < cfg.loss.label_dropout) \
        if (ds.labels is not None and cfg.loss.label_dropout > 0) else None
    return idx, flips, s, r, t, noise, drop


def _all_finite(run: _Run, loss: torch.Tensor, grad_norm: torch.Tensor, some_group: torch.Tensor) -> bool:
    """Whether every rank's loss and the grad norm are finite and every rank kept at least one group (a step whose
    groups were all masked carries no signal, yet Adam's momentum would still move the weights): the step's one
    device-to-host sync."""
    flag = (torch.isfinite(loss) & torch.isfinite(grad_norm) & some_group).float()
    if run.d.world > 1:  # every rank must take the same decision, also on stopping for a signal (the same sync)
        import torch.distributed as dist

        both = torch.stack([flag, torch.full_like(flag, -float(run.signals.request))])
        dist.all_reduce(both, op=dist.ReduceOp.MIN)
        ok, neg_request = both.tolist()
        run.agreed = int(-neg_request)
        return bool(ok)
    return bool(flag)


def _train_step(run: _Run) -> _StepOut:
    """One optimizer step on the global batch (A micro-batches per rank); skipped (nothing updated) when the loss or
    grad norm is non-finite or a rank's groups were all masked by imm_loss's non-finite guard."""
    from .loss import imm_loss

    cfg, d, device = run.cfg, run.d, run.device
    A, M, B = cfg.grad_accum, cfg.loss.group_size, cfg.batch_size
    b = B // (d.world * A)  # per-rank micro-batch
    idx, flips, s_all, r_all, t_all, noise_all, drop_all = _draw_global_batch(run)
    if d.world > 1:
        # Dropout (the global RNG) differs per rank; seeding it from (seed, rank, step) keeps resume exact
        # without saving every rank's RNG state (only rank 0 writes checkpoints).
        torch.manual_seed((cfg.seed * 1_000_003 + run.step) * 4096 + d.rank)
    run.opt.zero_grad(set_to_none=True)
    loss = torch.zeros((), device=device)
    masked = torch.zeros((), dtype=torch.int64, device=device)  # groups imm_loss masked out on this rank
    for a in range(A):
        lo = a * (B // A) + d.rank * b  # this rank's rows of micro-batch a
        rows, groups = slice(lo, lo + b), slice(lo // M, (lo + b) // M)
        x, y = run.ds.get(idx[rows], None if flips is None else flips[rows])
        x, y = x.to(device, non_blocking=True), None if y is None else y.to(device)
        sync = contextlib.nullcontext() if (d.world == 1 or a == A - 1) else run.net.no_sync()
        with sync:
            out = imm_loss(run.net, x, y, run.lcfg, target_model=run.model, t=t_all[groups], s=s_all[groups],
                           r=r_all[groups], noise=noise_all[rows].to(device),
                           drop_mask=None if drop_all is None else drop_all[rows].to(device), grad_accum=A)
            (out.loss / A).backward()
        loss += out.loss.detach().float() / A
        masked += out.nonfinite_groups
    run.window.bad_groups += masked
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip)
    lr = _lr_at(cfg, run.step)
    applied = _all_finite(run, loss, grad_norm, masked < A * b // M)
    if applied:
        for group in run.opt.param_groups:
            group["lr"] = lr
        run.opt.step()
    return _StepOut(applied, lr, loss, grad_norm.detach())


def _last_good(run: _Run) -> str:
    return f"last good checkpoint: {run.last_ck}" if run.last_ck else \
        "no checkpoint was written yet (set ckpt_every to keep some)"


_CAUSES = ("likely causes: NaN/inf in the data, a learning rate too high, weights that already became non-finite, "
           "or fp16 overflow (amp=bf16 is safer); resume from the last good checkpoint with a lower lr or "
           "grad_clip > 0")


def _skip(run: _Run, out: _StepOut):
    """Count a skipped step; stop the run after cfg.max_nonfinite_steps of them in a row."""
    cfg = run.cfg
    run.window.skipped += 1
    run.skipped_in_a_row += 1
    loss, gn = float(out.loss), float(out.grad_norm)
    why = f"loss={loss}, grad_norm={gn}" + ("" if not (math.isfinite(loss) and math.isfinite(gn)) else
                                            ", every group of a rank non-finite")
    if run.d.main:
        print(f"imm_fast: step {run.step + 1} skipped: {why} (the weights, EMA and lr schedule are unchanged; "
              f"{run.skipped_in_a_row} in a row)", file=sys.stderr, flush=True)
    if run.skipped_in_a_row >= cfg.max_nonfinite_steps:
        msg = (f"stopping at step {run.step + 1}: {run.skipped_in_a_row} optimizer steps in a row were non-finite "
               f"(last: {why}, lr={out.lr}; max_nonfinite_steps={cfg.max_nonfinite_steps}); none of them reached "
               f"the weights; {_last_good(run)}; {_CAUSES}")
        run.logger.log({"step": run.step, "skipped": run.window.skipped, "error": msg})
        raise NonFiniteError(msg)


def _update_ema(run: _Run) -> float:
    """EMA of the weights after step run.step; returns the decay used."""
    cfg, step = run.cfg, run.step
    decay = min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay
    with torch.no_grad():
        for pe, pm in zip(run.ema.parameters(), run.model.parameters()):
            pe.lerp_(pm.detach(), 1.0 - decay)
        for be, bm in zip(run.ema.buffers(), run.model.buffers()):
            be.copy_(bm)
    return decay


def _log(run: _Run, lr: float, decay: float):
    """One metrics line: means over the applied steps since the last line, averaged over ranks (one sync)."""
    w, d = run.window, run.d
    vals = torch.cat([w.sums / max(w.steps, 1), w.bad_groups.double().reshape(1)])
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(vals)
        vals[:2] /= d.world
    loss, grad_norm, bad = vals.tolist()
    now = time.perf_counter()
    its = (run.step - w.step0) / max(now - w.t0, 1e-9)
    B = run.cfg.batch_size
    run.logger.log({"step": run.step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "it_s": round(its, 3),
                    "samples_s": round(its * B, 1), "ema_decay": decay, "epoch": run.sampler.epoch,
                    "skipped": w.skipped, "nonfinite_groups": int(bad)})
    run.progress.update(run.step, {"loss": f"{loss:.4g}", "it/s": f"{its:.2f}", "samples/s": f"{its * B:.0f}"})
    w.sums.zero_()
    w.bad_groups.zero_()
    w.steps, w.skipped, w.t0, w.step0 = 0, 0, now, run.step


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints, samples and evaluation
# ----------------------------------------------------------------------------------------------------------------
def _checkpoint(run: _Run):
    """checkpoints/step-<step>/ (rank 0 writes). Every rank first checks the weights, so all stop together."""
    # Once per checkpoint, model and EMA together: one host sync.
    bad = nonfinite_entries(run.model.state_dict(), run.ema.state_dict())
    if bad:
        raise NonFiniteError(f"refusing to write the checkpoint of step {run.step}: the weights hold NaN or inf "
                             f"({', '.join(bad[:4])}); {_last_good(run)}; {_CAUSES}")
    if not run.d.main:
        return
    state = {"step": run.step, "world_size": run.d.world, "optimizer": run.opt.state_dict(), "rng": _rng_state(),
             "generators": {k: g.get_state() for k, g in run.gens.items()}, "sampler": run.sampler.state_dict(),
             "torch_version": str(torch.__version__)}
    run.last_ck = save_checkpoint(run.run_dir, run.step, run.model, run.ema.state_dict(), state,
                                  config_to_dict(run.cfg), keep_last=run.cfg.keep_last,
                                  keep_every=run.cfg.keep_every, check_finite=False)


def _sample(run: _Run):
    save_sample_grids(run.run_dir, run.step, run.ema, run.ds, run.cfg, run.device, run.vae, run.logger)


def _evaluate(run: _Run) -> dict:
    """The metrics of the EMA model (the call site of evaluation, periodic and final)."""
    return evaluate(run.ema, run.ds, run.cfg, run.device, run.step)


def _finish(run: _Run) -> dict:
    """Final metrics (rank 0): logged, written to final_metrics.json and returned."""
    if not (run.d.main and run.cfg.final_eval):
        return {}
    metrics = _evaluate(run)
    run.logger.log({"step": run.step, "eval": _scalars(metrics)})
    atomic_write_text(run.run_dir / "final_metrics.json", _dump(_scalars(metrics), indent=1))
    if metrics.get("message"):
        print(metrics["message"], file=sys.stderr, flush=True)
    return metrics


def _finished_run(run: _Run, reevaluate: bool) -> dict:
    """Resuming a run that already reached max_steps: nothing is trained; the final evaluation runs again only
    when asked (final_eval=true given with the resume), replacing the earlier one in metrics.jsonl."""
    cfg = run.cfg
    if run.d.main:
        print(f"imm_fast: run {run.run_dir} is already finished (step {run.step}, max_steps={cfg.max_steps}): "
              "nothing to train" + ("; evaluating again (final_eval=true)" if reevaluate else
                                    "; pass a larger max_steps to train on, or final_eval=true to evaluate again"),
              file=sys.stderr, flush=True)
    if not reevaluate:
        return {}
    if run.d.main:
        run.logger.drop(lambda rec: rec.get("step") == run.step and "eval" in rec)
    return _finish(run)


# ----------------------------------------------------------------------------------------------------------------
# Stopping and saving on a signal
# ----------------------------------------------------------------------------------------------------------------
def _save_now(run: _Run) -> Path:
    """A verified checkpoint of the last applied step (every rank; rank 0 writes): the newest one when it is of
    this step already. Further signals meanwhile only set flags: the write is never cut in half."""
    run.signals.saving = True
    try:
        if run.last_ck is None or run.last_ck.name != checkpoint_name(run.step):
            _checkpoint(run)
        _barrier(run.d)
        if run.d.main:
            problem = verify_checkpoint(run.last_ck)
            if problem:
                raise ValueError(f"the checkpoint written on the signal, {str(run.last_ck)!r}, does not verify: "
                                 f"{problem}; {_last_good(run)}")
        return run.last_ck if run.d.main else run.run_dir / "checkpoints" / checkpoint_name(run.step)
    finally:
        run.signals.saving = False


def _signal_name(run: _Run) -> tuple:
    # A rank that got no signal itself stops because another did (torchrun forwards SIGTERM to every rank).
    signum = run.signals.signum or signal.SIGTERM
    return signum, _SIGNAL_NAMES[signum]


def _act_on_signal(run: _Run):
    """At a step boundary: SIGUSR1 (save) writes a checkpoint and carries on; a stop writes one and raises
    Preempted. Under torchrun every rank acts on what all agreed at the last step's all-reduce (same step)."""
    request = run.signals.request if run.d.world == 1 else run.agreed
    if not request:
        return
    ck = _save_now(run)
    signum, name = _signal_name(run)
    command = _resume_command(run.run_dir, run.d.world)
    if request == _SAVE:
        run.agreed = 0
        if run.signals.request == _SAVE:
            run.signals.request = 0
        if run.d.main:
            print(f"imm_fast: {name}: checkpoint {ck} of step {run.step} saved and verified; training continues "
                  f"(sigusr1=exit stops instead); to resume later: {command}", file=sys.stderr, flush=True)
        return
    msg = (f"imm_fast: stopped by {name} at step {run.step}: checkpoint {ck} is saved and verified; resume with: "
           f"{command}")
    if run.d.main:
        run.logger.log({"step": run.step, "stopped_by": name, "checkpoint": ck.name})
        print(msg, file=sys.stderr, flush=True)
    raise Preempted(signum, run.step, ck, msg)


def _stopped_after_training(run: _Run) -> Preempted:
    """A stop that came after the last step (final grids or evaluation): the final checkpoint is there already."""
    signum, name = _signal_name(run)
    msg = (f"imm_fast: stopped by {name} after the last step ({run.step}): checkpoint {run.last_ck} is complete; "
           f"the final sample grids or evaluation were not finished; to evaluate: "
           f"{_resume_command(run.run_dir, run.d.world)} final_eval=true")
    if run.d.main:
        print(msg, file=sys.stderr, flush=True)
    return Preempted(signum, run.step, run.last_ck, msg)


def _stopped_in_setup(signals: _Signals, cfg: TrainConfig) -> Preempted:
    name = _SIGNAL_NAMES[signals.signum]
    msg = f"imm_fast: stopped by {name} before the first step: nothing was trained, nothing to save" + (
        f"; resume with: python -m imm_fast train resume={shlex.quote(str(cfg.resume))}" if cfg.resume else "")
    print(msg, file=sys.stderr, flush=True)
    return Preempted(signals.signum, 0, None, msg)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------
# One CPU thread by default: measured on a 2-core machine (benchmarks/RESULTS.md, "CPU threads"), 2 threads are
# faster on an idle machine but many times slower when another process keeps one core busy (every OpenMP barrier
# waits for the descheduled thread), and a shared machine is the common case.
_DEFAULT_THREADS = 1


def _cpu_threads(cfg: TrainConfig, device: torch.device) -> None:
    """threads= when given; else, on the CPU, 1 unless OMP_NUM_THREADS says otherwise (see _DEFAULT_THREADS)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(_DEFAULT_THREADS)


def _threads_note(device: torch.device) -> str:
    return f", {torch.get_num_threads()} CPU thread{'s' if torch.get_num_threads() != 1 else ''}" \
        if device.type == "cpu" else ""


def _after_step(run: _Run, out: _StepOut, callback):
    """EMA, metrics line, checkpoint, grids and evaluation when due, after an applied step."""
    cfg, d = run.cfg, run.d
    run.skipped_in_a_row = 0
    run.step += 1
    decay = _update_ema(run)
    run.window.sums += torch.stack([out.loss.double(), out.grad_norm.double()])
    run.window.steps += 1
    final = run.step == cfg.max_steps
    if _due(cfg.log_every, run.step) or final:
        _log(run, out.lr, decay)
    if _due(cfg.ckpt_every, run.step) or final:
        _checkpoint(run)
    try:  # grids and evaluations hold nothing to save: a stop abandons them (single process; DDP ranks wait)
        with run.signals.abandonable(d.world == 1):
            if d.main and (_due(cfg.sample_every, run.step) or final):
                _sample(run)
            if d.main and _due(cfg.eval_every, run.step) and not final:
                run.logger.log({"step": run.step, "eval": _scalars(_evaluate(run))})
    except _Interrupted:
        pass  # acted on at the next step boundary
    if callback is not None:
        callback(run.step, {"loss": float(out.loss), "model": run.model, "ema": run.ema})
    if d.world > 1 and (final or any(_due(e, run.step) for e in (cfg.ckpt_every, cfg.sample_every, cfg.eval_every))):
        _barrier(d)  # keep ranks together while rank 0 writes


def _loop(run: _Run, callback, reevaluate: bool) -> dict:
    """Steps until max_steps, then the final metrics; a signal is acted on between steps."""
    cfg = run.cfg
    if run.resumed and run.step >= cfg.max_steps:
        return _finished_run(run, reevaluate)
    run.model.train()
    while run.step < cfg.max_steps:
        _act_on_signal(run)
        out = _train_step(run)
        if not out.applied:
            _skip(run, out)
            continue
        _after_step(run, out, callback)
    run.progress.close()
    if run.signals.request == _STOP:
        raise _stopped_after_training(run)
    try:
        with run.signals.abandonable(run.d.world == 1):
            return _finish(run)
    except _Interrupted:
        raise _stopped_after_training(run) from None


def train(cfg=None, *, callback: Optional[Callable[[int, dict], None]] = None, **overrides) -> TrainResult:
    """Train an IMM model; returns TrainResult(run_dir, step, metrics, checkpoint).

    cfg: None (the digits preset), a preset name (imm_fast.PRESETS), a TrainConfig, a dict or a YAML/JSON path.
    overrides: dotted config keys, e.g. train("digits", max_steps=100, **{"model.depth": 2}).
    resume=<run or checkpoint folder> continues that run exactly (with its saved config when cfg is None); a run
    that already reached max_steps is left as it is (final_eval=true with the resume evaluates it again).
    callback(step, info): called on every rank after each applied optimizer step (tests use it).
    Under torchrun each process trains its slice of the global batch (DDP); only rank 0 writes files.
    SIGTERM / SIGINT stop the run at a step boundary with a verified checkpoint and raise Preempted (a SystemExit
    with status 143 / 130) after printing the resume command; SIGUSR1 writes a checkpoint and carries on
    (cfg.sigusr1="exit": stops like SIGTERM).
    Raises NonFiniteError after cfg.max_nonfinite_steps non-finite steps in a row, RunFolderBusyError when another
    process writes the run folder.
    """
    cfg = _resolve(cfg, overrides)
    device = _resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    threads_before = torch.get_num_threads()
    _cpu_threads(cfg, device)
    check_fits(cfg, device, int(os.environ.get("WORLD_SIZE", "1")))  # sizes against this machine, before step 0
    d = _init_distributed(device)
    signals = _Signals(cfg.sigusr1).install()
    try:
        with contextlib.ExitStack() as stack:  # the run lock, the logger, the progress bar
            try:
                with signals.abandonable():
                    run = _setup(cfg, device, d, stack, signals)
            except _Interrupted:
                raise _stopped_in_setup(signals, cfg) from None
            metrics = _loop(run, callback, bool(overrides.get("final_eval")))
            _barrier(d)
            if d.main and run.last_ck is None:
                run.last_ck = find_checkpoint(run.run_dir, explain=False)
            return TrainResult(run.run_dir if d.main else None, run.step, metrics, run.last_ck if d.main else None)
    finally:
        signals.restore()
        torch.set_num_threads(threads_before)  # the caller's setting again (a notebook, a test)
        if d.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()
