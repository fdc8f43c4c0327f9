"""Forward SDEs dx = f(x,t) dt + g(t) dw of Song et al. (ICLR 2021).

One abstraction used by the DSM loss, the samplers, the likelihood and the FPE
regularizer. All time arguments are tensors of shape (B,) on the data's device; every
method is differentiable in t (the FPE residual takes d/dt by forward-mode AD).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample (B,) tensor to broadcast against x (B, ...)."""
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim()))


class SDE(ABC):
    T: float = 1.0

    def __init__(self, N: int = 1000):
        self.N = N

    # ---- continuous-time description
    @abstractmethod
    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """g(t), shape (B,)."""

    def sde(self, x, t):
        return self.drift(x, t), self.diffusion(t)

    @abstractmethod
    def drift_divergence(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """∇x·f(x,t), shape (B,) (constant in x for the SDEs here)."""

    @abstractmethod
    def marginal_prob(self, x0: torch.Tensor, t: torch.Tensor):
        """Mean and std (std shape (B,)) of the perturbation kernel p_0t(x_t | x_0)."""

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, σ(t)): x_t = a(t) x0 + σ(t) z, the sample of p_0t(x_t | x0) for the noise z; the one
        place the perturbation is written (losses, the regularizer, evaluation, the classifier, inpainting)."""
        mean, std = self.marginal_prob(x0, t)
        return mean + bcast(std, x0) * z, std

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        return self.marginal_prob(torch.zeros(t.shape[0], 1, device=t.device, dtype=t.dtype), t)[1]

    @abstractmethod
    def mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """a(t) with mean = a(t) x0, shape (B,)."""

    @abstractmethod
    def prior_std(self) -> float: ...

    def prior_sampling(self, shape, device=None, dtype=torch.float32, generator=None):
        return torch.randn(shape, device=device, dtype=dtype, generator=generator) * self.prior_std()

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        s = self.prior_std()
        D = z[0].numel()
        return -0.5 * D * math.log(2 * math.pi * s * s) - z.flatten(1).pow(2).sum(1) / (2 * s * s)

    # ---- one step t -> t_next (< t) of the samplers (pipeline.sampling). Each SDE gives its
    # own discretisation here, so the samplers never ask which SDE they run.
    default_eps: float = 1e-3  # smallest sampling time (score_sde: 1e-3 for VP / sub-VP, 1e-5 for VE)
    has_ancestral: bool = False  # whether ancestral_step is defined (DDPM / SMLD chains)

    def discretize(self, x, t, t_next):
        """(f, G²) of the forward step t_next -> t, x_t ≈ x_{t_next} + f + G z, with the step
        actually taken. Euler-Maruyama here (f = f(x,t)Δt, G² = g(t)²Δt); VP and VE override
        with the DDPM / SMLD forms (Song et al. 2021, App. E)."""
        dt = t - t_next
        f, g = self.sde(x, t)
        return f * bcast(dt, x), g * g * dt

    def langevin_alpha(self, t, t_next):
        """α of the Langevin corrector's step size 2α(snr·‖z‖/‖s‖)²: DDPM's 1 - β for VP, else 1."""
        return torch.ones_like(t)

    def ancestral_step(self, x, score, t, t_next):
        """(mean, std) of ancestral sampling's step t -> t_next (VP and VE only)."""
        raise ValueError(f"ancestral sampling is defined for the VP and VE SDEs only, not "
                         f"{type(self).__name__}; use predictor 'reverse_diffusion' or 'euler_maruyama'")


class VPSDE(SDE):
    """Variance preserving: f = -½β(t)x, g = √β(t); β linear in t."""

    def __init__(self, beta_min=0.1, beta_max=20.0, N=1000):
        super().__init__(N)
        self.beta_0, self.beta_1 = beta_min, beta_max

    def beta(self, t):
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def log_mean_coeff(self, t):
        # log a(t) = -½∫β = -¼t²(β1-β0) - ½tβ0
        return -0.25 * t * t * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def mean_coeff(self, t):
        return torch.exp(self.log_mean_coeff(t))

    def drift(self, x, t):
        return -0.5 * bcast(self.beta(t), x) * x

    def diffusion(self, t):
        return torch.sqrt(self.beta(t))

    def drift_divergence(self, x, t):
        return -0.5 * self.beta(t) * x[0].numel()

    def marginal_prob(self, x0, t):
        lmc = self.log_mean_coeff(t)
        mean = bcast(torch.exp(lmc), x0) * x0
        std = torch.sqrt(-torch.expm1(2.0 * lmc))
        return mean, std

    def prior_std(self):
        return 1.0

    # DDPM chain over the step actually taken: β = 1 - a(t)²/a(t_next)² (≈ β(t)Δt; β(t)/N at Δt = 1/N)
    has_ancestral = True

    def step_beta(self, t, t_next):
        return -torch.expm1(2.0 * (self.log_mean_coeff(t) - self.log_mean_coeff(t_next)))

    def discretize(self, x, t, t_next):
        beta = self.step_beta(t, t_next)
        return bcast(torch.sqrt(1.0 - beta) - 1.0, x) * x, beta

    def langevin_alpha(self, t, t_next):
        return 1.0 - self.step_beta(t, t_next)

    def ancestral_step(self, x, score, t, t_next):
        beta = self.step_beta(t, t_next)
        return (x + bcast(beta, x) * score) / bcast(torch.sqrt(1.0 - beta), x), torch.sqrt(beta)


class SubVPSDE(VPSDE):
    """sub-VP: VP drift, g² = β(t)(1 - e^{-2∫β}); std = 1 - e^{-∫β} (no square root, by design)."""

    def diffusion(self, t):
        discount = -torch.expm1(-2 * self.beta_0 * t - (self.beta_1 - self.beta_0) * t * t)
        return torch.sqrt(self.beta(t) * discount)

    def marginal_prob(self, x0, t):
        lmc = self.log_mean_coeff(t)
        mean = bcast(torch.exp(lmc), x0) * x0
        std = -torch.expm1(2.0 * lmc)
        return mean, std

    # no DDPM chain: Euler-Maruyama steps as score_sde, α = 1, no ancestral sampling
    has_ancestral = False
    discretize = SDE.discretize
    langevin_alpha = SDE.langevin_alpha
    ancestral_step = SDE.ancestral_step


class VESDE(SDE):
    """Variance exploding: f = 0, σ(t) = σmin(σmax/σmin)^t, g = σ(t)√(2 log(σmax/σmin))."""

    def __init__(self, sigma_min=0.01, sigma_max=50.0, N=1000):
        super().__init__(N)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self._log_ratio = math.log(sigma_max / sigma_min)

    def sigma(self, t):
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def mean_coeff(self, t):
        return torch.ones_like(t)

    def drift(self, x, t):
        return torch.zeros_like(x)

    def diffusion(self, t):
        return self.sigma(t) * math.sqrt(2 * self._log_ratio)

    def drift_divergence(self, x, t):
        return torch.zeros_like(t)

    def marginal_prob(self, x0, t):
        return x0, self.sigma(t)

    def prior_std(self):
        return self.sigma_max

    # SMLD chain over the step actually taken: G² = σ(t)² - σ(t_next)², σ taken 0 at t_next = 0
    # (so the last step is Tweedie's x + σ² s)
    default_eps = 1e-5
    has_ancestral = True

    def _step_sigmas(self, t, t_next):
        return self.sigma(t), torch.where(t_next > 0, self.sigma(t_next), torch.zeros_like(t_next))

    def discretize(self, x, t, t_next):
        sigma, sigma_next = self._step_sigmas(t, t_next)
        return torch.zeros_like(x), (sigma ** 2 - sigma_next ** 2).clamp_min(0.0)

    def ancestral_step(self, x, score, t, t_next):
        sigma, sigma_next = self._step_sigmas(t, t_next)
        d2 = (sigma ** 2 - sigma_next ** 2).clamp_min(0.0)
        return x + bcast(d2, x) * score, torch.sqrt(sigma_next ** 2 * d2 / sigma ** 2)


SDE_CLASSES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}  # by sde.type


def build_sde(cfg) -> SDE:
    """From an ``SDEConfig``."""
    if cfg.type == "vp":
        return VPSDE(cfg.beta_min, cfg.beta_max, cfg.num_scales)
    if cfg.type == "subvp":
        return SubVPSDE(cfg.beta_min, cfg.beta_max, cfg.num_scales)
    if cfg.type == "ve":
        return VESDE(cfg.sigma_min, cfg.sigma_max, cfg.num_scales)
    raise ValueError(f"sde.type: unknown SDE {cfg.type!r}")
