"""Negative log-likelihood in bits/dim on test images via the probability-flow ODE,
distributed over ranks (scheme in ``pipeline.eval``)."""
from __future__ import annotations

import math
import time
from typing import Optional

import torch

from pipeline.data.test_set import rank_share, rank_test_batches
from pipeline.eval.common import IMAGE_BAR, device_of, eval_pass
from pipeline.images import to_model_space
from pipeline.collectives import gather_by_index, rank_world, seed_for
from pipeline.likelihood import bits_per_dim, data_bpd_offset, log_likelihood
from pipeline.score import get_score_fn


def evaluate_bpd(model, cfg, sde, *, images: Optional[torch.Tensor] = None, state=None,
                 num_batches: Optional[int] = None, max_samples: Optional[int] = None, progress: bool = True,
                 device=None, return_per_sample: bool = False) -> dict:
    """Negative log-likelihood in bits/dim via the probability-flow ODE; every rank calls.

    How comes from the config (``fpdiff eval bpd``'s flags are dotted overrides of it): batches of
    eval.batch_size, eval.bpd_passes passes, eval.hutchinson probes, the ODE's eval.rtol /
    eval.atol from t = eval.likelihood_eps, eval.dequantize, seeds from eval.seed.
    Data: ``images`` (uint8 (N,C,H,W)) or the shards data.test_shards, read in a fixed order and
    cut into global batches; batch k runs on rank k mod W. Pass p of batch k draws its
    dequantisation noise and Hutchinson probes from a generator seeded by (seed, p, k), so results
    do not depend on the number of ranks. ``num_batches`` limits the number of global batches (the
    trainer's quick eval: cfg.eval.bpd_num_batches per rank), ``max_samples`` the number of test
    images; otherwise every test image counts.
    Returns {"metric": "bpd", "value" (mean), "stderr", "N", "passes", "pass_means", "nfe", ...}.
    bpd = -log p(x) / (D ln 2) + offset, offset = log2(256) - log2(scale) (``pipeline.likelihood.data_bpd_offset``).
    """
    rank, world = rank_world(state)
    dev = device_of(state, device)
    ec = cfg.eval
    bs, passes, seed, hutchinson = ec.batch_size, ec.bpd_passes, ec.seed, ec.hutchinson
    rtol, atol, eps, dequantize = ec.rtol, ec.atol, ec.likelihood_eps, ec.dequantize
    shards = None if images is not None else cfg.data.test_shards
    offset = data_bpd_offset(cfg.data.centered)
    score_fn = get_score_fn(model, sde)
    t0 = time.time()
    idx_rows, bpd_rows, nfe_rows = [], [], []
    share = rank_share(images, shards, bs, rank, world, max_samples, num_batches) if progress and rank == 0 else None
    done = 0  # images finished; the bar moves inside a batch as its ODEs advance (one batch may take minutes)
    with eval_pass(model, progress and rank == 0, total=share, unit="img", smoothing=0.1,
                   bar_format=IMAGE_BAR if share else None,
                   desc=f"bits/dim, {passes} pass{'es' if passes > 1 else ''} (rank 0 of {world})") as bar:

        def advance(n_batch: int, p: int, t: Optional[torch.Tensor] = None) -> None:
            frac = 0.0 if t is None else float((t.min() - eps) / (sde.T - eps))
            bar.n = round(done + n_batch * (p + min(max(frac, 0.0), 1.0)) / passes, 1)
            bar.refresh()

        for k, u8 in rank_test_batches(images, shards, cfg.data.num_channels, bs, rank, world,
                                       max_samples, num_batches):
            u8 = u8.to(dev)
            D = u8[0].numel()
            per_pass, nfes = [], []
            for p in range(passes):
                g = torch.Generator(device=dev).manual_seed(seed_for(seed, p, k))
                noise = torch.rand(u8.shape, generator=g, device=dev) if dequantize else None
                x = to_model_space(u8, cfg.data.centered, noise)
                logp, _, nfe = log_likelihood(score_fn, sde, x, hutchinson=hutchinson, rtol=rtol,
                                              atol=atol, eps=eps, generator=g,
                                              callback=None if bar.disable else
                                              (lambda t, n=u8.shape[0], p=p: advance(n, p, t)))
                bpd = bits_per_dim(logp.detach().double().cpu(), D, offset)
                per_pass.append(bpd)
                nfes.append(float(nfe))
            idx_rows.append(torch.arange(k * bs, k * bs + u8.shape[0], dtype=torch.int64))
            bpd_rows.append(torch.stack(per_pass, 1))
            nfe_rows.append(torch.tensor(nfes, dtype=torch.float64).expand(u8.shape[0], passes))
            done += u8.shape[0]
            if not bar.disable:
                advance(0, 0)
    idx = torch.cat(idx_rows) if idx_rows else torch.zeros(0, dtype=torch.int64)
    vals = torch.cat([torch.cat(bpd_rows, 0), torch.cat(nfe_rows, 0)], 1) if bpd_rows \
        else torch.zeros(0, 2 * passes, dtype=torch.float64)
    idx, vals = gather_by_index(idx, vals)
    bpd_all, nfe_all = vals[:, :passes], vals[:, passes:]
    n = int(bpd_all.shape[0])
    if n == 0:
        raise RuntimeError("bpd: no test samples were read")
    per_sample = bpd_all.mean(1)
    stderr = float(per_sample.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    result = {"metric": "bpd", "value": float(per_sample.mean()), "stderr": stderr, "N": n,
              "passes": passes, "pass_means": [float(v) for v in bpd_all.mean(0)],
              "nfe": float(nfe_all.mean()), "offset_bits": offset, "dequantize": bool(dequantize),
              "hutchinson": hutchinson, "rtol": rtol, "atol": atol, "eps": eps, "batch_size": bs,
              "seed": seed, "world_size": world, "seconds": time.time() - t0}
    if return_per_sample:
        result["index"] = idx.numpy()
        result["per_sample"] = bpd_all.numpy()
    return result
