"""One optimizer step of the trainer, built from the config: what ``train()`` calls and what the
benchmarks time (benchmarks/gpu.py, benchmarks/fpe_cost.py), so a measured step is the trainer's.

The step holds the model, the SDE, the DSM loss, the FPE regularizer, Adam, the learning-rate
schedule and the EMA; the backend (``pipeline.train.backends``) does autocast, accumulation,
gradient sync and clipping. Randomness is stateless: micro-batch m of step s draws its times,
noise, probes, subsample and dropout from a generator seeded by (seed, s, m), where
m = rank * grad_accum + micro_step.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch

from pipeline.collectives import seed_for
from pipeline.config import Config, ConfigError
from pipeline.ema import EMA
from pipeline.fpe import FPERegularizer
from pipeline.losses import DSMLoss
from pipeline.models import build_model
from pipeline.rundir import load_state_into
from pipeline.score import get_score_fn
from pipeline.sde import build_sde
from pipeline.train.backends import AccelerateBackend


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


@dataclass
class StepResult:
    """One optimizer step's losses (means over its micro-batches) and the regularized (t, ‖r‖/D)."""

    dsm: float = 0.0
    fpe: float = 0.0
    residual: float = 0.0
    grad_norm: float = float("nan")
    applied: bool = False  # False: a non-finite gradient norm, the update was skipped
    residual_t: list = field(default_factory=list)
    residual_norm: list = field(default_factory=list)


class TrainStep:
    """Build with the config and a backend; load weights (optional); ``prepare``; then call once per
    optimizer step with an iterable of (x0, labels) micro-batches."""

    def __init__(self, cfg: Config, backend):
        tc = cfg.training
        self.cfg, self.backend, self.device = cfg, backend, backend.device
        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        self.sde = build_sde(cfg.sde)
        self.model = build_model(cfg).to(self.device)
        self.raw_model = self.dsm_model = self.model
        self.ema = EMA(self.model, tc.ema_decay, warmup=tc.ema_warmup)
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=tc.lr,
                                          betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps,
                                          weight_decay=tc.weight_decay)
        self.dsm_loss = DSMLoss(self.sde, eps=tc.eps, likelihood_weighting=tc.likelihood_weighting,
                                reduce_mean=tc.reduce_mean, min_snr_gamma=tc.min_snr_gamma,
                                t_sampling=tc.t_sampling)
        self.regularizer = FPERegularizer(cfg.fpe, self.sde) if cfg.fpe.enabled else None
        self.scheduler = None

    @classmethod
    def standalone(cls, cfg: Config, cpu: Optional[bool] = None) -> "TrainStep":
        """A prepared step at step 0 outside a run (the benchmarks): the Accelerate backend, one process
        or each rank of a torchrun launch. Call ``backend.end()`` when done."""
        backend = AccelerateBackend(cfg, cpu=cpu)
        try:
            return cls(cfg, backend).prepare()
        except BaseException:
            backend.end()
            raise

    def repeat_on(self, x0: torch.Tensor, labels: Optional[torch.Tensor] = None):
        """A callable taking the next optimizer step on the same micro-batch every time (a benchmark's
        fixed batch): ``take(regularize=True)``."""
        calls = itertools.count()

        def take(regularize: bool = True) -> StepResult:
            i = next(calls)
            return self(itertools.repeat((x0, labels)), i, i, regularize=regularize)
        return take

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.raw_model.parameters())

    def load_weights(self, weights: dict, ema_weights: dict, source: Path, key: str = "model") -> None:
        """Before ``prepare``: a resumed or continued run's raw and EMA weights. Strict loads with one
        line naming ``key``, the source and the first mismatching tensor."""
        try:
            load_state_into(self.model, weights, source=str(source))
            load_state_into(self.ema.model, ema_weights, source=str(source))
        except (ValueError, RuntimeError) as e:  # ConfigError included
            raise ConfigError(f"{key}: {str(e).splitlines()[0][:300]}") from None

    def prepare(self, start_step: int = 0, end_step: int = 0, scheduler_state: Optional[dict] = None,
                optimizer_from: Optional[tuple] = None) -> "TrainStep":
        """Schedule at ``start_step``, wrap by the backend, then the optimizer state (``optimizer_from``:
        the backend's ``load_state`` arguments; after wrapping, as DeepSpeed's is partitioned)."""
        tc = self.cfg.training
        # stepped by hand once per optimizer step (through prepare it steps once per process)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(tc.warmup, tc.lr_decay, end_step))
        if scheduler_state is not None:
            self.scheduler.load_state_dict(scheduler_state)
        self.scheduler.last_epoch = start_step
        self.ema.model.to(self.device)
        self.model, self.raw_model = self.backend.prepare(self.model, self.optimizer)
        if optimizer_from is not None:
            self.backend.load_state(*optimizer_from)
        # always: LambdaLR set the lr of step 0 and a run may start mid-schedule; and the configured
        # settings win over those stored with a resumed or continued optimizer state
        set_optimizer_settings(self.optimizer, self.scheduler, tc)
        # DSM through the wrapper (DDP syncs these gradients); torch.compile only here: compiled
        # modules have no double backward, so the regularizer keeps using the raw module
        self.dsm_model = torch.compile(self.model, backend=tc.compile_backend) if tc.compile else self.model
        return self

    def __call__(self, batches: Iterable, step: int, ema_updates: int, regularize: bool = True) -> StepResult:
        """One optimizer step over grad_accum micro-batches; the EMA update is the ``ema_updates``-th
        (its warm-up position). ``regularize=False``: the DSM step alone (a benchmark's baseline)."""
        tc, backend = self.cfg.training, self.backend
        regularizer = self.regularizer if regularize else None
        out = StepResult()
        for micro, (x0, y) in zip(range(tc.grad_accum), batches):
            x0 = x0.to(self.device, non_blocking=True)
            seed = seed_for(tc.seed, step, backend.rank * tc.grad_accum + micro)
            torch.manual_seed(seed)  # dropout masks
            gen = torch.Generator(device=self.device).manual_seed(seed)
            num_classes = self.cfg.model.num_classes
            y = class_labels(y, num_classes, tc.label_dropout, gen, self.device) if num_classes else None
            with backend.micro_step_context(micro):
                with backend.autocast():
                    dsm = self.dsm_loss(get_score_fn(self.dsm_model, self.sde, y), x0, generator=gen)
                loss = dsm.loss.float()
                fpe_out = regularizer(self.raw_model, x0, dsm.xt.detach(), dsm.t.detach(), step=step,
                                      generator=gen, class_labels=y) if regularizer else None
                if fpe_out is not None:
                    loss = loss + fpe_out.loss
                    out.fpe += fpe_out.loss.item() / tc.grad_accum
                    out.residual += fpe_out.residual_norm.mean().item() / tc.grad_accum
                    out.residual_t.append(fpe_out.t.detach().cpu())
                    out.residual_norm.append(fpe_out.residual_norm.detach().cpu())
                backend.backward(loss)
            backend.finish_micro_step()
            out.dsm += dsm.loss.item() / tc.grad_accum

        # clip + step; skipped when the all-reduced grad norm is non-finite (same on every rank)
        out.grad_norm, out.applied = backend.optimizer_step()
        if out.applied:
            self.ema.update(self.raw_model, ema_updates)
        self.scheduler.step()
        return out

    def state(self) -> dict:
        """What a checkpoint stores besides the backend's optimizer state and the loop's counters."""
        return {"model": self.raw_model.state_dict(), "ema": self.ema.state_dict(),
                "scheduler": self.scheduler.state_dict()}
