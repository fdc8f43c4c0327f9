"""Sources written by hand for the shard writer's tests: CIFAR-10's python batches and MNIST's IDX
files, with random images."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np


def cifar10_batches(tmp_path, sizes=(6, 4, 5)) -> tuple[Path, dict]:
    """A small folder laid out as CIFAR-10's python download (pickled batches of random images):
    ``sizes`` images in data_batch_1, data_batch_2 and test_batch."""
    rng = np.random.default_rng(3)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir(parents=True)
    batches = {}
    for name, n in zip(("data_batch_1", "data_batch_2", "test_batch"), sizes):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n}, f)
        batches[name] = (data, labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f)
    return d, batches


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    (gzip.open if gz else open)(path, "wb").write(header + arr.astype(np.uint8).tobytes())
