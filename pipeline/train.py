"""The training loop: DSM + FPE regularizer, one file, top to bottom.

Runs in one process (``fpdiff train``) or under ``accelerate launch`` (DDP, one or many
nodes). Randomness is stateless: every micro-batch draws its times, noise, probes,
subsample and dropout from a generator seeded by (seed, step, micro-shard index), where
the micro-shard index m = rank * grad_accum + micro_step. Hence a resumed run is bitwise
equal to an uninterrupted one, and a step is the same update for any split of the same
global batch into ranks x accumulation steps.

Exit codes: 0 finished, 75 stopped by SIGUSR1/SIGTERM after a checkpoint (requeue),
2 bad configuration, 3 too many consecutive non-finite steps.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import Config, ConfigError, load_config, save_config
from .ema import EMA
from .images import save_grid
from .score import get_score_fn
from .sde import build_sde

EXIT_OK, EXIT_BAD_CONFIG, EXIT_NONFINITE, EXIT_REQUEUE = 0, 2, 3, 75


def stream_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. seed, step, shard)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class StopRequest:
    """SIGUSR1 / SIGTERM (or a STOP file in the run dir) ask the loop to checkpoint and exit."""

    def __init__(self, run_dir: Path):
        self.flag = False
        self.stop_file = run_dir / "STOP"
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def requested(self) -> bool:
        return self.flag or self.stop_file.exists()


@dataclass
class Counters:
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    corrupt_samples: int = 0
    loss_curve: list = field(default_factory=list)


def lr_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def build_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # find_unused: the regularizer calls the raw module, DSM the wrapper
    kwargs = DistributedDataParallelKwargs(find_unused_parameters=False)
    return Accelerator(mixed_precision=cfg.training.mixed_precision, kwargs_handlers=[kwargs],
                       gradient_accumulation_steps=1)


def sample_grid(ema_model, cfg: Config, sde, device, path: Path, seed: int) -> Path:
    from .sampling import sample

    g = torch.Generator(device=device).manual_seed(seed)
    n = cfg.sampling.num_samples
    shape = (n, cfg.data.num_channels, cfg.data.image_size, cfg.data.image_size)
    x, _ = sample(cfg.sampling, cfg.sde.sampling_eps, get_score_fn(ema_model, sde), sde, shape,
                  device=device, generator=g)
    return save_grid(x, path, centered=cfg.data.centered)


def train(cfg: Config, run_dir: str | Path, resume: str | None = None, progress: bool = True) -> int:
    from tqdm.auto import tqdm

    from .data import build_train_loader
    from .fpe import FPERegularizer
    from .losses import DSMLoss
    from .models import build_model
    from .tracking import Tracker

    run_dir = Path(run_dir)
    accelerator = build_accelerator(cfg)
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    tc = cfg.training
    if tc.batch_size % (world * tc.grad_accum):
        raise ConfigError(f"training.batch_size: {tc.batch_size} not divisible by processes x grad_accum "
                          f"({world} x {tc.grad_accum})")
    micro_bs = tc.batch_size // (world * tc.grad_accum)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()

    # ---- model, EMA, optimizer, schedule
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    sde = build_sde(cfg.sde)
    model = build_model(cfg).to(device)
    if tc.init_from:
        from .hub import load_weights_into
        load_weights_into(model, tc.init_from)
    ema = EMA(model, tc.ema_decay)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2),
                                 eps=tc.adam_eps, weight_decay=tc.weight_decay)
    # stepped by hand once per optimizer step (through prepare it steps once per process)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc.warmup))
    dsm_loss = DSMLoss(sde, eps=tc.eps, likelihood_weighting=tc.likelihood_weighting, reduce_mean=tc.reduce_mean)
    regularizer = FPERegularizer(cfg.fpe, sde) if cfg.fpe.enabled else None

    # ---- resume
    start_step, counters, loader_state = 0, Counters(), None
    resume_from = ckpt.latest_checkpoint(run_dir) if resume == "auto" else (Path(resume) if resume else None)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["state"]["step"]
        loader_state = state["state"].get("loader")
        c = state["state"].get("counters", {})
        counters = Counters(**{k: v for k, v in c.items() if k in Counters.__dataclass_fields__})
        ckpt.set_rng_state(state["rng"])
        if is_main:
            print(f"[fpdiff] resumed from {resume_from} at step {start_step}", flush=True)
    ema.model.to(device)

    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    dsm_score_fn = get_score_fn(model, sde)  # through the wrapper: DDP syncs these gradients

    loader = build_train_loader(cfg, batch_size=tc.batch_size // world, rank=rank, world_size=world,
                                seed=tc.seed, state=loader_state)
    batches = iter(loader)
    tracker = Tracker(cfg.logging, run_dir, cfg.to_dict(), is_main)
    pusher = None
    if is_main and cfg.hub.repo_id:
        from .hub import HubPusher
        pusher = HubPusher(cfg.hub.repo_id, max_retries=cfg.hub.max_retries, private=cfg.hub.private)
    stop = StopRequest(run_dir)

    def save(step: int) -> None:
        accelerator.wait_for_everyone()
        if is_main:
            ckpt.save_checkpoint(
                run_dir, step, model_state=raw_model.state_dict(), ema_state=ema.state_dict(),
                optimizer_state=optimizer.state_dict(),
                extra_state={"scheduler": scheduler.state_dict(), "rng": ckpt.rng_state(),
                             "scaler": accelerator.scaler.state_dict() if accelerator.scaler else None},
                json_state={"loader": loader.state_dict(), "counters": counters.__dict__},
                keep_last=tc.keep_last)
        accelerator.wait_for_everyone()

    bar = tqdm(total=tc.n_steps, initial=start_step, disable=not (is_main and progress), desc="train",
               dynamic_ncols=True)
    t_start, images_seen, step = time.time(), 0, start_step
    exit_code = EXIT_OK
    while step < tc.n_steps:
        # ---- one optimizer step over grad_accum micro-batches
        images, _labels, _keys = next(batches)
        images = images.to(device, non_blocking=True)
        stats = {"dsm": 0.0, "fpe": 0.0, "residual": 0.0}
        for micro in range(tc.grad_accum):
            shard = rank * tc.grad_accum + micro
            seed = stream_seed(tc.seed, step, shard)
            torch.manual_seed(seed)  # dropout masks
            gen = torch.Generator(device=device).manual_seed(seed)
            x0 = images[micro * micro_bs:(micro + 1) * micro_bs]
            with accelerator.no_sync(model) if micro < tc.grad_accum - 1 else _null():
                with accelerator.autocast():
                    dsm = dsm_loss(dsm_score_fn, x0, generator=gen)
                loss = dsm.loss.float()
                fpe_out = regularizer(raw_model, x0, dsm.xt.detach(), dsm.t.detach(), step=step,
                                      generator=gen) if regularizer else None
                if fpe_out is not None:
                    loss = loss + fpe_out.loss
                    stats["fpe"] += fpe_out.loss.item() / tc.grad_accum
                    stats["residual"] += fpe_out.residual_norm.mean().item() / tc.grad_accum
                accelerator.backward(loss / tc.grad_accum)
            stats["dsm"] += dsm.loss.item() / tc.grad_accum

        grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        grad_norm = float(grad_norm)
        if math.isfinite(grad_norm):  # grads are all-reduced: every rank takes the same branch
            optimizer.step()
            ema.update(raw_model)
            counters.consecutive_nonfinite = 0
        else:
            counters.skipped_steps += 1
            counters.consecutive_nonfinite += 1
            if is_main:
                print(f"[fpdiff] step {step}: non-finite loss/gradient, update skipped "
                      f"({counters.consecutive_nonfinite} in a row)", flush=True)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        images_seen += tc.batch_size
        bar.update(1)

        if counters.consecutive_nonfinite >= tc.max_nonfinite:
            if is_main:
                print(f"[fpdiff] stopping: {counters.consecutive_nonfinite} consecutive non-finite steps "
                      f"(training.max_nonfinite={tc.max_nonfinite}); last good checkpoint kept", flush=True)
            exit_code = EXIT_NONFINITE
            break

        # ---- log, checkpoint, push, stop
        if step % tc.log_every == 0 or step == tc.n_steps:
            counters.corrupt_samples = getattr(loader, "corrupt_count", 0)
            metrics = {"loss/dsm": stats["dsm"], "loss/fpe": stats["fpe"], "loss/total": stats["dsm"] + stats["fpe"],
                       "fpe/residual": stats["residual"], "grad_norm": grad_norm,
                       "lr": scheduler.get_last_lr()[0], "images_per_s": images_seen / (time.time() - t_start),
                       "skipped_steps": counters.skipped_steps, "corrupt_samples": counters.corrupt_samples}
            counters.loss_curve.append([step, stats["dsm"] + stats["fpe"]])
            tracker.log(metrics, step=step)
            bar.set_postfix(loss=f"{metrics['loss/total']:.4f}")
        stop_now = _all_ranks_any(accelerator, stop.requested())
        if step % tc.ckpt_every == 0 or step == tc.n_steps or stop_now:
            save(step)
            if pusher and (step == tc.n_steps or (cfg.hub.push_every and step % cfg.hub.push_every == 0)):
                pusher.push(export(run_dir, cfg, ema, step, counters), commit_message=f"step {step}")
        if stop_now and step < tc.n_steps:
            if is_main:
                print(f"[fpdiff] stop requested: checkpoint at step {step} written, exiting {EXIT_REQUEUE}", flush=True)
            exit_code = EXIT_REQUEUE
            break
    bar.close()

    if exit_code == EXIT_OK and is_main:
        elapsed = time.time() - t_start
        grid = sample_grid(ema.model, cfg, sde, device, run_dir / "samples.png", seed=tc.seed)
        tracker.log_image("samples", str(grid), step=step)
        export_dir = export(run_dir, cfg, ema, step, counters)
        summary = {"steps": step, "images_per_s": images_seen / max(elapsed, 1e-9), "seconds": elapsed,
                   "final_loss": counters.loss_curve[-1][1] if counters.loss_curve else None,
                   "loss_curve": counters.loss_curve, "skipped_steps": counters.skipped_steps,
                   "corrupt_samples": counters.corrupt_samples, "samples": str(grid), "export": str(export_dir)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        with open(run_dir / "summary.txt", "a") as fh:
            fh.write(f"train: {step} steps in {elapsed:.0f}s ({summary['images_per_s']:.1f} img/s), "
                     f"final loss {summary['final_loss']}, samples {grid}\n")
        tracker.summary({k: v for k, v in summary.items() if k != "loss_curve"})
    if pusher:
        pusher.wait()
    tracker.finish()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return exit_code


def export(run_dir: Path, cfg: Config, ema: EMA, step: int, counters: Counters) -> Path:
    from .hub import write_export

    metrics = {"step": step, "final_loss": counters.loss_curve[-1][1] if counters.loss_curve else None}
    return write_export(run_dir / "export", ema.state_dict(), cfg.to_dict(), metrics)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _all_ranks_any(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


# --------------------------------------------------------------------------- CLI
def build_parser(prog: str = "fpdiff train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a score model (DSM + FPE regularizer).")
    p.add_argument("--config", required=True, help="YAML experiment config (configs/*.yaml)")
    p.add_argument("--run-dir", default=None, help="output directory (default runs/<name>)")
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in the run dir) or a checkpoint dir")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.lr=1e-4 fpe.enabled=false")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser("python -m pipeline.train").parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(args.run_dir or cfg.run_dir or f"runs/{cfg.name}")
        return train(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
    except ConfigError as e:
        print(f"fpdiff: config error: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG


if __name__ == "__main__":
    sys.exit(main())
