"""Test fixtures for the FPE residual: closed-form Gaussian-mixture marginals and scores, and a
small stand-in score network (GroupNorm, SiLU, dropout, attention) with ``forward(x, labels)``.

Gaussian mixture p_0 = Σ_k π_k N(μ_k, Σ_k). Every SDE of ``pipeline.sde`` perturbs x_0 to
x_t = a(t) x_0 + σ(t) z, so p_t = Σ_k π_k N(a μ_k, C_k(t)), C_k = a² Σ_k + σ² I, and
    ∇x log p_t(x) = −Σ_k w_k(x) C_k⁻¹ (x − a μ_k),   w = softmax_k(log π_k + log N(x; a μ_k, C_k)).
This p_t solves the Fokker-Planck equation of the SDE exactly (VE: dσ²/dt = g²; VP:
dC/dt = −βC + βI; sub-VP: dC/dt = −βC + β(1 − a⁴)I), so its score has zero FPE residual.
All operations are torch ops: differentiable in x and t (forward and reverse mode, any order).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class GaussianMixture:
    def __init__(self, D: int, K: int = 3, *, seed: int = 0, dtype=torch.float64, scale: float = 1.0):
        g = torch.Generator().manual_seed(seed)
        self.D, self.K = D, K
        self.mu = torch.randn(K, D, generator=g, dtype=dtype) * 1.5 * scale
        A = torch.randn(K, D, D, generator=g, dtype=dtype) * 0.4
        self.cov = (A @ A.transpose(1, 2) + 0.2 * torch.eye(D, dtype=dtype)) * scale ** 2  # full covariances
        self.logpi = torch.log_softmax(torch.randn(K, generator=g, dtype=dtype), 0)

    def marginal(self, sde, t):
        a = sde.mean_coeff(t)
        sd = sde.marginal_std(t)
        eye = torch.eye(self.D, dtype=t.dtype)
        C = a[:, None, None, None] ** 2 * self.cov.to(t.dtype) + sd[:, None, None, None] ** 2 * eye
        return a, C  # (B,), (B, K, D, D)

    def score(self, sde, x, t):
        a, C = self.marginal(sde, t)
        diff = x[:, None, :] - a[:, None, None] * self.mu.to(x.dtype)
        sol = torch.linalg.solve(C, diff.unsqueeze(-1)).squeeze(-1)  # C⁻¹(x − aμ)
        logdet = torch.linalg.slogdet(C)[1]
        logn = -0.5 * (diff * sol).sum(-1) - 0.5 * logdet - 0.5 * self.D * math.log(2 * math.pi)
        w = torch.softmax(self.logpi.to(x.dtype) + logn, dim=1)
        return -(w.unsqueeze(-1) * sol).sum(1)

    def score_fn(self, sde):
        return lambda x, t: self.score(sde, x, t)

    def sample_x0(self, n, generator=None):
        k = torch.multinomial(self.logpi.exp(), n, replacement=True, generator=generator)
        L = torch.linalg.cholesky(self.cov)
        z = torch.randn(n, self.D, generator=generator, dtype=self.mu.dtype)
        return self.mu[k] + (L[k] @ z.unsqueeze(-1)).squeeze(-1)

    def sample_xt(self, sde, t, generator=None):
        x0 = self.sample_x0(t.shape[0], generator)
        a, sd = sde.mean_coeff(t), sde.marginal_std(t)
        return a[:, None] * x0 + sd[:, None] * torch.randn(x0.shape, generator=generator, dtype=x0.dtype)


# --------------------------------------------------------------------------- stand-in network
def _timestep_embedding(labels, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=labels.dtype, device=labels.device) / (half - 1))
    arg = labels[:, None] * freqs[None]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class _ResBlock(nn.Module):
    def __init__(self, cin, cout, temb, dropout):
        super().__init__()
        self.n0 = nn.GroupNorm(min(cin // 4, 32), cin, eps=1e-6)
        self.c0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.d0 = nn.Linear(temb, cout)
        self.n1 = nn.GroupNorm(min(cout // 4, 32), cout, eps=1e-6)
        self.drop = nn.Dropout(dropout)
        self.c1 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.c0(F.silu(self.n0(x)))
        h = h + self.d0(F.silu(temb))[:, :, None, None]
        h = self.c1(self.drop(F.silu(self.n1(h))))
        return (self.skip(x) + h) / math.sqrt(2)


class _Attn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n = nn.GroupNorm(min(c // 4, 32), c, eps=1e-6)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.n(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)
        o = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return (x + self.out(o.transpose(1, 2).reshape(B, C, H, W))) / math.sqrt(2)


class TinyUNet(nn.Module):
    """Two-level UNet-ish score net: ResBlocks (GroupNorm, SiLU, dropout), attention at the
    low resolution, sinusoidal embedding of the time label. ``forward(x, labels)``."""

    def __init__(self, channels=1, nf=16, dropout=0.1, temb=32):
        super().__init__()
        self.temb_dim = temb
        self.t0 = nn.Linear(temb, temb)
        self.t1 = nn.Linear(temb, temb)
        self.cin = nn.Conv2d(channels, nf, 3, padding=1)
        self.r0 = _ResBlock(nf, nf, temb, dropout)
        self.down = nn.Conv2d(nf, 2 * nf, 3, stride=2, padding=1)
        self.r1 = _ResBlock(2 * nf, 2 * nf, temb, dropout)
        self.attn = _Attn(2 * nf)
        self.up = nn.ConvTranspose2d(2 * nf, nf, 4, stride=2, padding=1)
        self.r2 = _ResBlock(2 * nf, nf, temb, dropout)
        self.nout = nn.GroupNorm(min(nf // 4, 32), nf, eps=1e-6)
        self.cout = nn.Conv2d(nf, channels, 3, padding=1)

    def forward(self, x, labels):
        temb = self.t1(F.silu(self.t0(_timestep_embedding(labels, self.temb_dim))))
        h0 = self.r0(self.cin(x), temb)
        h = self.attn(self.r1(self.down(h0), temb))
        h = self.r2(torch.cat([self.up(h), h0], 1), temb)
        return self.cout(F.silu(self.nout(h)))


class TinyMLP(nn.Module):
    """Flat-vector score net for small-D tests: ``forward(x (B,D), labels (B,))``."""

    def __init__(self, D, hidden=32, dropout=0.0):
        super().__init__()
        self.l0 = nn.Linear(D + 16, hidden)
        self.n0 = nn.GroupNorm(4, hidden)
        self.drop = nn.Dropout(dropout)
        self.l1 = nn.Linear(hidden, D)

    def forward(self, x, labels):
        h = self.l0(torch.cat([x, _timestep_embedding(labels, 16)], 1))
        return self.l1(self.drop(F.silu(self.n0(h))))
