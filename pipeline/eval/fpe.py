"""FPE evaluation (``fpdiff eval fpe``): the score-FPE residual of a model over a grid of times.

``fpe_residual_by_t`` gives the mean ‖r‖²/D² per t of one set of clean images, each perturbed by
p_0t(·|x0) at every t of the grid; ``evaluate_fpe`` runs it over the test set, split across ranks by
global batch index (batch k on rank k mod W, generator seeded by (seed, k)), and sums over ranks.

The residual is estimated exactly as the trainer's regularizer estimates it:
``ResidualEstimator.from_config(cfg.fpe, sde)`` (dt_method, probe, n_probes, norm_estimator,
fused, ...); change it with dotted overrides on the command line (``fpe.n_probes=8``).
Uses: pipeline.fpe (the estimator), pipeline.eval.common (ranks, devices, test batches),
pipeline.images (uint8 to model space), pipeline.collectives (sums over ranks, per-batch seeds).
"""
from __future__ import annotations

from typing import Optional

import torch

from pipeline.collectives import all_reduce_sum, rank_world, seed_for
from pipeline.data.test_set import rank_share, rank_test_batches
from pipeline.eval.common import IMAGE_BAR, device_of, eval_pass
from pipeline.fpe import ResidualEstimator, fp32_at_least, draw_random, fpe_precision
from pipeline.images import to_model_space
from pipeline.score import get_score_fn


def fpe_residual_by_t(model, estimator: ResidualEstimator, x0: torch.Tensor, t_grid, *, generator=None,
                      batch_size: int = 0, on_time=None) -> dict:
    """Mean FPE residual of ``model`` on x_t ~ p_0t(·|x0) for each t of ``t_grid``.

    Returns {"t": (T,), "sq_norm": (T,) mean ‖r‖²/D² (unbiased with the default pair estimator),
    "norm": (T,) sqrt of it, "norm_per_sample": (T,) mean of per-sample sqrt(max(‖r̂‖²,0))/D}.
    The caller picks the mode (eval() for checkpoints). ``on_time()`` is called after each t (a bar).
    """
    sde = estimator.sde
    t_grid = torch.as_tensor(t_grid, dtype=torch.float32, device=x0.device)
    score_fn = get_score_fn(model, sde)
    bs = batch_size or x0.shape[0]
    sq_out, per_out = [], []
    with fpe_precision(x0.device):
        for tv in t_grid:
            sq_all = []
            for start in range(0, x0.shape[0], bs):
                xb = x0[start:start + bs].to(fp32_at_least(x0.dtype))
                tb = torch.full((xb.shape[0],), float(tv), device=x0.device, dtype=xb.dtype)
                xt, _ = sde.perturb(xb, tb, draw_random(xb.shape, generator, x0.device, xb.dtype, normal=True))
                sq_all.append(estimator.squared_norm(score_fn, xt, tb, generator=generator, create_graph=False))
            sq = torch.cat(sq_all)
            sq_out.append(sq.mean())
            per_out.append(sq.clamp_min(0).sqrt().mean())
            if on_time is not None:
                on_time()
    sq_t = torch.stack(sq_out)
    return {"t": t_grid, "sq_norm": sq_t, "norm": sq_t.clamp_min(0).sqrt(), "norm_per_sample": torch.stack(per_out)}


def evaluate_fpe(model, cfg, sde, *, images: Optional[torch.Tensor] = None, state=None, device=None,
                 progress: bool = False) -> dict:
    """FPE residual over a t-grid in [fpe.t_min, fpe.t_max] on test images (every rank calls).

    How comes from the config (``fpdiff eval fpe``'s flags are dotted overrides of it): the first
    eval.fpe_max_samples test images (``images``, uint8 (N,C,H,W), or the shards data.test_shards)
    in batches of eval.batch_size, eval.fpe_num_times times, seeds from eval.seed.
    Returns the mean ‖r‖²/D² per t summed over ranks, its square root, the mean over t
    (``value``) and the estimator's settings (``estimator``).
    """
    rank, world = rank_world(state)
    dev = device_of(state, device)
    bs, seed = cfg.eval.batch_size, cfg.eval.seed
    num_times, max_samples = cfg.eval.fpe_num_times, cfg.eval.fpe_max_samples
    shards = None if images is not None else cfg.data.test_shards
    estimator = ResidualEstimator.from_config(cfg.fpe, sde)
    t_grid = torch.linspace(cfg.fpe.t_min, cfg.fpe.t_max, num_times)
    sq_sum = torch.zeros(num_times, dtype=torch.float64)
    per_sum = torch.zeros(num_times, dtype=torch.float64)
    n_local = 0
    share = rank_share(images, shards, bs, rank, world, max_samples) if progress and rank == 0 else None
    with eval_pass(model, progress and rank == 0, total=share, unit="img", bar_format=IMAGE_BAR if share else None,
                   desc=f"FPE residual at {num_times} times (rank 0 of {world})") as bar:
        for k, u8 in rank_test_batches(images, shards, cfg.data.num_channels, bs, rank, world, max_samples):
            x0 = to_model_space(u8.to(dev), cfg.data.centered)
            g = torch.Generator(device=dev).manual_seed(seed_for(seed, k))
            r = fpe_residual_by_t(model, estimator, x0, t_grid.to(dev), generator=g,
                                  on_time=lambda n=u8.shape[0]: bar.update(n / num_times))
            sq_sum += r["sq_norm"].detach().double().cpu() * u8.shape[0]
            per_sum += r["norm_per_sample"].detach().double().cpu() * u8.shape[0]
            n_local += u8.shape[0]
    sq_sum, per_sum = all_reduce_sum(sq_sum), all_reduce_sum(per_sum)
    n = int(all_reduce_sum(torch.tensor([n_local], dtype=torch.int64)).item())
    if n == 0:
        raise RuntimeError("fpe: no test samples were read")
    sq = sq_sum / n
    norm = sq.clamp_min(0).sqrt()
    settings = {f: getattr(estimator, f) for f in ("dt_method", "fd_step", "div_method", "probe", "n_probes",
                                                   "norm_estimator", "fused")}
    return {"metric": "fpe", "value": float(norm.mean()), "t": t_grid.tolist(),
            "sq_norm": sq.tolist(), "norm": norm.tolist(), "norm_per_sample": (per_sum / n).tolist(),
            "N": n, "seed": seed, "world_size": world, "estimator": settings}
