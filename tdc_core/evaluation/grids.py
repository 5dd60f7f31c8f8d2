"""Image grids for people to look at."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tdc_core.atomic import atomic_write_bytes

__all__ = ["image_grid", "save_grid"]


def image_grid(images: torch.Tensor, *, nrow: int | None = None, scale: int = 1, pad: int | None = None) -> np.ndarray:
    """Tile uint8 ``[N x C x H x W]`` images into one ``[H' x W' x C]`` (or ``[H' x W']``) array.

    ``scale`` enlarges each pixel (nearest neighbour) so tiny images such as 8×8 digits are
    legible; ``pad`` pixels of mid-grey (default 1/16 of a tile) separate the tiles.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError("image_grid expects uint8 [N x C x H x W]")
    n, c, h, w = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol_rows = int(np.ceil(n / nrow))
    arr = images.cpu().numpy().transpose(0, 2, 3, 1)
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    pad = max(1, h // 16) if pad is None else pad
    grid = np.full((ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = arr[i]
    return grid[..., 0] if c == 1 else grid


def save_grid(path: str | Path, images: torch.Tensor, *, nrow: int | None = None, scale: int | None = None) -> Path:
    """Write a PNG grid of uint8 ``[N x C x H x W]`` images atomically; returns the path.

    By default tiles are enlarged to at least 64 px so small images stay legible.
    """
    h = images.shape[-1]
    scale = scale or max(1, 64 // h)
    buf = io.BytesIO()
    Image.fromarray(image_grid(images, nrow=nrow, scale=scale)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
