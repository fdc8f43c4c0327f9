"""WebDataset shard loader with an exactly-once, exactly-resumable sample schedule.

Design (all of it is a pure function of ``(seed, epoch, reader)``; nothing depends on timing):

* **Readers.** A job has ``P = world_size * W`` readers, ``W = max(1, num_workers)`` per rank;
  reader ``j = rank * W + worker``. In epoch ``e`` the shards are put in a seeded order
  (``train=True``) and their samples concatenated (counts from the JSON index beside the shards,
  or one header scan at start-up); reader ``j`` owns the contiguous slice
  ``[floor(jN/P), floor((j+1)N/P))`` of that sequence. Splitting is at the **sample** level, so
  any number of shards of any sizes gives every sample to exactly one reader, and reader
  lengths differ by at most one. A reader opens only the shards its slice touches, once per
  epoch, and reads them with ``pipeline.data.reader.read_shard`` (webdataset's tar iteration;
  the samples before its slice are skipped by their tar headers, not decoded).
* **Shuffle buffer.** Within its slice a reader emits samples in the order a sliding shuffle
  buffer of ``data.shuffle_buffer`` would, but the permutation is computed on positions from
  ``(seed, epoch, reader)`` up front, so the stream can be restarted at any offset.
* **Streams and steps.** Default (``exact_epochs=False``): each reader's slices of epochs
  0, 1, 2, ... form one endless stream cut into full batches (a batch may span an epoch
  boundary); every rank yields batches forever (or ``epoch_length`` per ``iter()``), so all
  DDP ranks always take the same number of steps, and within every epoch each sample is still
  delivered exactly once across the job. ``exact_epochs=True``: each ``iter()`` yields the rest
  of the current epoch and stops (last batch of each worker may be short; ranks may differ by
  up to ``W`` batches) -- for evaluation and for checking exactly-once coverage.
  ``resampled=True``: each reader draws whole shards with replacement (seeded by
  ``(seed, epoch, reader)``) up to ``ceil(N/P)`` samples per epoch.
* **Workers.** DataLoader worker ``i`` serves reader ``(i + rotation) % W`` of its rank; the
  DataLoader returns worker batches round-robin, and after a resume ``rotation`` makes the
  next batch come from the worker that was next before the interruption.
* **Exact resume.** ``state_dict()`` holds, per worker, ``(epoch, offset)`` in its stream,
  counting every slot (also corrupt ones), plus the round-robin position and counters.
  A loader built with ``state=`` continues the identical stream (same keys in the same order,
  same flips and dequantisation noise: augmentation is seeded per batch from its position).
* **Pixels.** ``pipeline.data.decode.decode_sample`` (the decoder evaluation uses too), then
  flip on uint8 and ``pipeline.images.to_model_space`` (the one uint8 -> model space scaling).
* **Faults.** A sample whose image cannot be decoded, has the wrong size or cannot be read
  exactly (16 bits, alpha, colour for a gray model: ``decode.exact_mode``), and every sample
  lost from a truncated / unreadable shard or one that disagrees with its index (sha256, count),
  is skipped with a warning naming shard and key and counted in ``corrupt_count``. Tar members
  and decoded images are capped (``data.max_member_bytes``, ``data.max_image_pixels``). Start-up problems (no shard spec, missing directory or files,
  empty shard list, image size / channels that disagree with the config) raise ``DataError``
  (a ``ConfigError``) with one line naming the problem.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from pipeline.collectives import rng_for
from pipeline.data.schedule import Schedule
from pipeline.data.decode import decode_sample
from pipeline.data.reader import DataError, read_shard, resolve_shards
from pipeline.images import to_model_space
from pipeline.status import warn


STATE_VERSION = 1


# --------------------------------------------------------------------------- the dataset
def _identity(x):
    return x


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, sched: Schedule, *, rank: int, workers: int, positions: list, rotation: int,
                 batch_size: int, one_epoch: bool, shape: tuple, centered: bool, flip: bool, dequant: bool,
                 max_pixels: Optional[int] = None):
        super().__init__()
        self.sched, self.rank, self.W, self.positions, self.rotation = sched, rank, workers, positions, rotation
        self.B, self.one_epoch, self.shape = batch_size, one_epoch, shape
        self.centered, self.flip, self.dequant = centered, flip, dequant
        self.max_pixels = max_pixels

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = 0 if info is None else info.id
        return self.worker_batches((wid + self.rotation) % self.W)

    def worker_batches(self, w: int):
        H, W, C = self.shape
        j = self.rank * self.W + w
        epoch, offset = self.positions[w]
        imgs, labels, keys = [], [], []
        corrupt = 0
        first = (epoch, offset)
        for e_next, o_next, url, key, files in self.sched.stream(j, epoch, offset, self.one_epoch):
            if url is not None:
                if files is None:
                    corrupt += 1
                else:
                    try:
                        arr, lab = decode_sample(files, H, W, C, self.max_pixels)
                        imgs.append(arr)
                        labels.append(lab)
                        keys.append(key)
                    except ValueError as err:
                        corrupt += 1
                        warn(f"data: skipping sample {key} in shard {url}: {err}")
            end_of_epoch = self.one_epoch and o_next == 0
            if len(keys) == self.B or end_of_epoch:
                yield self._batch(imgs, labels, keys, j, first) + ((w, e_next, o_next, corrupt),)
                imgs, labels, keys, corrupt = [], [], [], 0
                first = (e_next, o_next)
                if end_of_epoch:
                    return

    def _batch(self, imgs, labels, keys, j, first):
        H, W, C = self.shape
        n = len(imgs)
        u8 = np.stack(imgs) if n else np.zeros((0, H, W, C), np.uint8)
        u8 = u8.transpose(0, 3, 1, 2)  # [B,C,H,W]
        rng = rng_for(self.sched.seed, 0xA06, j, first[0], first[1])  # augmentation seeded by position
        if self.flip and n:
            f = rng.random(n) < 0.5
            u8[f] = u8[f, :, :, ::-1]
        noise = torch.from_numpy(rng.random(u8.shape, dtype=np.float32)) if self.dequant else None
        x = to_model_space(torch.from_numpy(np.ascontiguousarray(u8)), self.centered, noise)
        return x, torch.tensor(labels, dtype=torch.int64), list(keys)


# --------------------------------------------------------------------------- the loader
class ShardLoader:
    """Batches ``(images float32 [B,C,H,W], labels int64 [B], keys list[str])`` from tar shards.

    ``cfg_data``: a ``DataConfig`` (shards, index, image_size, num_channels, centered,
    random_flip, uniform_dequantization, num_workers, shuffle_buffer, resampled).
    ``batch_size``: per rank. ``epoch_length``: batches per ``iter()`` (None: endless, or one
    epoch with ``exact_epochs=True``). ``train=False``: no shard/sample shuffling, no flip, no
    dequantisation. ``shards``/``num_workers`` override the config's. ``state``: a
    ``state_dict()`` (or the list/dict from ``gather_state``) to resume from.
    """

    def __init__(self, cfg_data, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 state: Optional[dict | list] = None, epoch_length: Optional[int] = None,
                 exact_epochs: bool = False, train: bool = True, shards: Optional[str] = None,
                 num_workers: Optional[int] = None, pin_memory: bool = False, shards_key: str = "data.shards"):
        if batch_size <= 0:
            raise DataError(f"batch_size: must be > 0, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} outside world_size {world_size}")
        if epoch_length is not None and epoch_length <= 0:
            raise DataError(f"epoch_length: must be > 0, got {epoch_length}")
        self.cfg = cfg_data
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers = cfg_data.num_workers if num_workers is None else num_workers
        self.W = max(1, self.num_workers)
        self.epoch_length, self.exact_epochs, self.train, self.pin_memory = epoch_length, exact_epochs, train, pin_memory
        spec = cfg_data.shards if shards is None else shards
        self.max_member_bytes = getattr(cfg_data, "max_member_bytes", None)
        self.max_pixels = getattr(cfg_data, "max_image_pixels", None)
        self.shardset = resolve_shards(spec, getattr(cfg_data, "index", ""), key=shards_key)
        self._check_shape(shards_key)
        if self.shardset.num_samples == 0:
            raise DataError(f"{shards_key}: the shards in {spec!r} hold no samples")
        resampled = bool(cfg_data.resampled) and train
        self.seed = int(seed)
        self._sig = {"fingerprint": self.shardset.fingerprint(), "resampled": resampled,
                     "shuffle_buffer": int(cfg_data.shuffle_buffer) if train else 0, "train": train}
        self.corrupt_count = 0
        self.batches = 0
        self.samples = 0
        self.positions = [[0, 0] for _ in range(self.W)]
        self.worker_samples = [0] * self.W
        self.next_worker = 0
        if state is not None:
            self._load_state(state)
        self.sched = Schedule(self.shardset, world_size=world_size, workers=self.W, seed=self.seed, shuffle=train,
                              shuffle_buffer=self._sig["shuffle_buffer"], resampled=resampled,
                              max_member_bytes=self.max_member_bytes)

    # ---- start-up checks
    def _check_shape(self, key: str) -> None:
        s, cfg = self.shardset, self.cfg
        h, w, c = s.height, s.width, s.channels
        if h is None:  # no index: look at the first decodable sample
            for url in s.urls:
                for _, _, files in read_shard(url, 0, 1, max_member_bytes=self.max_member_bytes):
                    try:
                        h, w, c = decode_sample(files, max_pixels=self.max_pixels)[0].shape
                    except ValueError:
                        pass
                if h is not None:
                    break
            if h is None:
                return
        if h != cfg.image_size or w != cfg.image_size:
            raise DataError(f"data.image_size: config says {cfg.image_size} but the shards ({key}={s.described}) "
                            f"hold {h}x{w} images")
        if c != cfg.num_channels:
            raise DataError(f"data.num_channels: config says {cfg.num_channels} but the shards ({key}={s.described}) "
                            f"hold {c}-channel images")

    # ---- state
    @property
    def epoch(self) -> int:
        return min(p[0] for p in self.positions)

    @property
    def num_samples(self) -> int:
        return self.shardset.num_samples

    def state_dict(self) -> dict:
        """This rank's position (JSON-serialisable). See ``gather_state`` for all ranks."""
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.W, "seed": self.seed, "schedule": dict(self._sig),
                "epoch": self.epoch, "positions": [list(p) for p in self.positions],
                "worker_samples": list(self.worker_samples), "next_worker": self.next_worker,
                "batches": self.batches, "samples": self.samples, "corrupt": self.corrupt_count,
                "ranks": {str(self.rank): {"positions": [list(p) for p in self.positions],
                                           "corrupt": self.corrupt_count}}}

    def load_state_dict(self, state) -> None:
        self._load_state(state)
        self.sched = Schedule(self.shardset, world_size=self.world_size, workers=self.W, seed=self.seed,
                              shuffle=self.train, shuffle_buffer=self._sig["shuffle_buffer"],
                              resampled=self._sig["resampled"], max_member_bytes=self.max_member_bytes)

    def _load_state(self, state) -> None:
        if isinstance(state, list):  # one state per rank
            state = state[self.rank] if self.rank < len(state) else state[0]
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(f"loader state: not a version-{STATE_VERSION} ShardLoader state")
        self.seed = int(state["seed"])
        same = (state["world_size"] == self.world_size and state["num_workers"] == self.W
                and state["schedule"] == self._sig)
        if not same:
            e = int(max(p[0] for p in state["positions"])) + 1
            warn(f"data: loader state was saved with a different schedule (world_size {state['world_size']}, "
                 f"workers {state['num_workers']}, {state['schedule']}); starting epoch {e} from its beginning")
            self.positions = [[e, 0] for _ in range(self.W)]
            self.next_worker = 0
            self.batches, self.samples = int(state["batches"]), int(state["samples"])
            return
        mine = state.get("ranks", {}).get(str(self.rank))
        if mine is not None:
            self.positions = [list(map(int, p)) for p in mine["positions"]]
            self.corrupt_count = int(mine.get("corrupt", 0))
        else:
            # another rank's state: derive this rank's positions from the samples each worker
            # delivered (exact when this rank met no corrupt samples)
            warn(f"data: no saved position for rank {self.rank}; derived from rank {state['rank']}'s counts "
                 f"(exact unless corrupt samples were skipped)")
            sched = Schedule(self.shardset, world_size=self.world_size, workers=self.W, seed=self.seed,
                             shuffle=self.train, shuffle_buffer=self._sig["shuffle_buffer"],
                             resampled=self._sig["resampled"])
            self.positions = []
            for w, c in enumerate(state["worker_samples"]):
                L = sched.part_length(self.rank * self.W + w)
                self.positions.append([int(c) // L, int(c) % L] if L else [int(state["epoch"]), 0])
        self.worker_samples = [int(c) for c in state["worker_samples"]]
        self.next_worker = int(state["next_worker"])
        self.batches, self.samples = int(state["batches"]), int(state["samples"])

    # ---- iteration
    def _dataset(self) -> _Stream:
        return _Stream(self.sched, rank=self.rank, workers=self.W, positions=[list(p) for p in self.positions],
                       rotation=self.next_worker, batch_size=self.batch_size, one_epoch=self.exact_epochs,
                       shape=(self.cfg.image_size, self.cfg.image_size, self.cfg.num_channels),
                       centered=self.cfg.centered, flip=self.cfg.random_flip and self.train,
                       dequant=self.cfg.uniform_dequantization and self.train, max_pixels=self.max_pixels)

    def __len__(self) -> int:
        if self.epoch_length is not None:
            return self.epoch_length
        if self.exact_epochs:
            return sum(-(-self.sched.part_length(self.rank * self.W + w) // self.batch_size) for w in range(self.W))
        raise TypeError("an endless ShardLoader has no length (set epoch_length or exact_epochs)")

    def __iter__(self):
        ds = self._dataset()
        dl_iter = None
        if self.num_workers == 0:
            source = ds.worker_batches(0)
        else:
            dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                             collate_fn=_identity, pin_memory=self.pin_memory,
                                             prefetch_factor=2, persistent_workers=False)
            source = dl_iter = iter(dl)
        yielded = 0
        try:
            for images, labels, keys, (w, e, o, corrupt) in source:
                self.positions[w] = [int(e), int(o)]
                self.corrupt_count += int(corrupt)
                if not keys:
                    continue
                self.worker_samples[w] += len(keys)
                self.next_worker = (w + 1) % self.W
                self.batches += 1
                self.samples += len(keys)
                yield images, labels, keys
                yielded += 1
                if self.epoch_length is not None and yielded >= self.epoch_length:
                    return
            if self.exact_epochs:
                self.next_worker = 0
        finally:
            if dl_iter is not None:
                dl_iter._shutdown_workers()


def gather_state(loader: ShardLoader) -> dict:
    """Collective (call on EVERY rank): this rank's state with every rank's exact position
    merged under ``"ranks"``; pass it to ``ShardLoader(state=...)`` on any rank."""
    st = loader.state_dict()
    if torch.distributed.is_available() and torch.distributed.is_initialized() and loader.world_size > 1:
        allst: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(allst, st)
        for s in allst:
            st["ranks"].update(s["ranks"])
        st["corrupt_total"] = int(sum(s["corrupt"] for s in allst))
    return st


def build_train_loader(cfg, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                       state=None, epoch_length: Optional[int] = None) -> ShardLoader:
    """The training stream: endless full batches of ``batch_size`` per rank (DDP-safe)."""
    return ShardLoader(cfg.data, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                       state=state, epoch_length=epoch_length)


def build_eval_loader(cfg, *, batch_size: int, rank: int = 0, world_size: int = 1,
                      num_workers: Optional[int] = None) -> ShardLoader:
    """One pass over ``data.test_shards`` (or ``data.shards`` if empty): no shuffle, flip or noise."""
    spec = cfg.data.test_shards or cfg.data.shards
    key = "data.test_shards" if cfg.data.test_shards else "data.shards"
    return ShardLoader(cfg.data, batch_size=batch_size, rank=rank, world_size=world_size, seed=0,
                       exact_epochs=True, train=False, shards=spec, num_workers=num_workers, shards_key=key)
