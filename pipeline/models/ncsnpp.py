"""NCSN++ / DDPM++: one continuous-time score UNet, two configurations.

DDPM++ (VP / sub-VP): positional embedding of the label 999·t, the net predicts noise.
NCSN++ (VE): Gaussian Fourier embedding of log σ (the label is σ(t)); with
``scale_by_sigma`` the output is divided by σ. Both use BigGAN-style residual blocks,
GroupNorm + SiLU, self-attention at chosen resolutions, optional FIR resampling and
progressive input/output pyramids (Song et al. 2021, Appendix H).

All submodules with weights sit in one ``all_modules`` ModuleList in the order
score_sde_pytorch's ``NCSNpp`` creates them, so its released checkpoints load by key (see
``pipeline.publish.score_sde_import``). As there, the parameter-free pyramid resamplers of
``progressive='output_skip'`` / ``progressive_input='input_skip'`` are single attributes
outside the list (they take no index), while the convolutional ``residual`` ones are list
entries. ``forward`` walks the list in the order it was built.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import layers

_SQRT2 = math.sqrt(2.0)


class NCSNpp(nn.Module):
    def __init__(self, *, image_size: int, num_channels: int, nf: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 4,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 embedding_type: str = "positional", fourier_scale: float = 16.0,
                 resblock_type: str = "biggan", resamp_with_conv: bool = True,
                 skip_rescale: bool = True, fir: bool = False, fir_kernel: Sequence[int] = (1, 3, 3, 1),
                 progressive: str = "none", progressive_input: str = "none",
                 progressive_combine: str = "sum", init_scale: float = 0.0,
                 scale_by_sigma: bool = False, num_heads: int = 1, centered: bool = True, patch_size: int = 1,
                 num_classes: int = 0):
        super().__init__()  # the arguments are model.* keys, checked by Config.validate (build_model's input)
        # patch_size p > 1: the UNet runs on (C p²) x (H / p) x (W / p) (pixel unshuffle in, pixel shuffle
        # out), so at a given cost its first level has p x the channels (cheap width for small images)
        self.patch_size = patch_size
        image_size, num_channels = image_size // patch_size, num_channels * patch_size ** 2
        self.act = act = nn.SiLU()
        self.nf = nf
        self.num_resolutions = n_res = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.all_resolutions = [image_size // (2 ** i) for i in range(n_res)]
        self.attn_resolutions = tuple(attn_resolutions)
        self.embedding_type = embedding_type
        self.resblock_type = resblock_type
        self.progressive = progressive
        self.progressive_input = progressive_input
        self.skip_rescale = skip_rescale
        self.scale_by_sigma = scale_by_sigma
        self.centered = centered
        self.num_channels = channels = num_channels
        self.image_size = image_size
        combine = partial(layers.Combine, method=progressive_combine)
        attn = partial(layers.AttnBlock, init_scale=init_scale, skip_rescale=skip_rescale, num_heads=num_heads)
        upsample = partial(layers.Upsample, with_conv=resamp_with_conv, fir=fir, fir_kernel=fir_kernel)
        downsample = partial(layers.Downsample, with_conv=resamp_with_conv, fir=fir, fir_kernel=fir_kernel)
        pyramid_up = partial(layers.Upsample, fir=fir, fir_kernel=fir_kernel, with_conv=progressive == "residual")
        pyramid_down = partial(layers.Downsample, fir=fir, fir_kernel=fir_kernel,
                               with_conv=progressive_input == "residual")
        if resblock_type == "ddpm":
            resblock = partial(layers.ResnetBlockDDPM, act=act, dropout=dropout, init_scale=init_scale,
                               skip_rescale=skip_rescale, temb_dim=4 * nf)
        else:
            resblock = partial(layers.ResnetBlockBigGAN, act=act, dropout=dropout, fir=fir, fir_kernel=fir_kernel,
                               init_scale=init_scale, skip_rescale=skip_rescale, temb_dim=4 * nf)

        # parameter-free pyramid resamplers live outside ``all_modules`` (score_sde's layout)
        if progressive_input == "input_skip":
            self.pyramid_downsample = pyramid_down(in_ch=channels)
        if progressive == "output_skip":
            self.pyramid_upsample = pyramid_up(in_ch=channels)
        modules: list[nn.Module] = []
        # time / noise-level embedding, then a 2-layer MLP to 4·nf
        if embedding_type == "fourier":
            modules.append(layers.GaussianFourierProjection(embedding_size=nf, scale=fourier_scale))
            embed_dim = 2 * nf
        else:
            embed_dim = nf
        modules.append(layers.dense(embed_dim, 4 * nf))
        modules.append(layers.dense(4 * nf, 4 * nf))
        # class-conditional (num_classes = K > 0): a learned vector per class, plus one for "no class"
        # (index K, the unconditional score that classifier-free guidance needs), added to the time
        # embedding between the MLP's two layers so the second mixes them. Outside ``all_modules``:
        # score_sde checkpoints (unconditional) keep loading by key.
        self.num_classes = num_classes
        if num_classes:
            self.class_embed = nn.Embedding(num_classes + 1, 4 * nf)

        # ---- down path
        modules.append(layers.conv3x3(channels, nf))
        hs_c = [nf]
        in_ch = nf
        pyramid_ch = channels
        for i_level in range(n_res):
            for _ in range(num_res_blocks):
                out_ch = nf * ch_mult[i_level]
                modules.append(resblock(in_ch=in_ch, out_ch=out_ch))
                in_ch = out_ch
                if self.all_resolutions[i_level] in self.attn_resolutions:
                    modules.append(attn(channels=in_ch))
                hs_c.append(in_ch)
            if i_level != n_res - 1:
                if resblock_type == "ddpm":
                    modules.append(downsample(in_ch=in_ch))
                else:
                    modules.append(resblock(down=True, in_ch=in_ch))
                if progressive_input == "input_skip":
                    modules.append(combine(dim1=pyramid_ch, dim2=in_ch))
                    if progressive_combine == "cat":
                        in_ch *= 2
                elif progressive_input == "residual":
                    modules.append(pyramid_down(in_ch=pyramid_ch, out_ch=in_ch))
                    pyramid_ch = in_ch
                hs_c.append(in_ch)

        # ---- middle
        in_ch = hs_c[-1]
        modules.append(resblock(in_ch=in_ch))
        modules.append(attn(channels=in_ch))
        modules.append(resblock(in_ch=in_ch))

        # ---- up path
        pyramid_ch = 0
        for i_level in reversed(range(n_res)):
            for _ in range(num_res_blocks + 1):
                out_ch = nf * ch_mult[i_level]
                modules.append(resblock(in_ch=in_ch + hs_c.pop(), out_ch=out_ch))
                in_ch = out_ch
            if self.all_resolutions[i_level] in self.attn_resolutions:
                modules.append(attn(channels=in_ch))
            if progressive != "none":
                if i_level == n_res - 1:
                    modules.append(layers.group_norm(in_ch))
                    if progressive == "output_skip":
                        modules.append(layers.conv3x3(in_ch, channels, init_scale=init_scale))
                        pyramid_ch = channels
                    else:
                        modules.append(layers.conv3x3(in_ch, in_ch, bias=True))
                        pyramid_ch = in_ch
                elif progressive == "output_skip":
                    modules.append(layers.group_norm(in_ch))
                    modules.append(layers.conv3x3(in_ch, channels, bias=True, init_scale=init_scale))
                    pyramid_ch = channels
                else:
                    modules.append(pyramid_up(in_ch=pyramid_ch, out_ch=in_ch))
                    pyramid_ch = in_ch
            if i_level != 0:
                if resblock_type == "ddpm":
                    modules.append(upsample(in_ch=in_ch))
                else:
                    modules.append(resblock(in_ch=in_ch, up=True))
        assert not hs_c

        if progressive != "output_skip":
            modules.append(layers.group_norm(in_ch))
            modules.append(layers.conv3x3(in_ch, channels, init_scale=init_scale))
        self.all_modules = nn.ModuleList(modules)

    # ------------------------------------------------------------------ forward
    def _merge(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a + b) / _SQRT2 if self.skip_rescale else a + b

    def _norm_act_conv(self, mods, h: torch.Tensor) -> torch.Tensor:
        norm = next(mods)
        conv = next(mods)
        return conv(self.act(norm(h)))

    def forward(self, x: torch.Tensor, labels: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W); labels: (B,) σ(t) (Fourier) or 999·t (positional); class_labels: (B,)
        integers in [0, K] for a class-conditional net (K or None: the unconditional score)."""
        mods = iter(self.all_modules)
        act = self.act
        if self.embedding_type == "fourier":
            temb = next(mods)(torch.log(labels))
        else:
            temb = layers.timestep_embedding(labels, self.nf)
        temb = next(mods)(temb)
        if self.num_classes:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            temb = temb + self.class_embed(class_labels).to(temb.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional network (model.num_classes = 0)")
        temb = next(mods)(act(temb))

        if not self.centered:  # data in [0, 1]: the network sees 2x - 1 (score_sde convention)
            x = 2 * x - 1.0
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)

        # ---- down path
        input_pyramid = x if self.progressive_input != "none" else None
        hs = [next(mods)(x)]
        for i_level in range(self.num_resolutions):
            has_attn = self.all_resolutions[i_level] in self.attn_resolutions
            for _ in range(self.num_res_blocks):
                h = next(mods)(hs[-1], temb)
                if has_attn:
                    h = next(mods)(h)
                hs.append(h)
            if i_level != self.num_resolutions - 1:
                if self.resblock_type == "ddpm":
                    h = next(mods)(hs[-1])
                else:
                    h = next(mods)(hs[-1], temb)
                if self.progressive_input == "input_skip":
                    input_pyramid = self.pyramid_downsample(input_pyramid)
                    h = next(mods)(input_pyramid, h)
                elif self.progressive_input == "residual":
                    input_pyramid = self._merge(next(mods)(input_pyramid), h)
                    h = input_pyramid
                hs.append(h)

        # ---- middle
        h = hs[-1]
        h = next(mods)(h, temb)
        h = next(mods)(h)
        h = next(mods)(h, temb)

        # ---- up path
        pyramid = None
        for i_level in reversed(range(self.num_resolutions)):
            for _ in range(self.num_res_blocks + 1):
                h = next(mods)(torch.cat([h, hs.pop()], dim=1), temb)
            if self.all_resolutions[i_level] in self.attn_resolutions:
                h = next(mods)(h)
            if self.progressive != "none":
                if i_level == self.num_resolutions - 1:
                    pyramid = self._norm_act_conv(mods, h)
                elif self.progressive == "output_skip":
                    pyramid = self.pyramid_upsample(pyramid) + self._norm_act_conv(mods, h)
                else:
                    pyramid = self._merge(next(mods)(pyramid), h)
                    h = pyramid
            if i_level != 0:
                if self.resblock_type == "ddpm":
                    h = next(mods)(h)
                else:
                    h = next(mods)(h, temb)
        assert not hs

        if self.progressive == "output_skip":
            h = pyramid
        else:
            h = self._norm_act_conv(mods, h)
        assert next(mods, None) is None, "forward did not use every module"
        if self.patch_size > 1:
            h = F.pixel_shuffle(h, self.patch_size)

        if self.scale_by_sigma:
            h = h / labels.reshape((-1,) + (1,) * (h.dim() - 1))
        return h
