"""Command line: `python -m imm_fast {train,encode,sample}` (also installed as the `imm_fast` script).

  python -m imm_fast train                                 # the digits preset on the CPU (a few minutes)
  python -m imm_fast train --preset cifar10 data.path=/data/cifar-10-batches-py
  python -m imm_fast train --config run.yaml max_steps=2000 model.depth=6
  python -m imm_fast train resume=runs/digits-20260101-000000
  torchrun --nproc_per_node 8 -m imm_fast train --preset imagenet256 data.path=/data/latents
  python -m imm_fast encode IMAGE_FOLDER OUT_FOLDER --vae /models/sd-vae-ft-ema
  python -m imm_fast sample runs/digits-... --steps 2 --cfg-scale 2 --out grid.png
"""
from __future__ import annotations

import argparse
import json
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
        else:
            print("metrics: " + json.dumps(result.metrics))
    return 0


def _cmd_encode(args):
    from .vae import encode_folder

    out = encode_folder(args.src, args.out, args.vae, args.resolution, args.batch_size, args.device, args.seed)
    print(f"latents written to {out}")
    return 0


def _cmd_sample(args):
    from pathlib import Path

    import torch

    from .checkpoint import load_official
    from .sampling import sample
    from .training import save_png

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{str(out)!r} exists; pass --overwrite or choose another --out")
    model = load_official(args.checkpoint, device=args.device)
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.num, model.img_channels, model.img_resolution, model.img_resolution)
    noise = torch.randn(shape, generator=g) * model.sigma_data
    labels = None
    if model.label_dim:
        labels = torch.tensor(args.labels) if args.labels else torch.arange(args.num) % model.label_dim
        if len(labels) != args.num:
            labels = labels.repeat(args.num // len(labels) + 1)[: args.num]
    grid = args.grid
    if grid not in ("uniform", "edm"):  # middle eta values, e.g. "1.4" (the paper's CIFAR-10 2-step grid)
        try:
            grid = tuple(float(v) for v in grid.split(","))
        except ValueError:
            raise ValueError(f"--grid={args.grid!r} is not 'uniform', 'edm' or comma-separated middle eta values "
                             "such as 1.4") from None
    x = sample(model, noise.to(args.device), args.steps, args.sampler, grid, labels,
               args.cfg_scale if model.label_dim else None).float()
    if args.vae:
        from .vae import decode_latents, load_vae

        pixels = decode_latents(load_vae(args.vae, args.device), x)
    elif model.img_channels == 1 and model.img_resolution == 8:  # the digits scaling
        pixels = ((x * 12 + 8) / 16).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    else:
        if model.img_channels not in (1, 3):
            raise ValueError(f"a {model.img_channels}-channel model samples latents: pass --vae to decode them")
        pixels = ((x + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    nrow = model.label_dim if model.label_dim and args.num % model.label_dim == 0 else None
    save_png(out, pixels, nrow, max(1, 64 // pixels.shape[-1]))
    print(f"samples written to {out}")
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="python -m imm_fast", description="Inductive Moment Matching with imm_fast",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("train", help="train a model (default: the digits preset on the CPU)")
    t.add_argument("--preset", help="a preset name: digits (default), cifar10 (DDPM++), cifar10-dit, "
                                         "imagenet256, imagenet256-S/B/L")
    t.add_argument("--config", help="a YAML or JSON config file (may name a base with `preset:`)")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. max_steps=200 model.depth=4")
    t.set_defaults(fn=_cmd_train)
    e = sub.add_parser("encode", help="encode an image folder into normalized SD-VAE latents")
    e.add_argument("src", help="image folder (class = subfolder)")
    e.add_argument("out", help="output folder (latents.npy, labels.npy, meta.json)")
    e.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (nothing is downloaded)")
    e.add_argument("--resolution", type=int, default=256)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--device", default="cpu")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(fn=_cmd_encode)
    s = sub.add_parser("sample", help="sample a grid PNG from a checkpoint (run folder, checkpoint folder or file)")
    s.add_argument("checkpoint")
    s.add_argument("--steps", type=int, default=2)
    s.add_argument("--num", type=int, default=100)
    s.add_argument("--cfg-scale", type=float, default=None)
    s.add_argument("--labels", type=int, nargs="*", help="class ids (cycled); default 0..label_dim-1 cycled")
    s.add_argument("--sampler", default="pushforward", choices=("pushforward", "restart"))
    s.add_argument("--grid", default="uniform",
                   help="uniform, edm, or comma-separated middle eta values (then --steps is ignored), e.g. 1.4")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.add_argument("--vae", help="decode latents with this local AutoencoderKL folder")
    s.add_argument("--out", default="samples.png")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_cmd_sample)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.fn(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
