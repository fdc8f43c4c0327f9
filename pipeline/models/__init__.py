"""Score networks: ``build_model(cfg)`` returns an NCSN++ / DDPM++ UNet.

Forward signature ``model(x, labels, class_labels=None)``: labels = σ(t) for the VE SDE (Fourier embedding
of log σ; output divided by σ when ``model.scale_by_sigma``), 999·t for VP / sub-VP
(positional embedding; the network predicts noise). ``pipeline.score`` turns outputs into
scores; ``pipeline.publish.score_sde_import`` loads score_sde_pytorch checkpoints into these networks.
"""
from __future__ import annotations

import torch.nn as nn

from ..config import Config
from .ncsnpp import NCSNpp

__all__ = ["NCSNpp", "build_model", "count_parameters"]


def build_model(cfg: Config) -> nn.Module:
    """Build the UNet described by ``cfg.model`` for ``cfg.data`` images and ``cfg.sde``.

    DDPM++ and NCSN++ are configurations of this one network. Parameters are created on the current default device (``with
    torch.device("meta"): build_model(cfg)`` builds without allocating). The keys' values are
    checked when the config loads (``Config.validate``), not here.
    """
    m = cfg.model
    return NCSNpp(
        image_size=cfg.data.image_size, num_channels=cfg.data.num_channels, centered=cfg.data.centered,
        nf=m.nf, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
        embedding_type=m.embedding_type, fourier_scale=m.fourier_scale, resblock_type=m.resblock_type,
        resamp_with_conv=m.resamp_with_conv, skip_rescale=m.skip_rescale, fir=m.fir,
        fir_kernel=tuple(m.fir_kernel), progressive=m.progressive, progressive_input=m.progressive_input,
        progressive_combine=m.progressive_combine, init_scale=m.init_scale,
        scale_by_sigma=m.scale_by_sigma, num_heads=m.num_heads, patch_size=m.patch_size,
        num_classes=m.num_classes,
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
