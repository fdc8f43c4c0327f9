"""Image helpers: uint8 <-> model space (the one place pixels are scaled: ``to_model_space`` for
the data loader and evaluation, ``to_uint8`` -- rounding, not truncation -- for samples) and PNG
grids."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from pipeline.atomic import atomic_path


LEVELS = 256  # pixel levels of uint8 data


def to_model_space(images_u8: torch.Tensor, centered: bool, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 (any shape) -> float32 model space. With ``noise`` ~ U[0,1) of the same shape:
    (u8 + noise)/256 (uniform dequantisation as score_sde); without: u8/255. Then [-1, 1] if
    ``centered``."""
    x = images_u8.float()
    x = (x + noise) / LEVELS if noise is not None else x / (LEVELS - 1)
    return x * 2.0 - 1.0 if centered else x


def to_uint8(x: torch.Tensor, centered: bool) -> torch.Tensor:
    """Model-space images (B,C,H,W) -> uint8 in [0,255], rounded to nearest level."""
    x = (x + 1.0) / 2.0 if centered else x
    return torch.clamp(torch.round(x * 255.0), 0, 255).to(torch.uint8)


def make_grid(images_u8: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(B,C,H,W) uint8 -> (H', W', C) uint8 grid."""
    b, c, h, w = images_u8.shape
    nrow = nrow or int(math.ceil(math.sqrt(b)))
    ncol = int(math.ceil(b / nrow))
    grid = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    arr = images_u8.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(b):
        r, q = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = arr[i]
    return grid


def label_columns(labels) -> int | None:
    """Columns of a grid of class-conditional samples drawn for the labels 0..K-1 in turn: K, so
    each row reads 0..K-1 (None for other labels, or none)."""
    if labels is None or len(labels) == 0:
        return None
    k = int(max(labels)) + 1
    return k if [int(v) for v in labels] == [i % k for i in range(len(labels))] else None


def save_grid(x: torch.Tensor, path: str | Path, centered: bool, nrow: int | None = None) -> Path:
    grid = make_grid(to_uint8(x.detach().float(), centered), nrow)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
