"""Decoding one sample of a shard -- the one decoder of training, evaluation and the classifier.

``decode_sample``: ``{ext: bytes}`` -> (uint8 [H, W, C] image, label from ``.cls``). An image is
read only through conversions that keep its pixel values (``exact_mode``: no 16 bits clipped, alpha
flattened or colour grayed), and its size is checked from the header before any pixel is
allocated. Uses: PIL.
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "pgm", "bmp")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# the largest image decoded (data.max_image_pixels sets it for a run): an 11000 x 11000 PNG of 15 KB
# would take gigabytes once decoded
MAX_IMAGE_PIXELS = 4096 * 4096

# conversions that keep every pixel value (gray to colour, an opaque alpha added, palettes)
_EXACT = {("1", "L"), ("1", "RGB"), ("1", "RGBA"), ("L", "RGB"), ("L", "RGBA"), ("RGB", "RGBA"), ("P", "RGB"),
          ("P", "RGBA")}
_MODE_NAMES = {"I;16": "16-bit gray", "I;16B": "16-bit gray", "I": "32-bit integer gray", "F": "32-bit float gray",
               "LA": "gray with alpha", "RGBA": "RGB with alpha", "PA": "palette with alpha", "CMYK": "CMYK",
               "YCbCr": "YCbCr", "L": "8-bit gray", "RGB": "8-bit RGB"}


def image_mode(im) -> str:
    """The image's real mode in words (PIL reads 16-bit RGB PNGs as 8-bit ``RGB``)."""
    args = [t[3] for t in getattr(im, "tile", None) or () if len(t) > 3]
    if any(isinstance(a, str) and ";16" in a for a in args) and im.mode in ("RGB", "RGBA"):
        return f"16-bit {im.mode}"
    return _MODE_NAMES.get(im.mode, im.mode)


def exact_mode(im, channels: Optional[int]) -> str:
    """The mode ``im`` is read as (``channels``: 1 L, 3 RGB, 4 RGBA; None: its own L / RGB / RGBA).
    Raises ValueError naming its real mode when that would change pixel values (16 bits clipped,
    alpha flattened, colour grayed)."""
    want = _MODES[channels] if channels else (im.mode if im.mode in ("L", "RGB", "RGBA") else "RGB")
    real = image_mode(im)
    exact = not real.startswith("16-bit") and (im.mode == want or (im.mode, want) in _EXACT)
    if im.mode == "P" and "transparency" in im.info and want != "RGBA":
        exact = False
    if not exact:
        raise ValueError(f"a {real} image (PIL mode {im.mode}) cannot be read exactly as "
                         f"{channels or len(want)}-channel {want}")
    return want


def decode_sample(files: dict, height: Optional[int] = None, width: Optional[int] = None,
                  channels: Optional[int] = None, max_pixels: Optional[int] = None) -> tuple[np.ndarray, int]:
    """``{ext: bytes}`` -> (uint8 [H,W,C], label; -1 without ``.cls``). The image is read as
    ``channels`` (``exact_mode``: only conversions that keep its values); ``height`` / ``width``,
    when given, must match, and no image over ``max_pixels`` (default ``MAX_IMAGE_PIXELS``) is
    decoded: sizes are checked from the header, before any pixel is allocated. Raises ValueError on
    anything unusable."""
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        raise ValueError(f"no image ({', '.join(IMAGE_EXTS)}) among {sorted(files)}")
    try:
        with Image.open(io.BytesIO(files[ext])) as im:
            w, h = im.size
            if (height is not None and h != height) or (width is not None and w != width) or \
                    w * h > (max_pixels or MAX_IMAGE_PIXELS):
                raise ValueError(f"image {h}x{w}, expected {height or '*'}x{width or '*'} "
                                 f"(at most {max_pixels or MAX_IMAGE_PIXELS} pixels)")
            want = exact_mode(im, channels)
            arr = np.asarray(im if im.mode == want else im.convert(want))
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001  PIL raises many types on bad data
        raise ValueError(f"undecodable {ext}: {type(e).__name__}: {str(e)[:200]}") from None
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype != np.uint8:
        raise ValueError(f"image {arr.shape[0]}x{arr.shape[1]}x{arr.shape[2]} {arr.dtype}, expected uint8")
    label = -1
    if "cls" in files:
        raw = files["cls"]
        try:
            text = raw.decode().strip()
            label = int(text) if len(text) <= 18 else None  # an int64; a 23-digit label is no class
        except (ValueError, UnicodeDecodeError):
            label = None
        if label is None:
            raise ValueError(f"bad .cls {raw[:20]!r}")
    return arr, label
