"""Atomic training checkpoints.

A checkpoint is ``RUN/checkpoints/step_XXXXXXXX/`` (layout in ``pipeline.rundir``): EMA and model
weights, ``optimizer.pt`` (optimizer, scheduler, grad scaler, RNG states), ``state.json`` (step,
loader state, counters) and, under DeepSpeed, its partitioned optimizer states in ``deepspeed/``.
It is assembled in a ``.tmp-*`` staging folder and renamed into place
(``pipeline.atomic.atomic_directory``), so a crash mid-save leaves the previous checkpoint as the
newest complete one; ``.tmp-*`` leftovers are ignored and cleaned.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.atomic import atomic_directory
from pipeline.config import ConfigError
from pipeline.rundir import (CHECKPOINT_STATE, EMA_WEIGHTS, MODEL_WEIGHTS, OPTIMIZER, RunDir, check_finite,
                             checkpoint_step, save_weights, write_error_text, write_errors)
from pipeline.status import warn


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read or written; the message names the file."""


def rng_state() -> dict:
    # numpy's state as plain ints and a tensor: optimizer.pt must load with weights_only=True
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def clear_staging(staging: Path) -> None:
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)


def save_checkpoint(run_dir: str | Path, step: int, staging: Path | None = None, *, model_state: dict,
                    ema_state: dict, optimizer_state: dict | None, extra_state: dict, json_state: dict,
                    keep_last: int) -> Path:
    """Write into ``staging`` (default: a fresh ``RunDir.staging(step)``) and rename atomically;
    prune to the newest ``keep_last``."""
    run = RunDir(run_dir)
    final = run.checkpoint(step)
    tmp = staging or run.staging(step)
    if staging is None:
        clear_staging(tmp)
    try:
        with atomic_directory(final, staging=tmp, fsync=True):
            save_weights(tmp / MODEL_WEIGHTS, model_state)
            save_weights(tmp / EMA_WEIGHTS, ema_state)
            torch.save({"optimizer": optimizer_state, **extra_state}, tmp / OPTIMIZER)
            # state.json last: its presence marks a complete checkpoint
            (tmp / CHECKPOINT_STATE).write_text(json.dumps({"step": step, **json_state}, indent=1))
    except write_errors() as e:  # disk full, quota, permissions: the half-written checkpoint is dropped
        raise CheckpointError(f"{final}: checkpoint not written ({write_error_text(e)}); "
                              f"the previous checkpoints are kept") from None
    for stale in run.stale_staging():
        shutil.rmtree(stale, ignore_errors=True)
    for old in run.list_checkpoints()[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Tensors and state of one checkpoint; ``optimizer.pt`` is read with ``weights_only=True``
    (no code from a file). An unreadable file raises ``CheckpointError`` naming it."""
    path = Path(path)
    current = path / CHECKPOINT_STATE
    try:
        out = {"state": _checked_state(json.loads(current.read_text()), path)}
        for key, name in (("model", MODEL_WEIGHTS), ("ema", EMA_WEIGHTS)):
            current = path / name
            out[key] = check_finite(load_file(str(current), device=str(map_location)), str(current))
        current = path / OPTIMIZER
        out.update(torch.load(current, map_location=map_location, weights_only=True))
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, or a pickle with code in it
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{current}: unreadable checkpoint file ({type(e).__name__}: {first})") from None
    return out


def _checked_state(state, path: Path) -> dict:
    """A state.json's content, or ValueError: a mapping whose ``step`` is the checkpoint's own, with
    mappings (or nothing) for the loader position and the counters."""
    if not isinstance(state, dict):
        raise ValueError(f"expected a JSON object, got {type(state).__name__}")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {str(step)[:50]!r}")
    if checkpoint_step(path) not in (None, step):  # a step_XXXXXXXX folder names its own step
        raise ValueError(f"step {step} is not the checkpoint's ({path.name})")
    for key in ("loader", "counters"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            raise ValueError(f"{key} must be a JSON object, got {type(state[key]).__name__}")
    return state


def load_for_resume(run_dir: str | Path, resume: str | None) -> tuple[Path | None, dict | None]:
    """(checkpoint dir, its contents) to resume from: ``resume="auto"`` takes the newest complete
    checkpoint that reads back, falling back (with a warning) past truncated ones; a path must
    exist and read back."""
    if not resume:
        return None, None
    if resume != "auto":
        path = Path(resume)
        if not (path / CHECKPOINT_STATE).is_file():
            raise CheckpointError(f"--resume: {path} is not a checkpoint directory (no {CHECKPOINT_STATE})")
        return path, load_checkpoint(path)
    candidates = RunDir(run_dir).list_checkpoints()[::-1]
    for i, path in enumerate(candidates):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            if i + 1 == len(candidates):
                raise
            warn(f"{e}; resuming from the previous checkpoint {candidates[i + 1].name}")
    return None, None


def drop_checkpoints_after(run_dir: str | Path, step: int) -> Path | None:
    """Delete checkpoints newer than ``step`` (written while training was going wrong); returns the
    newest one left."""
    run = RunDir(run_dir)
    for path in run.list_checkpoints():
        if checkpoint_step(path) > step:
            shutil.rmtree(path, ignore_errors=True)
    return run.latest_checkpoint()
