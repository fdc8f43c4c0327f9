"""FIR up/down-sampling (StyleGAN2's ``upfirdn2d``) in plain torch.

Only differentiable torch primitives (pad, reshape, grouped ``conv2d``,
``conv_transpose2d``) are used, so everything here supports double backward and
forward-mode AD. Filters are separable 1-D taps (default ``[1, 3, 3, 1]``), made into
a normalised 2-D kernel once per (taps, gain, device, dtype) and cached: the modules
therefore own no buffers and add no state-dict keys.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=64)
def _kernel_cached(taps: tuple, gain: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():
        k = torch.tensor(taps, dtype=torch.float64)
        if k.dim() == 1:
            k = torch.outer(k, k)
        k = k / k.sum() * gain
        return k.to(device=device, dtype=dtype)


def fir_kernel(taps: Sequence[float], gain: float, like: torch.Tensor) -> torch.Tensor:
    """Normalised 2-D FIR kernel (sum = ``gain``) on ``like``'s device and dtype."""
    return _kernel_cached(tuple(float(t) for t in taps), float(gain), like.device, like.dtype)


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Zero-insertion upsample by ``up``, pad (``pad[0]`` before, ``pad[1]`` after, both
    axes; negative values crop), convolve with ``kernel`` (true convolution), keep every
    ``down``-th pixel. Same semantics as StyleGAN2's ``upfirdn2d_native``."""
    n, c, h, w = x.shape
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(n, c, h * up, w * up)
    p0, p1 = pad
    x = F.pad(x, (max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)))
    if p0 < 0 or p1 < 0:
        hh, ww = x.shape[-2:]
        x = x[:, :, max(-p0, 0): hh - max(-p1, 0), max(-p0, 0): ww - max(-p1, 0)]
    kh, kw = kernel.shape
    weight = torch.flip(kernel, [0, 1]).reshape(1, 1, kh, kw).expand(c, 1, kh, kw)
    return F.conv2d(x, weight, stride=down, groups=c)


def upsample_2d(x: torch.Tensor, taps: Sequence[float] = (1, 3, 3, 1), factor: int = 2,
                gain: float = 1.0) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H*factor, W*factor), FIR-filtered."""
    k = fir_kernel(taps, gain * factor ** 2, x)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: torch.Tensor, taps: Sequence[float] = (1, 3, 3, 1), factor: int = 2,
                  gain: float = 1.0) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H//factor, W//factor), FIR-filtered."""
    k = fir_kernel(taps, gain, x)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x: torch.Tensor, weight: torch.Tensor, taps: Sequence[float] = (1, 3, 3, 1),
                     factor: int = 2, gain: float = 1.0) -> torch.Tensor:
    """Fused FIR upsample + conv: a strided transposed convolution with the flipped
    ``weight`` (out, in, k, k), then the FIR filter, padding applied once."""
    out_c, in_c, kh, kw = weight.shape
    assert kh == kw
    k = fir_kernel(taps, gain * factor ** 2, x)
    p = (k.shape[0] - factor) - (kw - 1)
    w = torch.flip(weight, [2, 3]).transpose(0, 1)  # (in, out, k, k) for conv_transpose2d
    x = F.conv_transpose2d(x, w, stride=factor)
    return upfirdn2d(x, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: torch.Tensor, weight: torch.Tensor, taps: Sequence[float] = (1, 3, 3, 1),
                       factor: int = 2, gain: float = 1.0) -> torch.Tensor:
    """Fused FIR downsample + strided conv with ``weight`` (out, in, k, k)."""
    kw = weight.shape[-1]
    k = fir_kernel(taps, gain, x)
    p = (k.shape[0] - factor) + (kw - 1)
    x = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
    return F.conv2d(x, weight, stride=factor)


def naive_upsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Nearest-neighbour upsampling (pixel repeat). ATen's kernel, not a reshape of an expand: the
    expand's backward is a strided sum that took 15% of a small UNet's bf16 step on a CPU."""
    return F.interpolate(x, scale_factor=factor, mode="nearest")


def naive_downsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Average pooling over factor x factor blocks."""
    return F.avg_pool2d(x, factor)
