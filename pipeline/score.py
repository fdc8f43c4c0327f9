"""Score parameterisation of the networks (score_sde_pytorch's ``get_score_fn``).

VE: the network sees the time label σ(t) and returns the score (an NCSN++ with
``scale_by_sigma`` divides its output by σ itself). VP / sub-VP: the network sees the
label 999·t and predicts noise; score = -output / std(t).
All of it is differentiable in t, which the FPE residual's jvp in t relies on.
"""
from __future__ import annotations

import torch

from pipeline.sde import SDE, VESDE, _bcast


def time_labels(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    if isinstance(sde, VESDE):
        return sde.sigma(t)
    return t * 999.0


def score_from_output(sde: SDE, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if isinstance(sde, VESDE):
        return output
    return -output / _bcast(sde.marginal_std(t), x)


def get_score_fn(model: torch.nn.Module, sde: SDE):
    """score_fn(x, t) -> s_θ(x, t). ``model`` may be a wrapper or the raw module."""

    def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return score_from_output(sde, model(x, time_labels(sde, t)), x, t)

    return score_fn
