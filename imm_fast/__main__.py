"""Command line: `python -m imm_fast {train,config,sample,encode,eval}` (also installed as the `imm_fast` script).

  python -m imm_fast train                                 # the digits preset on the CPU (a few minutes)
  python -m imm_fast train --preset cifar10 data.path=/data/cifar-10-batches-py
  python -m imm_fast train --config run.yaml max_steps=2000 model.depth=6
  python -m imm_fast train resume=runs/digits-20260101-000000
  python -m imm_fast config --preset cifar10 > cifar.yaml       # every key with its meaning; edit, then --config
  torchrun --nproc_per_node 8 -m imm_fast train --preset imagenet256 data.path=/data/latents
  python -m imm_fast encode IMAGE_FOLDER OUT_FOLDER --vae /models/sd-vae-ft-ema
  python -m imm_fast sample runs/digits-... --steps 2 --cfg-scale 2 --out grid.png
  python -m imm_fast eval runs/cifar10-... --ref cifar10-32x32.npz --num 50000 --steps 1,2
  torchrun --nproc_per_node 8 -m imm_fast eval imagenet256_ts_a2.pkl --ref VIRTUAL_imagenet256_labeled.npz \
      --steps 1,2,4,8 --cfg-scale 1.5 --vae /models/sd-vae-ft-ema --save-npz
  python -m imm_fast eval --ref /data/imagenet/train --ref-resolution 256 --ref-out imagenet256-stats.npz

Errors in your input (a config typo, a missing or malformed file, an unsafe checkpoint) are printed as one line
on stderr with exit status 2; set IMM_FAST_TRACEBACK=1 to see their traceback. Other errors are bugs and keep it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys


def parse_overrides(items):
    """["a.b=1", "c=[1, 2]"] -> {"a.b": 1, "c": [1, 2]} (values parsed as YAML scalars/lists)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value, e.g. max_steps=200 or model.depth=4")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _cmd_train(args):
    from .training import train

    if args.preset and args.config:
        raise ValueError("give --preset or --config, not both (a config file may name its base with `preset:`)")
    overrides = parse_overrides(args.overrides)
    cfg = args.config or args.preset
    result = train(cfg, **overrides)
    if result.run_dir is not None:  # rank 0
        print(f"run folder: {result.run_dir}")
        print(f"checkpoint: {result.checkpoint}")
        if "table" in result.metrics:
            print(result.metrics["table"])
        elif result.metrics:
            print("metrics: " + json.dumps(result.metrics))
    return 0


def _cmd_config(args):
    from ._config_doc import to_yaml
    from .config import load_train_config

    if args.preset and args.config:
        raise ValueError("give --preset or --config, not both")
    cfg = load_train_config(args.config or args.preset, parse_overrides(args.overrides))
    source = f"--config {args.config}" if args.config else f"preset {args.preset or 'digits'}"
    print(f"# imm_fast training config ({source}); edit and run: python -m imm_fast train --config FILE")
    print(to_yaml(cfg))
    return 0


def _cmd_encode(args):
    from .vae import encode_folder

    out = encode_folder(args.src, args.out, args.vae, args.resolution, args.batch_size, args.device, args.seed)
    print(f"latents written to {out}")
    return 0


def _cmd_sample(args):
    from pathlib import Path

    import torch

    from .checkpoints import load_official
    from .sampling import sample
    from ._files import save_png

    from .config import GRIDS

    if args.num < 1:
        raise ValueError(f"--num {args.num}: the number of images must be >= 1")
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: the number of sampling steps must be >= 1")
    if args.cfg_scale is not None and not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 0):
        raise ValueError(f"--cfg-scale {args.cfg_scale}: the guidance weight must be a finite number >= 0")
    grid = args.grid
    if grid not in GRIDS:  # middle eta values, e.g. "1.4" (the paper's CIFAR-10 2-step grid)
        try:
            grid = tuple(float(v) for v in grid.split(","))
        except ValueError:
            raise ValueError(f"--grid {args.grid!r} is not one of {GRIDS} nor comma-separated middle eta values "
                             "such as 1.4") from None
    if not str(args.checkpoint).startswith("hf://") and not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist (give a run folder, a checkpoint "
                                "folder, a .safetensors / .pkl file or hf://<repo>/<file>)")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{str(out)!r} exists; pass --overwrite or choose another --out")
    model = load_official(args.checkpoint, device=args.device, trust_unverified=args.trust_unverified)
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.num, model.img_channels, model.img_resolution, model.img_resolution)
    noise = torch.randn(shape, generator=g) * model.sigma_data
    labels = None
    if model.label_dim:
        labels = torch.tensor(args.labels) if args.labels else torch.arange(args.num) % model.label_dim
        if len(labels) != args.num:
            labels = labels.repeat(args.num // len(labels) + 1)[: args.num]
    x = sample(model, noise.to(args.device), args.steps, args.sampler, grid, labels,
               args.cfg_scale if model.label_dim else None).float()
    from .evaluation import decode, pixel_kind_of

    vae = None
    if args.vae:
        from .vae import load_vae

        vae = load_vae(args.vae, args.device)
    pixels = decode(model, x, vae, pixel_kind_of(args.checkpoint))  # the decoder of the run's data kind
    nrow = model.label_dim if model.label_dim and args.num % model.label_dim == 0 else None
    save_png(out, pixels, nrow, max(1, 64 // pixels.shape[-1]))
    print(f"samples written to {out}")
    return 0


def _cmd_eval(args):
    from .evaluation import evaluate, reference_statistics

    if args.checkpoint is None:
        if not (args.ref and args.ref_out):
            raise ValueError("give a checkpoint to evaluate, or --ref DATASET --ref-out STATS.npz to only compute "
                             "reference statistics")
        info = reference_statistics(args.ref, args.ref_out, args.inception, args.device, args.ref_resolution,
                                    args.batch, metrics=args.metrics.split(","), dinov2=args.dinov2).info
        print(f"reference statistics of {info['num_images']} images written to {args.ref_out}")
        return 0
    try:  # --ref may be left out for a digits run: evaluate() says what to pass otherwise
        steps = None if args.steps is None else tuple(int(v) for v in args.steps.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--steps must be comma-separated ints such as 1,2,4,8, got {args.steps!r}") from None
    grid = args.grid
    if grid not in ("uniform", "edm"):
        try:
            grid = [float(v) for v in grid.split(",")]
        except ValueError:
            raise ValueError(f"--grid must be uniform, edm or comma-separated middle eta values (e.g. 1.4), "
                             f"got {args.grid!r}") from None
    evaluate(args.checkpoint, args.ref, num=args.num, steps=steps, cfg_scale=args.cfg_scale, sampler=args.sampler,
             grid=grid, batch=args.batch, seed=args.seed, inception=args.inception, vae=args.vae, device=args.device,
             save_npz=args.save_npz, shard_size=args.shard_size, out_dir=args.out_dir,
             ref_resolution=args.ref_resolution, keep_cache=args.keep_cache, progress=not args.no_progress,
             trust_unverified=args.trust_unverified, metrics=args.metrics.split(","), dinov2=args.dinov2)
    return 0


_TRUST_HELP = ("use a training checkpoint that has no manifest.json (its files cannot be verified; "
               "default: refuse it)")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and appends "(default: X)" to every option whose help does not state its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


_GUIDANCE = ("classifier-free guidance weight w, G = G_u + w (G_c - G_u) (class-conditional models). Default: no "
             "guidance (the plain conditional model: what w=1 gives, at half the cost); w=0 samples "
             "unconditionally. The training grids and the digits table use the config's sample.cfg_scale "
             "(digits: w=2)")


def _train_parser(sub):
    t = sub.add_parser("train", help="train a model (default: the digits preset on the CPU)", formatter_class=_Help,
                       description="Train IMM. SIGTERM or Ctrl-C saves a verified checkpoint of the last step and "
                                   "prints the resume command (exit 143 / 130); SIGUSR1 saves one and carries on.",
                       epilog="Every config key, its default and meaning: python -m imm_fast config [--preset NAME]")
    t.add_argument("--preset", help="a preset name: digits (default), cifar10 (DDPM++), cifar10-dit, "
                                    "imagenet256, imagenet256-S/B/L")
    t.add_argument("--config", help="a YAML or JSON config file (may name a base with `preset:`); default: the "
                                    "preset")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. max_steps=200 model.depth=4; "
                                                "resume=RUN_FOLDER continues a run (default: none)")
    t.set_defaults(fn=_cmd_train)
    c = sub.add_parser("config", help="print the resolved training config as commented YAML (every key)",
                       formatter_class=_Help)
    c.add_argument("--preset", help="a preset name (default: digits)")
    c.add_argument("--config", help="a YAML or JSON config file to resolve (default: the preset)")
    c.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. max_steps=200 model.depth=4 "
                                                "(default: none)")
    c.set_defaults(fn=_cmd_config)


def _encode_parser(sub):
    e = sub.add_parser("encode", help="encode an image folder into normalized SD-VAE latents", formatter_class=_Help)
    e.add_argument("src", help="image folder (class = subfolder)")
    e.add_argument("out", help="output folder (latents.npy, labels.npy, meta.json); must not exist")
    e.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (nothing is downloaded; "
                                                "required, no default)")
    e.add_argument("--resolution", type=int, default=256, help="resize + center-crop side in pixels")
    e.add_argument("--batch-size", type=int, default=32, help="images per VAE call")
    e.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    e.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    e.set_defaults(fn=_cmd_encode)


def _sample_parser(sub):
    s = sub.add_parser("sample", help="sample a grid PNG from a checkpoint (run folder, checkpoint folder or file)",
                       formatter_class=_Help,
                       description="Sample a grid of images into one PNG (by default samples.png in the current "
                                   "folder; an existing file is never overwritten without --overwrite).")
    s.add_argument("checkpoint", help="run folder (its newest verified checkpoint), checkpoint folder, "
                                      ".safetensors, an authors' .pkl or hf://<repo>/<file>")
    s.add_argument("--steps", type=int, default=2, help="sampling steps (network evaluations, x2 with guidance)")
    s.add_argument("--num", type=int, default=100, help="number of images")
    s.add_argument("--cfg-scale", type=float, default=None, help=_GUIDANCE)
    s.add_argument("--labels", type=int, nargs="*", help="class ids (cycled); default: 0..label_dim-1 cycled")
    s.add_argument("--sampler", default="pushforward", choices=("pushforward", "restart"),
                   help="pushforward (deterministic) or restart (re-noises between steps)")
    s.add_argument("--grid", default="uniform",
                   help="uniform, edm, or comma-separated middle eta values (then --steps is ignored), e.g. 1.4")
    s.add_argument("--seed", type=int, default=0, help="seed of the noise")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    s.add_argument("--vae", help="decode latents with this local AutoencoderKL folder (default: none; pixel "
                                 "models need none)")
    s.add_argument("--out", default="samples.png", help="the PNG to write, relative to the current folder")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out file (default: refuse)")
    s.add_argument("--trust-unverified", action="store_true", help=_TRUST_HELP)
    s.set_defaults(fn=_cmd_sample)


def _eval_parser(sub):
    v = sub.add_parser("eval", help="FID and IS of a checkpoint against reference statistics (torchrun-shardable)",
                       formatter_class=_Help)
    v.add_argument("checkpoint", nargs="?", help="run folder, checkpoint folder, .safetensors or an authors' .pkl")
    v.add_argument("--ref", help="statistics .npz (imm_fast, EDM cifar10-32x32.npz, ADM VIRTUAL_imagenet256_labeled."
                                 "npz) or a dataset: CIFAR-10 python folder, image folder, .npz/.npy of images "
                                 "(no default)")
    v.add_argument("--ref-resolution", type=int, help="center-crop folder images to this side the ADM way "
                                                      "(ImageNet: 256; default: keep the size)")
    v.add_argument("--ref-out", help="without a checkpoint: write the statistics of --ref to this .npz (no default)")
    v.add_argument("--num", type=int, help="samples per step count (default: 50000; digits: the run's eval_samples)")
    v.add_argument("--steps", help="comma-separated step counts (default: 1,2,4,8; digits: the run's eval_steps)")
    v.add_argument("--metrics", default="fid,is", help="comma-separated, of imm_fast.metrics.METRICS: fid, is, pr "
                                                       "(precision/recall), fd_dinov2")
    v.add_argument("--dinov2", help="DINOv2 ViT-L/14 weights file for fd_dinov2, or 'download' (default: "
                                    "$IMM_FAST_DINOV2, then the torch hub cache)")
    v.add_argument("--cfg-scale", type=float, default=None, help=_GUIDANCE.split(". The training")[0])
    v.add_argument("--sampler", choices=("pushforward", "restart"),
                   help="pushforward (deterministic) or restart (re-noises between steps) (default: pushforward; "
                        "digits: the run's)")
    v.add_argument("--grid", default="uniform", help="uniform, edm or comma-separated middle eta values")
    v.add_argument("--batch", type=int, default=64, help="images per network call, per rank")
    v.add_argument("--seed", type=int, help="sample i uses seed + i (default 0; digits: the run's seed)")
    v.add_argument("--inception", help="FID Inception weights file, or 'download' "
                                       "(default: $IMM_FAST_INCEPTION, then the torch hub cache)")
    v.add_argument("--vae", help="decode latent samples with this local AutoencoderKL folder (default: none)")
    v.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    v.add_argument("--save-npz", action="store_true", help="also write ADM's sample batch (uint8 NHWC arr_0, "
                                                           "labels arr_1) per step count (default: off)")
    v.add_argument("--shard-size", type=int, default=1000, help="images per resumable shard")
    v.add_argument("--out-dir", help="where eval-<time>.json goes (default: beside the checkpoint)")
    v.add_argument("--keep-cache", action="store_true", help="keep the finished shards (eval-cache/; default: "
                                                             "removed at the end)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    v.add_argument("--trust-unverified", action="store_true", help=_TRUST_HELP)
    v.set_defaults(fn=_cmd_eval)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m imm_fast", description="Inductive Moment Matching with imm_fast",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command")
    _train_parser(sub)
    _encode_parser(sub)
    _sample_parser(sub)
    _eval_parser(sub)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return _run(args)


def cli(argv=None):
    """The command line's entry (`python -m imm_fast`, the `imm_fast` script): main, then a torchrun worker leaves
    at once (_leave); main itself returns, for callers in a Python process."""
    code = main(argv)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        _leave(code)
    return code


def _leave(code):
    """A torchrun worker whose command has ended (process group destroyed, files closed) leaves at once: at
    interpreter exit a gloo worker's C++ teardown sometimes aborts ("terminate called without an active
    exception": 2 of 109 two-rank runs on a loaded 2-core machine), turning its status (0, or 2 after the printed
    error) into SIGABRT."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(0 if code is None else code if isinstance(code, int) else 1)


def _run(args):
    from .training import Preempted

    try:
        return args.fn(args)
    except Preempted as e:  # the message and the resume command are printed already
        return e.code
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if os.environ.get("IMM_FAST_TRACEBACK", "0") not in ("", "0"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


def _user_errors():
    from .errors import UserError

    # ValueError/TypeError are what imm_fast raises for bad arguments, OSError for files it cannot read or write,
    # UnpicklingError for unsafe or corrupt pickles, ImportError for a missing optional package.
    return (UserError, ValueError, TypeError, OSError, ImportError, pickle.UnpicklingError)


USER_ERRORS = _user_errors()


def one_line(e: BaseException) -> str:
    """The message of `e` on one line (its type name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(cli())
