"""FID / KID of a model's samples, distributed over ranks (scheme in ``pipeline.eval``), and
feature statistics of reference shards (``fpdiff eval ref-stats``)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.atomic import atomic_path
from pipeline.eval.common import device_of, eval_pass
from pipeline.data.reader import iter_images
from pipeline.data.test_set import batched, ceil_div
from pipeline.eval.features import (FeatureExtractor, FeatureStats, check_ref_matches, check_ref_stats, frechet_distance,
                                    kernel_distance, load_ref_stats)
from pipeline.collectives import broadcast_float
from pipeline.collectives import all_reduce_sum, rank_world, seed_for
from pipeline.images import save_grid, to_uint8
from pipeline.sampling import sample
from pipeline.score import sampling_score_fn


def make_generate_fn(model, cfg, sde, device="cpu"):
    """generate(n, generator) -> (x model space (n,C,H,W), nfe) with eval.sampler (``config``:
    sampling.method)."""
    method = cfg.eval.sampler if cfg.eval.sampler != "config" else cfg.sampling.method
    scfg = dataclasses.replace(cfg.sampling, method=method)
    score_fn, _ = sampling_score_fn(model, sde, cfg)  # conditional nets: guided, labels in turn
    shape_tail = (cfg.data.num_channels, cfg.data.image_size, cfg.data.image_size)

    def generate(n: int, generator: torch.Generator):
        return sample(scfg, cfg.sde.sampling_eps, score_fn, sde, (n,) + shape_tail,
                      device=device, generator=generator, progress=False)

    generate.method = scfg.method
    return generate


_EXTRACTORS: dict = {}


def _as_extractor(fe, cfg, device) -> FeatureExtractor:
    """A FeatureExtractor / callable as is; None: cfg.eval.feature_extractor (or Inception), loaded
    once per (path, device) and cached (the trainer evaluates many times)."""
    if fe is not None:
        return fe
    key = (cfg.eval.feature_extractor or None, str(device))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = FeatureExtractor(key[0], device=device, download=False)
    return _EXTRACTORS[key]


def evaluate_fid(model, cfg, sde, *, state=None, feature_extractor=None, ref_stats=None,
                 sample_files: Optional[list[Path]] = None, save_dir: Optional[str | Path] = None,
                 grid_path: Optional[str | Path] = None, progress: bool = True, device=None,
                 generate_fn: Optional[Callable] = None, return_features: bool = False) -> dict:
    """Distributed FID (and KID) of ``model``'s samples; every rank must call it.

    What to compute comes from the config (``fpdiff eval fid``'s flags are dotted overrides of
    it): eval.fid_num_samples samples in batches of eval.batch_size, seeded by eval.seed, drawn by
    eval.sampler (``config``: sampling.method), KID when eval.kid and the reference holds features.
    feature_extractor: a FeatureExtractor / callable(uint8 (B,C,H,W)) -> (B,F), or None
    (cfg.eval.feature_extractor, else clean-fid Inception). ref_stats: dict with mu, sigma
    (feats), or None (cfg.eval.ref_stats); with no reference the dict has the sample statistics'
    n and NFE but no "value". generate_fn(n, generator) -> (x, nfe) replaces the sampler (tests).
    sample_files: PNG samples saved earlier (``--save-samples``, ``saved_sample_files``), scored
    as they are (N = their count), nothing is sampled; e.g. to pool sample sets of several seeds
    or to score them with another feature network. save_dir / grid_path: the samples as PNG files
    / a grid of the first 64.
    Returns {"metric": "fid", "value", "kid", "N", "sampler", "nfe", "seconds", ...} on every rank.
    """
    rank, world = rank_world(state)
    dev = device_of(state, device)
    ec = cfg.eval
    pngs = list(sample_files) if sample_files is not None else None
    n_total = len(pngs) if pngs is not None else ec.fid_num_samples
    bs, seed, kid = ec.batch_size, ec.seed, ec.kid
    t0 = time.time()
    fe = _as_extractor(feature_extractor, cfg, dev)
    ref = None
    if ref_stats is not None or cfg.eval.ref_stats:
        ref = ref_stats if ref_stats is not None else load_ref_stats(
            check_ref_stats(cfg.eval.ref_stats, cfg.data.image_size, download=False))
        check_ref_matches(ref, getattr(fe, "name", type(fe).__name__), getattr(fe, "identity", None),
                          cfg.data.image_size)
    want_feats = return_features or (kid and ref is not None and "feats" in ref)
    if pngs is not None:
        batch_u8 = _read_samples_fn(pngs, bs, cfg)
    else:
        batch_u8 = _sampled_batches(generate_fn or make_generate_fn(model, cfg, sde, device=dev), seed, dev, cfg)
    method = getattr(batch_u8, "method", "custom")
    n_batches = ceil_div(n_total, bs)
    mine = list(range(rank, n_batches, world))
    # features kept for KID in float32; in float64 when returned (exact check against np.cov)
    stats = FeatureStats(keep_features=want_feats, keep_dtype=torch.float64 if return_features else torch.float32)
    nfe_sum = 0.0
    save_dir = Path(save_dir) if save_dir else None
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    with eval_pass(model, progress and rank == 0, total=sum(min(bs, n_total - k * bs) for k in mine), unit="sample",
                   desc=f"FID {'reading' if pngs is not None else 'sampling'}, rank 0 of {world} ({n_total} in all)") as bar:
        for k in mine:
            n = min(bs, n_total - k * bs)
            u8, nfe = batch_u8(k, n)
            index = torch.arange(k * bs, k * bs + n, dtype=torch.int64)
            stats.update(fe(u8), index)
            nfe_sum += float(nfe)
            if save_dir is not None:
                _save_pngs(u8, index, save_dir)
            if grid_path is not None and k == 0:
                save_grid(u8[:64].float() / 255.0, grid_path, centered=False)
            bar.update(n)
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


def saved_sample_files(folders) -> list[Path]:
    """The PNG files of sample folders, folder by folder in name order; an empty or missing
    folder is an error (a FID of fewer samples than meant would pass unnoticed)."""
    files = []
    for folder in map(Path, folders):
        # hidden names are temporaries of a killed writer (pipeline.atomic), not samples
        found = sorted(f for f in folder.glob("*.png") if not f.name.startswith(".")) if folder.is_dir() else []
        if not found:
            raise FileNotFoundError(f"--from-samples: {folder} holds no .png samples")
        files += found
    return files


def _sampled_batches(generate_fn, seed: int, dev, cfg):
    """batch(k, n) -> (uint8 (n, C, H, W) on the CPU, NFE): batch k drawn with a generator seeded
    by (seed, k), so a sample does not depend on the number of ranks."""
    def batch(k: int, n: int):
        g = torch.Generator(device=dev).manual_seed(seed_for(seed, k))
        with torch.no_grad():
            x, nfe = generate_fn(n, g)
        return to_uint8(x.detach().float(), cfg.data.centered).cpu(), nfe

    if hasattr(generate_fn, "method"):
        batch.method = generate_fn.method
    return batch


def _read_samples_fn(files: list[Path], bs: int, cfg):
    """read(k, n) -> (uint8 (n, C, H, W) of batch k, 0 NFE); checks each image's size."""
    want = (cfg.data.image_size, cfg.data.image_size)
    mode = "L" if cfg.data.num_channels == 1 else "RGB"

    def read(k: int, n: int):
        arrs = []
        for f in files[k * bs:k * bs + n]:
            with Image.open(f) as im:
                if im.size != want:
                    raise ValueError(f"--from-samples: {f} is {im.size[0]}x{im.size[1]}, the model's images are {want[0]}x{want[1]}")
                a = np.asarray(im.convert(mode))
            arrs.append(a[..., None] if a.ndim == 2 else a)
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous(), 0.0

    read.method = "saved samples"
    return read


def _save_pngs(u8: torch.Tensor, index: torch.Tensor, folder: Path) -> None:
    """One PNG per sample; a killed run leaves whole files only (``--from-samples`` reads them)."""
    arr = u8.permute(0, 2, 3, 1).numpy()
    for a, i in zip(arr, index.tolist()):
        with atomic_path(folder / f"{i:06d}.png") as tmp:
            Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(tmp, format="PNG")


def compute_ref_stats(urls: list[str], feature_extractor, *, channels: int = 3, batch_size: int = 100,
                      state=None, keep_features: int = 0, progress: bool = True, counts: Optional[list] = None):
    """Feature statistics of shard images; shards are split across ranks (urls[rank::W]).

    Returns (FeatureStats summed over ranks, kept features (≤ keep_features rows) or None).
    ``counts`` (images per url, when known) gives the bar its total.
    """
    rank, world = rank_world(state)
    stats = FeatureStats(keep_features=keep_features > 0, max_keep=ceil_div(keep_features, world) if keep_features else None)
    bar = None
    if progress and rank == 0:
        bar = tqdm(desc=f"reference features (rank 0 of {world})", unit="img", dynamic_ncols=True,
                   total=sum(counts[rank::world]) if counts else None)
    count = 0
    for chunk in batched(iter_images(urls[rank::world], channels), batch_size):
        u8 = torch.from_numpy(np.stack([a for _, a, _ in chunk])).permute(0, 3, 1, 2).contiguous()
        idx = torch.arange(count, count + len(chunk)) * world + rank
        stats.update(feature_extractor(u8), idx)
        stats.image_size = f"{u8.shape[2]}x{u8.shape[3]}"  # recorded in the .npz: FID checks it
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
