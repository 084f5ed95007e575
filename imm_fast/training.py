"""Training: `train(cfg)` runs the IMM objective with EMA, checkpoints, exact resume and data parallelism.

A run folder <out_dir>/<run_name>/ holds:
  config.json                      the resolved TrainConfig
  metrics.jsonl                    one JSON object per logged step (loss, grad norm, lr, it/s, samples/s) + evals
  samples/step-<7-digit step>-<N>step.png sample grids of the EMA model at each step count N
  checkpoints/step-<7-digit step>/ model.safetensors, ema.safetensors, train_state.pt, config.json
  checkpoints/latest               the name of the newest complete checkpoint
  final_metrics.json               the metrics at the end (digits: accuracy and Frechet distance per step count)

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
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .config import TrainConfig, config_to_dict, load_train_config, read_config_file

CKPT_PREFIX = "step-"


@dataclass
class TrainResult:
    run_dir: Optional[Path]        # the run folder (None on ranks > 0)
    step: int                      # optimizer steps done
    metrics: dict = field(default_factory=dict)  # final metrics (rank 0)
    checkpoint: Optional[Path] = None            # the last checkpoint folder

    def __str__(self):
        return f"run folder: {self.run_dir}\nstep: {self.step}\nmetrics: {json.dumps(self.metrics, indent=1)}"


# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self):
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    here = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        here = True
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), here)


def _resolve_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={spec!r} but CUDA is not available here; use device=cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def _broadcast_object(obj, d: _Dist):
    if d.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(d: _Dist):
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def find_checkpoint(path) -> Path:
    """A checkpoint folder from a checkpoint folder, a run folder or its checkpoints/ folder (via `latest`)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"resume={str(path)!r} does not exist")
    if (p / "train_state.pt").is_file():
        return p
    for ck in (p / "checkpoints", p):
        latest = ck / "latest"
        if latest.is_file():
            target = ck / latest.read_text().strip()
            if (target / "train_state.pt").is_file():
                return target
            raise ValueError(f"{str(latest)!r} points at {str(target)!r}, which is not a complete checkpoint")
    raise ValueError(f"resume={str(path)!r} is neither a checkpoint folder (with train_state.pt) nor a run folder "
                     "with checkpoints/latest")


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


def save_checkpoint(run_dir: Path, step: int, model, ema, opt, gens: dict, sampler, cfg: TrainConfig) -> Path:
    """Write checkpoints/step-<7-digit step>/ into a temporary sibling, then rename it into place; update `latest`.

    A finished checkpoint is never overwritten (if it exists already, it is kept and returned).
    """
    from .checkpoint import atomic_write, save_model

    ck_root = run_dir / "checkpoints"
    name = f"{CKPT_PREFIX}{step:07d}"
    final = ck_root / name
    if final.exists():
        return final
    tmp = ck_root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(tmp / "model.safetensors", model)
    save_model(tmp / "ema.safetensors", model, state_dict=ema.state_dict())
    state = {"step": step, "optimizer": opt.state_dict(), "rng": _rng_state(),
             "generators": {k: g.get_state() for k, g in gens.items()}, "sampler": sampler.state_dict(),
             "torch_version": str(torch.__version__)}
    atomic_write(tmp / "train_state.pt", lambda f: torch.save(state, f))
    atomic_write(tmp / "config.json", lambda f: Path(f).write_text(json.dumps(config_to_dict(cfg), indent=1)))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)  # atomic on POSIX: the folder appears complete or not at all
    atomic_write(ck_root / "latest", lambda f: Path(f).write_text(name + "\n"))
    return final


def load_checkpoint(ck: Path, model, ema, opt, gens: dict, sampler) -> int:
    """Restore everything save_checkpoint wrote; returns the step. Corrupt files raise a ValueError."""
    from safetensors.torch import load_file

    try:
        state = torch.load(ck / "train_state.pt", map_location="cpu", weights_only=True)
        model_sd = load_file(str(ck / "model.safetensors"))
        ema_sd = load_file(str(ck / "ema.safetensors"))
    except Exception as e:
        raise ValueError(f"checkpoint {str(ck)!r} is unreadable or corrupt ({type(e).__name__}: {e})") from e
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
    return int(state["step"])


# ----------------------------------------------------------------------------------------------------------------
# Logging and images
# ----------------------------------------------------------------------------------------------------------------
def save_png(path, images_uint8, nrow=None, upscale=1):
    """Write (N, C, R, R) uint8 images (C = 1 or 3) as one PNG grid (pure zlib, no PIL needed), atomically."""
    import struct
    import zlib

    from .checkpoint import atomic_write

    x = images_uint8.cpu()
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    pad = 1
    grid = torch.full((3, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        tile = x[i].expand(3, h, w) if c == 1 else x[i, :3]
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = tile
    if upscale > 1:
        grid = grid.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    arr = grid.permute(1, 2, 0).contiguous().numpy()
    H, W = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[i].tobytes() for i in range(H))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    return atomic_write(path, lambda f: Path(f).write_bytes(png))


class _Logger:
    """metrics.jsonl (+ TensorBoard when installed) on rank 0."""

    def __init__(self, run_dir: Optional[Path], resume_step: Optional[int]):
        self.path = None if run_dir is None else run_dir / "metrics.jsonl"
        self.tb = None
        if self.path is None:
            return
        if resume_step is not None and self.path.is_file():
            # Drop lines a killed run wrote after the checkpoint we resume from, so the log reads as one run.
            from .checkpoint import atomic_write

            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except json.JSONDecodeError:
                    pass
            atomic_write(self.path, lambda f: Path(f).write_text("".join(k + "\n" for k in keep)))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except Exception:  # tensorboard not installed
            self.tb = None

    def log(self, record: dict):
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record.get("step", 0))

    def close(self):
        if self.tb is not None:
            self.tb.close()


class _Progress:
    def __init__(self, enabled, total, initial):
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def update(self, step, info: dict):
        if not self.enabled:
            return
        text = " ".join(f"{k}={v}" for k, v in info.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(step - self.bar.n)
        else:
            print(f"step {step} {text}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------------------------
# Sampling during training
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def save_sample_grids(run_dir: Path, step: int, ema, ds, cfg: TrainConfig, device, vae=None):
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
        upscale = max(1, 64 // ds.shape[-1])
        paths.append(save_png(run_dir / "samples" / f"{CKPT_PREFIX}{step:07d}-{steps}step.png", pixels, nrow,
                              upscale))
    return paths


def evaluate(ema, ds, cfg: TrainConfig, device) -> dict:
    """Metrics of the EMA model: digits -> accuracy / FD table; images -> FID when available."""
    from . import metrics as M

    if cfg.data.source == "digits" and ema.label_dim == 10 and ds.shape == (1, 8, 8):
        table = M.digits_report(ema, cfg.eval_steps, cfg.sample.cfg_scale or 0.0, cfg.eval_samples, cfg.seed,
                                cfg.sample.sampler)
        return {"digits": {str(k): v for k, v in table.items()},
                "table": M.format_digits_table(table, cfg.sample.cfg_scale)}
    if cfg.data.source == "latents" and cfg.data.vae_path is None:
        return {"fid": None, "message": "FID skipped: latents need data.vae_path (a local AutoencoderKL) to decode"}
    ok, msg = M.fid_available()
    if not ok:
        return {"fid": None, "message": msg}
    from .sampling import sample

    g = torch.Generator().manual_seed(cfg.seed + 777)
    n = cfg.eval_samples
    out = {}
    ref_idx = torch.randperm(len(ds), generator=g)[: min(n, len(ds))].numpy()
    ref = ds.to_pixels(ds.get(ref_idx)[0])
    for steps in cfg.eval_steps:
        xs = []
        for i in range(0, n, 250):
            m = min(250, n - i)
            noise = torch.randn((m,) + ds.shape, generator=g) * ema.sigma_data
            labels = torch.randint(0, ema.label_dim, (m,), generator=g).to(device) if ema.label_dim else None
            xs.append(ds.to_pixels(sample(ema, noise.to(device), steps, cfg.sample.sampler, cfg.sample.grid, labels,
                                          cfg.sample.cfg_scale if ema.label_dim else None)))
        out[f"fid_{steps}step"], _ = M.fid(torch.cat(xs), ref)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------
def _resolve(cfg, overrides) -> TrainConfig:
    overrides = dict(overrides)
    if cfg is None and overrides.get("resume"):
        # Continue the saved run with its own config (overrides such as max_steps still apply).
        ck = find_checkpoint(overrides["resume"])
        saved = read_config_file(ck / "config.json")
        saved.pop("resume", None)
        return load_train_config(saved, overrides, source=ck / "config.json")
    return load_train_config(cfg, overrides)


def _make_run_dir(cfg: TrainConfig, d: _Dist, resume_ck: Optional[Path]) -> Optional[Path]:
    if resume_ck is not None:
        run_dir = resume_ck.parent.parent
        later = sorted(p.name for p in resume_ck.parent.glob(f"{CKPT_PREFIX}*") if p.name > resume_ck.name)
        if later:  # continuing would collide with (and must not overwrite) the later checkpoints
            raise ValueError(f"resume={str(resume_ck)!r} is older than checkpoints {later} of the same run: resume "
                             "from the run folder (its latest checkpoint), or copy the checkpoint into a new run "
                             "folder's checkpoints/ to branch from it")
    else:
        name = cfg.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        run_dir = Path(cfg.out_dir) / name
        if d.main and run_dir.exists() and (run_dir / "checkpoints").exists():
            raise ValueError(f"run folder {str(run_dir)!r} already holds checkpoints: pass resume={str(run_dir)!r} "
                             "to continue it, or choose another run_name")
    return run_dir


def _lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def _due(every: int, step: int) -> bool:
    return every > 0 and step % every == 0


def train(cfg=None, *, callback: Optional[Callable[[int, dict], None]] = None, **overrides) -> TrainResult:
    """Train an IMM model; returns TrainResult(run_dir, step, metrics, checkpoint).

    cfg: None (the digits preset), a preset name (imm_fast.PRESETS), a TrainConfig, a dict or a YAML/JSON path.
    overrides: dotted config keys, e.g. train("digits", max_steps=100, **{"model.depth": 2}).
    resume=<run or checkpoint folder> continues that run exactly (with its saved config when cfg is None).
    callback(step, info): called on every rank after each optimizer step (tests use it).
    Under torchrun each process trains its slice of the global batch (DDP); only rank 0 writes files.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .data import EpochSampler, build_dataset, check_compatible
    from .loss import draw_times, imm_loss
    from .models import build_model

    cfg = _resolve(cfg, overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    d = _init_distributed(device)
    try:
        A, M, B = cfg.grad_accum, cfg.loss.group_size, cfg.batch_size
        if B % (d.world * A * M):
            raise ValueError(f"batch_size={B} must be divisible by world size x grad_accum x loss.group_size = "
                             f"{d.world} x {A} x {M} so that every rank gets whole groups")
        b = B // (d.world * A)  # per-rank micro-batch

        # Model config: bf16/fp16 autocast of the student pass on CUDA (the target pass stays fp32).
        mcfg, lcfg = cfg.model, cfg.loss
        if device.type == "cuda" and cfg.amp and mcfg.mixed_precision is None:
            mcfg = dataclasses.replace(mcfg, mixed_precision=cfg.amp)
        if cfg.reference:  # the switch to the plain PyTorch path
            mcfg = dataclasses.replace(mcfg, fused=False)
            lcfg = dataclasses.replace(lcfg, backend="torch")
        if device.type == "cuda" and cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        ds = build_dataset(cfg.data)
        check_compatible(ds, mcfg)
        resume_ck = find_checkpoint(cfg.resume) if cfg.resume else None

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
        # Generators shared (same state) by all ranks: the loss draws and the data order / flips.
        gens = {"loss": torch.Generator().manual_seed(cfg.seed + 1),
                "data": torch.Generator().manual_seed(cfg.seed + 2)}
        sampler = EpochSampler(len(ds), cfg.seed)
        step = 0
        if resume_ck is not None:
            step = load_checkpoint(resume_ck, model, ema, opt, gens, sampler)
        made = None
        if d.main:
            try:
                made = _make_run_dir(cfg, d, resume_ck)
            except ValueError as e:  # tell the other ranks too, so that none waits forever
                made = e
        made = _broadcast_object(made, d)
        if isinstance(made, Exception):
            raise made
        run_dir = made
        writer_dir = run_dir if d.main else None
        if d.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not (run_dir / "config.json").exists():
                from .checkpoint import atomic_write

                atomic_write(run_dir / "config.json",
                             lambda f: Path(f).write_text(json.dumps(config_to_dict(cfg), indent=1)))
        logger = _Logger(writer_dir, step if resume_ck is not None else None)
        vae = None
        if d.main and cfg.data.source == "latents" and cfg.data.vae_path:
            from .vae import load_vae

            vae = load_vae(cfg.data.vae_path, device)

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if d.world > 1 else model
        if d.main:
            print(f"imm_fast: training {cfg.name} on {device} (world {d.world}), run folder {run_dir}, "
                  f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(ds)} samples"
                  + (f", resumed at step {step}" if resume_ck else ""), file=sys.stderr, flush=True)

        progress = _Progress(cfg.progress and d.main, cfg.max_steps, step)

        last_ck = resume_ck
        acc = torch.zeros(2, dtype=torch.float64, device=device)  # running (loss, grad norm) sums; no per-step sync
        n_acc = 0
        t_last, step_last = time.perf_counter(), step
        model.train()
        while step < cfg.max_steps:
            lr = _lr_at(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            # Global randomness of this step, identical on every rank.
            idx = sampler.next(B)                                                         # (B,)
            flips = torch.rand(B, generator=gens["data"]) < 0.5 if cfg.data.hflip else None
            s_all, r_all, t_all = draw_times(B // M, model, cfg.loss, gens["loss"], "cpu")  # (B/M,) each
            noise_all = torch.randn((B,) + ds.shape, generator=gens["loss"]) * model.sigma_data
            drop_all = (torch.rand(B, generator=gens["loss"]) < cfg.loss.label_dropout) \
                if (ds.labels is not None and cfg.loss.label_dropout > 0) else None

            if d.world > 1:
                # Dropout (the global RNG) differs per rank; seeding it from (seed, rank, step) keeps resume exact
                # without saving every rank's RNG state (only rank 0 writes checkpoints).
                torch.manual_seed((cfg.seed * 1_000_003 + step) * 4096 + d.rank)
            opt.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for a in range(A):
                lo = a * (B // A) + d.rank * b  # this rank's rows of micro-batch a
                rows = slice(lo, lo + b)
                groups = slice(lo // M, (lo + b) // M)
                x, y = ds.get(idx[rows], None if flips is None else flips[rows])
                x = x.to(device, non_blocking=True)
                y = None if y is None else y.to(device)
                sync = contextlib.nullcontext() if (d.world == 1 or a == A - 1) else net.no_sync()
                with sync:
                    out = imm_loss(net, x, y, lcfg, target_model=model, t=t_all[groups], s=s_all[groups],
                                   r=r_all[groups], noise=noise_all[rows].to(device),
                                   drop_mask=None if drop_all is None else drop_all[rows].to(device))
                    (out.loss / A).backward()
                loss_sum += out.loss.detach().float() / A
            clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            step += 1
            decay = min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm.detach(), 1.0 - decay)
                for be, bm in zip(ema.buffers(), model.buffers()):
                    be.copy_(bm)

            acc += torch.stack([loss_sum.double(), grad_norm.detach().double()])
            n_acc += 1
            if _due(cfg.log_every, step) or step == cfg.max_steps:
                vals = acc / n_acc
                if d.world > 1:
                    import torch.distributed as dist

                    dist.all_reduce(vals)
                    vals /= d.world
                vals = vals.cpu()
                if not math.isfinite(float(vals[0])):
                    raise FloatingPointError(f"the loss became {float(vals[0])} by step {step}; lower lr or set "
                                             "grad_clip")
                now = time.perf_counter()
                its = (step - step_last) / max(now - t_last, 1e-9)
                rec = {"step": step, "loss": float(vals[0]), "grad_norm": float(vals[1]), "lr": lr,
                       "it_s": round(its, 3), "samples_s": round(its * B, 1), "ema_decay": decay,
                       "epoch": sampler.epoch}
                logger.log(rec)
                progress.update(step, {"loss": f"{rec['loss']:.4g}", "it/s": f"{its:.2f}",
                                       "samples/s": f"{its * B:.0f}"})
                acc.zero_()
                n_acc = 0
                t_last, step_last = now, step
            final = step == cfg.max_steps
            if d.main and (_due(cfg.ckpt_every, step) or final):
                last_ck = save_checkpoint(run_dir, step, model, ema, opt, gens, sampler, cfg)
            if d.main and (_due(cfg.sample_every, step) or final):
                save_sample_grids(run_dir, step, ema, ds, cfg, device, vae)
            if d.main and _due(cfg.eval_every, step) and not final:
                logger.log({"step": step, "eval": _scalars(evaluate(ema, ds, cfg, device))})
            if callback is not None:
                callback(step, {"loss": float(loss_sum), "model": model, "ema": ema})
            if d.world > 1 and (_due(cfg.ckpt_every, step) or _due(cfg.sample_every, step) or final):
                _barrier(d)  # keep ranks together while rank 0 writes
        progress.close()

        metrics = {}
        if d.main and cfg.final_eval:
            metrics = evaluate(ema, ds, cfg, device)
            logger.log({"step": step, "eval": _scalars(metrics)})
            from .checkpoint import atomic_write

            atomic_write(run_dir / "final_metrics.json",
                         lambda f: Path(f).write_text(json.dumps(_scalars(metrics), indent=1)))
            if metrics.get("message"):
                print(metrics["message"], file=sys.stderr, flush=True)
        logger.close()
        _barrier(d)
        if d.main and last_ck is None:
            last_ck = find_checkpoint(run_dir)
        return TrainResult(run_dir if d.main else None, step, metrics, last_ck if d.main else None)
    finally:
        if d.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _scalars(obj):
    """JSON-able copy without the pre-formatted table string."""
    if isinstance(obj, dict):
        return {k: _scalars(v) for k, v in obj.items() if k != "table"}
    return obj
