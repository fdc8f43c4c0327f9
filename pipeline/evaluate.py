"""Evaluation stage: distributed FID / KID (clean-fid), bits/dim, reference statistics, FPE residual.

    python -m pipeline.evaluate {fid,bpd,ref-stats,fpe} ...       (one process)
    accelerate launch --multi_gpu --num_processes K -m pipeline.evaluate fid RUN ...
    fpdiff eval {fid,bpd,ref-stats,fpe} ...                       (``evaluate_main(argv)``)

Work is split by GLOBAL batch index: the N samples (or test images) are cut into batches of
``batch_size`` in a fixed order, batch k runs on rank k mod W with a generator seeded by
(seed, k) (bpd: (seed, pass, k)). A sample therefore does not depend on the number of ranks,
only on the batch size; ranks may end up with one batch more or fewer (N need not divide).

FID: every rank accumulates n, Σf, Σfᵀf in float64 and one all-reduce sums them (EDM's
scheme), so the statistics hold exactly N samples. Features are gathered (exactly N rows,
sorted by sample index) only for KID. bpd: per-sample values are gathered and sorted by
test index; every test sample counts (the last partial batch included).

The trainer calls ``evaluate_fid`` / ``evaluate_bpd`` (every rank, they are collective) and
``check_eval_inputs`` once at start-up.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .fid import (FeatureExtractor, FeatureStats, MissingFileError, all_reduce_sum, barrier,
                  batched, broadcast_float, check_feature_extractor, check_ref_stats, ceil_div,
                  dist_rank_world, expand_shards, frechet_distance, gather_by_index, iter_shard_images,
                  kernel_distance, load_ref_stats, save_stats, seed_for)

LEVELS = 256


# --------------------------------------------------------------------------- helpers
def get_state():
    """Accelerate's PartialState: initialises torch.distributed under ``accelerate launch``."""
    from accelerate import PartialState
    # cpu=True on a machine without CUDA: otherwise Accelerate reports DistributedType.NO
    # (1 process) under `accelerate launch --multi_gpu` on CPU
    return PartialState(cpu=not torch.cuda.is_available())


def _rank_world(state) -> tuple[int, int]:
    return dist_rank_world(state)


def _is_main(state) -> bool:
    return _rank_world(state)[0] == 0


def _device(state, device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if state is not None and getattr(state, "device", None) is not None:
        return torch.device(state.device)
    return torch.device("cpu")


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _main_first(state, fn: Callable[[bool], object]):
    """Run ``fn(download=True)`` on the main rank, then ``fn(download=False)`` elsewhere.

    A failure on the main rank is announced to every rank (no rank hangs in a barrier):
    all raise ``MissingFileError``; only the main rank's message is meant to be printed.
    """
    rank, world = _rank_world(state)
    if world == 1:
        return fn(True)
    err, out = None, None
    if rank == 0:
        try:
            out = fn(True)
        except MissingFileError as e:
            err = e
    failed = broadcast_float(1.0 if err is not None else 0.0)
    if failed:
        raise err if err is not None else MissingFileError("(see the main rank's error)")
    if rank != 0:
        out = fn(False)
    return out


def bpd_offset(centered: bool, levels: int = LEVELS) -> float:
    """Bits added per dimension: log2(levels) − log2(scale from [0, 1] to model space).

    Data in [0, 1] (``centered: false``): 8 bits; in [-1, 1] (``centered: true``, scale 2): 7.
    Same as score_sde's ``7 - inverse_scaler(-1)`` (``pipeline.likelihood.data_bpd_offset``).
    """
    from .likelihood import data_bpd_offset
    return data_bpd_offset(centered, levels)


def to_model_space(images_u8: torch.Tensor, centered: bool, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 -> model space. With ``noise`` ~ U[0,1): (u8 + noise)/256 (uniform
    dequantisation as score_sde); without: u8/255. Then [-1, 1] if centered."""
    x = images_u8.float()
    x = (x + noise) / LEVELS if noise is not None else x / (LEVELS - 1)
    return x * 2.0 - 1.0 if centered else x


# --------------------------------------------------------------------------- loading a model
def _find_step(folder: Path) -> Optional[int]:
    for name in ("state.json", "metrics.json", "metadata.json", "export.json"):
        f = folder / name
        if f.is_file():
            try:
                d = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            for key in ("step", "checkpoint_step", "steps"):
                if isinstance(d.get(key), int):
                    return d[key]
            if isinstance(d.get("metrics"), dict) and isinstance(d["metrics"].get("step"), int):
                return d["metrics"]["step"]
    if folder.name.startswith("step_") and folder.name[5:].isdigit():
        return int(folder.name[5:])
    return None


def resolve_eval_source(path: str | Path) -> tuple[Path, Path, Path]:
    """(weights file, config.yaml, run dir) for a run dir, its export/ or a checkpoint dir.

    A run dir resolves to its newest complete checkpoint, else its export/ folder.
    """
    from .checkpoint import latest_checkpoint

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no run, export or checkpoint at {p}")
    if p.is_file() and p.suffix == ".safetensors":
        p = p.parent
    if (p / "ema.safetensors").is_file():
        if (p / "config.yaml").is_file():  # an export folder
            return p / "ema.safetensors", p / "config.yaml", p.parent
        if p.parent.name == "checkpoints" and (p.parents[1] / "config.yaml").is_file():
            return p / "ema.safetensors", p.parents[1] / "config.yaml", p.parents[1]
        raise FileNotFoundError(f"{p}: EMA weights found but no config.yaml beside them or in the run dir")
    ckpt = latest_checkpoint(p)
    if ckpt is not None and (ckpt / "ema.safetensors").is_file() and (p / "config.yaml").is_file():
        return ckpt / "ema.safetensors", p / "config.yaml", p
    if (p / "export" / "ema.safetensors").is_file():
        return p / "export" / "ema.safetensors", p / "export" / "config.yaml", p
    raise FileNotFoundError(f"{p}: no checkpoints/step_*/ema.safetensors (with config.yaml) and no export/ema.safetensors")


def load_for_eval(path: str | Path, device="cpu", overrides: Optional[list[str]] = None):
    """(EMA model in eval mode on ``device``, Config, step or None) from a run dir, its
    export/ folder or a checkpoints/step_XXXXXXXX folder. ``overrides``: dotted config
    overrides applied to the run's saved config."""
    from safetensors.torch import load_file

    from .config import load_config
    from .models import build_model

    weights, cfg_path, _ = resolve_eval_source(path)
    cfg = load_config(cfg_path, overrides)
    from .hub import load_state_into

    model = build_model(cfg)
    load_state_into(model, load_file(str(weights), device="cpu"), source=str(weights))
    model.to(device).eval().requires_grad_(False)
    return model, cfg, _find_step(weights.parent)


# --------------------------------------------------------------------------- in-training / library API
def check_eval_inputs(cfg, state=None, *, fid: bool = True, download: bool = True) -> dict:
    """Start-up check for the trainer (every rank calls): resolves the feature extractor and
    the reference statistics of ``cfg.eval``; raises MissingFileError (one line) if missing.
    Returns {"feature_extractor": Path, "ref_stats": Path} (FID skipped: {}).
    """
    if not fid or not cfg.eval.ref_stats:
        return {}
    fe = _main_first(state, lambda dl: check_feature_extractor(cfg.eval.feature_extractor or None, download=download and dl))
    ref = _main_first(state, lambda dl: check_ref_stats(cfg.eval.ref_stats, cfg.data.image_size, download=download and dl))
    return {"feature_extractor": fe, "ref_stats": ref}


def _sampling_cfg(cfg, sampler: Optional[str]):
    method = sampler or (cfg.eval.sampler if cfg.eval.sampler != "config" else cfg.sampling.method)
    return dataclasses.replace(cfg.sampling, method=method)


def make_generate_fn(model, cfg, sde, sampler: Optional[str] = None, device="cpu"):
    """generate(n, generator) -> (x model space (n,C,H,W), nfe) with the config's sampler."""
    from .sampling import sample
    from .score import get_score_fn

    scfg = _sampling_cfg(cfg, sampler)
    score_fn = get_score_fn(model, sde)
    shape_tail = (cfg.data.num_channels, cfg.data.image_size, cfg.data.image_size)

    def generate(n: int, generator: torch.Generator):
        return sample(scfg, cfg.sde.sampling_eps, score_fn, sde, (n,) + shape_tail,
                      device=device, generator=generator, progress=False)

    generate.method = scfg.method
    return generate


_EXTRACTORS: dict = {}


def _as_extractor(fe, cfg, device) -> FeatureExtractor:
    """A FeatureExtractor / callable as is; a path (or None: cfg / Inception) loaded once per
    (path, device) and cached (the trainer evaluates many times)."""
    if callable(fe) and not isinstance(fe, (str, Path)):
        return fe
    path = str(fe) if fe else (cfg.eval.feature_extractor or None)
    key = (path, str(device))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = FeatureExtractor(path, device=device, download=False)
    return _EXTRACTORS[key]


def _as_ref(ref, cfg) -> dict:
    if isinstance(ref, dict):
        return ref
    spec = str(ref) if ref else cfg.eval.ref_stats
    return load_ref_stats(check_ref_stats(spec, cfg.data.image_size, download=False))


def evaluate_fid(model, cfg, sde, *, num_samples: Optional[int] = None, feature_extractor=None,
                 ref_stats=None, state=None, accelerator=None, batch_size: Optional[int] = None,
                 seed: Optional[int] = None, sampler: Optional[str] = None,
                 save_dir: Optional[str | Path] = None, grid_path: Optional[str | Path] = None,
                 kid: Optional[bool] = None, progress: bool = True, device=None,
                 generate_fn: Optional[Callable] = None, return_features: bool = False) -> dict:
    """Distributed FID (and KID) of ``model``'s samples; every rank must call it.

    feature_extractor: a FeatureExtractor / callable(uint8 (B,C,H,W)) -> (B,F), a TorchScript
    path, or None (cfg.eval.feature_extractor, else clean-fid Inception). ref_stats: dict with
    mu, sigma (feats), an .npz path, a clean-fid name, or None (cfg.eval.ref_stats); with no
    reference the dict has the sample statistics' n and NFE but no "value".
    generate_fn(n, generator) -> (x, nfe) replaces the sampler (tests).
    Returns {"metric": "fid", "value", "kid", "N", "sampler", "nfe", "seconds", ...} on every rank.
    """
    from .images import save_grid, to_uint8

    state = state if state is not None else accelerator
    rank, world = _rank_world(state)
    dev = _device(state, device)
    n_total = int(num_samples or cfg.eval.fid_num_samples)
    bs = int(batch_size or cfg.eval.batch_size)
    seed = cfg.eval.seed if seed is None else seed
    kid = cfg.eval.kid if kid is None else kid
    t0 = time.time()
    fe = _as_extractor(feature_extractor, cfg, dev)
    ref = None
    if ref_stats is not None or cfg.eval.ref_stats:
        ref = _as_ref(ref_stats, cfg)
    want_feats = return_features or (kid and ref is not None and "feats" in ref)
    was_training = model.training
    model.eval()
    if generate_fn is None:
        generate_fn = make_generate_fn(model, cfg, sde, sampler, dev)
    method = getattr(generate_fn, "method", sampler or "custom")
    n_batches = ceil_div(n_total, bs)
    mine = list(range(rank, n_batches, world))
    # features kept for KID in float32; in float64 when returned (exact check against np.cov)
    stats = FeatureStats(keep_features=want_feats, keep_dtype=torch.float64 if return_features else torch.float32)
    nfe_sum = 0.0
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=len(mine), desc=f"FID sampling, rank 0 of {world} ({n_total} in all)",
                   unit="batch", dynamic_ncols=True)
    save_dir = Path(save_dir) if save_dir else None
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    try:
        for k in mine:
            n = min(bs, n_total - k * bs)
            g = torch.Generator(device=dev).manual_seed(seed_for(seed, k))
            with torch.no_grad():
                x, nfe = generate_fn(n, g)
            u8 = to_uint8(x.detach().float(), cfg.data.centered).cpu()
            index = torch.arange(k * bs, k * bs + n, dtype=torch.int64)
            stats.update(fe(u8), index)
            nfe_sum += float(nfe)
            if save_dir is not None:
                _save_pngs(u8, index, save_dir)
            if grid_path is not None and k == 0:
                save_grid(x[:64].detach().cpu().float(), grid_path, centered=cfg.data.centered)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    stats.all_reduce()
    nfe_mean = float(all_reduce_sum(torch.tensor([nfe_sum], dtype=torch.float64)).item()) / n_batches
    result = {"metric": "fid", "N": stats.n, "sampler": method, "nfe": nfe_mean,
              "batch_size": bs, "seed": seed, "world_size": world,
              "feature_extractor": getattr(fe, "name", "custom")}
    feats = None
    if want_feats:
        _, feats = stats.gathered_features()
        feats = feats.numpy()
    if stats.n != n_total:
        raise RuntimeError(f"FID statistics hold {stats.n} samples, expected {n_total}")
    mu, sigma = stats.mean_cov()
    if ref is not None:
        value, kid_value = float("nan"), float("nan")
        if rank == 0:
            value = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
            if kid and "feats" in ref and feats is not None:
                kid_value = kernel_distance(feats, ref["feats"], seed=seed)
        result["value"] = broadcast_float(value)
        if kid and "feats" in ref:
            result["kid"] = broadcast_float(kid_value)
    result["seconds"] = time.time() - t0
    if return_features:
        result["features"] = feats
        result["mu"], result["sigma"] = mu, sigma
    return result


def evaluate_in_training(model, cfg, sde, accelerator=None, *, step: int,
                         run_dir: Optional[str | Path] = None, progress: bool = False) -> dict:
    """The trainer's ``eval.every`` hook; every rank calls it with the raw EMA module.

    FID of cfg.eval.fid_num_samples samples (when eval.ref_stats is set; call
    ``check_eval_inputs`` at start-up so a missing file fails before training) and bpd of
    cfg.eval.bpd_num_batches test batches per rank (when data.test_shards is set; one pass).
    Returns flat metrics on every rank: eval/fid, eval/kid, eval/fid_nfe, eval/bpd,
    eval/bpd_stderr, eval/bpd_nfe, eval/seconds. The main rank appends them with the step as
    one JSON line to RUN_DIR/eval/metrics.jsonl.
    """
    t0 = time.time()
    _, world = _rank_world(accelerator)
    out: dict = {}
    if cfg.eval.ref_stats:
        r = evaluate_fid(model, cfg, sde, state=accelerator, progress=progress)
        out["eval/fid"] = r.get("value")
        if "kid" in r:
            out["eval/kid"] = r["kid"]
        out["eval/fid_nfe"] = r["nfe"]
        out["eval/fid_n"] = r["N"]
    if cfg.data.test_shards:
        r = evaluate_bpd(model, cfg, sde, state=accelerator, num_batches=cfg.eval.bpd_num_batches * world,
                         passes=1, progress=progress)
        out["eval/bpd"], out["eval/bpd_stderr"], out["eval/bpd_nfe"] = r["value"], r["stderr"], r["nfe"]
        out["eval/bpd_n"] = r["N"]
    out["eval/seconds"] = time.time() - t0
    if run_dir is not None and _is_main(accelerator):
        f = Path(run_dir) / "eval" / "metrics.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "a") as fh:
            fh.write(json.dumps({"step": step, **out}) + "\n")
    return out


def _save_pngs(u8: torch.Tensor, index: torch.Tensor, folder: Path) -> None:
    from PIL import Image
    arr = u8.permute(0, 2, 3, 1).numpy()
    for a, i in zip(arr, index.tolist()):
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(folder / f"{i:06d}.png")


def compute_ref_stats(urls: list[str], feature_extractor, *, channels: int = 3, batch_size: int = 100,
                      state=None, keep_features: int = 0, progress: bool = True):
    """Feature statistics of shard images; shards are split across ranks (urls[rank::W]).

    Returns (FeatureStats summed over ranks, kept features (≤ keep_features rows) or None).
    """
    rank, world = _rank_world(state)
    stats = FeatureStats(keep_features=keep_features > 0, max_keep=ceil_div(keep_features, world) if keep_features else None)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(desc=f"reference features (rank 0 of {world})", unit="img", dynamic_ncols=True)
    count = 0
    for chunk in batched(iter_shard_images(urls[rank::world], channels), batch_size):
        u8 = torch.from_numpy(np.stack([a for _, a in chunk])).permute(0, 3, 1, 2).contiguous()
        idx = torch.arange(count, count + len(chunk)) * world + rank
        stats.update(feature_extractor(u8), idx)
        count += len(chunk)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    stats.all_reduce()
    feats = None
    if keep_features:
        _, f = stats.gathered_features()
        feats = f[:keep_features].numpy()
    return stats, feats


# --------------------------------------------------------------------------- bits per dim
def _test_batches(images: Optional[torch.Tensor], shards: Optional[str], channels: int, bs: int):
    """Global batches (k, uint8 (n,C,H,W)) of the test set in a fixed order."""
    if images is not None:
        for k in range(ceil_div(images.shape[0], bs)):
            yield k, images[k * bs:(k + 1) * bs]
        return
    urls = expand_shards(shards or "")
    if not urls:
        raise FileNotFoundError(f"no test shards match {shards!r}")
    for k, chunk in enumerate(batched(iter_shard_images(urls, channels), bs)):
        yield k, torch.from_numpy(np.stack([a for _, a in chunk])).permute(0, 3, 1, 2).contiguous()


def evaluate_bpd(model, cfg, sde, *, images: Optional[torch.Tensor] = None, shards: Optional[str] = None,
                 state=None, accelerator=None, batch_size: Optional[int] = None,
                 passes: Optional[int] = None, num_batches: Optional[int] = None,
                 max_samples: Optional[int] = None, seed: Optional[int] = None,
                 hutchinson: Optional[str] = None, rtol: Optional[float] = None,
                 atol: Optional[float] = None, eps: Optional[float] = None,
                 dequantize: Optional[bool] = None, progress: bool = True, device=None,
                 return_per_sample: bool = False) -> dict:
    """Negative log-likelihood in bits/dim via the probability-flow ODE; every rank calls.

    Data: ``images`` (uint8 (N,C,H,W)) or ``shards`` (default cfg.data.test_shards), read in
    a fixed order and cut into global batches; batch k runs on rank k mod W. Pass p of batch
    k draws its dequantisation noise and Hutchinson probes from a generator seeded by
    (seed, p, k), so results do not depend on the number of ranks. ``num_batches`` limits the
    number of global batches (the trainer's quick eval: cfg.eval.bpd_num_batches per rank),
    ``max_samples`` the number of test images; otherwise every test image counts.
    Returns {"metric": "bpd", "value" (mean), "stderr", "N", "passes", "pass_means", "nfe", ...}.
    bpd = -log p(x) / (D ln 2) + offset, offset = log2(256) - log2(scale) (see ``bpd_offset``).
    """
    from .likelihood import bits_per_dim, log_likelihood
    from .score import get_score_fn

    state = state if state is not None else accelerator
    rank, world = _rank_world(state)
    dev = _device(state, device)
    ec = cfg.eval
    bs = int(batch_size or ec.batch_size)
    passes = int(passes or ec.bpd_passes)
    seed = ec.seed if seed is None else seed
    hutchinson = hutchinson or ec.hutchinson
    rtol = ec.rtol if rtol is None else rtol
    atol = ec.atol if atol is None else atol
    eps = ec.likelihood_eps if eps is None else eps
    dequantize = ec.dequantize if dequantize is None else dequantize
    if images is None and not shards:
        shards = cfg.data.test_shards
    offset = bpd_offset(cfg.data.centered)
    score_fn = get_score_fn(model, sde)
    t0 = time.time()
    was_training = model.training
    model.eval()
    idx_rows, bpd_rows, nfe_rows = [], [], []
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(desc=f"bpd batches (rank 0 of {world})", unit="batch", dynamic_ncols=True)
    n_seen = 0
    try:
        for k, u8 in _test_batches(images, shards, cfg.data.num_channels, bs):
            if num_batches is not None and k >= num_batches:
                break
            if max_samples is not None:
                if n_seen >= max_samples:
                    break
                u8 = u8[: max_samples - n_seen]
            n_seen += u8.shape[0]
            if k % world != rank:
                continue
            u8 = u8.to(dev)
            D = u8[0].numel()
            per_pass, nfes = [], []
            for p in range(passes):
                g = torch.Generator(device=dev).manual_seed(seed_for(seed, p, k))
                noise = torch.rand(u8.shape, generator=g, device=dev) if dequantize else None
                x = to_model_space(u8, cfg.data.centered, noise)
                logp, _, nfe = log_likelihood(score_fn, sde, x, hutchinson=hutchinson, rtol=rtol,
                                              atol=atol, eps=eps, generator=g)
                bpd = bits_per_dim(logp.detach().double().cpu(), D, offset)
                per_pass.append(bpd)
                nfes.append(float(nfe))
            idx_rows.append(torch.arange(k * bs, k * bs + u8.shape[0], dtype=torch.int64))
            bpd_rows.append(torch.stack(per_pass, 1))
            nfe_rows.append(torch.tensor(nfes, dtype=torch.float64).expand(u8.shape[0], passes))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
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


# --------------------------------------------------------------------------- results
def write_result(result: dict, out: Path, run_dir: Optional[Path], state=None, extra_line: str = "") -> None:
    """Main rank: results JSON (atomic) and a line appended to RUN_DIR/summary.txt."""
    if not _is_main(state):
        return
    clean = {k: v for k, v in result.items() if not isinstance(v, np.ndarray) and k not in ("features", "mu", "sigma")}
    _atomic_write_text(out, json.dumps(clean, indent=1) + "\n")
    if run_dir is not None and run_dir.is_dir():
        line = _summary_line(clean) + (f" {extra_line}" if extra_line else "") + f" -> {out}\n"
        with open(run_dir / "summary.txt", "a") as fh:
            fh.write(line)


def _summary_line(r: dict) -> str:
    m = r.get("metric")
    step = r.get("checkpoint_step")
    if m == "fid":
        kid = f", KID {r['kid']:.5f}" if "kid" in r and r["kid"] == r["kid"] else ""
        return (f"eval fid: {r.get('value', float('nan')):.4f}{kid} (N={r['N']}, {r['sampler']}, "
                f"NFE {r['nfe']:.0f}, step {step}, {r['seconds']:.0f}s)")
    if m == "bpd":
        return (f"eval bpd: {r['value']:.4f} ± {r['stderr']:.4f} (N={r['N']}, passes {r['passes']}, "
                f"NFE {r['nfe']:.0f}, step {step}, {r['seconds']:.0f}s)")
    if m == "fpe":
        return f"eval fpe: mean residual {r['value']:.4g} over {len(r['t'])} times (N={r['N']}, step {step})"
    return f"eval {m}: {r.get('value')}"


# --------------------------------------------------------------------------- CLI
def build_parser(prog: str = "fpdiff eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=(
        "Evaluate a run (FID/KID with clean-fid, bits/dim), or make FID reference statistics. "
        "Distributed with `accelerate launch --multi_gpu --num_processes K -m pipeline.evaluate ...`."))
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, run=True):
        if run:
            sp.add_argument("run", help="run directory, its export/ folder, or checkpoints/step_XXXXXXXX")
            sp.add_argument("overrides", nargs="*", help="dotted config overrides (e.g. sampling.num_steps=500)")
        sp.add_argument("--batch-size", type=int, default=None, help="per-batch size (default eval.batch_size)")
        sp.add_argument("--seed", type=int, default=None, help="default eval.seed")
        sp.add_argument("--out", default=None, help="results file (default RUN/eval/<metric>-step<S>.json)")
        sp.add_argument("--no-progress", action="store_true")
        sp.add_argument("--device", default=None, help="default: the process's accelerator device")

    f = sub.add_parser("fid", help="FID (and KID) of samples against reference statistics")
    common(f)
    f.add_argument("--num-samples", type=int, default=None, help="N (default eval.fid_num_samples)")
    f.add_argument("--sampler", choices=["pc", "ode"], default=None, help="default eval.sampler / sampling.method")
    f.add_argument("--ref-stats", default=None, help=".npz from `ref-stats`, or a clean-fid name NAME[:SPLIT] (default eval.ref_stats)")
    f.add_argument("--feature-extractor", default=None, help="local TorchScript file (default: clean-fid Inception)")
    f.add_argument("--save-samples", default=None, help="folder for the samples as PNG files (<index>.png)")
    f.add_argument("--grid", default=None, nargs="?", const="", help="write a grid of the first 64 samples (default path RUN/eval/fid-grid-step<S>.png)")
    f.add_argument("--no-kid", action="store_true", help="skip KID even if the reference holds features")
    f.add_argument("--save-features", default=None, help="write the N gathered features (sample order) to this .npy")

    b = sub.add_parser("bpd", help="negative log-likelihood in bits/dim on the test shards")
    common(b)
    b.add_argument("--shards", default=None, help="test shard pattern (default data.test_shards)")
    b.add_argument("--passes", type=int, default=None, help="passes with fresh dequantisation noise and probes (default eval.bpd_passes)")
    b.add_argument("--max-samples", type=int, default=None, help="only the first M test images (default all)")
    b.add_argument("--hutchinson", choices=["rademacher", "gaussian", "exact"], default=None,
                   help="trace estimator probes (default eval.hutchinson); exact: D VJPs per step (tiny data only)")
    b.add_argument("--rtol", type=float, default=None)
    b.add_argument("--atol", type=float, default=None)
    b.add_argument("--eps", type=float, default=None, help="likelihood ODE starts at t=eps (default eval.likelihood_eps)")
    b.add_argument("--no-dequantize", action="store_true", help="no uniform dequantisation (u8/255)")

    r = sub.add_parser("ref-stats", help="reference feature statistics of shards -> .npz")
    common(r, run=False)
    r.add_argument("--shards", required=True, help="shard pattern (brace / glob / folder / pipe: URLs)")
    r.add_argument("--channels", type=int, default=3, choices=[1, 3], help="decode images as 1 or 3 channels")
    r.add_argument("--feature-extractor", default=None, help="local TorchScript file (default: clean-fid Inception)")
    r.add_argument("--keep-features", type=int, default=10000, help="features stored for KID (0: none)")

    try:
        from .fpe import fpe_residual_by_t  # noqa: F401
        have_fpe = True
    except Exception:
        have_fpe = False
    if have_fpe:
        e = sub.add_parser("fpe", help="FPE residual norm over a grid of times on test images")
        common(e)
        e.add_argument("--shards", default=None, help="test shard pattern (default data.test_shards)")
        e.add_argument("--num-times", type=int, default=20, help="points of the t-grid in [fpe.t_min, fpe.t_max]")
        e.add_argument("--max-samples", type=int, default=256)
    return p


def _default_out(run_dir: Optional[Path], metric: str, step) -> Path:
    base = run_dir / "eval" if run_dir is not None else Path("eval")
    return base / f"{metric}-step{step if step is not None else 'unknown'}.json"


def _print_err(state, msg: str) -> None:
    if _is_main(state):
        print(f"fpdiff eval: error: {msg}", file=sys.stderr, flush=True)


def evaluate_main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``fpdiff eval`` and ``python -m pipeline.evaluate``; returns an exit code
    (0 ok, 2 bad input: missing file, bad config, no data)."""
    from .config import ConfigError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or "=" not in e]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:  # dotted overrides given after options
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    state = get_state()
    try:
        if args.cmd == "ref-stats":
            return _cmd_ref_stats(args, state)
        return _cmd_run(args, state)
    except (MissingFileError, ConfigError, FileNotFoundError) as e:
        _print_err(state, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return 2


def _cmd_ref_stats(args, state) -> int:
    out = Path(args.out or "ref_stats.npz")
    urls = expand_shards(args.shards)
    if not urls:
        raise FileNotFoundError(f"no shards match {args.shards!r}")
    fe_path = _main_first(state, lambda dl: check_feature_extractor(args.feature_extractor, download=dl))
    dev = _device(state, args.device)
    fe = FeatureExtractor(str(fe_path) if args.feature_extractor else None, device=dev, download=False)
    t0 = time.time()
    stats, feats = compute_ref_stats(urls, fe, channels=args.channels, batch_size=args.batch_size or 100,
                                     state=state, keep_features=args.keep_features, progress=not args.no_progress)
    if stats.n < 2:
        raise FileNotFoundError(f"only {stats.n} decodable images in {args.shards!r}")
    if _is_main(state):
        save_stats(out, stats, feats=feats, meta={"feature_extractor": fe.name, "shards": args.shards, "mode": "clean"})
        print(f"[fpdiff] reference statistics of {stats.n} images ({time.time() - t0:.0f}s): {out}", flush=True)
    barrier()
    return 0


def _cmd_run(args, state) -> int:
    from .sde import build_sde

    rank, world = _rank_world(state)
    dev = _device(state, args.device)
    _, _, run_dir = resolve_eval_source(args.run)
    # start-up checks before anything is loaded or written
    fe_path = ref_path = None
    if args.cmd == "fid":
        from .config import load_config
        _, cfg_path, _ = resolve_eval_source(args.run)
        cfg0 = load_config(cfg_path, args.overrides)
        fe_spec = args.feature_extractor or cfg0.eval.feature_extractor or None
        fe_path = _main_first(state, lambda dl: check_feature_extractor(fe_spec, download=dl))
        ref_path = _main_first(state, lambda dl: check_ref_stats(args.ref_stats or cfg0.eval.ref_stats,
                                                                   cfg0.data.image_size, download=dl))
    model, cfg, step = load_for_eval(args.run, device=dev, overrides=args.overrides)
    sde = build_sde(cfg.sde)
    out = Path(args.out) if args.out else _default_out(run_dir, args.cmd, step)
    progress = not args.no_progress
    if args.cmd == "fid":
        fe = FeatureExtractor(str(fe_path) if fe_spec else None, device=dev, download=False)
        grid = None
        if args.grid is not None:
            grid = Path(args.grid) if args.grid else out.parent / f"fid-grid-step{step}.png"
        res = evaluate_fid(model, cfg, sde, num_samples=args.num_samples, feature_extractor=fe,
                           ref_stats=load_ref_stats(ref_path), state=state, batch_size=args.batch_size,
                           seed=args.seed, sampler=args.sampler, save_dir=args.save_samples,
                           grid_path=grid, kid=False if args.no_kid else None, progress=progress, device=dev,
                           return_features=bool(args.save_features))
        if args.save_features and rank == 0:
            feats_out = Path(args.save_features)
            feats_out.parent.mkdir(parents=True, exist_ok=True)
            np.save(feats_out, res["features"])
            res["features_file"] = str(feats_out)
        res["ref_stats"] = str(ref_path)
        if grid is not None:
            res["grid"] = str(grid)
        if args.save_samples:
            res["samples_dir"] = str(args.save_samples)
    elif args.cmd == "bpd":
        res = evaluate_bpd(model, cfg, sde, shards=args.shards or cfg.data.test_shards, state=state,
                           batch_size=args.batch_size, passes=args.passes, max_samples=args.max_samples,
                           seed=args.seed, hutchinson=args.hutchinson, rtol=args.rtol, atol=args.atol,
                           eps=args.eps, dequantize=False if args.no_dequantize else None,
                           progress=progress, device=dev)
    elif args.cmd == "fpe":
        res = evaluate_fpe(model, cfg, sde, shards=args.shards or cfg.data.test_shards, state=state,
                           batch_size=args.batch_size, num_times=args.num_times,
                           max_samples=args.max_samples, seed=args.seed, device=dev)
    else:  # pragma: no cover - argparse guards this
        raise ValueError(args.cmd)
    res["checkpoint_step"] = step
    res["checkpoint"] = str(args.run)
    write_result(res, out, run_dir, state)
    if rank == 0:
        print(f"[fpdiff] {_summary_line(res)} -> {out}", flush=True)
    barrier()
    return 0


# --------------------------------------------------------------------------- FPE residual (optional)
def evaluate_fpe(model, cfg, sde, *, shards: Optional[str] = None, images: Optional[torch.Tensor] = None,
                 state=None, batch_size: Optional[int] = None, num_times: int = 20,
                 max_samples: int = 256, seed: Optional[int] = None, device=None) -> dict:
    """FPE residual over a t-grid on test images (``pipeline.fpe.fpe_residual_by_t``).

    Global batch k (rank k mod W) uses a generator seeded by (seed, k). Returns the mean
    ‖r‖²/D² per t (unbiased, two probes) summed over ranks, its square root, and the mean over t.
    """
    from .fpe import fpe_residual_by_t

    rank, world = _rank_world(state)
    dev = _device(state, device)
    bs = int(batch_size or cfg.eval.batch_size)
    seed = cfg.eval.seed if seed is None else seed
    t_grid = torch.linspace(cfg.fpe.t_min, cfg.fpe.t_max, num_times)
    sq_sum = torch.zeros(num_times, dtype=torch.float64)
    per_sum = torch.zeros(num_times, dtype=torch.float64)
    n_local, n_seen = 0, 0
    was_training = model.training
    model.eval()
    try:
        for k, u8 in _test_batches(images, shards, cfg.data.num_channels, bs):
            if n_seen >= max_samples:
                break
            u8 = u8[: max_samples - n_seen]
            n_seen += u8.shape[0]
            if k % world != rank:
                continue
            x0 = to_model_space(u8.to(dev), cfg.data.centered)
            g = torch.Generator(device=dev).manual_seed(seed_for(seed, k))
            r = fpe_residual_by_t(model, sde, x0, t_grid.to(dev), n_probes=2, probe=cfg.fpe.probe,
                                  dt_method=cfg.fpe.dt_method, fd_step=cfg.fpe.fd_step,
                                  div_method=cfg.fpe.div_method, generator=g)
            sq_sum += r["sq_norm"].detach().double().cpu() * u8.shape[0]
            per_sum += r["norm_per_sample"].detach().double().cpu() * u8.shape[0]
            n_local += u8.shape[0]
    finally:
        model.train(was_training)
    sq_sum, per_sum = all_reduce_sum(sq_sum), all_reduce_sum(per_sum)
    n = int(all_reduce_sum(torch.tensor([n_local], dtype=torch.int64)).item())
    if n == 0:
        raise RuntimeError("fpe: no test samples were read")
    sq = sq_sum / n
    norm = sq.clamp_min(0).sqrt()
    return {"metric": "fpe", "value": float(norm.mean()), "t": t_grid.tolist(),
            "sq_norm": sq.tolist(), "norm": norm.tolist(), "norm_per_sample": (per_sum / n).tolist(),
            "N": n, "seed": seed, "world_size": world}


if __name__ == "__main__":
    sys.exit(evaluate_main())
