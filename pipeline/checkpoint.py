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
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError

PREFIX = "step_"


def _tensors(sd: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


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
    try:
        save_file(_tensors(model_state), str(tmp / "model.safetensors"))
        save_file(_tensors(ema_state), str(tmp / "ema.safetensors"))
        torch.save({"optimizer": optimizer_state, **extra_state}, tmp / "optimizer.pt")
        # state.json last: its presence marks a complete checkpoint
        (tmp / "state.json").write_text(json.dumps({"step": step, **json_state}, indent=1))
        for f in tmp.rglob("*"):  # flush before the rename makes it visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
    except OSError as e:  # disk full, quota, permissions: drop the half-written checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{final}: checkpoint not written ({e.strerror or e}); "
                              f"the previous checkpoints are kept") from None
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
    """Tensors and state of one checkpoint; ``optimizer.pt`` is read with ``weights_only=True``
    (no code from a file). An unreadable file raises ``CheckpointError`` naming it."""
    path = Path(path)
    current = path / "state.json"
    try:
        out = {"state": json.loads(current.read_text())}
        for key in ("model", "ema"):
            current = path / f"{key}.safetensors"
            out[key] = load_file(str(current), device=str(map_location))
        current = path / "optimizer.pt"
        out.update(torch.load(current, map_location=map_location, weights_only=True))
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, or a pickle with code in it
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{current}: unreadable checkpoint file ({type(e).__name__}: {first})") from None
    return out


def load_for_resume(run_dir: str | Path, resume: str | None) -> tuple[Path | None, dict | None]:
    """(checkpoint dir, its contents) to resume from: ``resume="auto"`` takes the newest complete
    checkpoint that reads back, falling back (with a warning) past truncated ones; a path must
    exist and read back."""
    if not resume:
        return None, None
    if resume != "auto":
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise CheckpointError(f"--resume: {path} is not a checkpoint directory (no state.json)")
        return path, load_checkpoint(path)
    candidates = list_checkpoints(run_dir)[::-1]
    for i, path in enumerate(candidates):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            if i + 1 == len(candidates):
                raise
            print(f"[fpdiff] warning: {e}; resuming from the previous checkpoint {candidates[i + 1].name}",
                  file=sys.stderr, flush=True)
    return None, None


# files a training run writes into its run dir (what --overwrite removes)
RUN_OUTPUTS = ("checkpoints", "export", "metrics.jsonl", "eval", "summary.json", "summary.txt",
               "samples.png", "samples.npz", "STOP")


def check_run_dir_free(run_dir: str | Path, resume: str | None, overwrite: bool) -> None:
    """Refuse to start a fresh run over an earlier one: its checkpoints would count as newer,
    its metrics be cut and its export replaced by a different model."""
    run_dir = Path(run_dir)
    if resume or overwrite:
        return
    found = [n for n in ("checkpoints", "export", "metrics.jsonl") if (run_dir / n).exists()]
    if found:
        raise ConfigError(f"{run_dir}: holds an earlier run ({', '.join(found)}); continue it with --resume auto, "
                          f"train into a new --run-dir, or replace it with --overwrite")


def clear_run_outputs(run_dir: str | Path) -> None:
    """``--overwrite``: remove an earlier run's outputs (other files in the run dir are left)."""
    for name in RUN_OUTPUTS:
        target = Path(run_dir) / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def drop_checkpoints_after(run_dir: str | Path, step: int) -> Path | None:
    """Delete checkpoints newer than ``step`` (written while training was going wrong); returns the
    newest one left."""
    for path in list_checkpoints(run_dir):
        if int(path.name[len(PREFIX):]) > step:
            shutil.rmtree(path, ignore_errors=True)
    return latest_checkpoint(run_dir)
