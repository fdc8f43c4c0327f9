"""Shared pieces of the evaluation stage (``pipeline.eval``): process state, rank / device,
main-rank-first file checks, and the test set cut into global uint8 batches (read with
``pipeline.data.reader``, the reader training uses; scale with ``pipeline.images.to_model_space``)."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import numpy as np
import torch

from pipeline.data.reader import iter_images, resolve_shards, shard_urls
from pipeline.eval.features import MissingFileError, batched, ceil_div
from pipeline.collectives import broadcast_float
from pipeline.collectives import dist_rank_world

# --------------------------------------------------------------------------- helpers
def get_state():
    """Accelerate's PartialState: initialises torch.distributed under ``accelerate launch``."""
    from accelerate import PartialState
    # cpu=True on a machine without CUDA: otherwise Accelerate reports DistributedType.NO
    # (1 process) under `accelerate launch --multi_gpu` on CPU
    return PartialState(cpu=not torch.cuda.is_available())


def _rank_world(state) -> tuple[int, int]:
    return dist_rank_world(state)


def _is_main(state) -> bool:
    return _rank_world(state)[0] == 0


def _device(state, device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if state is not None and getattr(state, "device", None) is not None:
        return torch.device(state.device)
    return torch.device("cpu")


def _main_first(state, fn: Callable[[bool], object]):
    """Run ``fn(download=True)`` on the main rank, then ``fn(download=False)`` elsewhere.

    A failure on the main rank is announced to every rank (no rank hangs in a barrier):
    all raise ``MissingFileError``; only the main rank's message is meant to be printed.
    """
    rank, world = _rank_world(state)
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


def _test_batches(images: Optional[torch.Tensor], shards: Optional[str], channels: int, bs: int):
    """Global batches (k, uint8 (n,C,H,W)) of the test set in a fixed order."""
    if images is not None:
        for k in range(ceil_div(images.shape[0], bs)):
            yield k, images[k * bs:(k + 1) * bs]
        return
    urls = shard_urls(shards or "", key="test shards (--shards / data.test_shards)")
    first = None
    for k, chunk in enumerate(batched(iter_images(urls, channels), bs)):
        for key, a, _ in chunk:  # one line naming the image, not numpy's "must have the same shape"
            first = first or a.shape
            if a.shape != first:
                raise ValueError(f"{shards}: test image {key} is {a.shape[0]}x{a.shape[1]}, the first ones "
                                 f"{first[0]}x{first[1]}; the test images must have one size")
        yield k, torch.from_numpy(np.stack([a for _, a, _ in chunk])).permute(0, 3, 1, 2).contiguous()


def rank_test_batches(images, shards, channels: int, bs: int, rank: int, world: int,
                      max_samples: Optional[int] = None, num_batches: Optional[int] = None):
    """This rank's share (batch k on rank k mod world) of the first ``max_samples`` test images
    in at most ``num_batches`` global batches; every image counts, partial batches included."""
    n_seen = 0
    for k, u8 in _test_batches(images, shards, channels, bs):
        if num_batches is not None and k >= num_batches:
            break
        if max_samples is not None:
            if n_seen >= max_samples:
                break
            u8 = u8[: max_samples - n_seen]
        n_seen += u8.shape[0]
        if k % world == rank:
            yield k, u8


# a bar counting (possibly fractional) images: whole numbers shown, an ETA when the total is known
IMAGE_BAR = "{l_bar}{bar}| {n:.0f}/{total_fmt} img [{elapsed}<{remaining}, {rate_fmt}]"


def local_shard_counts(shards: Optional[str]) -> Optional[list[int]]:
    """Images per shard (from the indexes, else the tar headers) when every shard is a local file,
    for progress bars; None for remote shards (counting would download them) or on any problem."""
    try:
        urls = shard_urls(shards or "")
        if any(u.startswith(("pipe:", "http:", "https:", "s3:", "gs:")) for u in urls):
            return None
        return resolve_shards(shards, key="test shards").counts
    except Exception:  # noqa: BLE001 - a bar without a total, the reader reports the problem
        return None


def rank_share(images, shards, bs: int, rank: int, world: int, max_samples: Optional[int] = None,
               num_batches: Optional[int] = None) -> Optional[int]:
    """How many test images ``rank_test_batches`` gives this rank (None: unknown), for its bar."""
    if images is not None:
        total = int(images.shape[0])
    else:
        counts = local_shard_counts(shards)
        if counts is None:
            return None
        total = sum(counts)
    if max_samples is not None:
        total = min(total, max_samples)
    if num_batches is not None:
        total = min(total, num_batches * bs)
    return sum(min(bs, total - k * bs) for k in range(rank, ceil_div(total, bs), world))


@contextlib.contextmanager
def eval_pass(model, progress: bool = False, **bar_kwargs):
    """Model in eval mode for the duration (its mode restored after, errors included) and a tqdm
    bar (a silent one unless ``progress``: pass ``progress and rank == 0``)."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    bar_kwargs.setdefault("unit", "batch")
    bar = tqdm(disable=not progress, dynamic_ncols=True, **bar_kwargs)
    try:
        yield bar
    finally:
        bar.close()
        model.train(was_training)
