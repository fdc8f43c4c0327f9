"""Building blocks of the NCSN++ / DDPM++ UNet.

Attribute names and parameter shapes follow score_sde_pytorch's ``layerspp.py`` (e.g.
``GroupNorm_0``, ``Conv_0``, ``Dense_0``, ``NIN_0.W``, ``Conv2d_0.weight``) so that its
released checkpoints load by name; the code is written from the description of the
architecture (Song et al. 2021, Appendix H). Every op supports double backward and
forward-mode AD in fp32; attention goes through ``scaled_dot_product_attention``
(callers that differentiate twice force the MATH backend around the call).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fir

_SQRT2 = math.sqrt(2.0)


# --------------------------------------------------------------------------- init
@torch.no_grad()
def variance_scaling_(tensor: torch.Tensor, scale: float = 1.0, in_axis: int = 1, out_axis: int = 0) -> torch.Tensor:
    """DDPM's default init: uniform variance scaling with fan_avg; scale 0 means 1e-10."""
    scale = 1e-10 if scale == 0 else scale
    shape = tensor.shape
    receptive = math.prod(shape) / shape[in_axis] / shape[out_axis]
    fan_avg = (shape[in_axis] + shape[out_axis]) * receptive / 2.0
    limit = math.sqrt(3.0 * scale / fan_avg)
    return tensor.uniform_(-limit, limit)


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, bias: bool = True, init_scale: float = 1.0,
            padding: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=padding, bias=bias)
    variance_scaling_(conv.weight, init_scale)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def conv1x1(in_ch: int, out_ch: int, bias: bool = True, init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, 1, bias=bias)
    variance_scaling_(conv.weight, init_scale)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def dense(in_dim: int, out_dim: int) -> nn.Linear:
    lin = nn.Linear(in_dim, out_dim)
    variance_scaling_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(ch // 4, 32), num_channels=ch, eps=1e-6)


# --------------------------------------------------------------------------- time embeddings
class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a scalar: [sin(2π x W), cos(2π x W)], W ~ N(0, scale²).
    W is a frozen parameter (named ``W``, as in the released checkpoints)."""

    def __init__(self, embedding_size: int = 256, scale: float = 1.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = x[:, None] * self.W[None, :] * (2 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


def timestep_embedding(t: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Transformer sinusoidal embedding of a (B,) float tensor (DDPM); differentiable in t."""
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32  # never below fp32
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=dtype)
                      * (-math.log(max_positions) / (half - 1)))
    args = t.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


# --------------------------------------------------------------------------- small layers
class NIN(nn.Module):
    """Per-pixel linear map ("network in network"): y = x·W + b over channels, W (in, out)."""

    def __init__(self, in_dim: int, num_units: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(torch.empty(in_dim, num_units))
        self.b = nn.Parameter(torch.zeros(num_units))
        variance_scaling_(self.W, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.W.t()[:, :, None, None], self.b)


class Combine(nn.Module):
    """Merge the input pyramid into the main path (1x1 conv, then sum or concat)."""

    def __init__(self, dim1: int, dim2: int, method: str = "cat"):
        super().__init__()
        self.Conv_0 = conv1x1(dim1, dim2)
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.Conv_0(x)
        return torch.cat([h, y], dim=1) if self.method == "cat" else h + y


class FIRConv2d(nn.Module):
    """Conv with optional fused FIR up/down-sampling (StyleGAN2). Parameters
    ``weight`` (out, in, k, k) and ``bias``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, up: bool = False, down: bool = False,
                 resample_kernel: Sequence[int] = (1, 3, 3, 1), use_bias: bool = True):
        super().__init__()
        assert not (up and down) and kernel % 2 == 1
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel, kernel))
        variance_scaling_(self.weight)
        self.bias = nn.Parameter(torch.zeros(out_ch)) if use_bias else None
        self.up, self.down, self.taps, self.kernel = up, down, tuple(resample_kernel), kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = fir.upsample_conv_2d(x, self.weight, self.taps)
        elif self.down:
            x = fir.conv_downsample_2d(x, self.weight, self.taps)
        else:
            x = F.conv2d(x, self.weight, padding=self.kernel // 2)
        if self.bias is not None:
            x = x + self.bias.reshape(1, -1, 1, 1)
        return x


class AttnBlock(nn.Module):
    """Self-attention over pixels (DDPM style, NIN projections), residual output.
    ``num_heads`` = 1 reproduces score_sde exactly (scale C^-1/2)."""

    def __init__(self, channels: int, skip_rescale: bool = False, init_scale: float = 0.0, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} not divisible by num_heads {num_heads}")
        self.GroupNorm_0 = group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale
        self.num_heads = num_heads

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, c, h, w = t.shape
        return t.reshape(b, self.num_heads, c // self.num_heads, h * w).transpose(-1, -2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.GroupNorm_0(x)
        q, k, v = self._heads(self.NIN_0(h)), self._heads(self.NIN_1(h)), self._heads(self.NIN_2(h))
        o = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        h = self.NIN_3(o.transpose(-1, -2).reshape(b, c, hh, ww))
        return (x + h) / _SQRT2 if self.skip_rescale else x + h


class Upsample(nn.Module):
    """x2 upsampling: nearest (+ 3x3 conv) or FIR (+ fused conv)."""

    def __init__(self, in_ch: int, out_ch: Optional[int] = None, with_conv: bool = False, fir: bool = False,
                 fir_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv:
            if fir:
                self.Conv2d_0 = FIRConv2d(in_ch, out_ch, 3, up=True, resample_kernel=fir_kernel)
            else:
                self.Conv_0 = conv3x3(in_ch, out_ch)
        elif out_ch != in_ch:
            raise ValueError("Upsample without conv cannot change channels")
        self.fir, self.with_conv, self.taps = fir, with_conv, tuple(fir_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else fir.upsample_2d(x, self.taps)
        h = fir.naive_upsample_2d(x)
        return self.Conv_0(h) if self.with_conv else h


class Downsample(nn.Module):
    """x2 downsampling: strided 3x3 conv / average pool, or FIR (+ fused conv)."""

    def __init__(self, in_ch: int, out_ch: Optional[int] = None, with_conv: bool = False, fir: bool = False,
                 fir_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv:
            if fir:
                self.Conv2d_0 = FIRConv2d(in_ch, out_ch, 3, down=True, resample_kernel=fir_kernel)
            else:
                self.Conv_0 = conv3x3(in_ch, out_ch, stride=2, padding=0)
        elif out_ch != in_ch:
            raise ValueError("Downsample without conv cannot change channels")
        self.fir, self.with_conv, self.taps = fir, with_conv, tuple(fir_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else fir.downsample_2d(x, self.taps)
        if self.with_conv:
            return self.Conv_0(F.pad(x, (0, 1, 0, 1)))  # TF "SAME" padding for stride 2
        return fir.naive_downsample_2d(x)


# --------------------------------------------------------------------------- residual blocks
class _ResBlockBase(nn.Module):
    """GroupNorm-act-conv, + Dense(act(temb)), GroupNorm-act-dropout-conv, skip."""

    def _body_init(self, act, in_ch, out_ch, temb_dim, dropout, skip_rescale, init_scale):
        self.GroupNorm_0 = group_norm(in_ch)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        self.act, self.in_ch, self.out_ch, self.skip_rescale = act, in_ch, out_ch, skip_rescale

    def _body_tail(self, h: torch.Tensor, temb: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.act(self.GroupNorm_1(h))
        return self.Conv_1(self.Dropout_0(h))

    def _merge(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return (x + h) / _SQRT2 if self.skip_rescale else x + h


class ResnetBlockDDPM(_ResBlockBase):
    """DDPM++ residual block; a NIN (or 3x3 conv) shortcut when channels change."""

    def __init__(self, act, in_ch: int, out_ch: Optional[int] = None, temb_dim: Optional[int] = None,
                 conv_shortcut: bool = False, dropout: float = 0.1, skip_rescale: bool = False,
                 init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch or in_ch
        self._body_init(act, in_ch, out_ch, temb_dim, dropout, skip_rescale, init_scale)
        if in_ch != out_ch:
            if conv_shortcut:
                self.Conv_2 = conv3x3(in_ch, out_ch)
            else:
                self.NIN_0 = NIN(in_ch, out_ch)
        self.conv_shortcut = conv_shortcut

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self._body_tail(self.act(self.GroupNorm_0(x)), temb)
        if self.in_ch != self.out_ch:
            x = self.Conv_2(x) if self.conv_shortcut else self.NIN_0(x)
        return self._merge(x, h)


class ResnetBlockBigGAN(_ResBlockBase):
    """BigGAN-style residual block that can also up- or down-sample (naive or FIR);
    1x1 conv shortcut when channels or resolution change."""

    def __init__(self, act, in_ch: int, out_ch: Optional[int] = None, temb_dim: Optional[int] = None,
                 up: bool = False, down: bool = False, dropout: float = 0.1, fir: bool = False,
                 fir_kernel: Sequence[int] = (1, 3, 3, 1), skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch or in_ch
        self._body_init(act, in_ch, out_ch, temb_dim, dropout, skip_rescale, init_scale)
        self.up, self.down, self.fir, self.taps = up, down, fir, tuple(fir_kernel)
        self.has_shortcut = in_ch != out_ch or up or down
        if self.has_shortcut:
            self.Conv_2 = conv1x1(in_ch, out_ch)

    def _resample(self, t: torch.Tensor) -> torch.Tensor:
        if self.up:
            return fir.upsample_2d(t, self.taps) if self.fir else fir.naive_upsample_2d(t)
        if self.down:
            return fir.downsample_2d(t, self.taps) if self.fir else fir.naive_downsample_2d(t)
        return t

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self._resample(self.act(self.GroupNorm_0(x)))
        x = self._resample(x)
        h = self._body_tail(h, temb)
        if self.has_shortcut:
            x = self.Conv_2(x)
        return self._merge(x, h)
