"""Distributed backends behind one small interface used by the training loop.

- ``AccelerateBackend``: one process, DDP on one node or across nodes (``accelerate launch``).
- ``DeepSpeedBackend``: DeepSpeed ZeRO stage 1 / 2 (``accelerate launch`` with a DeepSpeed
  config, or ``torchrun ... -m pipeline.train --deepspeed launch/ds_zero2.json``). It drives
  ``deepspeed.initialize`` itself: Accelerate's DeepSpeed integration miscounts processes on CPU
  and imports transformers (see README).

The FPE regularizer always runs on ``raw_model`` (never the wrapper's forward: DeepSpeed's output
hooks would treat its inner autograd calls as a training backward), and every step ends in one
ordinary ``backward``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from pipeline.collectives import rank_world
from pipeline.config import Config, ConfigError
from pipeline.rundir import DEEPSPEED_DIR


class AccelerateBackend:
    name = "accelerate"

    def __init__(self, cfg: Config, cpu: bool | None = None):
        # cpu=True on a CPU-only machine: without it, `accelerate launch --multi_gpu` processes each
        # believe they are alone (DistributedType.NO) although torch.distributed has 2 ranks
        # (cpu=True on a GPU machine: a benchmark's CPU rows)
        self.accelerator = Accelerator(mixed_precision=cfg.training.mixed_precision,
                                       cpu=not torch.cuda.is_available() if cpu is None else cpu)
        a = self.accelerator
        (self.rank, self.world), self.device = rank_world(a.state), a.device
        self.is_main = self.rank == 0
        self.grad_accum = cfg.training.grad_accum
        self.grad_clip = cfg.training.grad_clip

    def prepare(self, model, optimizer):
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # keep_fp32_wrapper=False strips the autocast that prepare() patched into the module's
        # forward: the regularizer must run in fp32, and autocast() below covers the DSM call
        self.raw_model = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        return self.model, self.raw_model

    def autocast(self):
        return self.accelerator.autocast()

    def micro_step_context(self, micro: int):
        # no gradient all-reduce until the last micro-batch of the step
        return self.accelerator.no_sync(self.model) if micro < self.grad_accum - 1 else contextlib.nullcontext()

    def backward(self, loss):
        self.accelerator.backward(loss / self.grad_accum)

    def finish_micro_step(self):
        pass

    def optimizer_step(self) -> tuple[float, bool]:
        """Clip, then step unless the (all-reduced, hence rank-consistent) grad norm is non-finite."""
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), clip))
        applied = math.isfinite(norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def barrier(self):
        self.accelerator.wait_for_everyone()

    def optimizer_state(self) -> dict | None:
        return self.optimizer.state_dict()

    def scaler_state(self) -> dict | None:
        return self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None

    def save_sharded(self, staging: Path) -> None:
        pass

    def load_state(self, ckpt_dir: Path, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])

    def end(self):
        self.accelerator.end_training()
        if self.world == 1:  # Accelerate's state is a per-process singleton: let a next train() configure anew
            AcceleratorState._reset_state(reset_partial_state=True)


class DeepSpeedBackend:
    name = "deepspeed"
    TAG = DEEPSPEED_DIR  # the checkpoint subfolder its optimizer partitions go to

    def __init__(self, cfg: Config, ds_config_path: str):
        import deepspeed  # deferred: optional (training.backend=deepspeed only)

        if cfg.training.mixed_precision != "no":
            raise ConfigError("training.mixed_precision: DeepSpeed keeps bf16/fp16 weights, on which the FPE "
                              "regularizer is not accurate; use 'no' with DeepSpeed (or DDP with autocast)")
        path = Path(ds_config_path)
        if not path.is_file():
            raise ConfigError(f"DeepSpeed config not found: {path}")
        self.ds_config = json.loads(path.read_text())
        stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        if stage == 3:
            raise ConfigError(f"{path}: ZeRO stage 3 is not supported: its parameter gather has no forward-mode "
                              "derivative (jvp), which the FPE residual's exact d/dt needs; use stage 1 or 2")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend)
        self.rank, self.world = rank_world()
        self.is_main = self.rank == 0
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        tc = cfg.training
        # batch geometry and clipping come from the experiment config, not the JSON
        self.ds_config.update({
            "train_batch_size": tc.batch_size,
            "train_micro_batch_size_per_gpu": tc.batch_size // (self.world * tc.grad_accum),
            "gradient_accumulation_steps": tc.grad_accum,
            "gradient_clipping": tc.grad_clip if tc.grad_clip > 0 else 0.0,
            "zero_allow_untested_optimizer": True,
        })
        self.grad_accum = tc.grad_accum

    def prepare(self, model, optimizer):
        import deepspeed  # deferred: optional (training.backend=deepspeed only)

        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.ds_config)
        self.raw_model = self.engine.module
        return self.engine, self.raw_model

    def autocast(self):
        return contextlib.nullcontext()

    def micro_step_context(self, micro: int):
        return contextlib.nullcontext()

    def backward(self, loss):
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself

    def finish_micro_step(self):
        # every micro-batch calls engine.step(); it applies the update at the accumulation boundary
        self.engine.step()

    def optimizer_step(self) -> tuple[float, bool]:
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        overflow = bool(getattr(self.engine.optimizer, "overflow", False))
        return norm, not overflow and math.isfinite(norm)

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def barrier(self):
        dist.barrier()

    def optimizer_state(self) -> dict | None:
        return None  # partitioned: written by save_sharded on every rank

    def scaler_state(self) -> dict | None:
        return None

    def save_sharded(self, staging: Path) -> None:
        # every rank must call this (it holds a barrier)
        self.engine.save_checkpoint(str(staging), tag=self.TAG, save_latest=False)

    def load_state(self, ckpt_dir: Path, state: dict) -> None:
        self.engine.load_checkpoint(str(ckpt_dir), tag=self.TAG, load_module_strict=True,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)

    def end(self):
        self.barrier()


def build_backend(cfg: Config, deepspeed_config: str | None = None):
    """DeepSpeed when a DeepSpeed JSON is given (``--deepspeed`` or accelerate's DeepSpeed plugin), else Accelerate."""
    if deepspeed_config is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        deepspeed_config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if not deepspeed_config:
            raise ConfigError("accelerate config: a DeepSpeed launch needs deepspeed_config.deepspeed_config_file "
                              "pointing at a JSON under launch/")
    if deepspeed_config:
        return DeepSpeedBackend(cfg, deepspeed_config)
    return AccelerateBackend(cfg)
