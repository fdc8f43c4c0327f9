"""Shard writer: sources, index, caps, split, CLI, MNIST reuse."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.sources import cifar10_batches, write_idx
from pipeline.config import DataConfig
from pipeline.data.loader import ShardLoader
from pipeline.data.decode import decode_sample
from pipeline.data.sources import ShardWriteError
from pipeline.data.shards import default_set_name, ensure_mnist_shards, shards_main, verify_index, write_shards


def _read_all(out_dir, index):
    """{key: (uint8 HWC, label)} from the shards of an index."""
    got = {}
    for s in index["shards"]:
        with tarfile.open(out_dir / s["file"]) as tf:
            names = tf.getnames()
            assert len(names) == 2 * s["count"]
            for n in names:
                if n.endswith(".png"):
                    k = n[:-4]
                    assert "." not in k
                    files = {"png": tf.extractfile(n).read(), "cls": tf.extractfile(k + ".cls").read()}
                    got[k] = decode_sample(files, index["height"], index["width"], index["channels"])
    return got


def test_npz_keys_split_caps_and_index(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(30, 6, 6), dtype=np.uint8)
    y = rng.integers(0, 3, size=30)
    np.savez(tmp_path / "a.npz", images=x, labels=y, class_names=np.array(["r", "g", "b"]))
    res = write_shards(tmp_path / "a.npz", tmp_path / "o", "a", max_samples=4, test_fraction=0.2, seed=1)
    assert set(res) == {"train", "test"}
    tr, te = res["train"], res["test"]
    assert (tr["num_samples"], te["num_samples"]) == (24, 6)
    assert [s["count"] for s in tr["shards"]] == [4] * 6 and tr["class_names"] == ["r", "g", "b"]
    assert tr["channels"] == 1 and tr["image_size"] == 6 and tr["split"] == "train"
    on_disk = json.loads((tmp_path / "o" / "a-train.json").read_text())
    assert on_disk["shards"] == tr["shards"] and verify_index(tr["index_path"]) == []
    got = {**_read_all(tmp_path / "o", tr), **_read_all(tmp_path / "o", te)}
    assert len(got) == 30
    for k, (arr, lab) in got.items():
        assert np.array_equal(arr[..., 0], x[int(k)]) and lab == y[int(k)]
    # a tampered shard fails verification
    p = tmp_path / "o" / tr["shards"][0]["file"]
    p.write_bytes(p.read_bytes()[:-1] + b"x")
    assert verify_index(tr["index_path"])


def test_npz_xy_flat_and_npy_and_byte_cap(tmp_path):
    x = (np.arange(12 * 16) % 256).reshape(12, 16).astype(np.float64)  # flat 4x4, float dtype
    np.savez(tmp_path / "f.npz", x=x, y=np.zeros(12))
    idx = write_shards(tmp_path / "f.npz", tmp_path / "o", "f", max_bytes=5 * 2048 + 1024)["all"]
    assert (idx["height"], idx["width"], idx["channels"]) == (4, 4, 1)
    assert all(s["bytes"] <= 5 * 2048 + 1024 + 10240 for s in idx["shards"]) and len(idx["shards"]) > 1
    np.save(tmp_path / "g.npy", np.zeros((5, 3, 7, 7), np.uint8))  # NCHW
    g = write_shards(tmp_path / "g.npy", tmp_path / "o", "g")["all"]
    assert (g["height"], g["channels"], g["class_names"]) == (7, 3, ["0"])
    np.savez(tmp_path / "bad.npz", x=np.full((3, 4, 4), 300.0))
    with pytest.raises(ShardWriteError, match="whole numbers in \\[0, 255\\]"):
        write_shards(tmp_path / "bad.npz", tmp_path / "o", "bad")
    with pytest.raises(ShardWriteError, match="keys x/y or images/labels"):
        np.savez(tmp_path / "nokey.npz", foo=np.zeros(3))
        write_shards(tmp_path / "nokey.npz", tmp_path / "o", "nk")


def test_image_folder(tmp_path):
    rng = np.random.default_rng(2)
    src = {}
    for cname in ("cat", "dog"):
        (tmp_path / "imgs" / cname).mkdir(parents=True)
        for i in range(3):
            a = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / "imgs" / cname / f"im.{i}.png")
            src[(cname, i)] = a
    idx = write_shards(tmp_path / "imgs", tmp_path / "o", "pets", shuffle=False)["all"]
    assert idx["class_names"] == ["cat", "dog"] and (idx["height"], idx["width"], idx["channels"]) == (5, 7, 3)
    got = _read_all(tmp_path / "o", idx)
    for n, ((cname, i), a) in enumerate(sorted(src.items())):
        arr, lab = got[f"{n:08d}"]
        assert np.array_equal(arr, a) and lab == ["cat", "dog"].index(cname)
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "imgs" / "dog" / "odd.png")
    with pytest.raises(ShardWriteError, match="odd.png: size 9x9"):
        write_shards(tmp_path / "imgs", tmp_path / "o", "pets")


def test_cifar10_pickle_batches(tmp_path):
    d, batches = cifar10_batches(tmp_path)
    res = write_shards(d, tmp_path / "o", "cifar10")  # keeps CIFAR's own split
    assert res["train"]["num_samples"] == 10 and res["test"]["num_samples"] == 5
    assert res["train"]["class_names"][9] == "truck" and res["train"]["image_size"] == 32
    all_x = np.concatenate([batches[n][0] for n in ("data_batch_1", "data_batch_2", "test_batch")])
    all_y = sum((batches[n][1] for n in ("data_batch_1", "data_batch_2", "test_batch")), [])
    got = {**_read_all(tmp_path / "o", res["train"]), **_read_all(tmp_path / "o", res["test"])}
    for k, (arr, lab) in got.items():
        i = int(k)
        assert np.array_equal(arr, all_x[i].reshape(3, 32, 32).transpose(1, 2, 0)) and lab == all_y[i]
    assert all(int(k) >= 10 for k in _read_all(tmp_path / "o", res["test"]))


def test_cli_naming_rule_and_lines_to_paste(tmp_path, capsys):
    """Files are NAME-train-000000.tar ... (NAME: --name, else the source's name without extension);
    the printed lines name exactly those files, the test split under data.test_shards."""
    d, _ = cifar10_batches(tmp_path)
    assert shards_main([str(d), "--out", str(tmp_path / "default"), "--max-samples", "4"]) == 0
    assert sorted(p.name for p in (tmp_path / "default").glob("*.tar")) == [
        "cifar-10-batches-py-test-000000.tar", "cifar-10-batches-py-test-000001.tar",
        "cifar-10-batches-py-train-000000.tar", "cifar-10-batches-py-train-000001.tar",
        "cifar-10-batches-py-train-000002.tar"]
    capsys.readouterr()
    assert shards_main([str(d), "--out", str(tmp_path / "c"), "--name", "cifar10", "--max-samples", "4"]) == 0
    out = capsys.readouterr().out
    train = f"{(tmp_path / 'c').resolve()}/cifar10-train-{{000000..000002}}.tar"
    test = f"{(tmp_path / 'c').resolve()}/cifar10-test-{{000000..000001}}.tar"
    assert f"  data.shards={train}\n" in out and f"  data.test_shards={test}\n" in out
    assert out.splitlines()[-1].endswith(f"data.shards={train} data.test_shards={test}")
    assert sorted(p.name for p in (tmp_path / "c").glob("*.json")) == ["cifar10-test.json", "cifar10-train.json"]
    assert default_set_name("data/cmnist.npz") == "cmnist" and default_set_name("mnist") == "mnist"
    assert default_set_name("a/my.data.npz") == "my_data"


def test_cli_and_mnist_reuse(tmp_path, capsys, mnist_shards):
    assert shards_main(["mnist", "--out", str(tmp_path / "m"), "--name", "mn", "--limit", "120",
                        "--max-samples", "50", "--test-fraction", "0.25", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "train: 90 samples in 2 shards, 28x28x1, 10 classes" in out and "data.shards=" in out
    assert shards_main(["/does/not/exist", "--out", str(tmp_path / "x")]) == 2

    train, test = mnist_shards  # conftest: ensure_mnist_shards(tmp dir), once per session
    root = Path(train).parent
    first = sorted(p.stat().st_mtime_ns for p in root.glob("*.tar"))
    assert ensure_mnist_shards(root) == (train, test)
    assert sorted(p.stat().st_mtime_ns for p in root.glob("*.tar")) == first  # reused, not rewritten
    cfg = DataConfig(shards=test, image_size=28, num_channels=1)
    ld = ShardLoader(cfg, batch_size=100, exact_epochs=True, train=False)
    labels = [int(v) for _x, y, _k in ld for v in y]
    assert len(labels) == 500 and len(set(labels)) == 10


@pytest.mark.parametrize("form", ["npz", "idx", "idx.gz"])
def test_own_train_test_split_is_kept(tmp_path, form):
    """keras' mnist.npz layout and the standard IDX files keep their split: every train image in
    the train shards, every test image in the test shards, pixel for pixel."""
    rng = np.random.default_rng(3)
    xtr, xte = rng.integers(0, 256, (13, 5, 5), dtype=np.uint8), rng.integers(0, 256, (4, 5, 5), dtype=np.uint8)
    ytr, yte = rng.integers(0, 10, 13), rng.integers(0, 10, 4)
    if form == "npz":
        src = tmp_path / "mnist.npz"
        np.savez(src, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    else:
        src = tmp_path / "raw"
        src.mkdir()
        gz = form.endswith(".gz")
        sfx = ".gz" if gz else ""
        for stem, a in (("train-images-idx3-ubyte", xtr), ("train-labels-idx1-ubyte", ytr),
                        ("t10k-images-idx3-ubyte", xte), ("t10k-labels-idx1-ubyte", yte)):
            write_idx(src / (stem + sfx), a, gz)
    res = write_shards(src, tmp_path / "o", "m", max_samples=5)
    assert set(res) == {"train", "test"}
    assert (res["train"]["num_samples"], res["test"]["num_samples"]) == (13, 4)
    for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        got = _read_all(tmp_path / "o", res[split])
        offset = 0 if split == "train" else len(xtr)
        assert sorted(int(k) - offset for k in got) == list(range(len(x)))
        for k, (arr, lab) in got.items():
            assert np.array_equal(arr[..., 0], x[int(k) - offset]) and lab == y[int(k) - offset]


def test_idx_missing_and_truncated_files_fail_in_one_line(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    write_idx(src / "train-images-idx3-ubyte", np.zeros((3, 4, 4)), False)
    with pytest.raises(ShardWriteError, match="missing train-labels-idx1-ubyte"):
        write_shards(src, tmp_path / "o", "m")
    for stem, a in (("train-labels-idx1-ubyte", np.zeros(3)), ("t10k-images-idx3-ubyte", np.zeros((2, 4, 4))),
                    ("t10k-labels-idx1-ubyte", np.zeros(2))):
        write_idx(src / stem, a, False)
    p = src / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(ShardWriteError, match="t10k-images-idx3-ubyte: header says"):
        write_shards(src, tmp_path / "o", "m")
    assert not (tmp_path / "o").exists()
