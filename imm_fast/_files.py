"""File helpers shared by the run folder, the checkpoints, the metrics cache and the latents encoder.

atomic_write: a file appears complete or not at all, with the mode a plain open() would give it (0666 & ~umask,
not mkstemp's 0600, so a lab's shared run folder stays readable by the group). save_png: a PNG grid without PIL.
"""
from __future__ import annotations

import math
import os
import struct
import tempfile
import zlib
from pathlib import Path


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it to read it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_sha256(path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (checkpoint manifests, evaluation records)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path):
    """Make a rename or a new entry in folder `path` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write_fn):
    """write_fn(tmp_path) into a temporary file beside `path`, fsync it, then os.replace it into place.

    A crash at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        # mkstemp creates 0600, and some writers (safetensors) recreate the file 0600: give it open()'s mode.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path, text: str):
    return atomic_write(path, lambda f: Path(f).write_text(text))


def save_png(path, images_uint8, nrow=None, upscale=1):
    """Write (N, C, R, R) uint8 images (C = 1 or 3) as one PNG grid (pure zlib, no PIL needed), atomically."""
    return write_png(path, image_grid(images_uint8, nrow, upscale))


def image_grid(images_uint8, nrow=None, upscale=1):
    """(N, C, R, R) uint8 images (C = 1 or 3) -> one (H, W, 3) uint8 numpy grid, `nrow` images a row."""
    import torch

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
    return grid.permute(1, 2, 0).contiguous().numpy()


def write_png(path, arr):
    """Write an (H, W, 3) uint8 array as an RGB PNG, atomically."""
    H, W = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[i].tobytes() for i in range(H))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    return atomic_write(path, lambda f: Path(f).write_bytes(png))
