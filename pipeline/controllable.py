"""Controllable generation (Song et al., ICLR 2021, §5 and appendix I) over any score function.

* Class-conditional sampling: Bayes' rule for scores,
      ∇x log p_t(x | y) = ∇x log p_t(x) + ∇x log p_t(y | x),
  with a time-dependent classifier log p_t(y | x) (any callable ``log_prob(x, t, y) -> (B,)``);
  ``scale`` ≠ 1 gives classifier guidance. ``classifier_guided_score`` returns a score function,
  so every sampler of ``pipeline.sampling`` (PC and the probability-flow ODE) uses it unchanged.
* Inpainting (imputation): known pixels (mask = 1) are replaced, after every predictor and
  corrector update, by the data perturbed to the current time, x_k(t) ~ p_0t(· | y_k); the
  unknown pixels follow the unconditional reverse SDE. The last step is taken without noise from
  the current state and the known pixels end exactly at the data (score_sde's inpainter returns
  its noisy x as the final "mean" instead).
* Colorization: the same imputation in an orthogonal colour basis whose first axis is the gray
  direction (1, 1, 1)/√3 (score_sde's method): the gray coordinate √3·mean_c(x) is the known
  "pixel", kept at the gray image perturbed to time t, the two chroma coordinates are generated.
  The output's channel mean equals the gray input.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from pipeline.sampling import pc_sample
from pipeline.sde import SDE

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LogProbFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
MASKS = ("left", "right", "top", "bottom", "center", "random")


def color_basis(dtype=torch.float32, device=None) -> torch.Tensor:
    """Orthogonal 3x3 M whose columns are the new axes: gray (1,1,1)/√3, then (-2,1,1)/√6 and
    (0,1,-1)/√2. Coordinates: ``to_basis(x, M)``; back: ``to_basis(y, M.T)``."""
    r3, r6, r2 = 3 ** 0.5, 6 ** 0.5, 2 ** 0.5
    m = [[1 / r3, -2 / r6, 0.0], [1 / r3, 1 / r6, 1 / r2], [1 / r3, 1 / r6, -1 / r2]]
    return torch.tensor(m, dtype=torch.float64).to(dtype=dtype, device=device)


def to_basis(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Channel coordinates of x (B, C, ...) in the basis of m's columns: y_j = Σ_i x_i m_ij."""
    return torch.einsum("bi...,ij->bj...", x, m.to(x.dtype))


def classifier_guided_score(score_fn: ScoreFn, log_prob: LogProbFn, y: torch.Tensor,
                            scale: float = 1.0) -> ScoreFn:
    """(x, t) -> s(x, t) + scale · ∇x log p_t(y | x) (Bayes' rule for scores at scale 1)."""

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():  # the samplers run under no_grad
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(log_prob(xg, t, y).sum(), xg)
        return score_fn(x, t) + scale * grad

    return guided


def inpaint_constraint(sde: SDE, data: torch.Tensor, mask: torch.Tensor,
                       generator: Optional[torch.Generator] = None):
    """``constraint(x, t)`` for ``pc_sample``: known pixels ← a fresh draw of p_0t(· | data), and
    the data itself at t = 0."""
    known = mask.to(dtype=torch.bool, device=data.device).expand_as(data)

    def constraint(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if bool((t == 0).all()):
            return torch.where(known, data, x)
        gdev = generator.device if generator is not None else data.device
        z = torch.randn(data.shape, generator=generator, device=gdev, dtype=data.dtype).to(data.device)
        return torch.where(known, sde.perturb(data, t, z)[0], x)

    return constraint


@torch.no_grad()
def inpaint(score_fn: ScoreFn, sde: SDE, data: torch.Tensor, mask: torch.Tensor, *,
            generator: Optional[torch.Generator] = None, **pc_kwargs) -> tuple[torch.Tensor, int]:
    """Fill the pixels where ``mask`` is 0 given ``data`` where it is 1; returns (x, nfe).

    ``mask`` broadcasts against ``data`` ((B or 1, 1 or C, H, W) or the data's shape);
    ``pc_kwargs`` go to ``pc_sample`` (predictor, corrector, snr, num_steps, eps, ...).
    """
    constraint = inpaint_constraint(sde, data, mask, generator)
    return pc_sample(score_fn, sde, tuple(data.shape), device=data.device, dtype=data.dtype,
                     generator=generator, constraint=constraint, **pc_kwargs)


def colorize_inputs(gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, mask) in ``color_basis`` coordinates for a gray image (B, 1 or 3, ...) in model
    space (3 channels: their mean is the gray value): coordinate 0 known, = √3 · gray."""
    g = gray.mean(1, keepdim=True)
    data = torch.cat([g * 3 ** 0.5, torch.zeros_like(g), torch.zeros_like(g)], 1)
    mask = torch.zeros((1, 3) + (1,) * (gray.dim() - 2), dtype=gray.dtype, device=gray.device)
    mask[:, 0] = 1
    return data, mask


@torch.no_grad()
def colorize(score_fn: ScoreFn, sde: SDE, gray: torch.Tensor, *, generator: Optional[torch.Generator] = None,
             **pc_kwargs) -> tuple[torch.Tensor, int]:
    """Colour images (B, 3, ...) whose channel mean is ``gray`` (B, 1 or 3, ...; model space);
    returns (x, nfe). ``pc_kwargs`` go to ``pc_sample``."""
    m = color_basis(gray.dtype, gray.device)
    data, mask = colorize_inputs(gray)
    known = inpaint_constraint(sde, data, mask, generator)

    def constraint(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return to_basis(known(to_basis(x, m), t), m.T)

    shape = (gray.shape[0], 3) + tuple(gray.shape[2:])
    return pc_sample(score_fn, sde, shape, device=gray.device, dtype=gray.dtype, generator=generator,
                     constraint=constraint, **pc_kwargs)


def make_mask(kind: str, shape, *, generator: Optional[torch.Generator] = None,
              keep: float = 0.5) -> torch.Tensor:
    """A (B, 1, H, W) float mask, 1 = known pixel: ``left`` / ``right`` / ``top`` / ``bottom``
    keep that half, ``center`` hides the central square of half the side, ``random`` keeps each
    pixel with probability ``keep``."""
    B, _, H, W = shape
    m = torch.zeros(B, 1, H, W)
    if kind == "left":
        m[..., : W // 2] = 1
    elif kind == "right":
        m[..., W // 2:] = 1
    elif kind == "top":
        m[..., : H // 2, :] = 1
    elif kind == "bottom":
        m[..., H // 2:, :] = 1
    elif kind == "center":
        m[:] = 1
        h0, w0 = H // 4, W // 4
        m[..., h0:h0 + H // 2, w0:w0 + W // 2] = 0
    elif kind == "random":
        m = (torch.rand(B, 1, H, W, generator=generator) < keep).float()
    else:
        raise ValueError(f"inpaint mask: unknown kind {kind!r} (choose from {', '.join(MASKS)})")
    return m
