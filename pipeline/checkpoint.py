"""Atomic training checkpoints.

Layout: ``RUN_DIR/checkpoints/step_XXXXXXXX/`` holding ``model.safetensors``,
``ema.safetensors``, ``optimizer.pt`` (optimizer, scheduler, grad scaler, RNG states),
``state.json`` (step, loader state, counters) and, under DeepSpeed, its partitioned
optimizer states in ``deepspeed/``. A checkpoint is written into a
``.tmp-*`` directory and renamed into place, so a crash mid-save leaves the previous
checkpoint as the newest complete one; ``.tmp-*`` leftovers are ignored and cleaned.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step_"


def _tensors(sd: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def staging_dir(run_dir: str | Path, step: int) -> Path:
    """Where a checkpoint is assembled (by every rank, for DeepSpeed) before its rename."""
    return checkpoint_dir(run_dir) / f".tmp-{PREFIX}{step:08d}"


def clear_staging(staging: Path) -> None:
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)


def save_checkpoint(run_dir: str | Path, step: int, staging: Path | None = None, *, model_state: dict,
                    ema_state: dict, optimizer_state: dict | None, extra_state: dict, json_state: dict,
                    keep_last: int) -> Path:
    """Write into ``staging`` and rename atomically; prune to the newest ``keep_last``."""
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = staging or staging_dir(run_dir, step)
    if staging is None:
        clear_staging(tmp)
    save_file(_tensors(model_state), str(tmp / "model.safetensors"))
    save_file(_tensors(ema_state), str(tmp / "ema.safetensors"))
    torch.save({"optimizer": optimizer_state, **extra_state}, tmp / "optimizer.pt")
    # state.json last: its presence marks a complete checkpoint
    (tmp / "state.json").write_text(json.dumps({"step": step, **json_state}, indent=1))
    for f in tmp.rglob("*"):  # flush before the rename makes it visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    for stale in root.glob(".tmp-*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    out = {
        "model": load_file(str(path / "model.safetensors"), device=str(map_location)),
        "ema": load_file(str(path / "ema.safetensors"), device=str(map_location)),
        "state": json.loads((path / "state.json").read_text()),
    }
    out.update(torch.load(path / "optimizer.pt", map_location=map_location, weights_only=False))
    return out
