"""The training loop: DSM + FPE regularizer, one file, top to bottom.

Runs in one process (``fpdiff train``) or under ``accelerate launch`` (DDP, one or many
nodes). Randomness is stateless: every micro-batch draws its times, noise, probes,
subsample and dropout from a generator seeded by (seed, step, micro-shard index), where
the micro-shard index m = rank * grad_accum + micro_step. Hence a resumed run is bitwise
equal to an uninterrupted one, and a step is the same update for any split of the same
global batch into ranks x accumulation steps.

Exit codes: 0 finished, 75 stopped by SIGUSR1/SIGTERM/SIGINT after a checkpoint (requeue),
2 bad configuration (or a run dir another process is training into), 3 too many consecutive
non-finite steps, or a run that ends on non-finite steps or weights (nothing exported).
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_path, atomic_write_json
from pipeline.train import checkpoint as ckpt
from pipeline.config import Config, ConfigError, save_config
from pipeline.collectives import seed_for
from pipeline.ema import EMA
from pipeline.images import label_columns, save_grid, to_uint8
from pipeline.rundir import SAMPLES_PNG, RunDir, RunLock, load_state_into
from pipeline.score import get_score_fn, sampling_score_fn
from pipeline.sde import build_sde
from pipeline.cliargs import ArgumentParser

EXIT_OK, EXIT_BAD_CONFIG, EXIT_NONFINITE, EXIT_REQUEUE = 0, 2, 3, 75


def say(msg: str) -> None:
    """Status lines for people and launch scripts (stderr, unbuffered)."""
    print(f"[fpdiff] {msg}", file=sys.stderr, flush=True)


class StopRequest:
    """SIGUSR1 / SIGTERM / SIGINT (Ctrl-C) (or a STOP file in the run dir) ask the loop to checkpoint
    and exit; a second Ctrl-C interrupts at once."""

    def __init__(self, run_dir: Path):
        self.flag = False
        self.stop_file = RunDir(run_dir).stop_file
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}

    def close(self) -> None:
        """The handlers from before (the run is over)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.flag:
                raise KeyboardInterrupt
            say("Ctrl-C: checkpointing after this step, then exiting (Ctrl-C again to stop at once)")
        self.flag = True

    def requested(self) -> bool:
        return self.flag or self.stop_file.exists()

    def consume(self) -> None:
        """The stop it asked for is done: a STOP file left behind would stop every resume at once."""
        self.stop_file.unlink(missing_ok=True)


@dataclass
class Counters:
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    corrupt_samples: int = 0
    ema_updates: int = 0  # the EMA's warm-up position
    loss_curve: list = field(default_factory=list)


def lr_lambda(warmup: int, decay: str = "none", n_steps: int = 0):
    """Factor on training.lr at a step: a linear warm-up, then constant or a cosine to 0 at
    n_steps (a short run ends at a low learning rate instead of wherever Adam's noise leaves it)."""
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if decay == "cosine" and n_steps > warmup:
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (n_steps - warmup))))
        return 1.0
    return factor


def set_optimizer_settings(optimizer, scheduler, tc) -> None:
    """The configured lr (at the schedule's position), betas, eps and weight decay, not those stored
    with a loaded optimizer state (a run stopped for non-finite steps is resumed with a smaller lr;
    a fine-tune may change any of them)."""
    scheduler.base_lrs = [tc.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, [f(scheduler.last_epoch) for f in scheduler.lr_lambdas]):
        group["initial_lr"], group["lr"] = tc.lr, tc.lr * factor
        group["betas"], group["eps"], group["weight_decay"] = (tc.adam_beta1, tc.adam_beta2), tc.adam_eps, tc.weight_decay


def load_model_and_ema(model, ema: EMA, weights: dict, ema_weights: dict, source: Path, key: str = "model") -> None:
    """Strict loads with one line naming ``key``, the source and the first mismatching tensor."""
    try:
        load_state_into(model, weights, source=str(source))
        load_state_into(ema.model, ema_weights, source=str(source))
    except (ValueError, RuntimeError) as e:  # ConfigError included
        raise ConfigError(f"{key}: {str(e).splitlines()[0][:300]}") from None


def class_labels(y: torch.Tensor, num_classes: int, dropout: float, gen: torch.Generator, device) -> torch.Tensor:
    """A conditional model's training labels: the data's, each replaced by "no class" (K) with
    probability ``training.label_dropout`` so that one net learns both scores (classifier-free guidance)."""
    bad = (y < 0) | (y >= num_classes)
    if bool(bad.any()):
        raise ConfigError(f"model.num_classes={num_classes}: the data has label {int(y[bad][0])} "
                          f"(-1: a sample without .cls); labels must lie in [0, {num_classes})")
    y = y.to(device)
    drop = torch.rand(y.shape, generator=gen, device=gen.device).to(device) < dropout
    return torch.where(drop, torch.full_like(y, num_classes), y)


def sample_grid(ema_model, cfg: Config, sde, device, path: Path, seed: int, progress: bool = True) -> Path:
    from pipeline.sampling import sample

    g = torch.Generator(device=device).manual_seed(seed)
    n = cfg.sampling.num_samples
    shape = (n, cfg.data.num_channels, cfg.data.image_size, cfg.data.image_size)
    # the global RNG streams are left as they were: a grid drawn mid-run (training.sample_every)
    # must not change the training that follows
    score_fn, labels_for = sampling_score_fn(ema_model, sde, cfg)
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        x, _ = sample(cfg.sampling, cfg.sde.sampling_eps, score_fn, sde, shape,
                      device=device, generator=g, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"images": to_uint8(x, cfg.data.centered).cpu().numpy()}
    labels = labels_for(n, cfg.sampling.batch_size)
    if labels is not None:  # a conditional model's samples: the class each was drawn for
        arrays["labels"] = labels.numpy()
    with atomic_path(path.with_suffix(".npz")) as tmp:
        np.savez_compressed(tmp, **arrays)
    return save_grid(x, path, centered=cfg.data.centered, nrow=label_columns(arrays.get("labels")))


def train(cfg: Config, run_dir: str | Path, resume: str | None = None, progress: bool = True,
          deepspeed_config: str | None = None, overwrite: bool = False) -> int:
    from tqdm.auto import tqdm

    from pipeline.train.backends import build_backend
    from pipeline.data.loader import build_train_loader, gather_state
    from pipeline.fpe import FPERegularizer, mean_by_t_bucket
    from pipeline.losses import DSMLoss
    from pipeline.models import build_model
    from pipeline.train.init_source import load_init_source, plan_continuation
    from pipeline.train.tracking import Tracker

    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    stop = StopRequest(run_dir)  # first: a preemption signal during start-up must not kill the job
    backend = build_backend(cfg, deepspeed_config)
    rank, world, is_main, device = backend.rank, backend.world, backend.is_main, backend.device
    lock = RunLock(run_dir).acquire() if is_main and run_dir.is_dir() else None  # one writer per run dir
    run.check_free(resume, overwrite)
    tc = cfg.training
    if tc.batch_size % (world * tc.grad_accum):
        raise ConfigError(f"training.batch_size: {tc.batch_size} not divisible by processes x grad_accum "
                          f"({world} x {tc.grad_accum})")
    micro_bs = tc.batch_size // (world * tc.grad_accum)
    if cfg.fpe.enabled and isinstance(cfg.fpe.subsample, int) and cfg.fpe.subsample > micro_bs and is_main:
        say(f"fpe.subsample={cfg.fpe.subsample} exceeds the {micro_bs} samples of a micro-batch; "
            f"regularizing all {micro_bs}")
    dist_state = SimpleNamespace(process_index=rank, num_processes=world, device=device)
    if cfg.eval.every:
        from pipeline.eval.cli import check_eval_inputs, evaluate_in_training
        check_eval_inputs(cfg, dist_state)  # a missing Inception / reference file fails now, not mid-run
    # ---- model, EMA, optimizer, schedule
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    sde = build_sde(cfg.sde)
    model = build_model(cfg).to(device)
    ema = EMA(model, tc.ema_decay, warmup=tc.ema_warmup)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2),
                                 eps=tc.adam_eps, weight_decay=tc.weight_decay)
    dsm_loss = DSMLoss(sde, eps=tc.eps, likelihood_weighting=tc.likelihood_weighting, reduce_mean=tc.reduce_mean,
                       min_snr_gamma=tc.min_snr_gamma, t_sampling=tc.t_sampling)
    regularizer = FPERegularizer(cfg.fpe, sde) if cfg.fpe.enabled else None

    # ---- where the run starts: a resume (its own checkpoint), a fine-tune (training.init_from
    # continues its source's weights, EMA, Adam state, step and data) or step 0. Weights go in
    # before wrapping; optimizer state after (DeepSpeed's is partitioned).
    start_step, origin_step, counters, loader_state = 0, 0, Counters(), None
    resume_from, state = ckpt.load_for_resume(run_dir, resume)
    continuation = None
    if resume_from is not None:
        load_model_and_ema(model, ema, state["model"], state["ema"], resume_from)
        start_step = state["state"]["step"]
        origin_step = state["state"].get("origin_step", 0)
        loader_state = state["state"].get("loader")
        c = state["state"].get("counters", {})
        counters = Counters(**{k: v for k, v in c.items() if k in Counters.__dataclass_fields__})
        ckpt.set_rng_state(state["rng"])
        if is_main:
            say(f"resumed from {resume_from} at step {start_step}")
    elif tc.init_from:
        continuation = plan_continuation(load_init_source(tc.init_from), cfg, backend.name == "deepspeed")
        src = continuation.source
        load_model_and_ema(model, ema, src.start_weights, src.ema, Path(src.path), key="training.init_from")
        start_step = origin_step = continuation.step
        counters.ema_updates = continuation.ema_updates
        loader_state = continuation.loader
        if continuation.rng is not None:
            ckpt.set_rng_state(continuation.rng)
        if is_main:
            say(continuation.describe())
    end_step = origin_step + tc.n_steps  # a fine-tune trains n_steps beyond its source's step
    # stepped by hand once per optimizer step (through prepare it steps once per process)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc.warmup, tc.lr_decay, end_step))
    if resume_from is not None or (continuation is not None and continuation.scheduler is not None):
        scheduler.load_state_dict(state["scheduler"] if resume_from is not None else continuation.scheduler)
    scheduler.last_epoch = start_step
    ema.model.to(device)

    model, raw_model = backend.prepare(model, optimizer)
    if resume_from is not None:
        backend.load_state(resume_from, state)
    elif continuation is not None and continuation.optimizer:
        src = continuation.source
        backend.load_state(src.deepspeed_dir or src.path, {"optimizer": src.optimizer, "scaler": src.scaler})
    # the configured optimizer settings win over those stored with a resumed or continued state
    set_optimizer_settings(optimizer, scheduler, tc)
    # DSM through the wrapper (DDP syncs these gradients); torch.compile only here: compiled
    # modules have no double backward, so the regularizer keeps using the raw module
    dsm_model = torch.compile(model, backend=tc.compile_backend) if tc.compile else model
    num_classes = cfg.model.num_classes

    # one reader per micro-shard m = rank * grad_accum + micro: the data a micro-batch sees, like its
    # randomness, depends only on m, so any ranks x accumulation split of a global batch is the same step
    loaders = [build_train_loader(cfg, batch_size=micro_bs, rank=rank * tc.grad_accum + micro,
                                  world_size=world * tc.grad_accum, seed=tc.seed, state=loader_state)
               for micro in range(tc.grad_accum)]
    streams = [iter(loader) for loader in loaders]
    # the run is known to start: only now is anything written into the run dir
    if is_main:
        lock = lock or RunLock(run_dir).acquire()
        if overwrite and resume is None:
            run.clear_outputs()
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config)
        if continuation is not None:
            atomic_write_json(run.init_source, continuation.record())
    backend.barrier()

    def loader_state_all_ranks() -> dict:
        # collective: every rank's exact reader positions, merged
        states = [gather_state(loader) for loader in loaders]
        merged = states[0]
        for st in states[1:]:
            merged["ranks"].update(st["ranks"])
        merged["corrupt_total"] = sum(int(v.get("corrupt", 0)) for v in merged["ranks"].values())
        return merged
    tracker = Tracker(cfg.logging, run_dir, cfg.to_dict(), is_main, resumed=resume_from is not None)
    pusher = None
    if is_main and cfg.hub.repo_id:
        from pipeline.publish.hub import HubPusher
        pusher = HubPusher.from_config(cfg.hub)  # uploads on a background thread, retries, never fatal

    def save(step: int) -> None:
        loader_state_now = loader_state_all_ranks()
        staging = run.staging(step)
        if is_main:
            ckpt.clear_staging(staging)
        backend.barrier()
        backend.save_sharded(staging)  # DeepSpeed: every rank writes its optimizer partition
        if is_main:
            ckpt.save_checkpoint(
                run_dir, step, staging, model_state=raw_model.state_dict(), ema_state=ema.state_dict(),
                optimizer_state=backend.optimizer_state(),
                extra_state={"scheduler": scheduler.state_dict(), "rng": ckpt.rng_state(),
                             "scaler": backend.scaler_state()},
                json_state={"loader": loader_state_now, "counters": counters.__dict__,
                            "origin_step": origin_step},
                keep_last=tc.keep_last)
        backend.barrier()

    bar = tqdm(total=end_step, initial=start_step, disable=not (is_main and progress), desc="train",
               dynamic_ncols=True)
    t_start, images_seen, step, last_metrics = time.time(), 0, start_step, {}
    residual_t, residual_norm = [], []  # regularized (t, ‖r‖/D) since the last log line
    exit_code = EXIT_OK
    while step < end_step:
        # ---- one optimizer step over grad_accum micro-batches
        stats = {"dsm": 0.0, "fpe": 0.0, "residual": 0.0}
        for micro in range(tc.grad_accum):
            x0, y = next(streams[micro])[:2]
            x0 = x0.to(device, non_blocking=True)
            seed = seed_for(tc.seed, step, rank * tc.grad_accum + micro)
            torch.manual_seed(seed)  # dropout masks
            gen = torch.Generator(device=device).manual_seed(seed)
            y = class_labels(y, num_classes, tc.label_dropout, gen, device) if num_classes else None
            with backend.micro_step_context(micro):
                with backend.autocast():
                    dsm = dsm_loss(get_score_fn(dsm_model, sde, y), x0, generator=gen)
                loss = dsm.loss.float()
                fpe_out = regularizer(raw_model, x0, dsm.xt.detach(), dsm.t.detach(), step=step,
                                      generator=gen, class_labels=y) if regularizer else None
                if fpe_out is not None:
                    loss = loss + fpe_out.loss
                    stats["fpe"] += fpe_out.loss.item() / tc.grad_accum
                    stats["residual"] += fpe_out.residual_norm.mean().item() / tc.grad_accum
                    residual_t.append(fpe_out.t.detach().cpu())
                    residual_norm.append(fpe_out.residual_norm.detach().cpu())
                backend.backward(loss)
            backend.finish_micro_step()
            stats["dsm"] += dsm.loss.item() / tc.grad_accum

        # clip + step; skipped when the all-reduced grad norm is non-finite (same on every rank)
        grad_norm, applied = backend.optimizer_step()
        if applied:
            ema.update(raw_model, counters.ema_updates)
            counters.ema_updates += 1
            counters.consecutive_nonfinite = 0
        else:
            counters.skipped_steps += 1
            counters.consecutive_nonfinite += 1
            if is_main:
                say(f"step {step}: non-finite loss/gradient, update skipped "
                      f"({counters.consecutive_nonfinite} in a row)")
        scheduler.step()
        step += 1
        images_seen += tc.batch_size
        bar.update(1)

        if counters.consecutive_nonfinite >= tc.max_nonfinite:
            streak_start = step - counters.consecutive_nonfinite
            if is_main:
                kept = ckpt.drop_checkpoints_after(run_dir, streak_start)
                say(f"stopping: {counters.consecutive_nonfinite} consecutive non-finite steps "
                    f"(training.max_nonfinite={tc.max_nonfinite}); "
                    + (f"kept {kept.name}, the last checkpoint before the streak" if kept else
                       "no checkpoint from before the streak exists"))
            exit_code = EXIT_NONFINITE
            break

        # ---- log, checkpoint, push, stop
        if step % tc.log_every == 0 or step == end_step:
            counters.corrupt_samples = sum(loader.corrupt_count for loader in loaders)  # this rank's
            metrics = {"loss/dsm": stats["dsm"], "loss/fpe": stats["fpe"], "loss/total": stats["dsm"] + stats["fpe"],
                       "fpe/residual": stats["residual"], "grad_norm": grad_norm,
                       "lr": scheduler.get_last_lr()[0], "images_per_s": images_seen / (time.time() - t_start),
                       "skipped_steps": counters.skipped_steps, "corrupt_samples": counters.corrupt_samples}
            if residual_t:  # the residual is also a metric: its mean per t-bucket on this rank
                metrics.update(mean_by_t_bucket(torch.cat(residual_t), torch.cat(residual_norm)))
                residual_t, residual_norm = [], []
            counters.loss_curve.append([step, stats["dsm"] + stats["fpe"]])
            last_metrics = metrics
            tracker.log(metrics, step=step)
            bar.set_postfix(loss=f"{metrics['loss/total']:.4f}")
        if cfg.eval.every and step % cfg.eval.every == 0:  # the last step's too (eval.every = n_steps)
            eval_metrics = evaluate_in_training(ema.model, cfg, sde, dist_state, step=step, run_dir=run_dir)
            tracker.log(eval_metrics, step=step)
            last_metrics.update(eval_metrics)
        if tc.sample_every and step % tc.sample_every == 0 and step < end_step and is_main:
            grid = sample_grid(ema.model, cfg, sde, device, run.sample_grid(step),
                               seed=tc.seed, progress=False)
            tracker.log_image("samples", str(grid), step=step)
        stop_now = backend.any(stop.requested())
        # no checkpoint during a non-finite streak: it may hold weights that diverged before it
        if (step % tc.ckpt_every == 0 or step == end_step or stop_now) and not counters.consecutive_nonfinite:
            save(step)
            if pusher and cfg.hub.push_every and step % cfg.hub.push_every == 0 and step < end_step:
                pusher.push(export(run_dir, cfg, ema, step, counters, last_metrics), f"step {step}")
        if stop_now and step < end_step:
            if is_main:
                stop.consume()
                bar.close()  # the message on its own line, not glued to the bar
                say(f"stop requested: checkpoint at step {step} "
                    f"{'not written (non-finite streak)' if counters.consecutive_nonfinite else 'written'}, "
                    f"exiting {EXIT_REQUEUE}")
            exit_code = EXIT_REQUEUE
            break
    bar.close()
    if exit_code == EXIT_OK:
        exit_code = _check_final_weights(run_dir, counters, step, raw_model, ema, is_main)

    summary = None
    if exit_code == EXIT_OK and is_main:
        elapsed = time.time() - t_start
        grid = sample_grid(ema.model, cfg, sde, device, run.samples_png, seed=tc.seed,
                           progress=progress)
        tracker.log_image("samples", str(grid), step=step)
        export_dir = export(run_dir, cfg, ema, step, counters, last_metrics, images={SAMPLES_PNG: grid})
        if pusher:
            pusher.push(export_dir, f"final: step {step}")
        summary = {"steps": step, "images_per_s": images_seen / max(elapsed, 1e-9), "seconds": elapsed,
                   "final_loss": counters.loss_curve[-1][1] if counters.loss_curve else None,
                   "loss_curve": counters.loss_curve, "skipped_steps": counters.skipped_steps,
                   "corrupt_samples": counters.corrupt_samples, "samples": str(grid), "export": str(export_dir)}
    if pusher:  # bounded: a Hub outage must not hold the exit (preemption has a grace period)
        pusher.close(timeout=600 if exit_code == EXIT_OK else 30)
    if summary is not None:
        summary["hub"] = pusher.status() if pusher else None
        atomic_write_json(run.summary_json, summary)
        run.add_summary_line(f"train: {step} steps in {summary['seconds']:.0f}s ({summary['images_per_s']:.1f} img/s), "
                             f"final loss {summary['final_loss']}, samples {summary['samples']}")
        tracker.summary({k: v for k, v in summary.items() if k not in ("loss_curve", "hub")})
    tracker.finish()
    backend.barrier()
    backend.end()
    if lock is not None:
        lock.release()
    stop.close()
    return exit_code


def _check_final_weights(run_dir: Path, counters: Counters, step: int, model, ema: EMA, is_main: bool) -> int:
    """A run never ends with exit 0 on non-finite weights: one that ends inside a non-finite streak
    (shorter than training.max_nonfinite) keeps only the checkpoints from before it, and weights that
    are not finite are neither exported nor sampled."""
    if counters.consecutive_nonfinite:
        if is_main:
            kept = ckpt.drop_checkpoints_after(run_dir, step - counters.consecutive_nonfinite)
            say(f"stopping: the last {counters.consecutive_nonfinite} steps were non-finite; no export"
                + (f"; kept {kept.name}, the last checkpoint before them" if kept else ""))
        return EXIT_NONFINITE
    bad = [name for net in (model, ema.model) for name, p in net.state_dict().items()
           if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        if is_main:
            say(f"stopping: {len(bad)} weight tensors are not finite (e.g. {bad[0]}); no export")
        return EXIT_NONFINITE
    return EXIT_OK


def export(run_dir: Path, cfg: Config, ema: EMA, step: int, counters: Counters, metrics: dict,
           images: dict | None = None) -> Path:
    """EMA weights + config + metrics + model card in RUN/export (what `fpdiff push` uploads)."""
    from pipeline.publish.export import write_export

    card = {"step": step, "skipped_steps": counters.skipped_steps, **metrics}
    return write_export(RunDir(run_dir).export, ema.state_dict(), cfg.to_dict(), card, repo_id=cfg.hub.repo_id or None,
                        images=images)


# --------------------------------------------------------------------------- CLI
def build_parser(prog: str = "fpdiff train") -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description="Train a score model (DSM + FPE regularizer).")
    p.add_argument("--config", default=None,
                   help="YAML experiment config (configs/*.yaml); a resumed run reads RUN/config.yaml without it")
    p.add_argument("--run-dir", default=None, help="output directory (default runs/<name>)")
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in the run dir) or a checkpoint "
                   "dir; continues the run's config (RUN/config.yaml), overrides given now applied on top")
    p.add_argument("--force", action="store_true",
                   help="resume even with a changed key that breaks exact resume (batch size, seed, data, model)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --run-dir (its checkpoints, export, metrics) instead of refusing")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    p.add_argument("--deepspeed", default=None, metavar="JSON",
                   help="DeepSpeed ZeRO config (launch/ds_zero1.json, launch/ds_zero2.json); run under torchrun")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.lr=1e-4 fpe.enabled=false")
    return p


def main(argv: list[str] | None = None) -> int:
    from pipeline.eval.features import MissingFileError

    from pipeline.train.resume import training_config

    args = build_parser().parse_args(argv)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        cfg, run_dir = training_config(args.config, args.run_dir, args.resume, args.overrides, force=args.force)
        code = train(cfg, run_dir, resume=args.resume, progress=not args.no_progress,
                     deepspeed_config=args.deepspeed, overwrite=args.overwrite)
        if code == EXIT_OK and os.environ.get("RANK", "0") == "0":  # where it all went, last
            summary = RunDir(run_dir).summary_txt.read_text().splitlines()[-1]
            print(f"[fpdiff] {summary}\n[fpdiff] outputs in {run_dir}/: checkpoints/, export/ (EMA weights, "
                  f"model card), samples.png, metrics.jsonl, summary.json, summary.txt", flush=True)
        return code
    except ckpt.CheckpointError as e:
        print(f"fpdiff: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except ConfigError as e:
        print(f"fpdiff: config error: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except MissingFileError as e:
        print(f"fpdiff: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except OSError as e:  # a full disk or a lost mount while writing metrics, samples, the summary
        print(f"fpdiff: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    finally:  # a run that failed to start leaves no handler of its StopRequest behind
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
