"""SD-VAE latents (IMM paper, Sec. 7: ImageNet-256 is trained in Stable Diffusion's VAE latent space): encode
an image folder to normalized latents, decode samples back to pixels.

The autoencoder is a diffusers AutoencoderKL loaded from a LOCAL folder (never downloaded at run time); diffusers
is imported only here, on first use. Latents are the posterior SAMPLE, without the 0.18215 factor, then per channel
z_norm = (z - mean) * 0.5 / std with the ImageNet statistics below; decoding inverts that.

Shapes: N images, (3, R, R) pixels in [-1, 1] for the VAE, (4, R/8, R/8) latents.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

LATENT_MEAN = (0.86488, -0.27787343, 0.21616915, 0.3738409)
LATENT_STD = (4.85503674, 5.31922414, 3.93725398, 3.9870003)


def _stats(device, dtype=torch.float32):
    mean = torch.tensor(LATENT_MEAN, device=device, dtype=dtype).reshape(1, -1, 1, 1)
    std = torch.tensor(LATENT_STD, device=device, dtype=dtype).reshape(1, -1, 1, 1)
    return mean, std


def load_vae(path, device="cpu"):
    """A diffusers AutoencoderKL from a local folder (config.json + weights), in eval mode."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError("encoding and decoding latents needs diffusers: pip install diffusers") from None
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"vae path {str(path)!r} is not a local folder holding an AutoencoderKL "
                                "(e.g. a download of stabilityai/sd-vae-ft-ema); nothing is downloaded at run time")
    vae = AutoencoderKL.from_pretrained(str(p), local_files_only=True)
    return vae.to(device).eval().requires_grad_(False)


def _check_channels(vae):
    c = vae.config.latent_channels
    if c != len(LATENT_MEAN):
        raise ValueError(f"the VAE has {c} latent channels; the SD-VAE normalization needs {len(LATENT_MEAN)}")


@torch.no_grad()
def encode_images(vae, images, generator=None):
    """Pixels (N, 3, R, R) in [-1, 1] -> normalized latents (N, 4, R/8, R/8) float32 (posterior sample)."""
    _check_channels(vae)
    dev = next(vae.parameters()).device
    dist = vae.encode(images.to(dev, torch.float32)).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator, dtype=dist.mean.dtype).to(dev)
    mean, std = _stats(dev)
    return ((z - mean) * 0.5 / std).float()


@torch.no_grad()
def decode_latents(vae, latents):
    """Normalized latents (N, 4, r, r) -> uint8 pixels (N, 3, 8r, 8r)."""
    _check_channels(vae)
    dev = next(vae.parameters()).device
    mean, std = _stats(dev)
    z = latents.to(dev, torch.float32) / 0.5 * std + mean
    x = vae.decode(z).sample  # (N, 3, R, R) in about [-1, 1]
    return ((x.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _save_npy(path, arr):
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a temporary name
        np.save(f, arr)


def encode_folder(src, out, vae_path=None, resolution=256, batch_size=32, device="cpu", seed=0, vae=None):
    """Encode an image folder (class = subfolder) into <out>/latents.npy (float32), labels.npy, meta.json.

    Refuses to overwrite an existing latents.npy. Returns the output folder.
    """
    from ._files import atomic_write
    from .data import _load_image, list_image_folder

    out = Path(out)
    if (out / "latents.npy").exists():
        raise FileExistsError(f"{str(out / 'latents.npy')!r} exists already; choose another output folder")
    if vae is None:
        if vae_path is None:
            raise ValueError("give vae_path (a local AutoencoderKL folder) or vae")
        vae = load_vae(vae_path, device)
    if resolution % 8:
        raise ValueError(f"resolution={resolution} must be a multiple of 8 (the VAE downsamples by 8)")
    items, names = list_image_folder(src)
    g = torch.Generator().manual_seed(seed)
    chunks = []
    for i in range(0, len(items), batch_size):
        batch = np.stack([_load_image(f, resolution) for f, _ in items[i:i + batch_size]])
        pixels = torch.from_numpy(batch).float() / 127.5 - 1.0
        chunks.append(encode_images(vae, pixels, g).cpu().numpy())
    latents = np.concatenate(chunks).astype(np.float32)
    labels = np.array([c for _, c in items], dtype=np.int64)
    out.mkdir(parents=True, exist_ok=True)
    if names:
        atomic_write(out / "labels.npy", lambda f: _save_npy(f, labels))
    meta = {"source": str(src), "resolution": resolution, "num_images": len(items), "classes": names,
            "latent_shape": list(latents.shape[1:]), "normalization": {"mean": LATENT_MEAN, "std": LATENT_STD,
                                                                       "scale": 0.5}}
    atomic_write(out / "meta.json", lambda f: Path(f).write_text(json.dumps(meta, indent=1)))
    atomic_write(out / "latents.npy", lambda f: _save_npy(f, latents))  # last: marks completion
    return out
