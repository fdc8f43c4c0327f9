"""Reading WebDataset tar shards -- the one reader of training, evaluation and the classifier.

* ``resolve_shards`` / ``shard_urls``: a shard spec (brace patterns or globs joined by ``::``, a
  directory, an index ``.json``, ``file://``, ``pipe:`` or ``http(s)://`` URLs) -> URLs, with
  per-shard sample counts from the JSON index beside the shards (or one header scan).
* ``read_shard``: the samples ``start <= i < stop`` of one shard as ``(i, key, {ext: bytes})``,
  through webdataset's tar iteration (``gopen`` -> ``tar_file_expander`` -> ``group_by_keys``);
  samples before ``start`` are skipped by their tar headers.
* ``decode_sample``: ``{ext: bytes}`` -> (uint8 [H, W, C] image, label from ``.cls``).
* ``iter_images``: decoded samples of a list of shards in order (evaluation reads this way).

Training adds the exactly-once, exactly-resumable schedule of ``pipeline.data.schedule`` on top
(``pipeline.data.loader``'s docstring describes the design). Uses: webdataset, braceexpand, PIL.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from pipeline.config import ConfigError

log = logging.getLogger("pipeline.data.loader")

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "pgm", "bmp")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


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


def _expand(pattern: str, local: bool = False) -> list[str]:
    """Brace expansion; for local paths also shell globs (``*``, ``?``, ``[...]``), sorted."""
    import braceexpand

    out = []
    for e in braceexpand.braceexpand(pattern):
        if local and any(c in e for c in "*?[") and not Path(e).exists():
            out += sorted(glob.glob(e)) or [e]  # no match: reported as missing below
        else:
            out.append(e)
    return out


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


def _list_shards(spec: str, key: str) -> tuple[list[str], list[tuple[str, dict]]]:
    """The URLs of a shard spec and the shard indexes it named (``(folder, index)``)."""
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
            try:
                d = json.loads(p.read_text())
            except ValueError:  # empty or cut short
                d = None
            if not _is_index(d):
                raise DataError(f"{key}: {p} is not a shard index written by `fpdiff data shards`")
            indexes.append((str(p.parent), d))
            urls += [str(p.parent / s["file"]) for s in d["shards"]]
            continue
        expanded = _expand(local, local=True)
        if len(expanded) == 1 and not Path(expanded[0]).exists():
            what = "shard file" if expanded[0].endswith(".tar") else "shard directory"
            raise DataError(f"{key}: {what} {expanded[0]} does not exist")
        parents = {str(Path(e).parent) for e in expanded}
        for par in sorted(parents):
            if not Path(par).is_dir():
                raise DataError(f"{key}: shard directory {par} does not exist")
        missing = [e for e in expanded if not Path(e).is_file()]
        if missing:
            raise DataError(f"{key}: {len(missing)} of {len(expanded)} shard files missing; {missing[0]} does not exist")
        urls += expanded
    if not urls:
        raise DataError(f"{key}: {spec!r} matches no shards")
    return urls, indexes


def shard_urls(spec: str, key: str = "--shards") -> list[str]:
    """The shard URLs of ``spec`` (see ``resolve_shards``), without counting samples."""
    return _list_shards(spec, key)[0]


def resolve_shards(spec: str, index: str = "", key: str = "data.shards") -> ShardSet:
    """Turn a shard spec (brace patterns or globs joined by ``::``, a directory, an index .json,
    ``file://`` or ``pipe:`` URLs) into URLs with per-shard sample counts (from the indexes
    beside local shards, ``index`` for remote ones, else one header scan). Problems raise a
    one-line ``DataError`` naming ``key``."""
    urls, indexes = _list_shards(spec, key)
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
            counts[i] = count_samples(urls[i])
    h = w = c = None
    names = None
    for d in used:
        dh, dw, dc = d.get("height"), d.get("width"), d.get("channels")
        if h is None:
            h, w, c, names = dh, dw, dc, d.get("class_names")
        elif (dh, dw, dc) != (h, w, c):
            raise DataError(f"{key}: shard sets disagree on image shape ({h}x{w}x{c} vs {dh}x{dw}x{dc})")
    return ShardSet(urls, [int(x) for x in counts], h, w, c, names, spec)


# --------------------------------------------------------------------------- tar iteration
class _Cursor:
    """The sample (index ``i``, ``key``) of the tar member being read -- a sample is a run of
    members with one key, as ``group_by_keys`` groups them -- and the ``select_files`` filter
    that reads only samples ``start..stop`` (the first member of sample ``stop`` closes sample
    ``stop - 1``); members of other samples are skipped by their headers."""

    def __init__(self, start: int, stop: int):
        from webdataset.tariterators import base_plus_ext

        self.start, self.stop, self.i, self.key = start, stop, -1, None
        self._key_ext = base_plus_ext

    def select(self, fname: str) -> bool:
        key, _ = self._key_ext(fname)
        if key is None:
            return False
        if key != self.key:
            self.i, self.key = self.i + 1, key
        return self.start <= self.i <= self.stop


def _tar_files(url: str, cursor: _Cursor, errors: list):
    """webdataset's member stream of one shard (``{fname, data, __url__}``; only the members
    ``cursor`` selects are read). The first read error ends it and is appended to ``errors``
    as ``(key of the sample being read, message)``. Returns (opened stream, members, the error
    handler, for ``group_by_keys`` too)."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import tar_file_expander

    def stop_at_first_error(exn: BaseException) -> bool:
        why = str(exn.args[0]).split(" @ ")[0] if exn.args else ""  # webdataset appends " @ <stream>"
        errors.append((cursor.key, f"{type(exn).__name__}: {why}"))
        return False

    stream = gopen(url, "rb")
    members = tar_file_expander([{"url": url, "stream": stream}], handler=stop_at_first_error,
                                select_files=cursor.select, eof_value=None)
    return stream, members, stop_at_first_error


def _close(stream) -> None:
    try:
        stream.close()
    except Exception:  # noqa: BLE001  (a pipe closed early exits with SIGPIPE)
        pass


def read_shard(url: str, start: int = 0, stop: Optional[int] = None,
               errors: Optional[list] = None) -> Iterator[tuple[int, str, dict]]:
    """Yield ``(i, key, {ext: bytes})`` for the samples ``start <= i < stop`` of one shard
    (``stop``: its sample count, None: to its end). A read error (truncated or corrupt tar,
    unreadable URL) ends the shard: it is appended to ``errors`` as ``(key, message)`` and the
    sample it cut is not yielded; so is a shard that ends before ``stop`` samples."""
    from webdataset.tariterators import group_by_keys

    errors = [] if errors is None else errors
    n_known = stop is not None
    stop = (1 << 62) if stop is None else stop
    if start >= stop:
        return
    cursor = _Cursor(start, stop)
    try:
        stream, members, on_error = _tar_files(url, cursor, errors)
    except Exception as e:  # noqa: BLE001  gopen: missing file, bad scheme
        errors.append((None, f"{type(e).__name__}: {e}"))
        return
    samples = group_by_keys(members, handler=on_error)
    try:
        for i, sample in enumerate(samples, start):
            key = sample["__key__"]
            if cursor.key == key:  # yielded at the end of the tar stream: whole unless cut there
                if errors:
                    return
                if n_known and i < stop - 1:
                    errors.append((key, f"the shard ends early (at sample {i + 1} of {stop}, which may be cut)"))
                    return
            yield i, key, {k: v for k, v in sample.items() if not k.startswith("__")}
            if i >= stop - 1:
                return
    finally:
        samples.close()
        _close(stream)


def count_samples(url: str) -> int:
    """Samples in one shard, from its tar headers (member data is skipped, not read)."""
    cursor = _Cursor(1 << 62, 1 << 62)  # selects nothing, counts keys
    try:
        stream, members, _ = _tar_files(url, cursor, [])
    except Exception:  # noqa: BLE001
        return 0
    try:
        for _ in members:
            pass
    finally:
        _close(stream)
    return cursor.i + 1


# --------------------------------------------------------------------------- decoding
def decode_sample(files: dict, height: Optional[int] = None, width: Optional[int] = None,
                  channels: Optional[int] = None) -> tuple[np.ndarray, int]:
    """``{ext: bytes}`` -> (uint8 [H,W,C], label; -1 without ``.cls``). The image is converted to
    ``channels`` (1: L, 3: RGB, 4: RGBA; None: its own L / RGB / RGBA, other modes as RGB);
    ``height`` / ``width``, when given, must match. Raises ValueError on anything unusable."""
    from PIL import Image

    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        raise ValueError(f"no image ({', '.join(IMAGE_EXTS)}) among {sorted(files)}")
    try:
        with Image.open(io.BytesIO(files[ext])) as im:
            want = _MODES[channels] if channels else (im.mode if im.mode in ("L", "RGB", "RGBA") else "RGB")
            arr = np.asarray(im if im.mode == want else im.convert(want))
    except Exception as e:  # noqa: BLE001  PIL raises many types on bad data
        raise ValueError(f"undecodable {ext}: {type(e).__name__}: {e}") from None
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype != np.uint8 or (height is not None and arr.shape[0] != height) or \
            (width is not None and arr.shape[1] != width):
        raise ValueError(f"image {arr.shape[0]}x{arr.shape[1]}x{arr.shape[2]} {arr.dtype}, "
                         f"expected {height or '*'}x{width or '*'}x{channels or '*'} uint8")
    label = -1
    if "cls" in files:
        try:
            label = int(files["cls"].decode().strip())
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"bad .cls {files['cls'][:20]!r}") from None
    return arr, label


def iter_images(urls: Iterable[str], channels: Optional[int] = None, *, height: Optional[int] = None,
                width: Optional[int] = None, skipped: Optional[list] = None
                ) -> Iterator[tuple[str, np.ndarray, int]]:
    """``(key, uint8 [H,W,C], label)`` of every sample of ``urls``, in order (``decode_sample``'s
    conversion and checks). An undecodable sample is skipped, and so is the rest of a shard
    after a read error: each with a warning naming shard and key, appended to ``skipped``
    as ``(url, key, why)``."""
    skipped = [] if skipped is None else skipped
    for url in urls:
        errors: list = []
        last = None
        for _, key, files in read_shard(url, errors=errors):
            last = key
            try:
                arr, label = decode_sample(files, height, width, channels)
            except ValueError as err:
                log.warning("data: skipping sample %s in shard %s: %s", key, url, err)
                skipped.append((url, key, str(err)))
                continue
            yield key, arr, label
        if errors:
            log.warning("data: shard %s truncated or unreadable after key %s (%s): the rest of it skipped",
                        url, last, errors[0][1])
            skipped.append((url, errors[0][0], errors[0][1]))
