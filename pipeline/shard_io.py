"""Reading WebDataset tar shards: shard-list resolution (patterns, directories, JSON indexes,
remote URLs) with per-shard sample counts, a fast local tar reader, sample grouping by key,
and decoding one sample to a uint8 image and a label.

The sample schedule built on top of this is in ``pipeline.schedule``, the loader in
``pipeline.data`` (whose docstring describes the whole design).
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from .config import ConfigError

log = logging.getLogger("pipeline.data")

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
            try:
                d = json.loads(p.read_text())
            except ValueError:  # empty or cut short
                d = None
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
