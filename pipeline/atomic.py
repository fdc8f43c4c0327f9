"""Atomic file writes: a reader (or a job killed mid-write) sees the old file or the new one,
never half of one. Every file fpdiff writes goes through here.

    with atomic_path(dest) as tmp:      # any writer: torch.save, np.savez, PIL, safetensors ...
        np.savez(tmp, **arrays)
    atomic_write_text(dest, text); atomic_write_json(dest, obj); atomic_write_bytes(dest, data)
    with atomic_directory(dest_folder) as tmp:   # a folder (export, checkpoint) appears whole
        ...
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every filesystem lets a directory be opened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_mode(path: Path, mode: int) -> None:
    """``mode`` less the umask: mkstemp / mkdtemp make private (0600 / 0700) files; the file or folder
    they become is shared like any other the user writes (colleagues on a cluster read the shards)."""
    os.chmod(path, mode & ~_umask())


@contextlib.contextmanager
def atomic_path(dest, *, fsync: bool = False) -> Iterator[Path]:
    """A fresh temporary path beside ``dest`` (same filesystem, hidden, ending in dest's own
    extension so that writers which go by it, np.savez and PIL, keep the name); renamed over
    ``dest`` when the block exits normally, removed when it raises. ``fsync``: flush the file and
    its folder to disk before the rename counts as done (checkpoints)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".tmp{dest.suffix}", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        shared_mode(tmp, 0o666)
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, dest)
        if fsync:
            _fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(dest, data: bytes, *, fsync: bool = False) -> Path:
    with atomic_path(dest, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def atomic_write_text(dest, text: str, *, fsync: bool = False) -> Path:
    return atomic_write_bytes(dest, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(dest, obj, *, indent: int = 1, fsync: bool = False) -> Path:
    return atomic_write_text(dest, json.dumps(obj, indent=indent) + "\n", fsync=fsync)


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_directory(dest, *, staging=None, fsync: bool = False) -> Iterator[Path]:
    """A folder written whole: yields a staging folder beside ``dest`` (a fresh hidden one, or
    ``staging`` when the caller has already filled part of it, e.g. every rank's optimizer
    shards); when the block exits normally it replaces ``dest`` (an old ``dest`` is moved aside
    first, then deleted), when it raises the staging folder is removed and ``dest`` is left as it
    was. ``fsync``: flush every file before the rename and the parent folder after it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if staging is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        shared_mode(tmp, 0o777)
    else:
        tmp = Path(staging)
        tmp.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        if fsync:
            _fsync_tree(tmp)
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(dest, old)
        os.replace(tmp, dest)
        if fsync:
            _fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def plain_json(value: Any) -> Any:
    """A JSON-friendly version of a metric (tensors / numpy scalars to floats, NaN kept as string)."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan" / "inf": valid JSON, still readable
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    return str(value)
