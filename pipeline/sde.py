"""Forward SDEs dx = f(x,t) dt + g(t) dw of Song et al. (ICLR 2021).

One abstraction used by the DSM loss, the samplers, the likelihood and the FPE
regularizer. All time arguments are tensors of shape (B,) on the data's device; every
method is differentiable in t (the FPE residual takes d/dt by forward-mode AD).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
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

    # ---- discretisation (Euler by default; VP/VE override with DDPM/SMLD forms)
    def discretize(self, x, t):
        dt = 1.0 / self.N
        f, g = self.sde(x, t)
        return f * dt, g * math.sqrt(dt)

    def reverse(self, score_fn, probability_flow: bool = False) -> "ReverseSDE":
        return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE:
    """dx = [f - (1 or ½) g² s] dt + (g or 0) dw̄, integrated from T to 0."""

    def __init__(self, sde: SDE, score_fn, probability_flow: bool):
        self.fwd, self.score_fn, self.probability_flow = sde, score_fn, probability_flow
        self.N = sde.N

    def sde(self, x, t):
        drift, g = self.fwd.sde(x, t)
        score = self.score_fn(x, t)
        c = 0.5 if self.probability_flow else 1.0
        drift = drift - _bcast(g * g, x) * score * c
        return drift, (torch.zeros_like(g) if self.probability_flow else g)

    def discretize(self, x, t):
        f, G = self.fwd.discretize(x, t)
        c = 0.5 if self.probability_flow else 1.0
        rev_f = f - _bcast(G * G, x) * self.score_fn(x, t) * c
        return rev_f, (torch.zeros_like(G) if self.probability_flow else G)


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
        return -0.5 * _bcast(self.beta(t), x) * x

    def diffusion(self, t):
        return torch.sqrt(self.beta(t))

    def drift_divergence(self, x, t):
        return -0.5 * self.beta(t) * x[0].numel()

    def marginal_prob(self, x0, t):
        lmc = self.log_mean_coeff(t)
        mean = _bcast(torch.exp(lmc), x0) * x0
        std = torch.sqrt(-torch.expm1(2.0 * lmc))
        return mean, std

    def prior_std(self):
        return 1.0

    # DDPM discretisation with β_i = β(t_i)/N (score_sde's VPSDE.discretize)
    def discretize(self, x, t):
        beta = self.beta(t) / self.N
        alpha = 1.0 - beta
        f = _bcast(torch.sqrt(alpha), x) * x - x
        return f, torch.sqrt(beta)

    def discrete_betas(self, device=None):
        return torch.linspace(self.beta_0 / self.N, self.beta_1 / self.N, self.N, device=device)


class SubVPSDE(VPSDE):
    """sub-VP: VP drift, g² = β(t)(1 - e^{-2∫β}); std = 1 - e^{-∫β} (no square root, by design)."""

    def diffusion(self, t):
        discount = -torch.expm1(-2 * self.beta_0 * t - (self.beta_1 - self.beta_0) * t * t)
        return torch.sqrt(self.beta(t) * discount)

    def marginal_prob(self, x0, t):
        lmc = self.log_mean_coeff(t)
        mean = _bcast(torch.exp(lmc), x0) * x0
        std = -torch.expm1(2.0 * lmc)
        return mean, std

    def discretize(self, x, t):  # Euler-Maruyama, as score_sde
        return SDE.discretize(self, x, t)


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

    # SMLD discretisation over the geometric σ table; the table is computed on the
    # device of t (score_sde keeps it on the CPU and indexes it with device tensors)
    def discrete_sigmas(self, device=None):
        return torch.exp(torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.N, device=device))

    def discretize(self, x, t):
        sigma = self.sigma(t)
        prev = self.sigma(torch.clamp(t - 1.0 / self.N, min=0.0))
        prev = torch.where(t - 1.0 / self.N <= 0, torch.zeros_like(prev), prev)  # σ before the first step is 0
        f = torch.zeros_like(x)
        G = torch.sqrt(torch.clamp(sigma ** 2 - prev ** 2, min=0.0))
        return f, G


def build_sde(cfg) -> SDE:
    """From an ``SDEConfig``."""
    if cfg.type == "vp":
        return VPSDE(cfg.beta_min, cfg.beta_max, cfg.num_scales)
    if cfg.type == "subvp":
        return SubVPSDE(cfg.beta_min, cfg.beta_max, cfg.num_scales)
    if cfg.type == "ve":
        return VESDE(cfg.sigma_min, cfg.sigma_max, cfg.num_scales)
    raise ValueError(f"sde.type: unknown SDE {cfg.type!r}")
