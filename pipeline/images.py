"""Image helpers: model space -> uint8 (rounding, not truncation) and PNG grids."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


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


def save_grid(x: torch.Tensor, path: str | Path, centered: bool, nrow: int | None = None) -> Path:
    grid = make_grid(to_uint8(x.detach().float(), centered), nrow)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path
