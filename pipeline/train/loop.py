"""The training loop: DSM + FPE regularizer, one file, top to bottom.

Runs in one process (``fpdiff train``) or under ``accelerate launch`` (DDP, one or many
nodes). Randomness is stateless: every micro-batch draws its times, noise, probes,
subsample and dropout from a generator seeded by (seed, step, micro-shard index), where
the micro-shard index m = rank * grad_accum + micro_step. Hence a resumed run is bitwise
equal to an uninterrupted one, and a step is the same update for any split of the same
global batch into ranks x accumulation steps.

Exit codes (pipeline.status): 0 finished, 75 stopped by SIGUSR1/SIGTERM/SIGINT after a checkpoint
(requeue), 2 bad configuration (or a run dir another process is training into), 3 too many
consecutive non-finite steps, or a run that ends on non-finite steps or weights (nothing exported).
The entry points
(pipeline.app: fpdiff train, python -m pipeline.train) hand ``train()`` its hooks into evaluation
and publishing.
"""
from __future__ import annotations

import argparse
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from pipeline.atomic import atomic_write_json
from pipeline.cliargs import ArgumentParser
from pipeline.collectives import is_main_rank
from pipeline.config import Config, ConfigError
from pipeline.config_files import save_config
from pipeline.data.loader import build_train_loader, gather_state
from pipeline.fpe import mean_by_t_bucket
from pipeline.images import write_sample_set
from pipeline.rundir import SAMPLES_PNG, RunDir, RunLock
from pipeline.sampling import sample
from pipeline.score import sampling_score_fn
from pipeline.status import EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE, MissingFileError, fail, result, say
from pipeline.train import checkpoint as ckpt
from pipeline.train.backends import build_backend
from pipeline.train.init_source import load_init_source, plan_continuation
from pipeline.train.resume import training_config
from pipeline.train.step import TrainStep, class_labels, lr_lambda  # noqa: F401 (class_labels, lr_lambda: API)
from pipeline.train.tracking import Tracker

__all__ = ["TrainHooks", "class_labels", "lr_lambda", "main", "train"]  # exit codes: pipeline.status


@dataclass
class TrainHooks:
    """What the trainer does through other stages, handed to ``train()`` by its entry point
    (``pipeline.app``): the training stage imports neither ``pipeline.eval`` nor ``pipeline.publish``.
    A hook left None is not done; a setting that needs it fails at start-up."""

    check_eval: Optional[Callable] = None  # (cfg, dist_state): eval inputs present, or MissingFileError
    evaluate: Optional[Callable] = None  # (ema_model, cfg, sde, dist_state, step=, run_dir=) -> metrics
    export: Optional[Callable] = None  # (folder, ema_state, cfg_dict, card, repo_id=, images=) -> folder
    hub_pusher: Optional[Callable] = None  # (cfg.hub) -> a background pusher (push, close, status)
    hub_export_folder: Optional[Callable] = None  # (repo id) -> its export, downloaded (training.init_from)


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

    def record(self, applied: bool) -> None:
        """An optimizer step's outcome: applied (one EMA update more) or skipped as non-finite."""
        if applied:
            self.ema_updates += 1
            self.consecutive_nonfinite = 0
        else:
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1


def sample_grid(ema_model, cfg: Config, sde, device, path: Path, seed: int, progress: bool = True) -> Path:
    g = torch.Generator(device=device).manual_seed(seed)
    n = cfg.sampling.num_samples
    shape = (n, cfg.data.num_channels, cfg.data.image_size, cfg.data.image_size)
    # the global RNG streams are left as they were: a grid drawn mid-run (training.sample_every)
    # must not change the training that follows
    score_fn, labels_for = sampling_score_fn(ema_model, sde, cfg)
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        x, _ = sample(cfg.sampling, cfg.sde.sampling_eps, score_fn, sde, shape,
                      device=device, generator=g, progress=progress)
    labels = labels_for(n, cfg.sampling.batch_size)  # a conditional model's: the class each was drawn for
    return write_sample_set(path.with_suffix(".npz"), path, [x], shape, cfg.data.centered,
                            labels=None if labels is None else labels.numpy())


@dataclass
class Run:
    """A training run in progress: what the set-up built and the loop and the end of the run use."""

    cfg: Config
    run: RunDir
    backend: object
    step_fn: TrainStep
    stop: StopRequest
    dist_state: SimpleNamespace
    loaders: list
    tracker: Tracker
    hooks: TrainHooks
    lock: Optional[RunLock] = None
    pusher: object = None
    step: int = 0
    origin_step: int = 0
    end_step: int = 0
    resumed: bool = False
    counters: Counters = field(default_factory=Counters)
    images_seen: int = 0
    t_start: float = 0.0
    last_metrics: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.backend.is_main


def train(cfg: Config, run_dir: str | Path, resume: str | None = None, progress: bool = True,
          deepspeed_config: str | None = None, overwrite: bool = False, hooks: TrainHooks | None = None) -> int:
    """Set up (or resume) a run, take optimizer steps until training.n_steps, then sample and export."""
    r = start_run(cfg, Path(run_dir), resume, overwrite, deepspeed_config, hooks or TrainHooks())
    exit_code = run_steps(r, progress)
    finish_run(r, exit_code, progress)
    return exit_code


def start_run(cfg: Config, run_dir: Path, resume: str | None, overwrite: bool, deepspeed_config: str | None,
              hooks: TrainHooks) -> Run:
    for key, needed, hook in (("eval.every", cfg.eval.every, hooks.evaluate), ("hub.repo_id", cfg.hub.repo_id,
                                                                                hooks.hub_pusher)):
        if needed and hook is None:
            raise ConfigError(f"{key}: this trainer was started without that stage (use fpdiff train / pipeline.app)")
    run = RunDir(run_dir)
    stop = StopRequest(run_dir)  # first: a preemption signal during start-up must not kill the job
    backend = build_backend(cfg, deepspeed_config)
    lock = RunLock(run_dir).acquire() if backend.is_main and run_dir.is_dir() else None  # one writer per run dir
    run.check_free(resume, overwrite)
    tc = cfg.training
    if tc.batch_size % (backend.world * tc.grad_accum):
        raise ConfigError(f"training.batch_size: {tc.batch_size} not divisible by processes x grad_accum "
                          f"({backend.world} x {tc.grad_accum})")
    micro_bs = tc.batch_size // (backend.world * tc.grad_accum)
    if cfg.fpe.enabled and isinstance(cfg.fpe.subsample, int) and cfg.fpe.subsample > micro_bs and backend.is_main:
        say(f"fpe.subsample={cfg.fpe.subsample} exceeds the {micro_bs} samples of a micro-batch; "
            f"regularizing all {micro_bs}")
    dist_state = SimpleNamespace(process_index=backend.rank, num_processes=backend.world, device=backend.device)
    if cfg.eval.every and hooks.check_eval:
        hooks.check_eval(cfg, dist_state)  # a missing Inception / reference file fails now, not mid-run
    step_fn = TrainStep(cfg, backend)
    start = where_to_start(step_fn, run_dir, resume, hooks.hub_export_folder)
    end_step = start.origin_step + tc.n_steps  # a fine-tune trains n_steps beyond its source's step
    step_fn.prepare(start.step, end_step, start.scheduler, start.optimizer_from)

    # one reader per micro-shard m = rank * grad_accum + micro: the data a micro-batch sees, like its
    # randomness, depends only on m, so any ranks x accumulation split of a global batch is the same step
    loaders = [build_train_loader(cfg, batch_size=micro_bs, rank=backend.rank * tc.grad_accum + micro,
                                  world_size=backend.world * tc.grad_accum, seed=tc.seed, state=start.loader)
               for micro in range(tc.grad_accum)]
    # the run is known to start: only now is anything written into the run dir
    if backend.is_main:
        lock = lock or RunLock(run_dir).acquire()
        if overwrite and resume is None:
            run.clear_outputs()
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config)
        if start.continuation is not None:
            atomic_write_json(run.init_source, start.continuation.record())
    backend.barrier()
    tracker = Tracker(cfg.logging, run_dir, cfg.to_dict(), backend.is_main, resumed=start.resumed)
    # uploads on a background thread, retries, never fatal
    pusher = hooks.hub_pusher(cfg.hub) if backend.is_main and cfg.hub.repo_id else None
    return Run(cfg, run, backend, step_fn, stop, dist_state, loaders, tracker, hooks, lock, pusher, step=start.step,
               origin_step=start.origin_step, end_step=end_step, resumed=start.resumed, counters=start.counters)


@dataclass
class Start:
    """Where a run starts: step 0, a resume (its own checkpoint) or a fine-tune's continuation."""

    step: int = 0
    origin_step: int = 0
    counters: Counters = field(default_factory=Counters)
    loader: dict | None = None
    scheduler: dict | None = None
    optimizer_from: tuple | None = None  # the backend's load_state arguments
    resumed: bool = False
    continuation: object = None


def where_to_start(step_fn: TrainStep, run_dir: Path, resume: str | None, hub_export_folder=None) -> Start:
    """A resume (its own checkpoint), a fine-tune (training.init_from continues its source's weights,
    EMA, Adam state, step and data) or step 0. Weights go in now, before the backend wraps the model."""
    cfg, is_main = step_fn.cfg, step_fn.backend.is_main
    resume_from, state = ckpt.load_for_resume(run_dir, resume)
    if resume_from is not None:
        step_fn.load_weights(state["model"], state["ema"], resume_from)  # key "model"
        s = state["state"]
        c = s.get("counters", {})
        ckpt.set_rng_state(state["rng"])
        if is_main:
            say(f"resumed from {resume_from} at step {s['step']}")
        return Start(s["step"], s.get("origin_step", 0),
                     Counters(**{k: v for k, v in c.items() if k in Counters.__dataclass_fields__}),
                     loader=s.get("loader"), scheduler=state["scheduler"], optimizer_from=(resume_from, state),
                     resumed=True)
    if not cfg.training.init_from:
        return Start()
    plan = plan_continuation(load_init_source(cfg.training.init_from, hub_export_folder), cfg,
                             step_fn.backend.name == "deepspeed")
    src = plan.source
    step_fn.load_weights(src.start_weights, src.ema, Path(src.path), key="training.init_from")
    if plan.rng is not None:
        ckpt.set_rng_state(plan.rng)
    if is_main:
        say(plan.describe())
    optimizer_from = ((src.deepspeed_dir or src.path, {"optimizer": src.optimizer, "scaler": src.scaler})
                      if plan.optimizer else None)
    return Start(plan.step, plan.step, Counters(ema_updates=plan.ema_updates), loader=plan.loader,
                 scheduler=plan.scheduler, optimizer_from=optimizer_from, continuation=plan)


def run_steps(r: Run, progress: bool) -> int:
    """The loop: optimizer steps, each followed by logging, evaluation, sample grids, checkpoints and
    the stop check. Returns the exit code."""
    cfg, tc, counters, is_main = r.cfg, r.cfg.training, r.counters, r.is_main
    streams = [iter(loader) for loader in r.loaders]
    bar = tqdm(total=r.end_step, initial=r.step, disable=not (is_main and progress), desc="train",
               dynamic_ncols=True)
    r.t_start = time.time()
    residual_t, residual_norm = [], []  # regularized (t, ‖r‖/D) since the last log line
    exit_code = EXIT_OK
    while r.step < r.end_step:
        out = r.step_fn((next(stream)[:2] for stream in streams), r.step, counters.ema_updates)
        counters.record(out.applied)
        if not out.applied and is_main:
            say(f"step {r.step}: non-finite loss/gradient, update skipped "
                f"({counters.consecutive_nonfinite} in a row)")
        residual_t += out.residual_t
        residual_norm += out.residual_norm
        r.step += 1
        step = r.step
        r.images_seen += tc.batch_size
        bar.update(1)

        if counters.consecutive_nonfinite >= tc.max_nonfinite:
            streak_start = step - counters.consecutive_nonfinite
            if is_main:
                kept = ckpt.drop_checkpoints_after(r.run.path, streak_start)
                say(f"stopping: {counters.consecutive_nonfinite} consecutive non-finite steps "
                    f"(training.max_nonfinite={tc.max_nonfinite}); "
                    + (f"kept {kept.name}, the last checkpoint before the streak" if kept else
                       "no checkpoint from before the streak exists"))
            exit_code = EXIT_NONFINITE
            break

        # ---- log, checkpoint, push, stop
        if step % tc.log_every == 0 or step == r.end_step:
            counters.corrupt_samples = sum(loader.corrupt_count for loader in r.loaders)  # this rank's
            metrics = {"loss/dsm": out.dsm, "loss/fpe": out.fpe, "loss/total": out.dsm + out.fpe,
                       "fpe/residual": out.residual, "grad_norm": out.grad_norm,
                       "lr": r.step_fn.scheduler.get_last_lr()[0],
                       "images_per_s": r.images_seen / (time.time() - r.t_start),
                       "skipped_steps": counters.skipped_steps, "corrupt_samples": counters.corrupt_samples}
            if residual_t:  # the residual is also a metric: its mean per t-bucket on this rank
                metrics.update(mean_by_t_bucket(torch.cat(residual_t), torch.cat(residual_norm)))
                residual_t, residual_norm = [], []
            counters.loss_curve.append([step, out.dsm + out.fpe])
            r.last_metrics = metrics
            r.tracker.log(metrics, step=step)
            bar.set_postfix(loss=f"{metrics['loss/total']:.4f}")
        if cfg.eval.every and step % cfg.eval.every == 0:  # the last step's too (eval.every = n_steps)
            eval_metrics = r.hooks.evaluate(r.step_fn.ema.model, cfg, r.step_fn.sde, r.dist_state, step=step,
                                            run_dir=r.run.path)
            r.tracker.log(eval_metrics, step=step)
            r.last_metrics.update(eval_metrics)
        if tc.sample_every and step % tc.sample_every == 0 and step < r.end_step and is_main:
            grid = sample_grid(r.step_fn.ema.model, cfg, r.step_fn.sde, r.backend.device, r.run.sample_grid(step),
                               seed=tc.seed, progress=False)
            r.tracker.log_image("samples", str(grid), step=step)
        stop_now = r.backend.any(r.stop.requested())
        # no checkpoint during a non-finite streak: it may hold weights that diverged before it
        if (step % tc.ckpt_every == 0 or step == r.end_step or stop_now) and not counters.consecutive_nonfinite:
            save(r)
            if r.pusher and cfg.hub.push_every and step % cfg.hub.push_every == 0 and step < r.end_step:
                r.pusher.push(export(r), f"step {step}")
        if stop_now and step < r.end_step:
            if is_main:
                r.stop.consume()
                bar.close()  # the message on its own line, not glued to the bar
                say(f"stop requested: checkpoint at step {step} "
                    f"{'not written (non-finite streak)' if counters.consecutive_nonfinite else 'written'}, "
                    f"exiting {EXIT_REQUEUE}")
            exit_code = EXIT_REQUEUE
            break
    bar.close()
    if exit_code == EXIT_OK:
        exit_code = check_final_weights(r)
    return exit_code


def check_final_weights(r: Run) -> int:
    """A run never ends with exit 0 on non-finite weights: one that ends inside a non-finite streak
    (shorter than training.max_nonfinite) keeps only the checkpoints from before it, and weights that
    are not finite are neither exported nor sampled."""
    counters = r.counters
    if counters.consecutive_nonfinite:
        if r.is_main:
            kept = ckpt.drop_checkpoints_after(r.run.path, r.step - counters.consecutive_nonfinite)
            say(f"stopping: the last {counters.consecutive_nonfinite} steps were non-finite; no export"
                + (f"; kept {kept.name}, the last checkpoint before them" if kept else ""))
        return EXIT_NONFINITE
    bad = [name for net in (r.step_fn.raw_model, r.step_fn.ema.model) for name, p in net.state_dict().items()
           if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        if r.is_main:
            say(f"stopping: {len(bad)} weight tensors are not finite (e.g. {bad[0]}); no export")
        return EXIT_NONFINITE
    return EXIT_OK


def loader_state_all_ranks(loaders: list) -> dict:
    """Collective: every rank's exact reader positions, merged."""
    states = [gather_state(loader) for loader in loaders]
    merged = states[0]
    for st in states[1:]:
        merged["ranks"].update(st["ranks"])
    merged["corrupt_total"] = sum(int(v.get("corrupt", 0)) for v in merged["ranks"].values())
    return merged


def save(r: Run) -> None:
    """A checkpoint of step ``r.step``: staged, then renamed into place (every rank takes part)."""
    loader_state_now = loader_state_all_ranks(r.loaders)
    staging = r.run.staging(r.step)
    if r.is_main:
        ckpt.clear_staging(staging)
    r.backend.barrier()
    r.backend.save_sharded(staging)  # DeepSpeed: every rank writes its optimizer partition
    if r.is_main:
        state = r.step_fn.state()
        ckpt.save_checkpoint(
            r.run.path, r.step, staging, model_state=state["model"], ema_state=state["ema"],
            optimizer_state=r.backend.optimizer_state(),
            extra_state={"scheduler": state["scheduler"], "rng": ckpt.rng_state(),
                         "scaler": r.backend.scaler_state()},
            json_state={"loader": loader_state_now, "counters": r.counters.__dict__,
                        "origin_step": r.origin_step},
            keep_last=r.cfg.training.keep_last)
    r.backend.barrier()


def finish_run(r: Run, exit_code: int, progress: bool) -> None:
    """A finished run: the final sample grid, the export, the Hub push and the summary (main rank)."""
    cfg, counters, step, run = r.cfg, r.counters, r.step, r.run
    summary = None
    if exit_code == EXIT_OK and r.is_main:
        elapsed = time.time() - r.t_start
        grid = sample_grid(r.step_fn.ema.model, cfg, r.step_fn.sde, r.backend.device, run.samples_png,
                           seed=cfg.training.seed, progress=progress)
        r.tracker.log_image("samples", str(grid), step=step)
        export_dir = export(r, images={SAMPLES_PNG: grid})
        if r.pusher and export_dir:
            r.pusher.push(export_dir, f"final: step {step}")
        # steps: the global step reached; start_step: where this run began (a fine-tune: its source's)
        summary = {"steps": step, "start_step": r.origin_step, "images_per_s": r.images_seen / max(elapsed, 1e-9), "seconds": elapsed,
                   "final_loss": counters.loss_curve[-1][1] if counters.loss_curve else None,
                   "loss_curve": counters.loss_curve, "skipped_steps": counters.skipped_steps,
                   "corrupt_samples": counters.corrupt_samples, "samples": str(grid),
                   "export": str(export_dir) if export_dir else None}
    if r.pusher:  # bounded: a Hub outage must not hold the exit (preemption has a grace period)
        r.pusher.close(timeout=600 if exit_code == EXIT_OK else 30)
    if summary is not None:
        summary["hub"] = r.pusher.status() if r.pusher else None
        atomic_write_json(run.summary_json, summary)
        run.add_summary_line(f"train: {step} steps in {summary['seconds']:.0f}s ({summary['images_per_s']:.1f} img/s), "
                             f"final loss {summary['final_loss']}, samples {summary['samples']}")
        r.tracker.summary({k: v for k, v in summary.items() if k not in ("loss_curve", "hub")})
    r.tracker.finish()
    r.backend.barrier()
    r.backend.end()
    if r.lock is not None:
        r.lock.release()
    r.stop.close()


def export(r: Run, images: dict | None = None) -> Path | None:
    """EMA weights + config + metrics + model card in RUN/export (what `fpdiff push` uploads), through
    the export hook (None without one)."""
    if r.hooks.export is None:
        return None
    card = {"step": r.step, "skipped_steps": r.counters.skipped_steps, **r.last_metrics}
    return r.hooks.export(r.run.export, r.step_fn.ema.state_dict(), r.cfg.to_dict(), card,
                          repo_id=r.cfg.hub.repo_id or None, images=images)


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


def main(argv: list[str] | None = None, hooks: TrainHooks | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        cfg, run_dir = training_config(args.config, args.run_dir, args.resume, args.overrides, force=args.force)
        code = train(cfg, run_dir, resume=args.resume, progress=not args.no_progress,
                     deepspeed_config=args.deepspeed, overwrite=args.overwrite, hooks=hooks)
        if code == EXIT_OK and is_main_rank():  # where it all went, last
            result(RunDir(run_dir).summary_txt.read_text().splitlines()[-1])
            result(f"outputs in {run_dir}/: checkpoints/, export/ (EMA weights, model card), samples.png, "
                   f"metrics.jsonl, summary.json, summary.txt")
        return code
    except ckpt.CheckpointError as e:
        return fail("", e)
    except ConfigError as e:
        return fail("", f"config error: {e}")
    except MissingFileError as e:
        return fail("", e)
    except OSError as e:  # a full disk or a lost mount while writing metrics, samples, the summary
        return fail("", f"{e.filename or ''}: {e.strerror or e}")
    finally:  # a run that failed to start leaves no handler of its StopRequest behind
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
