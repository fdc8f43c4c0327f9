"""Image helpers: uint8 <-> model space (the one place pixels are scaled: ``to_model_space`` for
the data loader and evaluation, ``to_uint8`` -- rounding, not truncation -- for samples) and PNG
grids."""
from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Iterable, Mapping, Optional

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


def _npy_member(zf: zipfile.ZipFile, name: str, shape: tuple, dtype, chunks: Iterable) -> None:
    """Write an array member of an .npz (``np.load`` reads it) from ``chunks`` of its rows, never
    holding more than one chunk."""
    with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
        np.lib.format.write_array_header_2_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": tuple(shape)})
        for chunk in chunks:
            fh.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


def write_sample_set(npz: Path, grid: Path, batches: Iterable[torch.Tensor], shape: tuple, centered: bool,
                     labels=None, extra: Optional[Mapping[str, np.ndarray]] = None, grid_max: Optional[int] = None,
                     grid_images: Optional[torch.Tensor] = None, nrow: Optional[int] = None) -> Path:
    """A set of ``shape[0]`` samples, drawn in ``batches`` (model space, (b, C, H, W) each), written
    as it comes: ``npz`` holds them as uint8 ("images"), their class ``labels`` when given and the
    ``extra`` arrays; ``grid`` is a PNG of the first ``grid_max`` (all: None) samples, or of
    ``grid_images`` when given, ``nrow`` per row (default: one column per class when the labels
    cycle 0..K-1). Only one batch and the grid's samples are held at once. Returns the grid's path."""
    shown: list[torch.Tensor] = []

    def uint8_batches():
        for x in batches:
            if grid_images is None and (grid_max is None or sum(len(b) for b in shown) < grid_max):
                shown.append(x[:None if grid_max is None else grid_max - sum(len(b) for b in shown)].detach().cpu())
            yield to_uint8(x, centered).cpu().numpy()

    members = dict(extra or {})
    if labels is not None:
        members = {"labels": np.asarray(labels, dtype=np.int64), **members}
    npz.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(npz) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
            _npy_member(zf, "images", shape, np.uint8, uint8_batches())
            for name, array in members.items():
                array = np.asarray(array)
                _npy_member(zf, name, array.shape, array.dtype, [array])
    on_grid = grid_images if grid_images is not None else torch.cat(shown)
    if nrow is None and labels is not None:
        nrow = label_columns([int(v) for v in np.asarray(labels)[:len(on_grid)]])
    return save_grid(on_grid, grid, centered=centered, nrow=nrow)
