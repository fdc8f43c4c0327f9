"""Reading WebDataset tar shards -- the one reader of training, evaluation and the classifier.

* ``resolve_shards`` / ``shard_urls``: a shard spec (brace patterns or globs joined by ``::``, a
  directory, an index ``.json``, ``file://``, ``pipe:`` or ``http(s)://`` URLs) -> URLs, with
  per-shard sample counts from the JSON index beside the shards (or one header scan).
* ``read_shard``: the samples ``start <= i < stop`` of one shard as ``(i, key, {ext: bytes})``,
  through ``gopen`` -> ``_tar_members`` (tarfile, members capped at ``data.max_member_bytes``) ->
  webdataset's ``group_by_keys``;
  samples before ``start`` are skipped by their tar headers. A local shard is first checked
  against the index beside it (sha256, sample count: ``shard_problem``, once per process).
* ``iter_images``: decoded samples (``pipeline.data.decode``) of a list of shards in order
  (evaluation reads this way).

Training adds the exactly-once, exactly-resumable schedule of ``pipeline.data.schedule`` on top
(``pipeline.data.loader``'s docstring describes the design). Uses: webdataset, braceexpand.
"""
from __future__ import annotations

import glob
import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import braceexpand
import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys

from pipeline.config import ConfigError
from pipeline.data.decode import decode_sample
from pipeline.status import warn


MAX_MEMBER_BYTES = 64 << 20  # the largest tar member read (data.max_member_bytes)


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
            warn(f"data: no index for {len(remote)} remote shard(s) (set data.index); scanning them once to "
                 f"count samples")
        for i in todo:
            errors: list = []
            counts[i] = count_samples(urls[i], errors)
            if errors and not counts[i]:  # not "holds no samples": say what it is
                raise DataError(f"{key}: {urls[i]} is not a readable tar shard ({errors[0][1]})")
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
        self.start, self.stop, self.i, self.key = start, stop, -1, None
        self._key_ext = base_plus_ext

    def select(self, fname: str) -> bool:
        key, _ = self._key_ext(fname)
        if key is None:
            return False
        if key != self.key:
            self.i, self.key = self.i + 1, key
        return self.start <= self.i <= self.stop


def _tar_members(url: str, stream, cursor: _Cursor, on_error, max_member_bytes: int):
    """The member stream of one tar shard, as webdataset's ``tar_file_iterator`` yields it
    (``{fname, data, __url__}``, plain files only, ``__*__`` metadata skipped), reading only the
    members ``cursor`` selects; a member larger than ``max_member_bytes`` (a small compressed
    shard may inflate to gigabytes) is an error before it is read."""
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        for info in tar:
            if not info.isreg() or re.match(r"__[^/]*__($|/)", info.name) or not cursor.select(info.name):
                continue
            if info.size > max_member_bytes:
                raise ValueError(f"member {info.name} is {info.size} bytes, more than the {max_member_bytes} allowed "
                                 f"(data.max_member_bytes)")
            yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
            tar.members = []
    except Exception as exn:  # noqa: BLE001  truncated, corrupt, not a tar
        on_error(exn)


def _tar_files(url: str, cursor: _Cursor, errors: list, max_member_bytes: Optional[int] = None):
    """The member stream of one shard (``_tar_members``; only the members ``cursor`` selects are
    read). The first read error ends it and is appended to ``errors`` as ``(key of the sample
    being read, message)``. Returns (opened stream, members, the error handler, for
    ``group_by_keys`` too)."""
    def stop_at_first_error(exn: BaseException) -> bool:
        why = str(exn.args[0]).split(" @ ")[0] if exn.args else ""  # webdataset appends " @ <stream>"
        errors.append((cursor.key, f"{type(exn).__name__}: {why[:200]}"))
        return False

    stream = gopen(url, "rb")
    members = _tar_members(url, stream, cursor, stop_at_first_error, max_member_bytes or MAX_MEMBER_BYTES)
    return stream, members, stop_at_first_error


def _close(stream) -> None:
    try:
        stream.close()
    except Exception:  # noqa: BLE001  (a pipe closed early exits with SIGPIPE)
        pass


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _index_entry(path: Path) -> Optional[tuple[Path, dict]]:
    """(index file, entry) of a local shard in the index beside it (``NAME.json`` of
    ``NAME-000000.tar`` first, else any index of its folder that lists it)."""
    own = path.parent / (re.sub(r"-\d+\.tar$", "", path.name) + ".json")
    for j in dict.fromkeys([own, *sorted(path.parent.glob("*.json"))]):
        try:
            d = json.loads(j.read_text())
        except (OSError, ValueError):
            continue
        if _is_index(d):
            for entry in d["shards"]:
                if isinstance(entry, dict) and entry.get("file") == path.name:
                    return j, entry
    return None


_checked: dict[tuple, Optional[str]] = {}  # (path, size, mtime) -> what is wrong with it (None: nothing)


def shard_problem(url: str) -> Optional[str]:
    """What is wrong with a local shard against the index beside it (its sha256, its sample count),
    None when nothing is (or it has no index, or is remote); checked once per process."""
    local = _local_path(url)
    if local is None:
        return None
    path = Path(local)
    try:
        st = path.stat()
    except OSError:
        return None  # reported by the reader
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _checked:
        problem, found = None, _index_entry(path)
        if found is not None:
            index, entry = found
            if entry.get("sha256") and file_sha256(path) != entry["sha256"]:
                problem = f"its sha256 differs from the one in {index}"
            # fewer samples than listed is a truncated shard (its readable samples are used, the rest
            # counted as lost); more would be ignored without a word
            elif isinstance(entry.get("count"), int) and (n := count_samples(url)) > entry["count"]:
                problem = f"it holds {n} samples, {index} lists {entry['count']}"
        _checked[key] = problem
    return _checked[key]


def read_shard(url: str, start: int = 0, stop: Optional[int] = None, errors: Optional[list] = None,
               max_member_bytes: Optional[int] = None) -> Iterator[tuple[int, str, dict]]:
    """Yield ``(i, key, {ext: bytes})`` for the samples ``start <= i < stop`` of one shard
    (``stop``: its sample count, None: to its end). A read error (truncated or corrupt tar,
    unreadable URL) ends the shard: it is appended to ``errors`` as ``(key, message)`` and the
    sample it cut is not yielded; so is a shard that ends before ``stop`` samples."""
    errors = [] if errors is None else errors
    n_known = stop is not None
    stop = (1 << 62) if stop is None else stop
    if start >= stop:
        return
    problem = shard_problem(url)
    if problem is not None:  # the index's sha256 and count are checked once, when the shard is first opened
        errors.append((None, f"not read: {problem}"))
        return
    cursor = _Cursor(start, stop)
    try:
        stream, members, on_error = _tar_files(url, cursor, errors, max_member_bytes)
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


def count_samples(url: str, errors: Optional[list] = None) -> int:
    """Samples in one shard, from its tar headers (member data is skipped, not read); a read error
    (not a tar, cut short) is appended to ``errors`` as ``(key, message)``."""
    errors = [] if errors is None else errors
    cursor = _Cursor(1 << 62, 1 << 62)  # selects nothing, counts keys
    try:
        stream, members, _ = _tar_files(url, cursor, errors)
    except Exception as e:  # noqa: BLE001
        errors.append((None, f"{type(e).__name__}: {str(e)[:200]}"))
        return 0
    try:
        for _ in members:
            pass
    finally:
        _close(stream)
    return cursor.i + 1


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
                warn(f"data: skipping sample {key} in shard {url}: {err}")
                skipped.append((url, key, str(err)))
                continue
            yield key, arr, label
        if errors:
            warn(f"data: shard {url} truncated or unreadable after key {last} ({errors[0][1]}): the rest of it "
                 f"skipped")
            skipped.append((url, errors[0][0], errors[0][1]))
