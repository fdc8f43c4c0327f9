"""Conservativity evaluation (``fpdiff eval conservativity``): how far the score is from a gradient field.

A score s(x, t) = ∇x log p_t(x) has a symmetric Jacobian J = ∂s/∂x; a learned one need not. The
metric is the relative asymmetry of J per t-bucket on test images perturbed by the SDE's marginal:

    A(t) = E‖(J − Jᵀ)v‖² / E‖Jv‖²,   v Rademacher (E[vvᵀ] = I, so for a fixed linear map M this is
                                        ‖M − Mᵀ‖_F² / ‖M‖_F²: 0 for a gradient field, up to 4)

Jv by forward-mode AD (a dual x), Jᵀv by a VJP (reverse mode), both in fp32 with autocast off.
Image i in bucket k gets t ~ U[edge_k, edge_k+1), x_t ~ p_0t(·|x0) and probes from a generator seeded
by (seed, global batch index), so every model evaluated with the same seed sees the same times,
noise and probes (paired comparisons). Batches are split over ranks as in ``pipeline.eval``.

Standard errors are over test images (delta method for a ratio of means): a bucket's ratio R_k =
mean(a_k)/mean(b_k) has SE std(a_k − R_k b_k)/(√N mean(b_k)); the summary ``value`` (the mean of R_k
over buckets) has the SE of the mean of its per-image influence terms.
Uses: pipeline.fpe (fp32 context, random draws), pipeline.eval.common (ranks, test batches).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from pipeline.collectives import gather_by_index, rank_world, seed_for
from pipeline.data.test_set import rank_test_batches
from pipeline.eval.common import device_of, eval_pass
from pipeline.fpe import draw_random, fp32_at_least, fpe_precision
from pipeline.images import to_model_space
from pipeline.score import get_score_fn

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def jvp_and_vjp(score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, v: torch.Tensor):
    """(J v, Jᵀ v) of x ↦ score_fn(x, t) at x (per sample: J is block-diagonal over the batch). Two
    forwards: a backward through a forward-mode pass needs double-backward formulas of forward AD that
    some ops lack (silu)."""
    x = x.detach()
    with torch.no_grad(), torch.autograd.forward_ad.dual_level():
        jv = torch.autograd.forward_ad.unpack_dual(score_fn(torch.autograd.forward_ad.make_dual(x, v), t)).tangent
    with torch.enable_grad():
        xg = x.requires_grad_(True)
        (jtv,) = torch.autograd.grad(score_fn(xg, t), xg, grad_outputs=v)
    return jv.detach(), jtv.detach()


def asymmetry_terms(score_fn: ScoreFn, sde, x0: torch.Tensor, edges, *, generator=None,
                    n_probes: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and t-bucket: (‖(J − Jᵀ)v‖², ‖Jv‖²), each (B, K) float64, averaged over ``n_probes``
    Rademacher probes; t uniform in each bucket of ``edges`` (K + 1 increasing times)."""
    dev = x0.device
    edges = [float(e) for e in edges]
    B, K = x0.shape[0], len(edges) - 1
    asym = torch.zeros(B, K, dtype=torch.float64)
    jv_sq = torch.zeros(B, K, dtype=torch.float64)
    with fpe_precision(dev):
        x0 = x0.to(fp32_at_least(x0.dtype))
        for k in range(K):
            t = edges[k] + (edges[k + 1] - edges[k]) * draw_random((B,), generator, dev, x0.dtype)
            xt, _ = sde.perturb(x0, t, draw_random(x0.shape, generator, dev, x0.dtype, normal=True))
            for _ in range(n_probes):
                v = (draw_random(x0.shape, generator, dev, x0.dtype) < 0.5).to(x0.dtype) * 2 - 1
                jv, jtv = jvp_and_vjp(score_fn, xt, t, v)
                asym[:, k] += (jv - jtv).flatten(1).double().pow(2).sum(1).cpu() / n_probes
                jv_sq[:, k] += jv.flatten(1).double().pow(2).sum(1).cpu() / n_probes
    return asym, jv_sq


def ratio_statistics(asym: torch.Tensor, jv_sq: torch.Tensor) -> dict:
    """Ratios of means per bucket and their mean over buckets, with delta-method standard errors over
    the N images (rows); see the module docstring."""
    n = asym.shape[0]
    mean_b = jv_sq.mean(0)
    ratio = asym.mean(0) / mean_b
    influence = (asym - ratio * jv_sq) / mean_b  # (N, K): per-image terms whose mean is ~0
    root_n = math.sqrt(n)
    se = influence.std(0, unbiased=True) / root_n if n > 1 else torch.full_like(ratio, float("nan"))
    overall = influence.mean(1)
    se_value = float(overall.std(unbiased=True) / root_n) if n > 1 else float("nan")
    return {"value": float(ratio.mean()), "stderr": se_value, "ratio": ratio.tolist(), "ratio_stderr": se.tolist(),
            "asym_sq": asym.mean(0).tolist(), "jv_sq": mean_b.tolist()}


def evaluate_conservativity(model, cfg, sde, *, images: Optional[torch.Tensor] = None, state=None,
                            progress: bool = True, device=None, score_fn: Optional[ScoreFn] = None) -> dict:
    """Relative Jacobian asymmetry of the model's score per t-bucket of [fpe.t_min, fpe.t_max] on test
    images (every rank calls). How comes from the config (``fpdiff eval conservativity``'s flags are
    dotted overrides of it): the first eval.conservativity_max_samples test images (``images``, uint8
    (N,C,H,W), or the shards data.test_shards) in batches of eval.batch_size, eval.conservativity_buckets
    buckets, eval.conservativity_probes probes, seeds from eval.seed. ``score_fn`` replaces the model's
    score (closed-form scores in tests)."""
    rank, world = rank_world(state)
    dev = device_of(state, device)
    ec = cfg.eval
    bs, seed = ec.batch_size, ec.seed
    num_buckets, max_samples, n_probes = ec.conservativity_buckets, ec.conservativity_max_samples, ec.conservativity_probes
    shards = None if images is not None else cfg.data.test_shards
    edges = torch.linspace(cfg.fpe.t_min, cfg.fpe.t_max, num_buckets + 1).tolist()
    score_fn = score_fn or get_score_fn(model, sde)
    n_total = max_samples if images is None else min(max_samples, images.shape[0])
    batches = math.ceil(math.ceil(n_total / bs) / world)
    idx_rows, val_rows = [], []
    with eval_pass(model, progress and rank == 0, total=batches,
                   desc=f"conservativity batches (rank 0 of {world})") as bar:
        for k, u8 in rank_test_batches(images, shards, cfg.data.num_channels, bs, rank, world, max_samples):
            x0 = to_model_space(u8.to(dev), cfg.data.centered)
            g = torch.Generator(device=dev).manual_seed(seed_for(seed, k))
            asym, jv_sq = asymmetry_terms(score_fn, sde, x0, edges, generator=g, n_probes=n_probes)
            idx_rows.append(torch.arange(k * bs, k * bs + u8.shape[0], dtype=torch.int64))
            val_rows.append(torch.cat([asym, jv_sq], 1))
            bar.update(1)
    idx = torch.cat(idx_rows) if idx_rows else torch.zeros(0, dtype=torch.int64)
    vals = torch.cat(val_rows) if val_rows else torch.zeros(0, 2 * num_buckets, dtype=torch.float64)
    _, vals = gather_by_index(idx, vals)
    n = int(vals.shape[0])
    if n == 0:
        raise RuntimeError("conservativity: no test samples were read")
    stats = ratio_statistics(vals[:, :num_buckets], vals[:, num_buckets:])
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    return {"metric": "conservativity", **stats, "t": centres, "t_edges": edges, "N": n, "n_probes": n_probes,
            "probe": "rademacher", "precision": "fp32", "seed": seed, "world_size": world,
            "definition": "per t-bucket: E|(J - J^T)v|^2 / E|Jv|^2 of the score's Jacobian J in x, Rademacher v; "
                          "value: mean over buckets; stderr: over test images"}
