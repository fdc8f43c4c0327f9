"""The test set cut into global uint8 batches in a fixed order, and one rank's share of them: what
the evaluation (FID reference statistics, bits/dim, the FPE residual) and inpainting read; which test
shards a command reads (never the training shards)."""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.data.reader import iter_images, resolve_shards, shard_urls


def require_test_shards(cfg, given: Optional[str], *, command: str, flag: str = "--shards") -> str:
    """The test shards a command reads: ``given`` (its ``flag``) or the run's ``data.test_shards``.
    Never the training shards: a run without test shards is refused in one line."""
    spec = given or cfg.data.test_shards
    if not spec:
        raise ConfigError(f"{command}: needs test data, and this run has none (data.test_shards is empty); "
                          f"pass {flag}{'' if flag.endswith('=') else ' '}PATTERN (e.g. the data.test_shards=... line of `fpdiff data shards`)")
    return spec


def batched(it: Iterable, n: int) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def global_test_batches(images: Optional[torch.Tensor], shards: Optional[str], channels: int, bs: int):
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
    for k, u8 in global_test_batches(images, shards, channels, bs):
        if num_batches is not None and k >= num_batches:
            break
        if max_samples is not None:
            if n_seen >= max_samples:
                break
            u8 = u8[: max_samples - n_seen]
        n_seen += u8.shape[0]
        if k % world == rank:
            yield k, u8


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
