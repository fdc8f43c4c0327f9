"""Adaptive Dormand–Prince RK45 integrator that runs entirely on the device of ``y0``.

Used by the probability-flow ODE sampler and the likelihood. It reproduces the step
control of ``scipy.integrate.solve_ivp(method="RK45")`` (which score_sde_pytorch calls on
the CPU, copying the state to and from the device at every function evaluation):

* Dormand–Prince 5(4) tableau with FSAL (6 new evaluations per step attempt),
* error norm: root mean square of ``err / (atol + rtol * max(|y|, |y_new|))``; a step is
  accepted when the norm is <= 1,
* new step ``h * clamp(0.9 * norm^(-1/5), 0.2, 10)``, no growth right after a rejection,
* scipy's initial step selection (Hairer, Nørsett & Wanner, 1 extra evaluation).

The state is a tensor ``y`` of shape (B, ...). Two error norms:

* ``error_norm="global"`` — one RMS over *all* elements of the batch, one step size for the
  whole batch: exactly what score_sde gets by flattening the batch into one scipy system.
* ``error_norm="per_sample"`` — one RMS and one step size/time per sample; every sample is
  integrated as if it were alone, so results do not depend on how data are split into
  batches or across ranks (up to floating-point reduction order in the network).

Device synchronisation: the time, step size, error norm, acceptance and termination
bookkeeping are all tensors on the device; no ``.item()`` is called inside a step. The one
unavoidable host read is the termination test ("has every sample reached t1?"), which
Python needs to decide whether to loop again. It is done once every ``check_every`` steps
(default 1, i.e. one sync per step of 6 function evaluations). With ``check_every > 1``
finished samples take zero-length steps (state unchanged) until the next check, trading
a few wasted evaluations for fewer syncs.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional

import torch

from pipeline.sde import bcast

__all__ = ["odeint_adaptive", "ODEMaxStepsError"]

# Dormand–Prince 5(4) tableau (scipy.integrate._ivp.rk.RK45)
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
# error estimate coefficients (5th minus embedded 4th order), last one multiplies f(t+h, y_new)
_E = (-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)
_SAFETY, _MIN_FACTOR, _MAX_FACTOR, _ORDER = 0.9, 0.2, 10.0, 4


class ODEMaxStepsError(RuntimeError):
    """The integrator exceeded ``max_steps`` step attempts."""


def odeint_adaptive(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    t0: float,
    t1: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    *,
    error_norm: Literal["global", "per_sample"] = "global",
    first_step: Optional[float] = None,
    max_steps: int = 10_000,
    check_every: int = 1,
    callback: Optional[Callable[[torch.Tensor], None]] = None,
) -> tuple[torch.Tensor, int]:
    """Integrate dy/dt = fn(t, y) from t0 to t1 (either direction); return (y(t1), nfe).

    ``fn(t, y)`` gets ``t`` of shape (B,) (dtype and device of ``y0``) and ``y`` of the
    shape of ``y0`` and returns a tensor of the same shape. ``nfe`` counts calls of ``fn``
    (each a batched evaluation). ``callback(t)`` (optional) is called after every host
    check with the per-sample times (for a progress bar). Raises ``ODEMaxStepsError``
    when more than ``max_steps`` step attempts are needed.
    """
    if y0.dim() == 0:
        raise ValueError("odeint_adaptive: y0 needs a batch dimension")
    if error_norm not in ("global", "per_sample"):
        raise ValueError(f"odeint_adaptive: unknown error_norm {error_norm!r}")
    B = y0.shape[0]
    dev, dt = y0.device, y0.dtype
    y = y0
    direction = 1.0 if t1 >= t0 else -1.0
    t = torch.full((B,), float(t0), device=dev, dtype=dt)
    t_end = torch.full((B,), float(t1), device=dev, dtype=dt)
    nfe = 0

    def rms(v: torch.Tensor) -> torch.Tensor:  # (B,) RMS over the chosen set of elements
        sq = v.reshape(B, -1).pow(2)
        if error_norm == "per_sample":
            return sq.mean(1).sqrt()
        return sq.mean().sqrt().expand(B)

    def scale_of(a: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = a.abs() if b is None else torch.maximum(a.abs(), b.abs())
        return atol + rtol * m

    f = fn(t, y)
    nfe += 1
    if f.shape != y.shape:
        raise ValueError(f"odeint_adaptive: fn returned shape {tuple(f.shape)}, expected {tuple(y.shape)}")
    span = abs(float(t1) - float(t0))
    if span == 0.0:
        return y, nfe

    # ---- initial step (scipy.integrate._ivp.common.select_initial_step), all on device
    if first_step is not None:
        h = torch.full((B,), float(first_step), device=dev, dtype=dt)
    else:
        sc = scale_of(y)
        d0, d1 = rms(y / sc), rms(f / sc)
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
        h0 = torch.clamp(h0, max=span)
        y_try = y + direction * bcast(h0, y) * f
        f_try = fn(t + direction * h0, y_try)
        nfe += 1
        d2 = rms((f_try - f) / sc) / h0
        dmax = torch.maximum(d1, d2)
        h1 = torch.where(dmax <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6),
                         (0.01 / dmax.clamp_min(1e-300)) ** (1.0 / (_ORDER + 1)))
        h = torch.minimum(100 * h0, h1)
    h = torch.clamp(h, max=span)
    rejected_before = torch.zeros(B, dtype=torch.bool, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    steps = 0
    while True:
        for _ in range(check_every):
            # step, clamped so as not to pass t1; finished samples take zero-length steps
            remaining = (t_end - t) * direction
            last = h >= remaining
            h_use = torch.where(last, remaining, h)
            h_use = torch.where(done, torch.zeros_like(h_use), h_use)
            hs = direction * h_use
            hb = bcast(hs, y)
            K = [f]
            for s in range(1, 6):
                dy = sum(a * k for a, k in zip(_A[s], K) if a != 0.0)
                K.append(fn(t + _C[s] * hs, y + hb * dy))
            y_new = y + hb * sum(b * k for b, k in zip(_B, K) if b != 0.0)
            t_new = torch.where(last, t_end, t + hs)
            f_new = fn(t_new, y_new)
            K.append(f_new)
            nfe += 6
            err = hb * sum(e * k for e, k in zip(_E, K) if e != 0.0)
            norm = rms(err / scale_of(y, y_new))
            accept = (norm <= 1.0) | done
            factor = torch.where(norm == 0, torch.full_like(norm, _MAX_FACTOR),
                                 _SAFETY * norm.clamp_min(1e-300) ** (-1.0 / (_ORDER + 1)))
            grow = torch.clamp(factor, _MIN_FACTOR, _MAX_FACTOR)
            grow = torch.where(rejected_before, torch.clamp(grow, max=1.0), grow)
            shrink = torch.clamp(factor, min=_MIN_FACTOR)
            h_next = torch.where(accept, h_use * grow, h_use * shrink)
            # a finished sample keeps its (unused) step size
            h = torch.where(done, h, torch.where(h_next > 0, h_next, h))
            a = bcast(accept, y)
            y = torch.where(a, y_new, y)
            f = torch.where(a, f_new, f)
            t = torch.where(accept, t_new, t)
            rejected_before = ~accept
            done = done | (accept & last)
            steps += 1
        # the one host synchronisation: termination
        finished = bool(done.all())
        if callback is not None:
            callback(t)
        if finished:
            return y, nfe
        if steps >= max_steps:
            raise ODEMaxStepsError(
                f"odeint_adaptive: no convergence after {steps} step attempts "
                f"(rtol={rtol}, atol={atol}); t reached {t.min().item():.3g}..{t.max().item():.3g}")
