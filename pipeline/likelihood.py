"""Log-likelihood and bits/dim through the probability-flow ODE (Song et al., ICLR 2021, App. D.2).

The probability-flow ODE dx/dt = f̃(x, t) = f(x, t) - ½ g(t)² s(x, t) transports p_eps to
p_T; along a solution, d log p_t(x_t)/dt = -∇·f̃(x_t, t). Integrating the augmented state
(x, Δ) with dΔ/dt = ∇·f̃ from t = eps to T gives

    log p_eps(x) = log p_T(z) + Δ(T) ≈ sde.prior_logp(z) + Δ(T),   z = x(T).

Divergence. ∇·f̃ = ∇·f - ½ g² ∇·s. The drift part ``sde.drift_divergence`` is exact (the
SDEs here have linear drifts); ∇·s is estimated with the Hutchinson–Skilling estimator
vᵀ (∂s/∂x) v (one vector–Jacobian product) with one probe v per sample, fixed for the
whole ODE solve (as score_sde), Rademacher or Gaussian, or computed exactly with D
vector–Jacobian products (``hutchinson="exact"``, for small D / tests). Since the
estimate is linear in the integrand, Δ(T) and hence log p are unbiased for a fixed ODE
path. (score_sde applies the estimator to all of f̃; taking ∇·f exactly removes the
variance the Gaussian probe adds through the drift and changes nothing else.)

The solver is ``pipeline.ode.odeint_adaptive`` (Dormand–Prince RK45, scipy's step control,
rtol = atol = 1e-5 as score_sde, the ODE state including Δ in the error norm). By default
each sample gets its own step size (``error_norm="per_sample"``), so a sample's result
does not depend on its batch mates, on the batch size or on how the data are split across
ranks; ``error_norm="global"`` is score_sde's single RMS over the flattened batch.

Bits per dimension (score_sde's convention)
-------------------------------------------
Data are integers k in {0, ..., L-1} (L = ``levels`` = 256 for 8-bit images), mapped to
[0, 1] as (k + u)/L with uniform dequantisation u ~ U[0, 1) (or k/(L-1) without), then
to model space by an affine map with scale c: c = 1 for [0, 1] data, c = 2 for centred
[-1, 1] data (``data.centered``). A density p on model space is a density p / c^D on
[0, 1]^D and p / (c L)^D on the integer grid scale, so for D data dimensions

    bpd = -log p_model(x) / (D ln 2) + offset,   offset = log2(L) - log2(c),

i.e. offset = 8 bits for [0, 255] data in [0, 1] and 7 bits for centred data in [-1, 1]
(score_sde: ``offset = 7 - inverse_scaler(-1)``). With uniform dequantisation this is an
upper bound on the discrete negative log-likelihood in bits/dim (Theis et al., 2016).
``bpd_offset(levels, scale)`` computes the offset; ``data_bpd_offset(centered)`` the one for
a ``DataConfig``; ``bits_per_dim(logp, D, offset_bits)`` the conversion.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch

from pipeline.config import EvalConfig, choices
from pipeline.ode import odeint_adaptive
from pipeline.sde import SDE, bcast

__all__ = ["log_likelihood", "bits_per_dim", "bpd_offset", "data_bpd_offset", "draw_probes"]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def bpd_offset(levels: int = 256, scale: float = 1.0) -> float:
    """offset = log2(levels) - log2(scale), scale = factor from [0, 1] to model space."""
    if levels < 2 or scale <= 0:
        raise ValueError(f"bpd_offset: need levels >= 2 and scale > 0, got {levels}, {scale}")
    return math.log2(levels) - math.log2(scale)


def data_bpd_offset(centered: bool, levels: int = 256) -> float:
    """8 bits for 8-bit data in [0, 1]; 7 bits for centred data in [-1, 1]."""
    return bpd_offset(levels, 2.0 if centered else 1.0)


def bits_per_dim(logp: torch.Tensor, D: int, offset_bits: float = 0.0) -> torch.Tensor:
    """bpd = -logp / (D ln 2) + offset_bits (logp in nats, per sample)."""
    return -logp / (D * math.log(2.0)) + offset_bits


def draw_probes(shape, n: int, kind: str = "rademacher", *, generator: Optional[torch.Generator] = None,
                device=None, dtype=torch.float32) -> torch.Tensor:
    """n independent Hutchinson probes of ``shape`` with E[v vᵀ] = I, stacked: (n, *shape).

    Rademacher (±1) or standard Gaussian; drawn on the generator's device (a CPU generator can
    feed a GPU run), then moved to ``device``. The one probe source of this project: the
    likelihood's ∇·s and the FPE residual's (pipeline.fpe) both draw here.
    """
    gdev = generator.device if generator is not None else device
    if kind == "rademacher":
        v = torch.randint(0, 2, (n, *shape), generator=generator, device=gdev).to(dtype) * 2 - 1
    elif kind == "gaussian":
        v = torch.randn((n, *shape), generator=generator, device=gdev, dtype=dtype)
    else:
        raise ValueError(f"unknown Hutchinson probe {kind!r} (rademacher, gaussian)")
    return v.to(device=device, dtype=dtype)


def log_likelihood(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, *,
                   hutchinson: str = EvalConfig.hutchinson, rtol: float = EvalConfig.rtol,
                   atol: float = EvalConfig.atol, eps: float = EvalConfig.likelihood_eps,
                   generator: Optional[torch.Generator] = None,
                   error_norm: Literal["per_sample", "global"] = "per_sample",
                   probe: Optional[torch.Tensor] = None,
                   callback: Optional[Callable[[torch.Tensor], None]] = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """log p_eps(x) in nats per sample through the probability-flow ODE.

    Returns (logp (B,), z = x(T), nfe), nfe = ODE right-hand-side evaluations (each one
    score evaluation plus one vector–Jacobian product; D of them with ``"exact"``).
    ``probe`` (shape of x) overrides the probe drawn from ``generator``. ``callback(t)`` is
    called with the integrator's times after every step (a progress bar).
    """
    if hutchinson not in choices(EvalConfig, "hutchinson"):
        raise ValueError(f"log_likelihood: unknown hutchinson {hutchinson!r} "
                         f"({', '.join(choices(EvalConfig, 'hutchinson'))})")
    B = x.shape[0]
    shape = x.shape
    D = x[0].numel()
    if hutchinson != "exact" and probe is None:
        probe = draw_probes(shape, 1, hutchinson, generator=generator, device=x.device, dtype=x.dtype)[0]

    def rhs(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xt = y[:, :D].reshape(shape).detach()
        with torch.enable_grad():
            xt.requires_grad_(True)
            s = score_fn(xt, t)
            if hutchinson == "exact":
                flat = s.reshape(B, -1)
                div_s = torch.zeros(B, device=x.device, dtype=y.dtype)
                for i in range(D):
                    gi = torch.autograd.grad(flat[:, i].sum(), xt, retain_graph=i < D - 1)[0]
                    div_s = div_s + gi.reshape(B, -1)[:, i]
            else:
                vjp = torch.autograd.grad((s * probe).sum(), xt)[0]
                div_s = (vjp * probe).reshape(B, -1).sum(1)
        s = s.detach()
        f, g = sde.sde(xt.detach(), t)
        g2 = g * g
        dx = f - 0.5 * bcast(g2, s) * s
        ddelta = sde.drift_divergence(xt.detach(), t) - 0.5 * g2 * div_s.detach()
        return torch.cat([dx.reshape(B, -1), ddelta.reshape(B, 1).to(y.dtype)], dim=1)

    y0 = torch.cat([x.detach().reshape(B, -1), torch.zeros(B, 1, device=x.device, dtype=x.dtype)], dim=1)
    with torch.no_grad():
        y1, nfe = odeint_adaptive(rhs, y0, eps, sde.T, rtol, atol, error_norm=error_norm, callback=callback)
    z = y1[:, :D].reshape(shape)
    delta = y1[:, D]
    logp = sde.prior_logp(z) + delta
    return logp, z, nfe
