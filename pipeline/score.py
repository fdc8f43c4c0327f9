"""Score parameterisation of the networks (score_sde_pytorch's ``get_score_fn``).

VE: the network sees the time label σ(t) and returns the score (an NCSN++ with
``scale_by_sigma`` divides its output by σ itself). VP / sub-VP: the network sees the
label 999·t and predicts noise; score = -output / std(t).
All of it is differentiable in t, which the FPE residual's jvp in t relies on.

Class-conditional networks (``model.num_classes`` = K) take a label per sample: 0..K-1, or K for
"no class" (the unconditional score, also what an omitted label means). ``sampling_score_fn`` is
the score every sampler of a run uses: for such a net, classifier-free guidance over labels
0..K-1 in turn.
"""
from __future__ import annotations

import torch

from pipeline.sde import SDE, VESDE, bcast


def time_labels(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    if isinstance(sde, VESDE):
        return sde.sigma(t)
    return t * 999.0


def score_from_output(sde: SDE, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if isinstance(sde, VESDE):
        return output
    return -output / bcast(sde.marginal_std(t), x)


def get_score_fn(model: torch.nn.Module, sde: SDE, class_labels: torch.Tensor | None = None):
    """score_fn(x, t) -> s_θ(x, t), or s_θ(x, t | y) with ``class_labels`` y (B,) for a
    class-conditional net. ``model`` may be a wrapper or the raw module."""

    def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if class_labels is None:
            return score_from_output(sde, model(x, time_labels(sde, t)), x, t)
        return score_from_output(sde, model(x, time_labels(sde, t), class_labels), x, t)

    return score_fn


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """The batches ``sample`` draws n samples in: full ``batch_size`` ones, then the rest."""
    bs = max(1, min(batch_size, n))
    return [min(bs, n - start) for start in range(0, n, bs)]


def cycled_labels(n: int, num_classes: int, device=None) -> torch.Tensor:
    """The labels a conditional net's samples get: 0, 1, ..., K-1, 0, 1, ... (each class ~n/K times)."""
    return torch.arange(n, device=device) % num_classes


def guided_score_fn(model: torch.nn.Module, sde: SDE, num_classes: int, weight: float):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6, for scores):
        s̃(x, t | y) = (1 + w) s(x, t | y) − w s(x, t),
    with y = ``cycled_labels`` over each batch the sampler passes, so any batch split of a sample
    set gets the labels ``cycled_labels`` of each batch. One forward of the 2B conditional and
    unconditional inputs per call; w = 0 evaluates the conditional score alone."""

    def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = cycled_labels(x.shape[0], num_classes, x.device)
        if weight == 0:
            return get_score_fn(model, sde, y)(x, t)
        both = get_score_fn(model, sde, torch.cat([y, torch.full_like(y, num_classes)]))(
            torch.cat([x, x]), torch.cat([t, t]))
        cond, uncond = both.chunk(2)
        return (1 + weight) * cond - weight * uncond

    return score_fn


def sampling_score_fn(model: torch.nn.Module, sde: SDE, cfg) -> tuple:
    """(score_fn, labels_for(n, batch_size)) for sampling a run (``cfg``: its Config): the
    unconditional score, or guided class-conditional scores (``guided_score_fn``, weight
    ``sampling.guidance_weight``). ``labels_for`` gives the labels of n samples drawn in batches
    of ``batch_size`` (None for an unconditional net)."""
    k = cfg.model.num_classes
    if not k:
        return get_score_fn(model, sde), lambda n, batch_size: None

    def labels_for(n: int, batch_size: int) -> torch.Tensor:
        return torch.cat([cycled_labels(size, k) for size in batch_sizes(n, batch_size)])

    return guided_score_fn(model, sde, k, cfg.sampling.guidance_weight), labels_for
