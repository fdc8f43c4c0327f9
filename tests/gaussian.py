"""Closed-form ground truth for Gaussian data N(μ, Σ) in D dimensions under the SDEs.

The perturbation kernel of every SDE here is x_t = a(t) x_0 + std(t) z (``sde.mean_coeff``,
``sde.marginal_prob``), so the marginal p_t is N(a μ, a² Σ + std² I) and its score is
-(a² Σ + std² I)^{-1} (x - a μ). With Σ = U diag(λ) Uᵀ every quantity is diagonal in the
U basis, which keeps the score cheap for 10k samples x 1000 steps.
Samples may have any shape (B, ...) with prod(...) = D; they are flattened in C order.
"""
from __future__ import annotations

import math

import torch

from pipeline.sde import SubVPSDE, VESDE, VPSDE

# the SDEs with Song et al.'s CIFAR-10 parameters, by name
SDES = {"vp": lambda: VPSDE(0.1, 20.0), "subvp": lambda: SubVPSDE(0.1, 20.0), "ve": lambda: VESDE(0.01, 50.0)}


class GaussianData:
    def __init__(self, mean, cov, dtype=torch.float64):
        self.mu = torch.as_tensor(mean, dtype=dtype)
        self.cov = torch.as_tensor(cov, dtype=dtype)
        self.D = self.mu.numel()
        assert self.cov.shape == (self.D, self.D)
        self.lam, self.U = torch.linalg.eigh(self.cov)
        assert bool((self.lam > 0).all())
        self.dtype = dtype

    @classmethod
    def random(cls, D: int, seed: int = 0, scale: float = 1.0, dtype=torch.float64) -> "GaussianData":
        g = torch.Generator().manual_seed(seed)
        mu = torch.randn(D, generator=g, dtype=dtype) * 0.5 * scale
        A = torch.randn(D, D, generator=g, dtype=dtype) / math.sqrt(D)
        cov = (A @ A.T + 0.3 * torch.eye(D, dtype=dtype)) * scale ** 2
        return cls(mu, cov, dtype)

    # ---- data
    def sample(self, n: int, generator=None, shape=None) -> torch.Tensor:
        z = torch.randn(n, self.D, dtype=self.dtype, generator=generator)
        x = self.mu + (z * self.lam.sqrt()) @ self.U.T
        return x.reshape((n,) + tuple(shape)) if shape is not None else x

    # ---- perturbed marginals
    def _coeffs(self, sde, t: torch.Tensor):
        t = t.to(self.dtype)
        a = sde.mean_coeff(t)
        std = sde.marginal_std(t)
        return a, std

    def marginal(self, sde, t: float):
        """(mean (D,), cov (D, D)) of p_t for a scalar time t."""
        tt = torch.tensor([t], dtype=self.dtype)
        a, std = (v[0] for v in self._coeffs(sde, tt))
        return a * self.mu, a * a * self.cov + std * std * torch.eye(self.D, dtype=self.dtype)

    def score(self, sde, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """∇x log p_t(x), t of shape (B,); in the dtype of x."""
        shape, dt = x.shape, x.dtype
        xf = x.reshape(shape[0], -1).to(self.dtype)
        a, std = self._coeffs(sde, t)
        var = a[:, None] ** 2 * self.lam + std[:, None] ** 2  # (B, D) in the eigenbasis
        r = (xf - a[:, None] * self.mu) @ self.U
        return (-(r / var) @ self.U.T).to(dt).reshape(shape)

    def score_fn(self, sde):
        return lambda x, t: self.score(sde, x, t)

    def logp(self, sde, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p_t(x) in nats, t of shape (B,)."""
        xf = x.reshape(x.shape[0], -1).to(self.dtype)
        a, std = self._coeffs(sde, t)
        var = a[:, None] ** 2 * self.lam + std[:, None] ** 2
        r = (xf - a[:, None] * self.mu) @ self.U
        return -0.5 * (self.D * math.log(2 * math.pi) + var.log().sum(1) + (r * r / var).sum(1))

    def data_logp(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; μ, Σ) of the unperturbed data."""
        xf = x.reshape(x.shape[0], -1).to(self.dtype)
        r = (xf - self.mu) @ self.U
        return -0.5 * (self.D * math.log(2 * math.pi) + self.lam.log().sum() + (r * r / self.lam).sum(1))

    def score_divergence(self, sde, t: torch.Tensor) -> torch.Tensor:
        """∇·s = -tr((a²Σ + std² I)^{-1}), shape (B,)."""
        a, std = self._coeffs(sde, t)
        return -(1.0 / (a[:, None] ** 2 * self.lam + std[:, None] ** 2)).sum(1)


def moments(x: torch.Tensor):
    """Sample mean (D,) and covariance (D, D) of samples (n, ...), in float64."""
    xf = x.reshape(x.shape[0], -1).double()
    m = xf.mean(0)
    c = xf - m
    return m, c.T @ c / (xf.shape[0] - 1)
