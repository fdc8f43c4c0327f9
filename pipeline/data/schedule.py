"""The deterministic sample schedule of ``pipeline.data.loader.ShardLoader``: which samples each reader
gets in each epoch and in which order, as a pure function of ``(seed, epoch, reader)`` (the
design is described in ``pipeline.data.loader``'s docstring)."""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from pipeline.collectives import rng_for
from pipeline.data.reader import ShardSet, read_shard
from pipeline.status import warn



def shuffle_order(n: int, bufsize: int, rng: np.random.Generator) -> np.ndarray:
    """Output order (input positions) of a sliding shuffle buffer of ``bufsize`` over ``n`` inputs."""
    if n <= 1 or bufsize <= 1:
        return np.arange(n, dtype=np.int64)
    b = min(bufsize, n)
    picks = (rng.random(n - b) * b).astype(np.int64).tolist()
    buf = list(range(b))
    out = np.empty(n, dtype=np.int64)
    for t, inp in enumerate(range(b, n)):
        k = picks[t]
        out[t] = buf[k]
        buf[k] = inp
    out[n - b:] = np.asarray(buf, dtype=np.int64)[rng.permutation(b)]
    return out


class Schedule:
    """The deterministic sample schedule (picklable; shipped to DataLoader workers)."""

    def __init__(self, shards: ShardSet, *, world_size: int, workers: int, seed: int, shuffle: bool,
                 shuffle_buffer: int, resampled: bool, max_member_bytes: Optional[int] = None):
        self.urls, self.counts = shards.urls, np.asarray(shards.counts, dtype=np.int64)
        self.N = int(self.counts.sum())
        self.P = world_size * workers
        self.seed, self.shuffle, self.bufsize, self.resampled = seed, shuffle, shuffle_buffer, resampled
        self.max_member_bytes = max_member_bytes

    def part_length(self, j: int) -> int:
        if self.resampled:
            return -(-self.N // self.P)
        return (j + 1) * self.N // self.P - j * self.N // self.P

    def segments(self, epoch: int, j: int) -> list[tuple[int, int, int]]:
        """Reader ``j``'s slice of epoch ``epoch`` as ``(shard, start, stop)`` pieces, in order."""
        if self.resampled:
            need, segs = self.part_length(j), []
            rng = rng_for(self.seed, 0x5E5A, epoch, j)
            nonempty = np.flatnonzero(self.counts > 0)
            while need > 0:
                s = int(nonempty[rng.integers(len(nonempty))])
                take = int(min(self.counts[s], need))
                segs.append((s, 0, take))
                need -= take
            return segs
        order = rng_for(self.seed, 0x5A4D, epoch).permutation(len(self.counts)) if self.shuffle \
            else np.arange(len(self.counts))
        lo, hi = j * self.N // self.P, (j + 1) * self.N // self.P
        segs, base = [], 0
        for s in order:
            c = int(self.counts[s])
            a, b = max(lo, base), min(hi, base + c)
            if a < b:
                segs.append((int(s), a - base, b - base))
            base += c
            if base >= hi:
                break
        return segs

    def order(self, epoch: int, j: int, n: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return shuffle_order(n, self.bufsize, rng_for(self.seed, 0x5B0F, epoch, j))

    def stream(self, j: int, epoch: int, offset: int, one_epoch: bool) -> Iterator[tuple]:
        """Yield ``(epoch, offset_next, url, key, files_or_None)`` for every slot of reader ``j``
        from ``(epoch, offset)``; ``files`` is None for a sample lost from a broken shard.
        ``(epoch, offset_next)`` is the position after this slot, normalised to ``(e+1, 0)``."""
        while True:
            segs = self.segments(epoch, j)
            n = sum(b - a for _, a, b in segs)
            if offset < n:
                order = self.order(epoch, j, n)
                inv = np.empty(n, dtype=np.int64)
                inv[order] = np.arange(n)
                q = int(order[offset:].min())
                starts = np.cumsum([0] + [b - a for _, a, b in segs])
                reader = self._positions(segs, starts, q)
                have: dict[int, tuple] = {}
                frontier = q
                for t in range(offset, n):
                    p = int(order[t])
                    while p not in have and frontier <= p:
                        item = next(reader, None)
                        if item is None:
                            frontier = n
                            break
                        pos, url, key, files = item
                        frontier = pos + 1
                        if inv[pos] >= offset:
                            have[pos] = (url, key, files)
                    got = have.pop(p, None)
                    nxt = (epoch, t + 1) if t + 1 < n else (epoch + 1, 0)
                    if got is None:
                        s = int(np.searchsorted(starts, p, side="right") - 1)
                        yield nxt[0], nxt[1], self.urls[segs[s][0]], f"#{segs[s][1] + p - starts[s]}", None
                    else:
                        yield nxt[0], nxt[1], got[0], got[1], got[2]
            elif n == 0:
                yield epoch + 1, 0, None, None, None  # empty slice: an explicit epoch boundary
            epoch, offset = epoch + 1, 0
            if one_epoch:
                return

    def _positions(self, segs, starts, q: int):
        for s_i, (s, a, b) in enumerate(segs):
            base = int(starts[s_i])
            if base + (b - a) <= q:
                continue
            first = a + max(0, q - base)
            url = self.urls[s]
            errors: list = []
            got = 0
            last_key = None
            for i, key, files in read_shard(url, first, b, errors, self.max_member_bytes):
                got += 1
                last_key = key
                yield base + (i - a), url, key, files
            if got < b - first:
                why = errors[0][1] if errors else "fewer samples than the index lists"
                warn(f"data: shard {url} truncated or unreadable after key {last_key} ({why}): "
                     f"{b - first - got} of its samples in this slice skipped")
