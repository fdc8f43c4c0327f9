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

One object holds these choices: ``ResidualEstimator.from_config(cfg.fpe, sde)`` (with
``fpe.fused``, pipeline/fused.py, and the fp32 precision the residual always runs in). The
trainer's ``FPERegularizer``, ``fpdiff eval fpe`` (pipeline/eval/fpe.py) and the benchmarks all
estimate through it, so they cannot disagree. Probes come from ``pipeline.likelihood.draw_probes``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.config import FPEConfig, check_choices
from pipeline.fused import fused_ops, plain_ops
from pipeline.likelihood import draw_probes
from pipeline.score import get_score_fn
from pipeline.sde import SDE, bcast

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- helpers
def flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product, (B, ...) x (B, ...) -> (B,)."""
    return (a * b).flatten(1).sum(1)


def fp32_at_least(dtype):
    """fp32 for half / bf16 / fp32 inputs; float64 stays float64 (tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def fpe_precision(device: torch.device):
    """fp32, autocast off, math attention kernel (forward AD and double backward need it)."""
    with torch.autocast(device_type=device.type, enabled=False), sdpa_kernel([SDPBackend.MATH]):
        yield


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


def score_and_dt(score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, *, dt_method: str = FPEConfig.dt_method,
                 fd_step: float = FPEConfig.fd_step):
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
    hb = bcast(h, x)
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
        dsdt = -bcast(direction, x) * (3 * s - 4 * s_1 + s_2) / (2 * hb)
    rng_after.replay()  # leave the global RNG as after one forward
    return s, dsdt


def _phi_terms(sde: SDE, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor):
    """The probe-free part of φ: (g²/2)‖s‖² − ⟨f, s⟩ − ∇·f, and g²/2 (B,)."""
    g2_half = 0.5 * sde.diffusion(t) ** 2
    f = sde.drift(x, t)
    return g2_half * s.flatten(1).pow(2).sum(1) - flat_dot(f, s) - sde.drift_divergence(x, t), g2_half


def exact_divergence(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """∇x·s = Σ_i ∂s_i/∂x_i per sample (B,), from D vector-Jacobian products (tests, small D)."""
    div = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for i in range(x[0].numel()):
        e = torch.zeros_like(x).flatten(1)
        e[:, i] = 1
        (col,) = torch.autograd.grad(s, x, e.view_as(x), create_graph=True)
        div = div + col.flatten(1)[:, i]
    return div


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
    div = flat_dot(u, v)
    g2_half = 0.5 * sde.diffusion(t) ** 2
    return g2_half * (div + s.flatten(1).pow(2).sum(1) + flat_dot(x, s))


# --------------------------------------------------------------------------- the estimator

@dataclass(frozen=True)
class ResidualEstimator:
    """How the residual r of (score FPE) and its norm ‖r‖² are estimated; defaults are ``FPEConfig``'s.

    ``from_config(cfg.fpe, sde)`` is the one way the trainer, ``fpdiff eval fpe`` and the
    benchmarks build it. ``estimates`` gives K residual estimates, ``residual`` their mean,
    ``squared_norm`` the per-sample ‖r‖²/D² the regularizer penalises and evaluation reports.
    Everything runs in fp32 (float64 stays float64) with autocast off (``fpe_precision``) and,
    with ``fused``, through the custom Functions of pipeline/fused.py (else the plain-autograd
    route of the same file: SDPA as matmuls + a composite softmax, since the built-in one fails
    reverse-over-forward).
    """

    sde: SDE
    dt_method: str = FPEConfig.dt_method  # ∂t s: "jvp" | "fd3" | "central"
    fd_step: float = FPEConfig.fd_step
    div_method: str = FPEConfig.div_method  # ∇·s: "hutchinson" | "exact" (K = 1)
    probe: str = FPEConfig.probe
    n_probes: int = FPEConfig.n_probes  # K
    norm_estimator: str = FPEConfig.norm_estimator  # div_method "exact": "single" (FPEConfig.resolve_probes)
    probe_gradient: str = FPEConfig.probe_gradient
    fused: bool = FPEConfig.fused

    def __post_init__(self):
        # the options are fpe.* keys: their allowed values and the exact-divergence rule live in FPEConfig
        opts = FPEConfig(**{name: getattr(self, name) for name in _OPTIONS})
        check_choices(opts, "fpe")
        opts.resolve_probes()
        object.__setattr__(self, "n_probes", opts.n_probes)
        object.__setattr__(self, "norm_estimator", opts.norm_estimator)

    @classmethod
    def from_config(cls, cfg: FPEConfig, sde: SDE) -> "ResidualEstimator":
        """The estimator of ``cfg.fpe``, its values as configured (``FPEConfig.validate`` checked them)."""
        return cls(sde, **{name: getattr(cfg, name) for name in _OPTIONS})

    @property
    def first_probe_only(self) -> bool:
        """Only r̂_1 reaches the parameters (probe_gradient "first"; unbiased only for the pair estimator)."""
        return self.probe_gradient == "first" and self.norm_estimator == "unbiased" and self.n_probes >= 2

    def estimates(self, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, *, generator=None,
                  probes: Optional[torch.Tensor] = None, create_graph: bool = True,
                  stage: Optional[Callable[[str], None]] = None) -> torch.Tensor:
        """Independent residual estimates r̂_k = ∂t s − ∇x φ̂_{v_k}, stacked: (K, *x.shape).

        They share s, ∂t s and the forward graph; only the Hutchinson probe v_k differs (drawn
        from ``generator`` unless ``probes`` (K, *x.shape) is given). With ``div_method="exact"``
        K = 1 and the result is the exact residual. With ``first_probe_only`` r̂_2.. carry no
        graph (values only; see ``probe_gradient_surrogate``). ``create_graph=False``: values
        only (evaluation). ``stage(name)`` is called after each stage (benchmark timing).
        """
        with fpe_precision(x.device), (fused_ops() if self.fused else plain_ops()):
            return self._estimates(score_fn, x.to(fp32_at_least(x.dtype)), t.to(fp32_at_least(t.dtype)),
                                   generator, probes, create_graph, stage or (lambda name: None))

    def _estimates(self, score_fn, x, t, generator, probes, create_graph, stage):
        x = x.detach().requires_grad_(True)
        t = t.detach()
        s, dsdt = score_and_dt(score_fn, x, t, dt_method=self.dt_method, fd_step=self.fd_step)  # LHS of (score FPE)
        stage("forward_jvp")
        base, g2_half = _phi_terms(self.sde, x, t, s)
        if self.div_method == "exact":
            psi = g2_half * exact_divergence(s, x) + base                                 # φ (score FPE)
            (grad_phi,) = torch.autograd.grad(psi.sum(), x, create_graph=create_graph)
            r = dsdt - grad_phi
            return r.unsqueeze(0) if create_graph else r.detach().unsqueeze(0)
        if probes is None:
            probes = draw_probes(x.shape, self.n_probes, self.probe, generator=generator, device=x.device,
                                 dtype=x.dtype)
        out = []
        for k, v in enumerate(probes):
            last = k == len(probes) - 1
            keep = create_graph and (k == 0 or not self.first_probe_only)  # this estimate reaches θ
            (u,) = torch.autograd.grad(s, x, v, create_graph=True)                        # Jᵀv
            psi = g2_half * flat_dot(u, v) + base                                         # φ̂_v
            stage("vjp")
            # the shared forward graph must survive for the later probes and the final backward
            (grad_phi,) = torch.autograd.grad(psi.sum(), x, create_graph=keep,
                                              retain_graph=create_graph or not last)
            stage("double_backward")
            r = dsdt - grad_phi
            out.append(r if keep else r.detach())
        return torch.stack(out)

    def residual(self, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, **kw) -> torch.Tensor:
        """r(x,t) = ∂t s − ∇x[(g²/2)(∇·s + ‖s‖²) − ⟨f,s⟩ − ∇·f]  (score FPE), same shape as x.

        The mean of ``estimates`` (keywords as there): with Hutchinson the divergence is
        averaged over the K probes.
        """
        return self.estimates(score_fn, x, t, **kw).mean(0)

    def squared_norm(self, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, *, generator=None,
                     create_graph: bool = True, stage: Optional[Callable[[str], None]] = None) -> torch.Tensor:
        """Per-sample estimate of ‖r(x,t)‖²/D² (B,) with ``norm_estimator`` (unbiased: may be < 0).

        With ``create_graph`` and ``first_probe_only`` only r̂_1 is backpropagated, scaled so that
        the pair estimator's parameter gradient stays unbiased (``probe_gradient_surrogate``).
        """
        rs = self.estimates(score_fn, x, t, generator=generator, create_graph=create_graph, stage=stage)
        sq = squared_norm_estimate(rs, self.norm_estimator) / x[0].numel() ** 2              # ‖r‖²/D²
        if create_graph and self.first_probe_only:
            sq = probe_gradient_surrogate(sq, self.n_probes)
        return sq


# the estimator's options: fpe.* keys of the same names
_OPTIONS = tuple(f.name for f in dataclasses.fields(ResidualEstimator) if f.name != "sde")


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


def draw_random(shape, generator, device, dtype=torch.float32, normal=False):
    """Uniform (or standard normal) draws from ``generator`` on the generator's own device, moved to
    ``device`` (a CPU generator gives the same numbers on any device)."""
    gdev = generator.device if generator is not None else device
    fn = torch.randn if normal else torch.rand
    return fn(shape, generator=generator, device=gdev, dtype=dtype).to(device)


def select_points(cfg, sde: SDE, x0: torch.Tensor, xt: Optional[torch.Tensor], t: Optional[torch.Tensor],
                  idx: torch.Tensor, generator=None):
    """Points and times of the residual for the subsampled indices (``fpe.points``).

    perturbed: the DSM step's x_t and t; samples whose t lies outside [t_min, t_max] (or when
    none is given) are re-perturbed from x0 at t ~ U[t_min, t_max]. clean: x0 at t ~ U.
    uniform: uniform in the bounding box of the clean batch at t ~ U (the reference's 'random').
    """
    dt = fp32_at_least(x0.dtype)
    x0s = x0[idx].detach().to(dt)
    k = x0s.shape[0]
    t_new = cfg.t_min + (cfg.t_max - cfg.t_min) * draw_random((k,), generator, x0.device, dt)
    if cfg.points == "perturbed":
        if xt is not None and t is not None:
            ts = t[idx].detach().to(dt)
            xs = xt[idx].detach().to(dt)
            bad = (ts < cfg.t_min) | (ts > cfg.t_max)
        else:
            ts, xs, bad = t_new, x0s, torch.ones(k, dtype=torch.bool, device=x0.device)
        if bool(bad.any()):
            z = draw_random(x0s.shape, generator, x0.device, dt, normal=True)
            fresh, _ = sde.perturb(x0s, t_new, z)
            ts = torch.where(bad, t_new, ts)
            xs = torch.where(bcast(bad, xs), fresh, xs)
        return xs, ts
    if cfg.points == "clean":
        return x0s, t_new
    if cfg.points == "uniform":
        lo, hi = x0s.min(), x0s.max()
        return lo + (hi - lo) * draw_random(x0s.shape, generator, x0.device, dt), t_new
    raise ValueError(f"fpe.points: unknown choice {cfg.points!r}")


class FPERegularizer:
    """α · mean_k[ λ(t) (‖r‖²)^{m/2} ] / D^m on a subsample of k of the B samples (L_FP).

    ``__call__(model, x0, xt, t, step=, generator=)`` with the RAW module (not a DDP /
    DeepSpeed / compiled wrapper). Returns ``None`` on steps skipped by ``every``. The residual
    is estimated by ``ResidualEstimator.from_config(cfg, sde)``, rebuilt from ``cfg`` at each call
    (a small dataclass) so that the regularizer follows its config.
    """

    def __init__(self, cfg: FPEConfig, sde: SDE):
        self.cfg = cfg
        self.sde = sde

    @property
    def estimator(self) -> ResidualEstimator:
        return ResidualEstimator.from_config(self.cfg, self.sde)

    def __call__(self, model, x0, xt=None, t=None, *, step: int = 0, generator=None,
                 class_labels: Optional[torch.Tensor] = None) -> Optional[FPEOutput]:
        c = self.cfg
        if not c.enabled or step % c.every:
            return None
        B = x0.shape[0]
        k = subsample_size(c.subsample, B)
        gdev = generator.device if generator is not None else x0.device
        idx = torch.randperm(B, generator=generator, device=gdev)[:k].to(x0.device)
        with fpe_precision(x0.device):
            xs, ts = select_points(c, self.sde, x0, xt, t, idx, generator)
            # a conditional model: the residual of each sample's own (or the unconditional) score,
            # which solves the score FPE as well (one density per class)
            score_fn = get_score_fn(model, self.sde, None if class_labels is None else class_labels[idx])
            loss, sq = self.loss_at(score_fn, xs, ts, generator=generator, batch_size=B)
        return FPEOutput(loss=loss, residual_norm=sq.detach().clamp_min(0).sqrt(), t=ts.detach(),
                         indices=idx, sq_norm=sq.detach())

    def loss_at(self, score_fn: ScoreFn, xs: torch.Tensor, ts: torch.Tensor, *, generator=None,
                batch_size: Optional[int] = None, stage: Optional[Callable[[str], None]] = None):
        """(L_FP at the k points (xs, ts), the (k,) estimates of ‖r‖²/D²); ``batch_size`` B only
        scales the reference scalar term."""
        c = self.cfg
        sq = self.estimator.squared_norm(score_fn, xs, ts, generator=generator, stage=stage)  # ‖r‖²/D²
        if c.m == 2:
            per = sq
        else:  # ‖r‖^m / D^m; not unbiased for m ≠ 2 (clamped below at 0)
            per = sq.clamp_min(0).add(1e-30).pow(c.m / 2)
        per = time_weight(self.sde, ts, c.weighting) * per
        loss = c.alpha * per.mean()                                                    # E_t, L_FP
        if c.reference_scalar_beta > 0:
            q = reference_scalar_term(score_fn, self.sde, xs, ts, generator=generator)
            # the reference's ‖q‖₂ over its batch, rescaled to the full batch B
            B = batch_size or xs.shape[0]
            loss = loss + c.reference_scalar_beta * q.pow(2).sum().mul(B / xs.shape[0]).sqrt()
        return loss, sq


# --------------------------------------------------------------------------- logging
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
