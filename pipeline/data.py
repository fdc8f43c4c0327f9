"""WebDataset shard loader with an exactly-once, exactly-resumable sample schedule.

Design (all of it is a pure function of ``(seed, epoch, reader)``; nothing depends on timing):

* **Readers.** A job has ``P = world_size * W`` readers, ``W = max(1, num_workers)`` per rank;
  reader ``j = rank * W + worker``. In epoch ``e`` the shards are put in a seeded order
  (``train=True``) and their samples concatenated (counts from the JSON index beside the shards,
  or one header scan at start-up); reader ``j`` owns the contiguous slice
  ``[floor(jN/P), floor((j+1)N/P))`` of that sequence. Splitting is at the **sample** level, so
  any number of shards of any sizes gives every sample to exactly one reader, and reader
  lengths differ by at most one. A reader opens only the shards its slice touches (a local
  shard is skipped into by tar headers, without reading image bytes).
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
* **Faults.** A sample whose image cannot be decoded or has the wrong size, and every sample
  lost from a truncated / unreadable shard, is skipped with a warning naming shard and key and
  counted in ``corrupt_count``. Start-up problems (no shard spec, missing directory or files,
  empty shard list, image size / channels that disagree with the config) raise ``DataError``
  (a ``ConfigError``) with one line naming the problem.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from .config import ConfigError

log = logging.getLogger("pipeline.data")

STATE_VERSION = 1
_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "pgm", "bmp")
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class DataError(ConfigError):
    """A data problem found at start-up; the message names it on one line."""


# --------------------------------------------------------------------------- shard lists
def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url)) and not url.startswith("file://")


def _local_path(url: str) -> Optional[str]:
    if url.startswith("file://"):
        return url[len("file://"):]
    if url.startswith("file:"):
        return url[len("file:"):]
    return None if _is_remote(url) else url


def _expand(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def _read_json_url(url: str) -> dict:
    local = _local_path(url)
    if local is not None:
        return json.loads(Path(local).read_text())
    from webdataset.gopen import gopen

    with gopen(url, "rb") as f:
        return json.loads(f.read().decode())


def _is_index(d: Any) -> bool:
    return isinstance(d, dict) and d.get("format") == "fpdiff-shards" and isinstance(d.get("shards"), list)


@dataclass
class ShardSet:
    urls: list[str]
    counts: list[int]
    height: Optional[int]
    width: Optional[int]
    channels: Optional[int]
    class_names: Optional[list[str]]
    described: str  # for messages

    @property
    def num_samples(self) -> int:
        return int(sum(self.counts))

    def fingerprint(self) -> str:
        import hashlib

        names = [u.rsplit("/", 1)[-1] for u in self.urls]
        return hashlib.sha1(json.dumps([names, self.counts]).encode()).hexdigest()[:16]


def resolve_shards(spec: str, index: str = "", key: str = "data.shards") -> ShardSet:
    """Turn ``data.shards`` (brace pattern(s) joined by ``::``, a directory, an index .json,
    ``file://`` or ``pipe:`` URLs) into URLs with per-shard sample counts."""
    spec = (spec or "").strip()
    if not spec:
        raise DataError(f"{key}: empty; write shards with `fpdiff data shards SOURCE --out DIR` and set {key}")
    urls: list[str] = []
    indexes: list[tuple[str, dict]] = []  # (directory or '' for remote, index)
    for part in spec.split("::"):
        local = _local_path(part)
        if local is None:
            urls += _expand(part)
            continue
        p = Path(local)
        if p.is_dir():
            found = []
            for j in sorted(p.glob("*.json")):
                try:
                    d = json.loads(j.read_text())
                except (OSError, ValueError):
                    continue
                if _is_index(d):
                    found.append((j, d))
            if len(found) > 1:
                raise DataError(f"{key}: {p} holds {len(found)} shard sets ({', '.join(j.name for j, _ in found)}); "
                                f"name one, e.g. {found[0][0]}")
            if found:
                j, d = found[0]
                indexes.append((str(p), d))
                urls += [str(p / s["file"]) for s in d["shards"]]
            else:
                tars = sorted(str(t) for t in p.glob("*.tar"))
                if not tars:
                    raise DataError(f"{key}: no .tar shards in {p}")
                urls += tars
            continue
        if p.suffix == ".json":
            if not p.is_file():
                raise DataError(f"{key}: index file {p} does not exist")
            d = json.loads(p.read_text())
            if not _is_index(d):
                raise DataError(f"{key}: {p} is not a shard index written by `fpdiff data shards`")
            indexes.append((str(p.parent), d))
            urls += [str(p.parent / s["file"]) for s in d["shards"]]
            continue
        expanded = _expand(local)
        if len(expanded) == 1 and not Path(expanded[0]).exists():
            what = "shard file" if expanded[0].endswith(".tar") else "shard directory"
            raise DataError(f"{key}: {what} {expanded[0]} does not exist")
        parents = {str(Path(e).parent) for e in expanded}
        for par in sorted(parents):
            if not Path(par).is_dir():
                raise DataError(f"{key}: shard directory {par} does not exist")
        missing = [e for e in expanded if not Path(e).is_file()]
        if missing:
            raise DataError(f"{key}: {len(missing)} of {len(expanded)} shard files missing, first: {missing[0]}")
        urls += expanded
    if not urls:
        raise DataError(f"{key}: {spec!r} matches no shards")

    # counts: from indexes beside local shards, data.index for remote ones, else a scan
    if index:
        try:
            d = _read_json_url(index)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"data.index: cannot read {index} ({e})") from None
        if not _is_index(d):
            raise DataError(f"data.index: {index} is not a shard index written by `fpdiff data shards`")
        indexes.append(("", d))
    by_file: dict[str, tuple[int, dict]] = {}
    for _, d in indexes:
        for s in d["shards"]:
            by_file[s["file"]] = (int(s["count"]), d)
    loaded_dirs: set[str] = set()
    counts: list[Optional[int]] = []
    used: list[dict] = []
    for u in urls:
        local = _local_path(u)
        name = (local or u).rsplit("/", 1)[-1]
        if local is not None and name not in by_file:
            parent = str(Path(local).parent)
            cand = Path(parent) / (re.sub(r"-\d+\.tar$", "", name) + ".json")
            if str(cand) not in loaded_dirs and cand.is_file():
                loaded_dirs.add(str(cand))
                try:
                    d = json.loads(cand.read_text())
                    if _is_index(d):
                        for s in d["shards"]:
                            by_file.setdefault(s["file"], (int(s["count"]), d))
                except (OSError, ValueError):
                    pass
        hit = by_file.get(name)
        if hit is None and local is None:  # pipe:/http: match a listed file name inside the URL
            for fname, h in by_file.items():
                if fname in u:
                    hit = h
                    break
        if hit is None:
            counts.append(None)
        else:
            counts.append(hit[0])
            used.append(hit[1])
    todo = [i for i, c in enumerate(counts) if c is None]
    if todo:
        remote = [urls[i] for i in todo if _local_path(urls[i]) is None]
        if remote:
            log.warning("data: no index for %d remote shard(s) (set data.index); scanning them once to count "
                        "samples", len(remote))
        for i in todo:
            counts[i] = _count_samples(urls[i])
    h = w = c = None
    names = None
    for d in used:
        dh, dw, dc = d.get("height"), d.get("width"), d.get("channels")
        if h is None:
            h, w, c, names = dh, dw, dc, d.get("class_names")
        elif (dh, dw, dc) != (h, w, c):
            raise DataError(f"{key}: shard sets disagree on image shape ({h}x{w}x{c} vs {dh}x{dw}x{dc})")
    return ShardSet(urls, [int(x) for x in counts], h, w, c, names, spec)


# --------------------------------------------------------------------------- tar reading
def _members_local(path: str):
    """``(name, get_bytes)`` for the regular files of an uncompressed local tar, read through
    mmap with a minimal header parser (ustar, GNU long names, pax paths); several times faster
    than ``tarfile`` per member. Raises ``tarfile.ReadError`` on a bad or truncated archive."""
    import mmap

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise tarfile.ReadError("empty file")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        off, longname = 0, None
        while off < size:  # ending exactly between members: the index counts tell what is missing
            if off + 512 > size:
                raise tarfile.ReadError("truncated header")
            hdr = mm[off:off + 512]
            if hdr.count(0) == 512:
                return
            chk = hdr[148:156].strip(b" \0")
            if not chk or int(chk, 8) != sum(hdr[:148]) + 256 + sum(hdr[156:]):
                raise tarfile.ReadError(f"invalid header at byte {off}")
            if hdr[124] & 0x80:  # GNU base-256 size
                sz = int.from_bytes(hdr[125:136], "big")
            else:
                sz = int(hdr[124:136].strip(b" \0") or b"0", 8)
            typ = hdr[156:157]
            name = hdr[0:100].split(b"\0", 1)[0]
            if hdr[257:262] == b"ustar" and hdr[345] != 0:
                name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
            data, end = off + 512, off + 512 + sz
            if end > size:  # the header is whole: report the name, fail when its data is read
                msg = f"unexpected end of data in {(longname or name).decode(errors='replace')}"

                def cut(msg=msg):
                    raise tarfile.ReadError(msg)

                yield (longname or name).decode("utf-8", "replace"), cut
                raise tarfile.ReadError(msg)
            if typ == b"L":
                longname = mm[data:end].split(b"\0", 1)[0]
            elif typ == b"x":
                rec = mm[data:end]
                while rec:
                    n_str, _, rest = rec.partition(b" ")
                    n = int(n_str)
                    k, _, v = rec[len(n_str) + 1:n - 1].partition(b"=")
                    if k == b"path":
                        longname = v
                    rec = rec[n:]
                    del rest
            elif typ in (b"0", b"\0", b"7"):
                yield (longname or name).decode("utf-8", "replace"), (lambda a=data, b=end: mm[a:b])
                longname = None
            else:
                longname = None
            off = data + (sz + 511) // 512 * 512
    finally:
        mm.close()


def _members_stream(url: str):
    from webdataset.gopen import gopen

    f = gopen(url, "rb")
    tf = None
    try:
        tf = tarfile.open(fileobj=f, mode="r|")
        while True:
            m = tf.next()
            if m is None:
                return
            if not m.isfile():
                continue

            def get(m=m):
                data = tf.extractfile(m).read()
                if len(data) != m.size:
                    raise tarfile.ReadError(f"unexpected end of data in {m.name}")
                return data

            yield m.name, get
    finally:
        for obj in (tf, f):
            try:
                if obj is not None:
                    obj.close()
            except Exception:  # noqa: BLE001  (a pipe closed early exits with SIGPIPE)
                pass


def _iter_groups(url: str, start: int, stop: int, errors: list) -> Iterator[tuple[int, str, dict]]:
    """Yield ``(i, key, {ext: bytes})`` for samples ``start <= i < stop`` of one shard.
    Samples before ``start`` are skipped by their headers. A read error ends the shard and is
    appended to ``errors`` as ``(last_key, message)``."""
    i, cur_key, cur = -1, None, {}
    local = _local_path(url)
    members = _members_local(local) if local is not None else _members_stream(url)
    try:
        for name, get in members:
            mt = _KEY_RE.match(name)
            if not mt:
                continue
            key, ext = mt.group(1), mt.group(2)
            if key != cur_key:
                if cur_key is not None and start <= i < stop:
                    yield i, cur_key, cur
                i += 1
                cur_key, cur = key, {}
                if i >= stop:
                    cur_key = None
                    return
            if i < start:
                continue
            cur[ext.lower()] = get()
        if cur_key is not None and start <= i < stop:
            yield i, cur_key, cur
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        errors.append((cur_key, f"{type(e).__name__}: {e}"))
    finally:
        members.close()


def _count_samples(url: str) -> int:
    errors: list = []
    n = 0
    for _ in _iter_groups(url, 0, 1 << 62, errors):
        n += 1
    return n


def decode_sample(files: dict, height: int, width: int, channels: int) -> tuple[np.ndarray, int]:
    """``{ext: bytes}`` -> (uint8 [H,W,C], label). Raises ValueError on anything unusable."""
    from PIL import Image

    ext = next((e for e in _IMAGE_EXTS if e in files), None)
    if ext is None:
        raise ValueError(f"no image ({', '.join(_IMAGE_EXTS)}) among {sorted(files)}")
    try:
        with Image.open(io.BytesIO(files[ext])) as im:
            im.load()
            want = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
            if im.mode != want and im.mode in ("P", "1", "I;16", "LA", "PA", "CMYK", "YCbCr"):
                im = im.convert(want)
            arr = np.asarray(im)
    except Exception as e:  # noqa: BLE001  PIL raises many types on bad data
        raise ValueError(f"undecodable {ext}: {type(e).__name__}: {e}") from None
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape != (height, width, channels) or arr.dtype != np.uint8:
        raise ValueError(f"image {arr.shape[0]}x{arr.shape[1]}x{arr.shape[2]} {arr.dtype}, "
                         f"expected {height}x{width}x{channels} uint8")
    label = -1
    if "cls" in files:
        try:
            label = int(files["cls"].decode().strip())
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"bad .cls {files['cls'][:20]!r}") from None
    return arr, label


# --------------------------------------------------------------------------- schedule
def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(w) & 0xFFFFFFFF for w in words])


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
                 shuffle_buffer: int, resampled: bool):
        self.urls, self.counts = shards.urls, np.asarray(shards.counts, dtype=np.int64)
        self.N = int(self.counts.sum())
        self.P = world_size * workers
        self.seed, self.shuffle, self.bufsize, self.resampled = seed, shuffle, shuffle_buffer, resampled

    def part_length(self, j: int) -> int:
        if self.resampled:
            return -(-self.N // self.P)
        return (j + 1) * self.N // self.P - j * self.N // self.P

    def segments(self, epoch: int, j: int) -> list[tuple[int, int, int]]:
        """Reader ``j``'s slice of epoch ``epoch`` as ``(shard, start, stop)`` pieces, in order."""
        if self.resampled:
            need, segs = self.part_length(j), []
            rng = _rng(self.seed, 0x5E5A, epoch, j)
            nonempty = np.flatnonzero(self.counts > 0)
            while need > 0:
                s = int(nonempty[rng.integers(len(nonempty))])
                take = int(min(self.counts[s], need))
                segs.append((s, 0, take))
                need -= take
            return segs
        order = _rng(self.seed, 0x5A4D, epoch).permutation(len(self.counts)) if self.shuffle \
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
        return shuffle_order(n, self.bufsize, _rng(self.seed, 0x5B0F, epoch, j))

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
            for i, key, files in _iter_groups(url, first, b, errors):
                got += 1
                last_key = key
                yield base + (i - a), url, key, files
            if got < b - first:
                why = errors[0][1] if errors else "fewer samples than the index lists"
                log.warning("data: shard %s truncated or unreadable after key %s (%s): %d of its samples "
                            "in this slice skipped", url, last_key, why, b - first - got)


# --------------------------------------------------------------------------- the dataset
def _identity(x):
    return x


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, sched: Schedule, *, rank: int, workers: int, positions: list, rotation: int,
                 batch_size: int, one_epoch: bool, shape: tuple, centered: bool, flip: bool, dequant: bool):
        super().__init__()
        self.sched, self.rank, self.W, self.positions, self.rotation = sched, rank, workers, positions, rotation
        self.B, self.one_epoch, self.shape = batch_size, one_epoch, shape
        self.centered, self.flip, self.dequant = centered, flip, dequant

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
                        arr, lab = decode_sample(files, H, W, C)
                        imgs.append(arr)
                        labels.append(lab)
                        keys.append(key)
                    except ValueError as err:
                        corrupt += 1
                        log.warning("data: skipping sample %s in shard %s: %s", key, url, err)
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
        x = np.stack(imgs) if n else np.zeros((0, H, W, C), np.uint8)
        x = x.transpose(0, 3, 1, 2).astype(np.float32)  # [B,C,H,W], values 0..255
        rng = _rng(self.sched.seed, 0xA06, j, first[0], first[1])
        if self.flip and n:
            f = rng.random(n) < 0.5
            x[f] = x[f, :, :, ::-1]
        if self.dequant:
            x = (x + rng.random(x.shape, dtype=np.float32)) / 256.0
        else:
            x = x / 255.0
        if self.centered:
            x = x * 2.0 - 1.0
        return torch.from_numpy(np.ascontiguousarray(x)), torch.tensor(labels, dtype=torch.int64), list(keys)


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
                              shuffle_buffer=self._sig["shuffle_buffer"], resampled=resampled)

    # ---- start-up checks
    def _check_shape(self, key: str) -> None:
        s, cfg = self.shardset, self.cfg
        h, w, c = s.height, s.width, s.channels
        if h is None:  # no index: look at the first sample
            errors: list = []
            for url in s.urls:
                for _, k, files in _iter_groups(url, 0, 1, errors):
                    try:
                        from PIL import Image

                        ext = next(e for e in _IMAGE_EXTS if e in files)
                        with Image.open(io.BytesIO(files[ext])) as im:
                            w, h = im.size
                            c = {"L": 1, "RGB": 3, "RGBA": 4}.get(im.mode, 3)
                    except Exception:  # noqa: BLE001
                        continue
                    break
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
                              resampled=self._sig["resampled"])

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
            warnings.warn(f"data: loader state was saved with a different schedule (world_size "
                          f"{state['world_size']}, workers {state['num_workers']}, {state['schedule']}); "
                          f"starting epoch {e} from its beginning", stacklevel=3)
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
            warnings.warn(f"data: no saved position for rank {self.rank}; derived from rank {state['rank']}'s "
                          f"counts (exact unless corrupt samples were skipped)", stacklevel=3)
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
                       dequant=self.cfg.uniform_dequantization and self.train)

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
