"""The test set cut into global uint8 batches in a fixed order, and one rank's share of them: what
the evaluation (FID reference statistics, bits/dim, the FPE residual) and inpainting read."""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from pipeline.data.reader import iter_images, shard_urls


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
    for k, chunk in enumerate(batched(iter_images(urls, channels), bs)):
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
