"""Continuous-time denoising score matching (Song et al., ICLR 2021, eq. 7).

For t ~ U(eps, T), z ~ N(0, I) and x_t = a(t) x_0 + σ(t) z (``sde.marginal_prob``) the
per-sample loss is, with reduce(v) over the D data dimensions the mean (``reduce_mean=True``) or
HALF the sum (``reduce_mean=False``: score_sde's ``0.5 * torch.sum``, i.e. D/2 times the mean),

* default weighting λ(t) = σ(t)²:   reduce(‖σ(t) s_θ(x_t, t) + z‖²)
* likelihood weighting λ(t) = g(t)² (Song, Durkan, Murray & Ermon, NeurIPS 2021,
  "Maximum likelihood training of score-based diffusion models"):
  g(t)² · reduce(‖s_θ(x_t, t) + z / σ(t)‖²)
* min-SNR-γ (Hang et al., ICCV 2023, "Efficient diffusion training via min-SNR weighting"):
  the default weighting times min(SNR(t), γ) / SNR(t), SNR = a(t)² / σ(t)². It lowers the weight of
  the nearly clean times (SNR > γ), whose easy detail gradients otherwise crowd out the times where
  the digit's shape is decided; any positive λ(t) keeps the same minimiser, only the use of a
  small model's capacity changes.

and the loss is the mean over the batch. Without min-SNR this is exactly score_sde_pytorch's
continuous ``get_sde_loss_fn`` (no importance sampling of t) for every SDE, reduction and
weighting (tests/test_losses.py checks all 12 combinations against its formula). With ``t_sampling="stratified"`` a batch's times
are u_i = (u + i / B) mod 1 mapped to (eps, T) (Kingma et al., NeurIPS 2021, "Variational diffusion
models", App. I.1): each time is still U(eps, T), so the expected loss is unchanged, but a batch
covers the whole range and the loss's variance across batches drops. The perturbed batch, times and noise
are returned so that the training loop can reuse them for the FPE regularizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from pipeline.config import TrainingConfig, check_choices
from pipeline.sde import SDE, bcast

__all__ = ["DSMLoss", "DSMOutput"]


@dataclass
class DSMOutput:
    loss: torch.Tensor  # scalar: mean of per_sample over the batch
    per_sample: torch.Tensor  # (B,)
    t: torch.Tensor  # (B,) times drawn from U(eps, T)
    xt: torch.Tensor  # perturbed batch a(t) x0 + σ(t) z
    z: torch.Tensor  # the standard normal noise
    std: torch.Tensor  # (B,) σ(t)
    score: torch.Tensor  # s_θ(xt, t) (part of the autograd graph)


class DSMLoss:
    """``DSMLoss(sde, eps, likelihood_weighting, reduce_mean, min_snr_gamma, t_sampling)(score_fn, x0, generator)``."""

    def __init__(self, sde: SDE, eps: float = TrainingConfig.eps,
                 likelihood_weighting: bool = TrainingConfig.likelihood_weighting,
                 reduce_mean: bool = TrainingConfig.reduce_mean, min_snr_gamma: float = TrainingConfig.min_snr_gamma,
                 t_sampling: str = TrainingConfig.t_sampling):
        # the arguments are training.* keys: checked where the config's are (ConfigError is a ValueError)
        opts = TrainingConfig(eps=eps, likelihood_weighting=likelihood_weighting, reduce_mean=reduce_mean,
                              min_snr_gamma=min_snr_gamma, t_sampling=t_sampling)
        check_choices(opts, "training")
        opts.validate("training")
        self.sde, self.eps = sde, eps
        self.likelihood_weighting, self.reduce_mean = likelihood_weighting, reduce_mean
        self.min_snr_gamma, self.t_sampling = min_snr_gamma, t_sampling

    def sample_t(self, batch: int, device, dtype, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.t_sampling == "stratified":
            u0 = torch.rand(1, device=device, dtype=dtype, generator=generator)
            u = torch.remainder(u0 + torch.arange(batch, device=device, dtype=dtype) / batch, 1.0)
        else:
            u = torch.rand(batch, device=device, dtype=dtype, generator=generator)
        return u * (self.sde.T - self.eps) + self.eps

    def per_sample_loss(self, score: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
                        std: torch.Tensor) -> torch.Tensor:
        """The (B,) loss for given score values, noise, times and σ(t)."""
        B = score.shape[0]
        if self.likelihood_weighting:
            r = score + z / bcast(std, z)
        else:
            r = score * bcast(std, z) + z
        sq = r.reshape(B, -1).pow(2)
        # score_sde: reduce_op = torch.mean, or 0.5 * torch.sum (so VE runs weigh DSM as the official ones)
        per = sq.mean(1) if self.reduce_mean else 0.5 * sq.sum(1)
        if self.likelihood_weighting:
            per = per * self.sde.diffusion(t) ** 2
        if self.min_snr_gamma > 0:
            snr = (self.sde.mean_coeff(t) / std).square()
            per = per * torch.clamp(snr, max=self.min_snr_gamma) / snr
        return per

    def __call__(self, score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                 generator: Optional[torch.Generator] = None, t: Optional[torch.Tensor] = None,
                 z: Optional[torch.Tensor] = None) -> DSMOutput:
        """``t`` and ``z`` may be given (tests, common random numbers); else drawn from ``generator``."""
        B = x0.shape[0]
        if t is None:
            t = self.sample_t(B, x0.device, x0.dtype, generator)
        if z is None:
            z = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        xt, std = self.sde.perturb(x0, t, z)
        score = score_fn(xt, t)
        per = self.per_sample_loss(score, z, t, std)
        return DSMOutput(loss=per.mean(), per_sample=per, t=t, xt=xt, z=z, std=std, score=score)
