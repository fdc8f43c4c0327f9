"""Samplers over a score function ``score_fn(x, t) -> s(x, t)`` (t of shape (B,)).

* ``pc_sample``: predictor-corrector sampling (Song et al., ICLR 2021, Alg. 1–3).
* ``ode_sample``: the probability-flow ODE dx/dt = f - ½ g² s, integrated from T to eps
  with the adaptive Dormand–Prince solver of ``pipeline.ode`` on the samples' device.
* ``sample``: dispatch from a ``SamplingConfig``.

All return ``(x, nfe)``: samples in model space and the number of score evaluations per
sample trajectory (each a batched call of ``score_fn``).

Time grid. The PC samplers visit t_0 = T > t_1 > ... > t_{K-1} = eps (``linspace``, K =
``num_steps``, default ``sde.N``) and the predictor at t_i moves to t_{i+1}, with t_K = 0.
The predictors use the step actually taken (t_i -> t_{i+1}), not a fixed 1/N, so any
``num_steps`` is consistent; with K = N they match score_sde_pytorch's discretisations:

* ``reverse_diffusion``: x <- x - f + G² s + G z with the forward discretisation (f, G)
  of the step: VE (SMLD) G² = σ(t_i)² - σ(t_{i+1})² (σ taken 0 at t_K = 0, so the last
  step is Tweedie's x + σ² s); VP (DDPM) β = 1 - (a(t_i)/a(t_{i+1}))², f = (√(1-β) - 1) x,
  G = √β; sub-VP: Euler f Δt, g √Δt.
* ``euler_maruyama``: x <- x - (f - g² s) Δt + g √Δt z, Δt = t_i - t_{i+1}.
* ``ancestral`` (VP, VE only; sub-VP raises): DDPM x <- (x + β s)/√(1-β) + √β z; SMLD
  x <- x + (σ_i² - σ_{i+1}²) s + √(σ_{i+1}² (σ_i² - σ_{i+1}²) / σ_i²) z.

Correctors (``n_steps_each`` steps at every t_i, before the predictor):

* ``langevin``: ε = 2 α (snr ‖z‖ / ‖s‖)² with norms averaged over the batch (as
  score_sde); x <- x + ε s + √(2ε) z.
* ``ald`` (annealed Langevin dynamics): ε = 2 α (snr σ(t))² per sample.

α is DDPM's 1 - β of the step for VP (score_sde's ``alphas[timestep]``) and 1 for VE and
for sub-VP. score_sde indexes the VP ``alphas`` table for sub-VP too, which does not
exist there (it crashes); α only rescales the step size (it is 1 - O(1/N)), and the
sub-VP SDE has no DDPM chain to take it from, so it is 1.

Noise removal (``noise_removal=True``): the last predictor step (t_{K-1} = eps -> 0) is
taken without noise, from the current x (after the last corrector). With
``predictor="none"`` a final Tweedie step x <- (x + σ(eps)² s(x, eps)) / a(eps) is taken
from the current x instead (one more score evaluation). The ODE sampler ends with a
noise-free reverse-diffusion step from eps to 0 (one more evaluation), as score_sde.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from pipeline.config import SamplingConfig, choices
from pipeline.ode import odeint_adaptive
from pipeline.score import batch_sizes
from pipeline.sde import SDE, bcast

__all__ = ["pc_sample", "ode_sample", "sample", "default_eps", "PREDICTORS", "CORRECTORS",
           "probability_flow_drift"]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PREDICTORS = choices(SamplingConfig, "predictor")
CORRECTORS = choices(SamplingConfig, "corrector")


def default_eps(sde: SDE) -> float:
    """Smallest sampling time of score_sde: 1e-5 for VE, 1e-3 for VP / sub-VP."""
    return sde.default_eps


# --------------------------------------------------------------------------- predictors
def _noise(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)


def _reverse_diffusion(score_fn, sde, x, t, t_next, generator, add_noise):
    s = score_fn(x, t)
    f, G2 = sde.discretize(x, t, t_next)  # the SDE's own step (DDPM / SMLD / Euler)
    x_mean = x - f + bcast(G2, x) * s
    if not add_noise:
        return x_mean
    return x_mean + bcast(torch.sqrt(G2), x) * _noise(x, generator)


def _euler_maruyama(score_fn, sde, x, t, t_next, generator, add_noise):
    dt = t - t_next  # > 0; reverse time
    f, g = sde.sde(x, t)
    drift = f - bcast(g * g, x) * score_fn(x, t)
    x_mean = x - drift * bcast(dt, x)
    if not add_noise:
        return x_mean
    return x_mean + bcast(g * torch.sqrt(dt), x) * _noise(x, generator)


def _ancestral(score_fn, sde, x, t, t_next, generator, add_noise):
    x_mean, std = sde.ancestral_step(x, score_fn(x, t), t, t_next)
    if not add_noise:
        return x_mean
    return x_mean + bcast(std, x) * _noise(x, generator)


_PREDICTOR_FNS = {"reverse_diffusion": _reverse_diffusion, "euler_maruyama": _euler_maruyama,
                  "ancestral": _ancestral}


# --------------------------------------------------------------------------- correctors
def _langevin(score_fn, sde, x, t, t_next, generator, snr, n_steps):
    alpha = sde.langevin_alpha(t, t_next)
    B = x.shape[0]
    for _ in range(n_steps):
        grad = score_fn(x, t)
        z = _noise(x, generator)
        grad_norm = torch.linalg.vector_norm(grad.reshape(B, -1), dim=-1).mean()
        noise_norm = torch.linalg.vector_norm(z.reshape(B, -1), dim=-1).mean()
        step = 2.0 * alpha * (snr * noise_norm / grad_norm) ** 2
        x = x + bcast(step, x) * grad + bcast(torch.sqrt(2.0 * step), x) * z
    return x


def _ald(score_fn, sde, x, t, t_next, generator, snr, n_steps):
    alpha = sde.langevin_alpha(t, t_next)
    step = 2.0 * alpha * (snr * sde.marginal_std(t)) ** 2
    for _ in range(n_steps):
        grad = score_fn(x, t)
        z = _noise(x, generator)
        x = x + bcast(step, x) * grad + bcast(torch.sqrt(2.0 * step), x) * z
    return x


_CORRECTOR_FNS = {"langevin": _langevin, "ald": _ald}


# --------------------------------------------------------------------------- samplers
def _prior(sde, shape, device, dtype, generator, x_init):
    if x_init is not None:
        return x_init.to(device=device if device is not None else x_init.device, dtype=dtype)
    return sde.prior_sampling(tuple(shape), device=device, dtype=dtype, generator=generator)


@torch.no_grad()
def pc_sample(score_fn: ScoreFn, sde: SDE, shape, *, predictor: str = SamplingConfig.predictor,
              corrector: str = SamplingConfig.corrector, snr: float = SamplingConfig.snr,
              n_steps_each: int = SamplingConfig.n_steps_each, num_steps: Optional[int] = None,
              eps: Optional[float] = None, noise_removal: bool = SamplingConfig.noise_removal,
              device=None, dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None,
              progress: bool = False, x_init: Optional[torch.Tensor] = None,
              constraint: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
              ) -> tuple[torch.Tensor, int]:
    """Predictor-corrector sampling from the prior at T down to eps; returns (x, nfe).

    nfe = K·(predictor != none) + K·n_steps_each·(corrector != none) + 1 if a final Tweedie
    step is taken (predictor none with noise_removal). ``x_init`` replaces the prior draw.
    ``constraint(x, t)`` is applied to the prior draw (at T) and after every corrector (at t_i)
    and predictor (at t_{i+1}, 0 after the last) update: e.g. inpainting's replacement of the
    known pixels (``pipeline.controllable``).
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"pc_sample: unknown predictor {predictor!r} (choose from {PREDICTORS})")
    if corrector not in CORRECTORS:
        raise ValueError(f"pc_sample: unknown corrector {corrector!r} (choose from {CORRECTORS})")
    if predictor == "none" and corrector == "none":
        raise ValueError("pc_sample: predictor and corrector cannot both be 'none'")
    if predictor == "ancestral" and not sde.has_ancestral:
        raise ValueError(f"pc_sample: ancestral sampling is defined for the VP and VE SDEs only, not "
                         f"{type(sde).__name__}; use predictor 'reverse_diffusion' or 'euler_maruyama'")
    K = int(num_steps) if num_steps else sde.N
    if K < 1:
        raise ValueError(f"pc_sample: num_steps must be >= 1, got {num_steps}")
    eps = default_eps(sde) if eps is None else float(eps)
    x = _prior(sde, shape, device, dtype, generator, x_init)
    B = x.shape[0]
    project = constraint or (lambda y, _t: y)
    x = project(x, torch.full((B,), sde.T, device=x.device, dtype=x.dtype))
    # the time grid lives on the samples' device (t_K = 0 closes the last step)
    grid = torch.cat([torch.linspace(sde.T, eps, K, device=x.device, dtype=x.dtype),
                      torch.zeros(1, device=x.device, dtype=x.dtype)])
    pred = _PREDICTOR_FNS.get(predictor)
    corr = _CORRECTOR_FNS.get(corrector)
    nfe = 0
    steps = range(K)
    if progress:
        steps = tqdm(steps, desc=f"sampling pc/{predictor}/{corrector}", dynamic_ncols=True, leave=False)
    for i in steps:
        t = grid[i].expand(B)
        t_next = grid[i + 1].expand(B)
        if corr is not None:
            x = project(corr(score_fn, sde, x, t, t_next, generator, snr, n_steps_each), t)
            nfe += n_steps_each
        if pred is not None:
            last = i == K - 1
            x = pred(score_fn, sde, x, t, t_next, generator, add_noise=not (last and noise_removal))
            x = project(x, t_next)
            nfe += 1
    if pred is None and noise_removal:
        t = grid[K - 1].expand(B)
        a, std = sde.mean_coeff(t), sde.marginal_std(t)
        x = (x + bcast(std * std, x) * score_fn(x, t)) / bcast(a, x)
        x = project(x, torch.zeros_like(t))
        nfe += 1
    return x, nfe


def probability_flow_drift(score_fn: ScoreFn, sde: SDE) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(x, t) -> f(x, t) - ½ g(t)² s(x, t)."""

    def drift(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        f, g = sde.sde(x, t)
        return f - 0.5 * bcast(g * g, x) * score_fn(x, t)

    return drift


@torch.no_grad()
def ode_sample(score_fn: ScoreFn, sde: SDE, shape, *, rtol: float = SamplingConfig.rtol,
               atol: float = SamplingConfig.atol, eps: Optional[float] = None, device=None,
               dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None,
               noise_removal: bool = SamplingConfig.noise_removal,
               error_norm: str = "global", progress: bool = False,
               x_init: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, int]:
    """Probability-flow ODE sampling from T to eps with adaptive RK45; returns (x, nfe).

    ``error_norm="global"`` (default) is score_sde's (one RMS over the whole batch);
    ``"per_sample"`` makes every sample independent of its batch mates.
    """
    eps = default_eps(sde) if eps is None else float(eps)
    x = _prior(sde, shape, device, dtype, generator, x_init)
    drift = probability_flow_drift(score_fn, sde)
    callback = None
    bar = None
    if progress:
        # the bar runs over the time still to integrate, T down to eps: its ETA assumes steps even in t
        bar = tqdm(total=round(sde.T - eps, 6), desc=f"sampling ode, {shape[0]} samples", dynamic_ncols=True,
                   leave=False, bar_format="{l_bar}{bar}| t={postfix} [{elapsed}<{remaining}]")

        def callback(t: torch.Tensor) -> None:
            tmax = float(t.max())
            bar.n = round(sde.T - tmax, 6)
            bar.set_postfix_str(f"{tmax:.4f}")

    try:
        x, nfe = odeint_adaptive(lambda t, y: drift(y, t), x, sde.T, eps, rtol, atol,
                                 error_norm=error_norm, callback=callback)
    finally:
        if bar is not None:
            bar.close()
    if noise_removal:
        B = x.shape[0]
        t = torch.full((B,), eps, device=x.device, dtype=x.dtype)
        x = _reverse_diffusion(score_fn, sde, x, t, torch.zeros_like(t), generator, add_noise=False)
        nfe += 1
    return x, nfe


def sample(cfg, eps: Optional[float], score_fn: ScoreFn, sde: SDE, shape, *, device=None,
           dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None,
           progress: bool = False) -> tuple[torch.Tensor, int]:
    """Sample ``shape`` with the sampler a ``SamplingConfig`` describes, in batches of at most
    ``cfg.batch_size``; returns (x, nfe) with nfe per sample trajectory (for the ODE sampler
    the mean over batches, rounded)."""
    outs, nfes = [], []
    for size in batch_sizes(shape[0], cfg.batch_size):
        sub = (size,) + tuple(shape[1:])
        if cfg.method == "pc":
            x, nfe = pc_sample(score_fn, sde, sub, predictor=cfg.predictor, corrector=cfg.corrector,
                               snr=cfg.snr, n_steps_each=cfg.n_steps_each, num_steps=cfg.num_steps or None,
                               eps=eps, noise_removal=cfg.noise_removal, device=device, dtype=dtype,
                               generator=generator, progress=progress)
        elif cfg.method == "ode":
            x, nfe = ode_sample(score_fn, sde, sub, rtol=cfg.rtol, atol=cfg.atol, eps=eps, device=device,
                                dtype=dtype, generator=generator, noise_removal=cfg.noise_removal,
                                progress=progress)
        else:
            raise ValueError(f"sampling.method: unknown method {cfg.method!r}")
        outs.append(x)
        nfes.append(nfe)
    return torch.cat(outs), round(sum(nfes) / len(nfes))
