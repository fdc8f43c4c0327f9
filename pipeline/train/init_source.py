"""Where a fine-tune starts: ``training.init_from`` read as FP-Diffusion's code reads it.

FP-Diffusion fine-tunes a DSM-trained model by restoring its whole checkpoint (raw weights, EMA,
Adam state, step) and continuing with a new loss. ``load_init_source`` reads what a source has:

==================  ============  =====  ====================  =============  =============
source              raw weights   EMA    Adam state            step, EMA pos  data position
==================  ============  =====  ====================  =============  =============
checkpoint folder   yes           yes    yes                   yes            yes
run dir             its newest readable checkpoint; else ``imported/`` (below); else export/
imported score_sde  yes           yes    when the .pth had it  yes            no
export / Hub repo   EMA only      yes    no                    no             no
==================  ============  =====  ====================  =============  =============

``plan_continuation`` decides what carries over: everything the source has, unless listed in
``training.init_fresh`` (optimizer, ema, schedule, data) or impossible (a model of another shape
fails; data from other shards starts anew). The trainer prints ``describe()``'s line at start-up
and writes ``record()`` to ``RUN/init_from.json``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from pipeline.config import Config, ConfigError
from pipeline.data.reader import resolve_shards
from pipeline.rundir import (CHECKPOINT_STATE, EMA_WEIGHTS, MODEL_WEIGHTS, OPTIMIZER, RunDir, find_weights,
                             has_deepspeed_state, read_weights)
from pipeline.train import checkpoint as ckpt

FRESH_CHOICES = ("optimizer", "ema", "schedule", "data")


@dataclass
class InitSource:
    """What a fine-tune's source holds (None: it does not have it)."""

    location: str  # as the user wrote it
    kind: str  # "checkpoint" | "imported" | "export"
    path: Path  # the folder (or file) read
    ema: dict
    model: Optional[dict] = None  # raw (non-EMA) weights
    optimizer: Optional[dict] = None
    scaler: Optional[dict] = None
    scheduler: Optional[dict] = None
    rng: Optional[dict] = None
    step: Optional[int] = None
    ema_updates: Optional[int] = None
    loader: Optional[dict] = None
    deepspeed_dir: Optional[Path] = None  # a checkpoint folder with DeepSpeed's partitioned optimizer

    @property
    def start_weights(self) -> dict:
        """The model starts from the raw weights the optimizer state belongs to (EMA if none)."""
        return self.model if self.model is not None else self.ema


def _from_checkpoint(location: str, folder: Path, state: dict) -> InitSource:
    s = state["state"]
    return InitSource(location, "checkpoint", folder, ema=state["ema"], model=state["model"],
                      optimizer=state.get("optimizer"), scaler=state.get("scaler"), rng=state.get("rng"),
                      scheduler=state.get("scheduler"),
                      step=int(s["step"]), ema_updates=int(s.get("counters", {}).get("ema_updates", s["step"])),
                      loader=s.get("loader"),
                      deepspeed_dir=folder if has_deepspeed_state(folder) else None)


def _from_import(location: str, run: RunDir) -> InitSource:
    """``fpdiff import score-sde``'s run: raw weights, EMA, and (when the .pth had it) Adam state."""
    info = json.loads(run.import_record.read_text())
    opt_file = run.imported / OPTIMIZER
    optimizer = None
    if opt_file.is_file():
        try:
            optimizer = torch.load(opt_file, map_location="cpu", weights_only=True)["optimizer"]
        except Exception as e:  # noqa: BLE001 - truncated or not ours: the one-line error names it
            raise ckpt.CheckpointError(f"{opt_file}: unreadable optimizer state ({type(e).__name__})") from None
    step = info.get("step")
    return InitSource(location, "imported", run.path, ema=read_weights(run.export / EMA_WEIGHTS),
                      model=read_weights(run.imported / MODEL_WEIGHTS), optimizer=optimizer, step=step,
                      ema_updates=info.get("ema_num_updates", step))


def load_init_source(location: str, hub_export_folder: Optional[Callable] = None) -> InitSource:
    """Read ``training.init_from``: a checkpoint folder, a run dir, an imported run, an export
    folder or weights file, or a Hub repo id (downloaded by ``hub_export_folder``, the publishing
    stage's, handed over by the entry point). Errors are one line naming the key and the file."""
    try:
        return _load(location, hub_export_folder)
    except (ConfigError, FileNotFoundError, ValueError) as e:  # CheckpointError, non-finite weights included
        raise ConfigError(f"training.init_from: {e}") from None


def _load(location: str, hub_export_folder: Optional[Callable]) -> InitSource:
    p = Path(location).expanduser()
    if not p.exists():  # a Hub repo id: only its export exists there
        if hub_export_folder is None:
            raise ConfigError(f"{location} does not exist (a Hub repo id needs fpdiff train)")
        folder = hub_export_folder(location)
        return InitSource(location, "export", folder, ema=read_weights(folder / EMA_WEIGHTS))
    # a checkpoint folder, or a run dir's newest checkpoint that reads back (falling back past
    # unreadable ones with a line): the resume's own resolver, each file read once
    if (p / CHECKPOINT_STATE).is_file():
        return _from_checkpoint(location, p, ckpt.load_checkpoint(p))
    run = RunDir(p)
    if p.is_dir() and run.list_checkpoints():
        return _from_checkpoint(location, *ckpt.load_for_resume(p, "auto"))
    if run.import_record.is_file():
        return _from_import(location, run)
    try:
        w = find_weights(p, prefer_export=True, need_config=False)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    return InitSource(location, "export", w.file.parent if w.file.parent.is_dir() else p, ema=read_weights(w.file),
                      step=w.step)


@dataclass
class Continuation:
    """What a fine-tune takes from its source, and why anything else starts fresh."""

    source: InitSource
    step: int = 0
    ema_updates: int = 0
    optimizer: bool = False
    loader: Optional[dict] = None
    rng: Optional[dict] = None
    scheduler: Optional[dict] = None
    fresh: dict = field(default_factory=dict)  # part -> why it starts fresh

    def describe(self) -> str:
        s = self.source
        kept = (["raw weights" if s.model is not None else "EMA weights as the model", "EMA weights"]
                + ([f"EMA warm-up position ({self.ema_updates} updates)"] if "ema" not in self.fresh else [])
                + (["Adam state"] if self.optimizer else [])
                + ([f"step {self.step}"] if "schedule" not in self.fresh else [])
                + (["data position"] if self.loader is not None else []))
        line = f"fine-tuning from {s.location} ({s.kind}): continues {', '.join(kept)}"
        if self.fresh:
            line += "; starts fresh: " + ", ".join(f"{k} ({why})" for k, why in self.fresh.items())
        return line

    def record(self) -> dict:
        s = self.source
        return {"init_from": s.location, "kind": s.kind, "read": str(s.path), "source_step": s.step,
                "start_step": self.step, "ema_updates": self.ema_updates, "optimizer": self.optimizer,
                "data_position": self.loader is not None, "fresh": self.fresh}


def plan_continuation(source: InitSource, cfg: Config, deepspeed: bool) -> Continuation:
    """Everything the source has carries over unless ``training.init_fresh`` names it."""
    asked = set(cfg.training.init_fresh)
    plan = Continuation(source)
    for part in FRESH_CHOICES:
        if part in asked:
            plan.fresh[part] = "training.init_fresh"
    if "schedule" not in asked:
        if source.step is None:
            plan.fresh["schedule"] = f"the {source.kind} records no step"
        else:
            plan.step, plan.rng, plan.scheduler = source.step, source.rng, source.scheduler
    if "ema" not in asked:
        if source.ema_updates is None:
            plan.fresh["ema"] = f"the {source.kind} records no EMA position"
        else:
            plan.ema_updates = source.ema_updates
    if "optimizer" not in asked:
        has = source.deepspeed_dir is not None if deepspeed else source.optimizer is not None
        if has:
            plan.optimizer = True
        else:
            plan.fresh["optimizer"] = (f"the {source.kind} has no optimizer state" if source.kind != "checkpoint" else
                                       "the checkpoint's optimizer state is DeepSpeed's" if not deepspeed else
                                       "the checkpoint has no DeepSpeed optimizer partitions")
    if "data" not in asked:
        if source.loader is None:
            plan.fresh["data"] = f"the {source.kind} has no data position"
        elif source.loader.get("schedule", {}).get("fingerprint") != _fingerprint(cfg):
            plan.fresh["data"] = "data.shards differ from the source's"
        else:
            plan.loader = source.loader
    return plan


def _fingerprint(cfg: Config) -> str:
    return resolve_shards(cfg.data.shards, getattr(cfg.data, "index", ""), key="data.shards").fingerprint()
