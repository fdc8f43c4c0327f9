"""Oracle for tests/test_import.py: score_sde_pytorch's NCSNpp read independently of
``pipeline.models``, from its sources (models/ncsnpp.py, layerspp.py, utils.py, ema.py).

* ``layout(cfg)``: the ``all_modules`` list in score_sde's construction order, as
  (kind, channel args); the parameter-free pyramid resamplers of ``output_skip`` /
  ``input_skip`` are attributes outside the list there, so they take no index.
* ``score_sde_state(cfg, gen)``: a state dict exactly as score_sde's DataParallel model writes
  it (``module.`` prefix, ``module.sigmas`` float64 buffer first, parameters in registration
  order), with random values; ``shapes_only=True`` gives (key, shape) pairs without tensors.
* ``forward(state, cfg, x, labels)``: score_sde's forward pass computed functionally from
  those keys, returning the output and every ``all_modules[i]`` output.

BigGAN residual blocks only (every released NCSN++ / DDPM++ config uses them). FIR
resampling reuses ``pipeline.models.fir`` (tested against StyleGAN2's definition in
tests/test_models.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.models import fir


def layout(cfg) -> list[tuple]:
    m, nf, ch = cfg.model, cfg.model.nf, cfg.data.num_channels
    assert m.resblock_type == "biggan"
    res = [cfg.data.image_size // 2 ** i for i in range(len(m.ch_mult))]
    mods: list[tuple] = []
    if m.embedding_type == "fourier":
        mods.append(("fourier", nf))
    mods += [("dense", 2 * nf if m.embedding_type == "fourier" else nf, 4 * nf), ("dense", 4 * nf, 4 * nf)]
    mods.append(("conv3", ch, nf))
    hs_c, c, pyr = [nf], nf, ch
    for i, mult in enumerate(m.ch_mult):
        for _ in range(m.num_res_blocks):
            mods.append(("res", c, nf * mult, None))
            c = nf * mult
            if res[i] in m.attn_resolutions:
                mods.append(("attn", c))
            hs_c.append(c)
        if i != len(m.ch_mult) - 1:
            mods.append(("res", c, c, "down"))
            if m.progressive_input == "input_skip":
                mods.append(("combine", pyr, c))
                c = 2 * c if m.progressive_combine == "cat" else c
            elif m.progressive_input == "residual":
                mods.append(("pyr_down", pyr, c))
                pyr = c
            hs_c.append(c)
    c = hs_c[-1]
    mods += [("res", c, c, None), ("attn", c), ("res", c, c, None)]
    pyr = 0
    for i in reversed(range(len(m.ch_mult))):
        for _ in range(m.num_res_blocks + 1):
            mods.append(("res", c + hs_c.pop(), nf * m.ch_mult[i], None))
            c = nf * m.ch_mult[i]
        if res[i] in m.attn_resolutions:
            mods.append(("attn", c))
        if m.progressive != "none":
            top = i == len(m.ch_mult) - 1
            if m.progressive == "output_skip":
                mods += [("gn", c), ("conv3", c, ch)]
            elif top:
                mods += [("gn", c), ("conv3", c, c)]
            else:
                mods.append(("pyr_up", pyr, c))
            pyr = ch if m.progressive == "output_skip" else c
        if i != 0:
            mods.append(("res", c, c, "up"))
    if m.progressive != "output_skip":
        mods += [("gn", c), ("conv3", c, ch)]
    return mods


def _params(kind: tuple, cfg) -> list[tuple[str, tuple]]:
    """(suffix, shape) of one module's parameters in registration order."""
    nf, fir_on = cfg.model.nf, cfg.model.fir
    k = kind[0]
    if k == "fourier":
        return [("W", (kind[1],))]
    if k == "dense":
        return [("weight", (kind[2], kind[1])), ("bias", (kind[2],))]
    if k == "conv3":
        return [("weight", (kind[2], kind[1], 3, 3)), ("bias", (kind[2],))]
    if k == "gn":
        return [("weight", (kind[1],)), ("bias", (kind[1],))]
    if k == "attn":
        c = kind[1]
        return [("GroupNorm_0.weight", (c,)), ("GroupNorm_0.bias", (c,))] + [
            (f"NIN_{j}.{p}", (c, c) if p == "W" else (c,)) for j in range(4) for p in ("W", "b")]
    if k == "combine":
        return [("Conv_0.weight", (kind[2], kind[1], 1, 1)), ("Conv_0.bias", (kind[2],))]
    if k in ("pyr_down", "pyr_up"):
        name = "Conv2d_0" if fir_on else "Conv_0"
        return [(f"{name}.weight", (kind[2], kind[1], 3, 3)), (f"{name}.bias", (kind[2],))]
    i, o, resample = kind[1], kind[2], kind[3]
    out = [("GroupNorm_0.weight", (i,)), ("GroupNorm_0.bias", (i,)), ("Conv_0.weight", (o, i, 3, 3)),
           ("Conv_0.bias", (o,)), ("Dense_0.weight", (o, 4 * nf)), ("Dense_0.bias", (o,)),
           ("GroupNorm_1.weight", (o,)), ("GroupNorm_1.bias", (o,)), ("Conv_1.weight", (o, o, 3, 3)),
           ("Conv_1.bias", (o,))]
    if i != o or resample:
        out += [("Conv_2.weight", (o, i, 1, 1)), ("Conv_2.bias", (o,))]
    return out


def sigmas(cfg) -> torch.Tensor:
    s = cfg.sde
    return torch.exp(torch.linspace(math.log(s.sigma_max), math.log(s.sigma_min), s.num_scales, dtype=torch.float64))


def score_sde_state(cfg, gen: torch.Generator | None = None, shapes_only: bool = False):
    """score_sde's ``model.state_dict()`` (DataParallel) for ``cfg`` with random weights, or its
    (key, shape) list; the second value is the trainable keys in ``parameters()`` order."""
    keys, trainable = [("module.sigmas", (cfg.sde.num_scales,))], []
    for idx, kind in enumerate(layout(cfg)):
        for suffix, shape in _params(kind, cfg):
            keys.append((f"module.all_modules.{idx}.{suffix}", shape))
            if kind[0] != "fourier":
                trainable.append(keys[-1][0])
    if shapes_only:
        return keys, trainable
    state = {"module.sigmas": sigmas(cfg)}
    for key, shape in keys[1:]:
        t = torch.randn(shape, generator=gen)
        if key.endswith(".W") and len(shape) == 1:
            t = t * cfg.model.fourier_scale
        elif len(shape) > 1:
            t = t / math.sqrt(math.prod(shape[1:]) if not key.endswith(".W") else shape[0])
        elif "GroupNorm" in key or ".weight" in key and len(shape) == 1:
            t = 1 + 0.2 * t if key.endswith("weight") else 0.2 * t
        else:
            t = 0.2 * t
        state[key] = t
    return state, trainable


def _gn(x, w, b):
    return F.group_norm(x, min(x.shape[1] // 4, 32), w, b, eps=1e-6)


def _nin(x, w, b):  # per-pixel x·W + b, W (in, out)
    return torch.einsum("bchw,co->bohw", x, w) + b[None, :, None, None]


def forward(state: dict, cfg, x: torch.Tensor, labels: torch.Tensor):
    """score_sde's NCSNpp.forward on ``state``; returns (output, {all_modules index: output})."""
    m, nf = cfg.model, cfg.model.nf
    p = {k[len("module."):]: v for k, v in state.items()}
    mods = layout(cfg)
    outs: dict[int, torch.Tensor] = {}
    idx = 0
    taps = tuple(m.fir_kernel)
    merge = (lambda a, b: (a + b) / math.sqrt(2)) if m.skip_rescale else (lambda a, b: a + b)

    def W(name):
        return p[f"all_modules.{idx}.{name}"]

    def up(t):
        return fir.upsample_2d(t, taps) if m.fir else t.repeat_interleave(2, 2).repeat_interleave(2, 3)

    def down(t):
        return fir.downsample_2d(t, taps) if m.fir else F.avg_pool2d(t, 2)

    def run(*args):
        nonlocal idx
        kind = mods[idx]
        k = kind[0]
        if k == "fourier":
            proj = args[0][:, None] * W("W")[None] * 2 * math.pi
            y = torch.cat([torch.sin(proj), torch.cos(proj)], 1)
        elif k == "dense":
            y = F.linear(args[0], W("weight"), W("bias"))
        elif k == "conv3":
            y = F.conv2d(args[0], W("weight"), W("bias"), padding=1)
        elif k == "gn":
            y = _gn(args[0], W("weight"), W("bias"))
        elif k == "combine":
            h = F.conv2d(args[0], W("Conv_0.weight"), W("Conv_0.bias"))
            y = torch.cat([h, args[1]], 1) if m.progressive_combine == "cat" else h + args[1]
        elif k in ("pyr_down", "pyr_up"):
            w, b = (W("Conv2d_0.weight"), W("Conv2d_0.bias"))
            y = (fir.conv_downsample_2d(args[0], w, taps) if k == "pyr_down"
                 else fir.upsample_conv_2d(args[0], w, taps)) + b[None, :, None, None]
        elif k == "attn":
            xx = args[0]
            B, C, H, Wd = xx.shape
            h = _gn(xx, W("GroupNorm_0.weight"), W("GroupNorm_0.bias"))
            q, kk, v = (_nin(h, W(f"NIN_{j}.W"), W(f"NIN_{j}.b")) for j in range(3))
            a = torch.einsum("bchw,bcij->bhwij", q, kk) * C ** -0.5
            a = F.softmax(a.reshape(B, H, Wd, H * Wd), -1).reshape(B, H, Wd, H, Wd)
            h = _nin(torch.einsum("bhwij,bcij->bchw", a, v), W("NIN_3.W"), W("NIN_3.b"))
            y = merge(xx, h)
        else:  # BigGAN residual block
            xx, temb = args
            h = F.silu(_gn(xx, W("GroupNorm_0.weight"), W("GroupNorm_0.bias")))
            if kind[3] == "up":
                h, xx = up(h), up(xx)
            elif kind[3] == "down":
                h, xx = down(h), down(xx)
            h = F.conv2d(h, W("Conv_0.weight"), W("Conv_0.bias"), padding=1)
            h = h + F.linear(F.silu(temb), W("Dense_0.weight"), W("Dense_0.bias"))[:, :, None, None]
            h = F.silu(_gn(h, W("GroupNorm_1.weight"), W("GroupNorm_1.bias")))
            h = F.conv2d(h, W("Conv_1.weight"), W("Conv_1.bias"), padding=1)
            if kind[1] != kind[2] or kind[3]:
                xx = F.conv2d(xx, W("Conv_2.weight"), W("Conv_2.bias"))
            y = merge(xx, h)
        outs[idx] = y
        idx += 1
        return y

    if m.embedding_type == "fourier":
        temb = run(torch.log(labels))
    else:
        half = nf // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
        temb = torch.cat([torch.sin(labels[:, None] * freqs), torch.cos(labels[:, None] * freqs)], 1)
    temb = run(temb)
    temb = run(F.silu(temb))
    if not cfg.data.centered:
        x = 2 * x - 1
    pyramid_in = x
    hs = [run(x)]
    n = len(m.ch_mult)
    for i in range(n):
        for _ in range(m.num_res_blocks):
            h = run(hs[-1], temb)
            if h.shape[-1] in m.attn_resolutions:
                h = run(h)
            hs.append(h)
        if i != n - 1:
            h = run(hs[-1], temb)
            if m.progressive_input == "input_skip":
                pyramid_in = down(pyramid_in)
                h = run(pyramid_in, h)
            elif m.progressive_input == "residual":
                pyramid_in = merge(run(pyramid_in), h)
                h = pyramid_in
            hs.append(h)
    h = run(run(run(hs[-1], temb)), temb)
    pyramid = None
    for i in reversed(range(n)):
        for _ in range(m.num_res_blocks + 1):
            h = run(torch.cat([h, hs.pop()], 1), temb)
        if h.shape[-1] in m.attn_resolutions:
            h = run(h)
        if m.progressive != "none":
            if i == n - 1:
                pyramid = run(F.silu(run(h)))
            elif m.progressive == "output_skip":
                pyramid = up(pyramid) + run(F.silu(run(h)))
            else:
                pyramid = merge(run(pyramid), h)
                h = pyramid
        if i != 0:
            h = run(h, temb)
    h = pyramid if m.progressive == "output_skip" else run(F.silu(run(h)))
    assert idx == len(mods) and not hs
    if m.scale_by_sigma:
        h = h / labels[:, None, None, None]
    return h, outs
