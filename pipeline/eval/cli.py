"""Evaluation stage: distributed FID / KID (clean-fid), bits/dim, reference statistics, FPE residual.

    python -m pipeline.eval {fid,bpd,ref-stats,fpe,conservativity} ...       (one process)
    accelerate launch --multi_gpu --num_processes K -m pipeline.eval fid RUN ...
    fpdiff eval {fid,bpd,ref-stats,fpe,conservativity} ...        (``evaluate_main(argv)``)

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

This module holds the stage entry (CLI) and the trainer hooks; the metrics are in
``pipeline.eval.fid``, ``pipeline.eval.bpd``, ``pipeline.eval.fpe`` and ``pipeline.eval.conservativity``, finding and loading the model in ``pipeline.rundir``, shared
helpers in ``pipeline.eval.common`` (all re-exported here).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.atomic import atomic_path, atomic_write_json
from pipeline.cliargs import ArgumentParser
from pipeline.rundir import RunDir, find_weights, load_for_eval
from pipeline.eval.bpd import evaluate_bpd
from pipeline.eval.fpe import evaluate_fpe
from pipeline.data.test_set import local_shard_counts, require_test_shards
from pipeline.eval.common import device_of, main_first, get_state
from pipeline.eval.conservativity import evaluate_conservativity
from pipeline.data.reader import shard_urls
from pipeline.eval.fid import compute_ref_stats, evaluate_fid, saved_sample_files
from pipeline.eval.features import (DEFAULT_EXTRACTOR, FeatureExtractor, MissingFileError, check_feature_extractor,
                                    check_ref_matches, check_ref_stats, extractor_identity, load_ref_stats, save_stats)
from pipeline.collectives import barrier, is_main_rank, rank_world
from pipeline.config import ConfigError, EvalConfig, SamplingConfig, choices, finite_float
from pipeline.config_files import load_saved_config
from pipeline.sde import build_sde
from pipeline.status import EXIT_BAD_CONFIG, fail, result


# --------------------------------------------------------------------------- in-training / library API
def check_eval_inputs(cfg, state=None, *, fid: bool = True, download: bool = True) -> dict:
    """Start-up check for the trainer (every rank calls): resolves the feature extractor and
    the reference statistics of ``cfg.eval``; raises MissingFileError (one line) if missing.
    Returns {"feature_extractor": Path, "ref_stats": Path} (FID skipped: {}).
    """
    if not fid or not cfg.eval.ref_stats:
        return {}
    fe = main_first(state, lambda dl: check_feature_extractor(cfg.eval.feature_extractor or None, download=download and dl))
    ref = main_first(state, lambda dl: check_ref_stats(cfg.eval.ref_stats, cfg.data.image_size, download=download and dl))
    custom = cfg.eval.feature_extractor or None
    check_ref_matches(load_ref_stats(ref), str(fe) if custom else DEFAULT_EXTRACTOR,
                      extractor_identity(str(fe) if custom else None), cfg.data.image_size)
    return {"feature_extractor": fe, "ref_stats": ref}


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
    _, world = rank_world(accelerator)
    out: dict = {}
    if cfg.eval.ref_stats:
        r = evaluate_fid(model, cfg, sde, state=accelerator, progress=progress)
        out["eval/fid"] = r.get("value")
        if "kid" in r:
            out["eval/kid"] = r["kid"]
        out["eval/fid_nfe"] = r["nfe"]
        out["eval/fid_n"] = r["N"]
    if cfg.data.test_shards:
        quick = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, bpd_passes=1))  # one pass
        r = evaluate_bpd(model, quick, sde, state=accelerator, num_batches=cfg.eval.bpd_num_batches * world,
                         progress=progress)
        out["eval/bpd"], out["eval/bpd_stderr"], out["eval/bpd_nfe"] = r["value"], r["stderr"], r["nfe"]
        out["eval/bpd_n"] = r["N"]
    out["eval/seconds"] = time.time() - t0
    if run_dir is not None and is_main_rank(accelerator):
        f = RunDir(run_dir).eval_log
        f.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "a") as fh:
            fh.write(json.dumps({"step": step, **out}) + "\n")
    return out


# --------------------------------------------------------------------------- results
def write_result(result: dict, out: Path, run: Optional[RunDir], state=None, extra_line: str = "") -> None:
    """Main rank: results JSON (atomic) and a line appended to the run's summary.txt."""
    if not is_main_rank(state):
        return
    clean = {k: v for k, v in result.items() if not isinstance(v, np.ndarray) and k not in ("features", "mu", "sigma")}
    atomic_write_json(out, clean)
    if run is not None and run.path.is_dir():
        run.add_summary_line(_summary_line(clean) + (f" {extra_line}" if extra_line else "") + f" -> {out}")


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
    if m == "conservativity":
        return (f"eval conservativity: relative Jacobian asymmetry {r['value']:.4g} ± {r['stderr']:.2g} "
                f"(mean over {len(r['t'])} t-buckets, N={r['N']}, step {step})")
    return f"eval {m}: {r.get('value')}"


# --------------------------------------------------------------------------- CLI
def build_parser(prog: str = "fpdiff eval") -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=(
        "Evaluate a run (FID/KID with clean-fid, bits/dim), or make FID reference statistics. "
        "Distributed with `accelerate launch --multi_gpu --num_processes K -m pipeline.eval ...`."))
    sub = p.add_subparsers(dest="cmd", required=True, help="the metric (or ref-stats); `fpdiff eval METRIC --help`")

    def common(sp, run=True):
        if run:
            sp.add_argument("run", help="run directory, its export/ folder, or checkpoints/step_XXXXXXXX")
            sp.add_argument("overrides", nargs="*", help="dotted config overrides (e.g. sampling.num_steps=500)")
        sp.add_argument("--batch-size", type=int, default=None, help="per-batch size (default eval.batch_size)")
        sp.add_argument("--seed", type=int, default=None, help="default eval.seed")
        sp.add_argument("--out", default=None, help="results file (default RUN/eval/<metric>-step<S>.json)")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")
        sp.add_argument("--device", default=None, help="default: the process's accelerator device")

    f = sub.add_parser("fid", help="FID (and KID) of samples against reference statistics")
    common(f)
    f.add_argument("--num-samples", type=int, default=None, help="N (default eval.fid_num_samples)")
    f.add_argument("--sampler", choices=choices(SamplingConfig, "method"), default=None,
                   help="default eval.sampler / sampling.method")
    f.add_argument("--ref-stats", default=None, help=".npz from `ref-stats`, or a clean-fid name NAME[:SPLIT] (default eval.ref_stats)")
    f.add_argument("--feature-extractor", default=None, help="local TorchScript file (default: clean-fid Inception)")
    f.add_argument("--save-samples", default=None, help="folder for the samples as PNG files (<index>.png)")
    f.add_argument("--grid", default=None, nargs="?", const="", help="write a grid of the first 64 samples (default path RUN/eval/fid-grid-step<S>.png)")
    f.add_argument("--no-kid", action="store_true", help="skip KID even if the reference holds features")
    f.add_argument("--from-samples", nargs="+", default=None, metavar="DIR",
                   help="score PNG samples saved earlier (--save-samples) instead of sampling; N = their count (or the first --num-samples of them)")
    f.add_argument("--save-features", default=None, help="write the N gathered features (sample order) to this .npy")

    b = sub.add_parser("bpd", help="negative log-likelihood in bits/dim on the test shards")
    common(b)
    b.add_argument("--shards", default=None, help="test shard pattern (default data.test_shards)")
    b.add_argument("--passes", type=int, default=None, help="passes with fresh dequantisation noise and probes (default eval.bpd_passes)")
    b.add_argument("--max-samples", type=int, default=None, help="only the first M test images (default all)")
    b.add_argument("--hutchinson", choices=choices(EvalConfig, "hutchinson"), default=None,
                   help="trace estimator probes (default eval.hutchinson); exact: D VJPs per step (tiny data only)")
    b.add_argument("--rtol", type=finite_float, default=None, help="likelihood ODE relative tolerance (default eval.rtol)")
    b.add_argument("--atol", type=finite_float, default=None, help="likelihood ODE absolute tolerance (default eval.atol)")
    b.add_argument("--eps", type=finite_float, default=None, help="likelihood ODE starts at t=eps (default eval.likelihood_eps)")
    b.add_argument("--no-dequantize", action="store_true", help="no uniform dequantisation (u8/255)")

    r = sub.add_parser("ref-stats", help="reference feature statistics of shards -> .npz")
    common(r, run=False)
    r.add_argument("--shards", required=True, help="shards as data.shards takes them: brace patterns or "
                   "globs joined by '::', a folder, an index .json, file:// or pipe: URLs")
    r.add_argument("--channels", type=int, default=3, choices=[1, 3], help="decode images as 1 or 3 channels")
    r.add_argument("--feature-extractor", default=None, help="local TorchScript file (default: clean-fid Inception)")
    r.add_argument("--keep-features", type=int, default=10000, help="features stored for KID (0: none)")

    e = sub.add_parser("fpe", help="FPE residual norm over a grid of times on test images, estimated as the run's fpe.* config says (dt_method, probe, n_probes, fused; override e.g. fpe.n_probes=8)")
    common(e)
    e.add_argument("--shards", default=None, help="test shard pattern (default data.test_shards)")
    e.add_argument("--num-times", type=int, default=None, help="points of the t-grid in [fpe.t_min, fpe.t_max] (default eval.fpe_num_times)")
    e.add_argument("--max-samples", type=int, default=None, help="only the first M test images (default eval.fpe_max_samples)")

    c = sub.add_parser("conservativity", help="relative asymmetry of the score's Jacobian, E|(J-J^T)v|^2 / E|Jv|^2 "
                       "(Rademacher v; 0 for a gradient field), per t-bucket of [fpe.t_min, fpe.t_max] on test images")
    common(c)
    c.add_argument("--shards", default=None, help="test shard pattern (default data.test_shards)")
    c.add_argument("--num-buckets", type=int, default=None, help="equal t-buckets; each image gets a t uniform in each (default eval.conservativity_buckets)")
    c.add_argument("--max-samples", type=int, default=None, help="the first M test images (default eval.conservativity_max_samples)")
    c.add_argument("--probes", type=int, default=None, help="Rademacher probes per image and bucket (default eval.conservativity_probes)")
    return p


# ``fpdiff eval METRIC`` flags that set a config key: given, they become dotted overrides (after the
# ones typed, so a flag wins), and the metric reads the config alone
FLAG_KEYS = {
    "fid": {"num_samples": "eval.fid_num_samples", "batch_size": "eval.batch_size", "seed": "eval.seed",
            "sampler": "eval.sampler", "ref_stats": "eval.ref_stats", "feature_extractor": "eval.feature_extractor"},
    "bpd": {"batch_size": "eval.batch_size", "seed": "eval.seed", "shards": "data.test_shards",
            "passes": "eval.bpd_passes", "hutchinson": "eval.hutchinson", "rtol": "eval.rtol", "atol": "eval.atol",
            "eps": "eval.likelihood_eps"},
    "fpe": {"batch_size": "eval.batch_size", "seed": "eval.seed", "shards": "data.test_shards",
            "num_times": "eval.fpe_num_times", "max_samples": "eval.fpe_max_samples"},
    "conservativity": {"batch_size": "eval.batch_size", "seed": "eval.seed", "shards": "data.test_shards",
                       "num_buckets": "eval.conservativity_buckets", "probes": "eval.conservativity_probes",
                       "max_samples": "eval.conservativity_max_samples"},
}
SWITCH_KEYS = {"fid": {"no_kid": "eval.kid"}, "bpd": {"no_dequantize": "eval.dequantize"}}  # on: the key false


def flag_overrides(args) -> list[str]:
    """The dotted overrides the given flags of ``args.cmd`` stand for (strings quoted: read back as is)."""
    out = [f"{key}={json.dumps(getattr(args, flag)) if isinstance(getattr(args, flag), str) else getattr(args, flag)}"
           for flag, key in FLAG_KEYS.get(args.cmd, {}).items() if getattr(args, flag) is not None]
    return out + [f"{key}=false" for flag, key in SWITCH_KEYS.get(args.cmd, {}).items() if getattr(args, flag)]


def name_the_flag(msg: str, args) -> str:
    """A config error on a key that a given flag set names the flag first:
    'eval.conservativity_buckets: must be >= 1, got 0' -> '--num-buckets: must be >= 1, got 0 (eval.conservativity_buckets)'."""
    for flag, key in FLAG_KEYS.get(getattr(args, "cmd", None), {}).items():
        if msg.startswith(key + ":") and getattr(args, flag, None) is not None:
            return f"--{flag.replace('_', '-')}{msg[len(key):]} ({key})"
    return msg


def _print_err(state, msg: str) -> None:
    if is_main_rank(state):
        fail("eval", f"error: {msg}")


def evaluate_main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``fpdiff eval`` and ``python -m pipeline.eval``; returns an exit code
    (0 ok, 2 bad input: missing file, bad config, no data)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or "=" not in e]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:  # dotted overrides given after options
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    if args.cmd in FLAG_KEYS:
        args.overrides = list(args.overrides) + flag_overrides(args)
    state = get_state()
    try:
        if args.cmd == "ref-stats":
            return _cmd_ref_stats(args, state)
        return _cmd_run(args, state)
    except (MissingFileError, ConfigError, FileNotFoundError) as e:
        _print_err(state, name_the_flag(str(e).splitlines()[0], args) if str(e) else type(e).__name__)
        return EXIT_BAD_CONFIG
    finally:
        # as training's end_training() does: a gloo group left to interpreter shutdown can abort a rank
        # that already finished (exit -6, "terminate called without an active exception")
        state.destroy_process_group()


def _cmd_ref_stats(args, state) -> int:
    out = Path(args.out or "ref_stats.npz")
    urls = shard_urls(args.shards, key="--shards")
    fe_path = main_first(state, lambda dl: check_feature_extractor(args.feature_extractor, download=dl))
    dev = device_of(state, args.device)
    fe = FeatureExtractor(str(fe_path) if args.feature_extractor else None, device=dev, download=False)
    t0 = time.time()
    stats, feats = compute_ref_stats(urls, fe, channels=args.channels, batch_size=args.batch_size or 100,
                                     state=state, keep_features=args.keep_features, progress=not args.no_progress,
                                     counts=local_shard_counts(args.shards) if not args.no_progress else None)
    if stats.n < 2:
        raise FileNotFoundError(f"only {stats.n} decodable images in {args.shards!r}")
    if is_main_rank(state):
        save_stats(out, stats, feats=feats, meta={"feature_extractor": fe.name, "feature_extractor_id": fe.identity,
                                                  "image_size": getattr(stats, "image_size", None),
                                                  "shards": args.shards, "mode": "clean"})
        result(f"reference statistics of {stats.n} images ({time.time() - t0:.0f}s): {out}")
    barrier()
    return 0


def _cmd_run(args, state) -> int:
    rank, world = rank_world(state)
    dev = device_of(state, args.device)
    weights = find_weights(args.run)
    run = weights.run
    if run is None and not args.out:  # results go beside the weights' run, never into the folder above
        raise ConfigError(f"--out: {args.run} is an export folder outside a run dir; name the results file with --out")
    # start-up checks before anything is loaded or written
    fe_path = ref_path = None
    if args.cmd == "fid":
        cfg0 = load_saved_config(weights.config, args.overrides)
        fe_spec = cfg0.eval.feature_extractor or None
        fe_path = main_first(state, lambda dl: check_feature_extractor(fe_spec, download=dl))
        ref_path = main_first(state, lambda dl: check_ref_stats(cfg0.eval.ref_stats, cfg0.data.image_size,
                                                                   download=dl))
    if args.cmd in ("bpd", "fpe", "conservativity"):  # test data, never the training shards; checked before the model loads
        require_test_shards(load_saved_config(weights.config, args.overrides), args.shards,
                            command=f"fpdiff eval {args.cmd}")
    model, cfg, step = load_for_eval(weights, device=dev, overrides=args.overrides)
    sde = build_sde(cfg.sde)
    out = Path(args.out) if args.out else run.eval_result(args.cmd, step)
    progress = not args.no_progress
    if args.cmd == "fid":
        fe = FeatureExtractor(str(fe_path) if fe_spec else None, device=dev, download=False)
        grid = None
        if args.grid is not None:
            grid = Path(args.grid) if args.grid else out.parent / f"fid-grid-step{step}.png"
        sample_files = None
        if args.from_samples:  # all of them, or the first --num-samples
            sample_files = saved_sample_files(args.from_samples)[:args.num_samples or None]
        res = evaluate_fid(model, cfg, sde, feature_extractor=fe, ref_stats=load_ref_stats(ref_path), state=state,
                           sample_files=sample_files, save_dir=args.save_samples, grid_path=grid, progress=progress,
                           device=dev, return_features=bool(args.save_features))
        if args.save_features and rank == 0:
            feats_out = Path(args.save_features)
            with atomic_path(feats_out) as tmp, open(tmp, "wb") as fh:
                np.save(fh, res["features"])
            res["features_file"] = str(feats_out)
        res["ref_stats"] = str(ref_path)
        if grid is not None:
            res["grid"] = str(grid)
        if args.save_samples:
            res["samples_dir"] = str(args.save_samples)
        if args.from_samples:
            res["from_samples"] = [str(d) for d in args.from_samples]
    elif args.cmd == "bpd":
        res = evaluate_bpd(model, cfg, sde, state=state, max_samples=args.max_samples, progress=progress, device=dev)
    elif args.cmd == "fpe":
        res = evaluate_fpe(model, cfg, sde, state=state, device=dev, progress=progress)
    elif args.cmd == "conservativity":
        res = evaluate_conservativity(model, cfg, sde, state=state, progress=progress, device=dev)
    else:  # pragma: no cover - argparse guards this
        raise ValueError(args.cmd)
    res["checkpoint_step"] = step
    res["checkpoint"] = str(args.run)
    write_result(res, out, run, state)
    if rank == 0:
        result(f"{_summary_line(res)} -> {out}")
    barrier()
    return 0


if __name__ == "__main__":
    sys.exit(evaluate_main())
