"""Shared pieces of the evaluation stage (``pipeline.eval``): process state, rank / device,
main-rank-first file checks (the test set's global batches: ``pipeline.data.test_set``)."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from accelerate import PartialState
from tqdm import tqdm

from pipeline.status import MissingFileError
from pipeline.collectives import broadcast_float, rank_world

# --------------------------------------------------------------------------- helpers
def get_state():
    """Accelerate's PartialState: initialises torch.distributed under ``accelerate launch``."""
    # cpu=True on a machine without CUDA: otherwise Accelerate reports DistributedType.NO
    # (1 process) under `accelerate launch --multi_gpu` on CPU
    return PartialState(cpu=not torch.cuda.is_available())


def device_of(state, device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if state is not None and getattr(state, "device", None) is not None:
        return torch.device(state.device)
    return torch.device("cpu")


def main_first(state, fn: Callable[[bool], object]):
    """Run ``fn(download=True)`` on the main rank, then ``fn(download=False)`` elsewhere.

    A failure on the main rank is announced to every rank (no rank hangs in a barrier):
    all raise ``MissingFileError``; only the main rank's message is meant to be printed.
    """
    rank, world = rank_world(state)
    if world == 1:
        return fn(True)
    err, out = None, None
    if rank == 0:
        try:
            out = fn(True)
        except MissingFileError as e:
            err = e
    failed = broadcast_float(1.0 if err is not None else 0.0)
    if failed:
        raise err if err is not None else MissingFileError("(see the main rank's error)")
    if rank != 0:
        out = fn(False)
    return out


# a bar counting (possibly fractional) images: whole numbers shown, an ETA when the total is known
IMAGE_BAR = "{l_bar}{bar}| {n:.0f}/{total_fmt} img [{elapsed}<{remaining}, {rate_fmt}]"


@contextlib.contextmanager
def eval_pass(model, progress: bool = False, **bar_kwargs):
    """Model in eval mode for the duration (its mode restored after, errors included) and a tqdm
    bar (a silent one unless ``progress``: pass ``progress and rank == 0``)."""
    was_training = model.training
    model.eval()
    bar_kwargs.setdefault("unit", "batch")
    bar = tqdm(disable=not progress, dynamic_ncols=True, **bar_kwargs)
    try:
        yield bar
    finally:
        bar.close()
        model.train(was_training)
