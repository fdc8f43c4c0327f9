"""The score Fokker-Planck residual and the FP-Diffusion regularizer (Lai et al., ICML 2023).

For dx = f(x,t) dt + g(t) dw with marginals p_t, the score s = ∇x log p_t satisfies

    ∂t s(x,t) = ∇x [ (g(t)²/2)(∇x·s + ‖s‖²) − ⟨f(x,t), s⟩ − ∇x·f(x,t) ]          (score FPE)

The residual of a learned score is r = ∂t s_θ − ∇x φ with
    φ(x,t) = (g²/2)(∇x·s_θ + ‖s_θ‖²) − ⟨f, s_θ⟩ − ∇x·f                           (φ, RHS potential)
For VE f = 0; for VP / sub-VP f = −½β(t)x, so −⟨f,s⟩ = ½β⟨x,s⟩ and ∇x·f = −½βD is constant in x.
Sub-VP has g² = β(1 − e^{−2∫β}) ≠ β: the drift term keeps β, only the first term uses g²; both
come from ``sde.drift`` / ``sde.diffusion``, so every SDE of ``pipeline.sde`` is handled alike.

The regularizer adds, on points x_t and times t,
    L_FP = α · E_t[ λ(t) ‖r(x_t,t)‖₂^m ] / D^m,     λ ∈ {1, g, g²}                 (L_FP)
estimated on a subsample of k of the B samples of a step; the mean over the k samples keeps
its expectation independent of k.

Estimators (all configurable, see ``FPEConfig``):
  ∂t s      "jvp" (exact forward-mode AD in t, also yields s in the same pass: one dropout mask)
            "fd3" (one-sided 3-point stencil (3s(t) − 4s(t−h) + s(t−2h))/2h, switched to the
            forward stencil where t < 4h), "central" (step min(h, t/2)). No time below 0 is
            ever evaluated; the reference's non-uniform stencil (t + h/2, t, t − h) evaluates
            t − h < 0 for t < h, where the VP/sub-VP std is NaN.
  ∇x·s      "exact" (D vector-Jacobian products; small D) or Hutchinson vᵀ(∂s/∂x)v with
            Rademacher or Gaussian probes.
  ∇x φ      one reverse pass through the graph of (s, Jᵀv): ∇x of the scalar
            ψ_v = (g²/2)(⟨Jᵀv, v⟩ + ‖s‖²) − ⟨f, s⟩, unbiased for ∇x φ.
  ‖r‖²      "unbiased": ⟨r̂₁, r̂₂⟩ of residual estimates with independent probes sharing s, ∂t s
            and the forward graph (E = ‖r‖²; U-statistic over pairs for n ≥ 2 probes);
            "single": ‖r̂‖² of one probe (biased upward by the probe variance, as the reference).
  ∇θ‖r‖²    ``probe_gradient`` "first" (default): through r̂₁ only, scaled by K (unbiased, one
            probe's parameter backward); "all": the exact gradient of the U-statistic.
Equations are labelled by name ((score FPE), (φ), (L_FP)) as in issue 3; the paper's own
equation numbers were not checked here.
Dropout: every pass of one residual sees one mask. With jvp there is one forward; the finite
differences replay the RNG state of the first forward for their extra forwards.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .score import get_score_fn
from .sde import SDE, _bcast

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- helpers
def _flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product, (B, ...) x (B, ...) -> (B,)."""
    return (a * b).flatten(1).sum(1)


def draw_probes(shape, n: int, kind: str = "rademacher", *, generator=None, device=None,
                dtype=torch.float32) -> torch.Tensor:
    """n independent Hutchinson probes of ``shape`` with E[v vᵀ] = I; returns (n, *shape)."""
    gdev = generator.device if generator is not None else device
    if kind == "rademacher":
        v = torch.randint(0, 2, (n, *shape), generator=generator, device=gdev).to(dtype) * 2 - 1
    elif kind == "gaussian":
        v = torch.randn((n, *shape), generator=generator, device=gdev, dtype=dtype)
    else:
        raise ValueError(f"fpe.probe: unknown probe {kind!r}")
    return v.to(device=device, dtype=dtype)


class _RNGReplay:
    """Replays the RNG state of the first pass so that every pass draws the same dropout mask."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def replay(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _fd_step(t: torch.Tensor, h: float, method: str):
    """Per-sample step and direction; never evaluates a time below 0."""
    if method == "central":
        return torch.minimum(torch.full_like(t, h), 0.5 * t), None
    # one-sided 3-point: the reference's backward stencil, forward where t < 4h
    direction = torch.where(t >= 4 * h, -torch.ones_like(t), torch.ones_like(t))
    return torch.full_like(t, h), direction


def score_and_dt(score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, *, dt_method: str = "jvp",
                 fd_step: float = 1e-3):
    """(s(x,t), ∂t s(x,t)), both differentiable in x and in the parameters; one dropout mask."""
    if dt_method == "jvp":
        # exact: one forward pass with a dual time, tangent 1 (forward-mode AD in t)
        with torch.autograd.forward_ad.dual_level():
            t_dual = torch.autograd.forward_ad.make_dual(t, torch.ones_like(t))
            out = torch.autograd.forward_ad.unpack_dual(score_fn(x, t_dual))
        return out.primal, out.tangent
    if dt_method not in ("fd3", "central"):
        raise ValueError(f"fpe.dt_method: unknown method {dt_method!r}")
    rng = _RNGReplay(x.device)
    s = score_fn(x, t)
    h, direction = _fd_step(t, fd_step, dt_method)
    hb = _bcast(h, x)
    rng_after = _RNGReplay(x.device)
    if dt_method == "central":
        rng.replay()
        s_p = score_fn(x, t + h)
        rng.replay()
        s_m = score_fn(x, t - h)
        dsdt = (s_p - s_m) / (2 * hb)
    else:
        # ∂t s ≈ −d(3 s(t) − 4 s(t + d h) + s(t + 2 d h)) / (2h), d = ±1            (3-point stencil)
        rng.replay()
        s_1 = score_fn(x, t + direction * h)
        rng.replay()
        s_2 = score_fn(x, t + 2 * direction * h)
        dsdt = -_bcast(direction, x) * (3 * s - 4 * s_1 + s_2) / (2 * hb)
    rng_after.replay()  # leave the global RNG as after one forward
    return s, dsdt


def _phi_terms(sde: SDE, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor):
    """The probe-free part of φ: (g²/2)‖s‖² − ⟨f, s⟩ − ∇·f, and g²/2 (B,)."""
    g2_half = 0.5 * sde.diffusion(t) ** 2
    f = sde.drift(x, t)
    return g2_half * s.flatten(1).pow(2).sum(1) - _flat_dot(f, s) - sde.drift_divergence(x, t), g2_half


def residual_estimates(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: torch.Tensor, *,
                       dt_method: str = "jvp", fd_step: float = 1e-3, div_method: str = "hutchinson",
                       probe: str = "rademacher", n_probes: int = 1, probes: Optional[torch.Tensor] = None,
                       generator=None, create_graph: bool = True, fused: bool = False,
                       graph_probes: str = "all", stage: Optional[Callable[[str], None]] = None) -> torch.Tensor:
    """Independent residual estimates r̂_k = ∂t s − ∇x φ̂_{v_k}, stacked: (K, *x.shape).

    They share s, ∂t s and the forward graph; only the Hutchinson probe differs. With
    ``div_method="exact"`` K = 1 and the result is the exact residual.
    ``graph_probes="first"``: only r̂_1 keeps a graph to the parameters; r̂_2.. are computed
    without one (values only; see ``probe_gradient_surrogate``). ``stage(name)`` is called after
    each stage (benchmark timing).
    """
    if graph_probes not in ("all", "first"):
        raise ValueError(f"fpe.probe_gradient: unknown choice {graph_probes!r}")
    kw = dict(dt_method=dt_method, fd_step=fd_step, div_method=div_method, probe=probe, n_probes=n_probes,
              probes=probes, generator=generator, create_graph=create_graph, graph_probes=graph_probes,
              stage=stage or (lambda name: None))
    from .fused import fused_ops, plain_ops
    # plain: SDPA as matmuls + a composite softmax (the built-in one fails reverse-over-forward);
    # fused: the custom Functions of pipeline/fused.py
    with (fused_ops() if fused else plain_ops()):
        return _residual_estimates_loop(score_fn, sde, x, t, **kw)


def _residual_estimates_loop(score_fn, sde, x, t, *, dt_method, fd_step, div_method, probe, n_probes,
                             probes, generator, create_graph, graph_probes, stage):
    x = x.detach().requires_grad_(True)
    t = t.detach()
    s, dsdt = score_and_dt(score_fn, x, t, dt_method=dt_method, fd_step=fd_step)   # LHS of score FPE
    stage("forward_jvp")
    base, g2_half = _phi_terms(sde, x, t, s)
    if div_method == "exact":
        # ∇·s = Σ_i ∂s_i/∂x_i with D vector-Jacobian products (tests, small D)
        D = x[0].numel()
        div = torch.zeros_like(t)
        for i in range(D):
            e = torch.zeros_like(x).flatten(1)
            e[:, i] = 1
            e = e.view_as(x)
            (col,) = torch.autograd.grad(s, x, e, create_graph=True)
            div = div + col.flatten(1)[:, i]
        psi = g2_half * div + base                                                     # φ (score FPE)
        (grad_phi,) = torch.autograd.grad(psi.sum(), x, create_graph=create_graph)
        r = dsdt - grad_phi
        return r.unsqueeze(0) if create_graph else r.detach().unsqueeze(0)
    if div_method != "hutchinson":
        raise ValueError(f"fpe.div_method: unknown method {div_method!r}")
    if probes is None:
        probes = draw_probes(x.shape, n_probes, probe, generator=generator, device=x.device, dtype=x.dtype)
    out = []
    for k, v in enumerate(probes):
        last = k == len(probes) - 1
        keep = create_graph and (k == 0 or graph_probes == "all")  # this estimate reaches θ
        (u,) = torch.autograd.grad(s, x, v, create_graph=True)                        # Jᵀv
        psi = g2_half * _flat_dot(u, v) + base                                         # φ̂_v
        stage("vjp")
        # the shared forward graph must survive for the later probes and the final backward
        (grad_phi,) = torch.autograd.grad(psi.sum(), x, create_graph=keep,
                                          retain_graph=create_graph or not last)
        stage("double_backward")
        r = dsdt - grad_phi
        out.append(r if keep else r.detach())
    return torch.stack(out)


def score_fpe_residual(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: torch.Tensor, *,
                       dt_method: str = "jvp", fd_step: float = 1e-3, div_method: str = "hutchinson",
                       probe: str = "rademacher", n_probes: int = 1, generator=None,
                       create_graph: bool = True, probes: Optional[torch.Tensor] = None,
                       fused: bool = False) -> torch.Tensor:
    """r(x,t) = ∂t s − ∇x[(g²/2)(∇·s + ‖s‖²) − ⟨f,s⟩ − ∇·f]  (score FPE), same shape as x.

    With Hutchinson and n_probes > 1 the divergence is averaged over the probes.
    """
    rs = residual_estimates(score_fn, sde, x, t, dt_method=dt_method, fd_step=fd_step,
                            div_method=div_method, probe=probe, n_probes=n_probes, probes=probes,
                            generator=generator, create_graph=create_graph, fused=fused)
    return rs.mean(0)


def squared_norm_estimate(rs: torch.Tensor, estimator: str = "unbiased") -> torch.Tensor:
    """Per-sample estimate of ‖r‖² from K residual estimates (K, B, ...) -> (B,).

    "unbiased": mean over pairs i<j of ⟨r̂_i, r̂_j⟩ (needs K ≥ 2; may be negative);
    "single": ‖mean_k r̂_k‖² (biased upward by the probe variance).
    """
    if estimator == "single" or rs.shape[0] == 1:
        if estimator == "unbiased":
            raise ValueError("fpe.norm_estimator: 'unbiased' needs at least 2 probes")
        return rs.mean(0).flatten(1).pow(2).sum(1)
    if estimator != "unbiased":
        raise ValueError(f"fpe.norm_estimator: unknown estimator {estimator!r}")
    K = rs.shape[0]
    flat = rs.flatten(2)
    total = flat.sum(0)
    # Σ_{i≠j} ⟨r_i, r_j⟩ = ‖Σ r_i‖² − Σ ‖r_i‖²
    off = total.pow(2).sum(1) - flat.pow(2).sum((0, 2))
    return off / (K * (K - 1))


def probe_gradient_surrogate(sq: torch.Tensor, n_probes: int) -> torch.Tensor:
    """Value ``sq``, parameter gradient K·∇sq: the unbiased gradient when only r̂_1 has a graph.

    With independent probes, E[∇θ⟨r̂_i, r̂_j⟩] = 2 E[(∂r̂_i/∂θ)ᵀ] E[r̂_j] = 2 (∂r/∂θ)ᵀ r = ∇θ‖r‖²
    (the pair is exchangeable), so the U-statistic's gradient through r̂_1 alone, which is
    (2/K)(∂r̂_1/∂θ)ᵀ mean_{j>1} r̂_j, is unbiased once scaled by K. The parameter backward then
    runs through one probe's triple graph instead of K (the dominant cost, benchmarks/RESULTS.md).
    """
    return n_probes * sq - (n_probes - 1) * sq.detach()


def time_weight(sde: SDE, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """λ(t) of L_FP: 1, g(t) or g(t)²."""
    if weighting == "constant":
        return torch.ones_like(t)
    g = sde.diffusion(t)
    if weighting == "convention":
        return g
    if weighting == "likelihood":
        return g * g
    raise ValueError(f"fpe.weighting: unknown weighting {weighting!r}")


def reference_scalar_term(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: torch.Tensor, *,
                          probe: str = "gaussian", generator=None) -> torch.Tensor:
    """Reference-compatible "scalar" residual q = (g²/2)(∇·s + ‖s‖² + ⟨x,s⟩) per sample (B,).

    This is NOT zero at the true score (it drops ∂t log p_t and ∇·f; for VP its mean there is
    −βD/2): offered only for compatibility with sony/fp-diffusion, off by default.
    """
    x = x.detach().requires_grad_(True)
    s = score_fn(x, t)
    v = draw_probes(x.shape, 1, probe, generator=generator, device=x.device, dtype=x.dtype)[0]
    (u,) = torch.autograd.grad(s, x, v, create_graph=True)
    div = _flat_dot(u, v)
    g2_half = 0.5 * sde.diffusion(t) ** 2
    return g2_half * (div + s.flatten(1).pow(2).sum(1) + _flat_dot(x, s))


# --------------------------------------------------------------------------- regularizer
@dataclass
class FPEOutput:
    loss: torch.Tensor  # scalar, already × alpha; ordinary .backward() gives parameter gradients
    residual_norm: torch.Tensor  # (k,) detached: sqrt(max(‖r‖² estimate, 0)) / D
    t: torch.Tensor  # (k,)
    indices: torch.Tensor  # (k,) indices into the batch
    sq_norm: Optional[torch.Tensor] = None  # (k,) detached ‖r‖²/D² estimates (may be < 0 if unbiased)


def subsample_size(subsample, B: int) -> int:
    """k from ``fpe.subsample``: an int count (capped at B) or a float fraction of B (≥ 1)."""
    if isinstance(subsample, bool):
        raise ValueError("fpe.subsample: must be a count or a fraction")
    if isinstance(subsample, int):
        return max(1, min(subsample, B))
    return max(1, min(B, int(round(float(subsample) * B))))


def _rand(shape, generator, device, dtype=torch.float32, normal=False):
    gdev = generator.device if generator is not None else device
    fn = torch.randn if normal else torch.rand
    return fn(shape, generator=generator, device=gdev, dtype=dtype).to(device)


def _fp32_at_least(dtype):
    """fp32 for half / bf16 / fp32 inputs; float64 stays float64 (tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def fpe_precision(device: torch.device):
    """fp32, autocast off, math attention kernel (forward AD and double backward need it)."""
    with torch.autocast(device_type=device.type, enabled=False), sdpa_kernel([SDPBackend.MATH]):
        yield


def select_points(cfg, sde: SDE, x0: torch.Tensor, xt: Optional[torch.Tensor], t: Optional[torch.Tensor],
                  idx: torch.Tensor, generator=None):
    """Points and times of the residual for the subsampled indices (``fpe.points``).

    perturbed: the DSM step's x_t and t; samples whose t lies outside [t_min, t_max] (or when
    none is given) are re-perturbed from x0 at t ~ U[t_min, t_max]. clean: x0 at t ~ U.
    uniform: uniform in the bounding box of the clean batch at t ~ U (the reference's 'random').
    """
    dt = _fp32_at_least(x0.dtype)
    x0s = x0[idx].detach().to(dt)
    k = x0s.shape[0]
    t_new = cfg.t_min + (cfg.t_max - cfg.t_min) * _rand((k,), generator, x0.device, dt)
    if cfg.points == "perturbed":
        if xt is not None and t is not None:
            ts = t[idx].detach().to(dt)
            xs = xt[idx].detach().to(dt)
            bad = (ts < cfg.t_min) | (ts > cfg.t_max)
        else:
            ts, xs, bad = t_new, x0s, torch.ones(k, dtype=torch.bool, device=x0.device)
        if bool(bad.any()):
            z = _rand(x0s.shape, generator, x0.device, dt, normal=True)
            mean, std = sde.marginal_prob(x0s, t_new)
            fresh = mean + _bcast(std, x0s) * z
            ts = torch.where(bad, t_new, ts)
            xs = torch.where(_bcast(bad, xs), fresh, xs)
        return xs, ts
    if cfg.points == "clean":
        return x0s, t_new
    if cfg.points == "uniform":
        lo, hi = x0s.min(), x0s.max()
        return lo + (hi - lo) * _rand(x0s.shape, generator, x0.device, dt), t_new
    raise ValueError(f"fpe.points: unknown choice {cfg.points!r}")


class FPERegularizer:
    """α · mean_k[ λ(t) (‖r‖²)^{m/2} ] / D^m on a subsample of k of the B samples (L_FP).

    ``__call__(model, x0, xt, t, step=, generator=)`` with the RAW module (not a DDP /
    DeepSpeed / compiled wrapper). Returns ``None`` on steps skipped by ``every``.
    """

    def __init__(self, cfg, sde: SDE):
        self.cfg = cfg
        self.sde = sde

    def n_probes(self) -> int:
        c = self.cfg
        if c.div_method == "exact":
            return 1
        need = 2 if c.norm_estimator == "unbiased" else 1
        return max(int(getattr(c, "n_probes", need)), need)

    def __call__(self, model, x0, xt=None, t=None, *, step: int = 0, generator=None) -> Optional[FPEOutput]:
        c = self.cfg
        if not c.enabled or step % c.every:
            return None
        B = x0.shape[0]
        k = subsample_size(c.subsample, B)
        gdev = generator.device if generator is not None else x0.device
        idx = torch.randperm(B, generator=generator, device=gdev)[:k].to(x0.device)
        with fpe_precision(x0.device):
            xs, ts = select_points(c, self.sde, x0, xt, t, idx, generator)
            score_fn = get_score_fn(model, self.sde)
            D = xs[0].numel()
            K = self.n_probes()
            est = "single" if c.div_method == "exact" else c.norm_estimator
            # the one-sided gradient is unbiased only for the pair estimator
            first_only = c.probe_gradient == "first" and est == "unbiased" and K >= 2
            rs = residual_estimates(score_fn, self.sde, xs, ts, dt_method=c.dt_method, fd_step=c.fd_step,
                                    div_method=c.div_method, probe=c.probe, n_probes=K,
                                    generator=generator, create_graph=True, fused=c.fused,
                                    graph_probes="first" if first_only else "all")
            sq = squared_norm_estimate(rs, est) / D ** 2                                # ‖r‖²/D²
            if first_only:
                sq = probe_gradient_surrogate(sq, K)
            if c.m == 2:
                per = sq
            else:  # ‖r‖^m / D^m; not unbiased for m ≠ 2 (clamped below at 0)
                per = sq.clamp_min(0).add(1e-30).pow(c.m / 2)
            per = time_weight(self.sde, ts, c.weighting) * per
            loss = c.alpha * per.mean()                                                # E_t, L_FP
            if c.reference_scalar_beta > 0:
                q = reference_scalar_term(score_fn, self.sde, xs, ts, generator=generator)
                # the reference's ‖q‖₂ over its batch, rescaled to the full batch B
                loss = loss + c.reference_scalar_beta * q.pow(2).sum().mul(B / k).sqrt()
        return FPEOutput(loss=loss, residual_norm=sq.detach().clamp_min(0).sqrt(), t=ts.detach(),
                         indices=idx, sq_norm=sq.detach())


# --------------------------------------------------------------------------- evaluation / logging
def fpe_residual_by_t(model, sde: SDE, x0: torch.Tensor, t_grid, *, n_probes: int = 2,
                      probe: str = "rademacher", dt_method: str = "jvp", fd_step: float = 1e-3,
                      div_method: str = "hutchinson", generator=None, batch_size: int = 0,
                      fused: bool = False) -> dict:
    """Mean FPE residual of ``model`` on x_t ~ p_0t(·|x0) for each t of ``t_grid``.

    Returns {"t": (T,), "sq_norm": (T,) unbiased mean ‖r‖²/D², "norm": (T,) sqrt of it,
    "norm_per_sample": (T,) mean of per-sample sqrt(max(‖r̂‖²,0))/D}. The caller picks the mode
    (eval() for checkpoints).
    """
    t_grid = torch.as_tensor(t_grid, dtype=torch.float32, device=x0.device)
    score_fn = get_score_fn(model, sde)
    D = x0[0].numel()
    bs = batch_size or x0.shape[0]
    sq_out, per_out = [], []
    n_probes = n_probes if div_method == "hutchinson" else 1
    est = "unbiased" if n_probes >= 2 else "single"
    with fpe_precision(x0.device):
        for tv in t_grid:
            sq_all = []
            for start in range(0, x0.shape[0], bs):
                xb = x0[start:start + bs].to(_fp32_at_least(x0.dtype))
                tb = torch.full((xb.shape[0],), float(tv), device=x0.device, dtype=xb.dtype)
                mean, std = sde.marginal_prob(xb, tb)
                xt = mean + _bcast(std, xb) * _rand(xb.shape, generator, x0.device, xb.dtype, normal=True)
                rs = residual_estimates(score_fn, sde, xt, tb, dt_method=dt_method, fd_step=fd_step,
                                        div_method=div_method, probe=probe, n_probes=n_probes,
                                        generator=generator, create_graph=False, fused=fused)
                sq_all.append(squared_norm_estimate(rs, est).detach() / D ** 2)
            sq = torch.cat(sq_all)
            sq_out.append(sq.mean())
            per_out.append(sq.clamp_min(0).sqrt().mean())
    sq_t = torch.stack(sq_out)
    return {"t": t_grid, "sq_norm": sq_t, "norm": sq_t.clamp_min(0).sqrt(), "norm_per_sample": torch.stack(per_out)}


def mean_by_t_bucket(t: torch.Tensor, values: torch.Tensor, n_buckets: int = 4,
                     t_min: float = 0.0, t_max: float = 1.0, prefix: str = "fpe/residual") -> dict:
    """Mean of per-sample ``values`` per t-bucket, for logging (residual norms in training,
    classifier accuracy): {"fpe/residual_t0.00-0.25": value, ...}.

    Buckets without samples are left out (sum them across ranks before dividing if needed).
    """
    t = t.detach().float().cpu()
    r = values.detach().float().cpu()
    edges = torch.linspace(t_min, t_max, n_buckets + 1)
    b = torch.bucketize(t, edges[1:-1], right=True)
    out = {}
    for i in range(n_buckets):
        m = b == i
        if bool(m.any()):
            out[f"{prefix}_t{edges[i]:.2f}-{edges[i + 1]:.2f}"] = float(r[m].mean())
    return out
