"""Loader checks: exactly-once over ranks x workers, exact resume, faults, round trip, URLs."""
from __future__ import annotations

import collections
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, DataConfig
from pipeline.data.decode import decode_sample
from pipeline.data.reader import DataError, resolve_shards
from pipeline.data.loader import ShardLoader
from pipeline.data.schedule import shuffle_order
from pipeline.data.shards import encode_png, write_shards

SIZES = [3, 17, 8, 1, 12, 5, 9]  # 7 shards of uneven sizes, 55 samples


def _images(n, h=8, w=8, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _write_uneven(root: Path, sizes=SIZES, h=8, c=3, with_index=True):
    """Shards ``u-00000i.tar`` with the given sample counts; returns (pattern, {key: image})."""
    root.mkdir(parents=True, exist_ok=True)
    imgs = _images(sum(sizes), h, h, c)
    truth, k, shards = {}, 0, []
    for s, n in enumerate(sizes):
        path = root / f"u-{s:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for _ in range(n):
                key = f"s{s}_{k:05d}"
                _add(tf, f"{key}.png", encode_png(imgs[k]))
                _add(tf, f"{key}.cls", str(k % 3).encode())
                truth[key] = imgs[k]
                k += 1
        shards.append({"file": path.name, "count": n, "bytes": path.stat().st_size, "sha256": ""})
    if with_index:
        (root / "u.json").write_text(json.dumps({
            "format": "fpdiff-shards", "version": 1, "name": "u", "height": h, "width": h, "channels": c,
            "class_names": ["a", "b", "c"], "num_samples": sum(sizes), "shards": shards}))
    return str(root / f"u-{{000000..{len(sizes) - 1:06d}}}.tar"), truth


def _cfg(pattern, **kw):
    base = dict(shards=pattern, image_size=8, num_channels=3, num_workers=0, shuffle_buffer=16)
    base.update(kw)
    return DataConfig(**base)


def _all_keys(cfg, batch_size, world_size, **kw):
    keys, steps = [], []
    for rank in range(world_size):
        ld = ShardLoader(cfg, batch_size=batch_size, rank=rank, world_size=world_size, exact_epochs=True, **kw)
        n = 0
        for _x, _y, k in ld:
            keys += k
            n += 1
        steps.append(n)
    return keys, steps


# ---------------------------------------------------------------- check 1: exactly once
def test_every_key_exactly_once_2_ranks_x_2_workers(tmp_path):
    pattern, truth = _write_uneven(tmp_path / "sh")
    cfg = _cfg(pattern, num_workers=2, random_flip=True)
    keys, _ = _all_keys(cfg, batch_size=4, world_size=2)
    counts = collections.Counter(keys)
    assert set(counts) == set(truth) and max(counts.values()) == 1 and len(keys) == sum(SIZES)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_exactly_once_every_epoch_and_topology(tmp_path):
    pattern, truth = _write_uneven(tmp_path / "sh", with_index=False)  # counts by header scan
    for world, workers in [(1, 0), (3, 1), (2, 3)]:
        cfg = _cfg(pattern, num_workers=workers)
        lds = [ShardLoader(cfg, batch_size=5, rank=r, world_size=world, exact_epochs=True) for r in range(world)]
        orders = []
        for epoch in range(2):
            keys = [k for ld in lds for _x, _y, ks in ld for k in ks]
            assert sorted(keys) == sorted(truth), (world, workers, epoch)
            orders.append(keys)
        assert orders[0] != orders[1]  # reshuffled per epoch


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_one_loader_worker_streams_what_the_in_process_loader_does(tmp_path):
    """A rank has max(1, num_workers) readers, so num_workers=1 moves the one reader into a process
    without changing the stream (2+ readers interleave shards: another, equally valid order). The demo
    uses one loader process for speed, and its samples must stay those of the in-process loader:
    same images, labels, keys and augmentation, batch for batch, across an epoch boundary."""
    pattern, _ = _write_uneven(tmp_path / "sh")
    streams = []
    for workers in (0, 1):
        cfg = _cfg(pattern, num_workers=workers, random_flip=True, uniform_dequantization=True, centered=True)
        it = iter(ShardLoader(cfg, batch_size=4, rank=0, world_size=1, seed=3))
        streams.append([next(it) for _ in range(20)])  # 80 images: past the 55-image epoch
    for other in streams[1:]:
        for (x0, y0, k0), (x, y, k) in zip(streams[0], other):
            assert list(k) == list(k0)
            assert torch.equal(x, x0) and torch.equal(y, y0)


def test_endless_stream_full_batches_and_epochs_exactly_once(tmp_path):
    pattern, truth = _write_uneven(tmp_path / "sh")
    cfg = _cfg(pattern, num_workers=0)
    world, B = 2, 4
    per_epoch = sum(SIZES) // world  # reader slices are 27 and 28 samples
    streams = []
    for r in range(world):
        ld = ShardLoader(cfg, batch_size=B, rank=r, world_size=world, epoch_length=30)
        batches = list(ld)
        assert len(batches) == 30 and all(len(k) == B for _x, _y, k in batches)
        streams.append([k for _x, _y, ks in batches for k in ks])
    # the first epoch of every reader is a permutation of its slice; together all keys once
    first = streams[0][:27] + streams[1][:28]
    assert sorted(first) == sorted(truth) and per_epoch == 27


# ---------------------------------------------------------------- check 2: kill and resume
@pytest.mark.parametrize("workers,exact", [(2, False), (0, False), (2, True)])
def test_resume_continues_the_same_stream(tmp_path, workers, exact):
    pattern, _ = _write_uneven(tmp_path / "sh")
    cfg = _cfg(pattern, num_workers=workers, random_flip=True, uniform_dequantization=True, centered=True)
    kw = dict(batch_size=3, rank=1, world_size=2, seed=7, exact_epochs=exact)
    k, m = 5, (3 if exact else 25)  # the continuous case crosses epoch boundaries

    ref = ShardLoader(cfg, **kw)
    it = iter(ref)
    want = [next(it) for _ in range(k + m)]
    del it

    first = ShardLoader(cfg, **kw)
    it = iter(first)
    got = [next(it) for _ in range(k)]
    state = json.loads(json.dumps(first.state_dict()))  # what the checkpoint stores
    del it, first  # "kill"
    resumed = ShardLoader(cfg, **kw, state=state)
    it = iter(resumed)
    got += [next(it) for _ in range(m)]
    assert [b[2] for b in got] == [b[2] for b in want]
    for (x1, y1, _), (x2, y2, _) in zip(got, want):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)  # same flips and dequantisation noise
    assert resumed.batches == k + m


def test_resume_from_another_ranks_state(tmp_path, capsys):
    pattern, _ = _write_uneven(tmp_path / "sh")
    cfg = _cfg(pattern, num_workers=2)
    kw = dict(batch_size=4, world_size=2, seed=3)
    lds = [ShardLoader(cfg, rank=r, **kw) for r in range(2)]
    its = [iter(ld) for ld in lds]
    for _ in range(9):
        for it in its:
            next(it)
    want = [next(its[1])[2] for _ in range(10)]
    del its
    capsys.readouterr()
    r1 = ShardLoader(cfg, rank=1, state=lds[0].state_dict(), **kw)  # only rank 0's state saved
    assert "no saved position for rank 1; derived from rank 0's counts" in capsys.readouterr().err
    it = iter(r1)
    assert [next(it)[2] for _ in range(10)] == want


def test_resampled_mode_deterministic_and_resumable(tmp_path):
    pattern, truth = _write_uneven(tmp_path / "sh")
    cfg = _cfg(pattern, resampled=True, num_workers=0)
    a = [k for _x, _y, ks in ShardLoader(cfg, batch_size=4, seed=1, epoch_length=40) for k in ks]
    b = [k for _x, _y, ks in ShardLoader(cfg, batch_size=4, seed=1, epoch_length=40) for k in ks]
    assert a == b and set(a) <= set(truth)
    assert max(collections.Counter(a).values()) > 1  # with replacement
    ld = ShardLoader(cfg, batch_size=4, seed=1, epoch_length=10)
    list(ld)
    rest = [k for _x, _y, ks in ShardLoader(cfg, batch_size=4, seed=1, epoch_length=30, state=ld.state_dict())
            for k in ks]
    assert rest == a[40:]


def test_shuffle_order_is_a_permutation_with_bounded_lookahead():
    order = shuffle_order(500, 32, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(500))
    assert all(order[t] < t + 32 for t in range(500))


# ---------------------------------------------------------------- check 3: faults
def test_truncated_and_corrupt_shards_are_skipped_and_counted(tmp_path, capsys):
    pattern, truth = _write_uneven(tmp_path / "sh")
    # shard 1 (17 samples): cut in the middle of a member
    p1 = tmp_path / "sh" / "u-000001.tar"
    data = p1.read_bytes()
    with tarfile.open(p1) as tf:
        members = tf.getmembers()
    cut_member = members[2 * 8]  # the PNG of the 9th sample
    p1.write_bytes(data[:cut_member.offset_data + 10])
    survivors_1 = {m.name.split(".")[0] for m in members[:16]}
    # shard 4 (12 samples): one PNG with garbage bytes (same length)
    p4 = tmp_path / "sh" / "u-000004.tar"
    with tarfile.open(p4) as tf:
        m4 = [m for m in tf.getmembers() if m.name.endswith(".png")][5]
    raw = bytearray(p4.read_bytes())
    raw[m4.offset_data:m4.offset_data + m4.size] = b"\x00" * m4.size
    p4.write_bytes(bytes(raw))
    bad_key = m4.name.split(".")[0]
    lost = {k for k in truth if k.startswith("s1_")} - survivors_1

    cfg = _cfg(pattern)
    capsys.readouterr()
    ld = ShardLoader(cfg, batch_size=4, exact_epochs=True)
    keys = [k for _x, _y, ks in ld for k in ks]
    assert sorted(keys) == sorted(set(truth) - lost - {bad_key})
    assert len(lost) == 9 and ld.corrupt_count == len(lost) + 1
    text = capsys.readouterr().err
    assert "u-000001.tar" in text and "truncated" in text
    assert "u-000004.tar" in text and bad_key in text
    # with workers, over two ranks: the same samples arrive and the counts add up
    cfg2 = _cfg(pattern, num_workers=2)
    lds = [ShardLoader(cfg2, batch_size=4, rank=r, world_size=2, exact_epochs=True) for r in range(2)]
    keys2 = [k for ld in lds for _x, _y, ks in ld for k in ks]
    assert sorted(keys2) == sorted(keys) and sum(ld.corrupt_count for ld in lds) == 10


def test_startup_errors_are_one_line(tmp_path):
    pattern, _ = _write_uneven(tmp_path / "sh")
    cases = [
        (_cfg(""), "data.shards: empty"),
        (_cfg(str(tmp_path / "nope" / "u-{000000..000003}.tar")), "does not exist"),
        (_cfg(str(tmp_path / "sh" / "u-{000000..000009}.tar")), "3 of 10 shard files missing"),
        (_cfg(str(tmp_path / "empty_dir_missing")), "does not exist"),
        (_cfg(pattern, image_size=16), "data.image_size: config says 16"),
        (_cfg(pattern, num_channels=1), "data.num_channels: config says 1"),
    ]
    (tmp_path / "emptydir").mkdir()
    cases.append((_cfg(str(tmp_path / "emptydir")), "no .tar shards"))
    for cfg, msg in cases:
        with pytest.raises(ConfigError) as ei:
            ShardLoader(cfg, batch_size=2)
        assert msg in str(ei.value) and "\n" not in str(ei.value), str(ei.value)
    assert issubclass(DataError, ConfigError)


# ---------------------------------------------------------------- check 4: round trip
def test_round_trip_is_bit_exact(tmp_path):
    x = _images(40, 8, 8, 3, seed=5)
    y = np.arange(40) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    idx = write_shards(tmp_path / "d.npz", tmp_path / "out", "d", max_samples=7)["all"]
    # decoded pixels (before flip / scaling) equal the source
    seen = 0
    for s in idx["shards"]:
        with tarfile.open(tmp_path / "out" / s["file"]) as tf:
            names = tf.getnames()
            for n in names:
                if n.endswith(".png"):
                    key = n[:-4]
                    files = {"png": tf.extractfile(n).read(), "cls": tf.extractfile(key + ".cls").read()}
                    arr, lab = decode_sample(files, 8, 8, 3)
                    assert np.array_equal(arr, x[int(key)]) and lab == y[int(key)]
                    seen += 1
    assert seen == 40
    # and through the loader in [0, 1] and [-1, 1]
    for centered in (False, True):
        cfg = _cfg(idx["abs_pattern"], centered=centered, random_flip=True, num_workers=0)
        for xb, yb, keys in ShardLoader(cfg, batch_size=16, exact_epochs=True, train=False):
            v = (xb + 1) / 2 if centered else xb
            pix = torch.round(v * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for i, k in enumerate(keys):
                assert np.array_equal(pix[i], x[int(k)]) and yb[i].item() == y[int(k)]


def test_flip_and_dequantisation(tmp_path):
    pattern, truth = _write_uneven(tmp_path / "sh")
    cfg = _cfg(pattern, random_flip=True, uniform_dequantization=True)
    flipped = 0
    for xb, _y, keys in ShardLoader(cfg, batch_size=8, exact_epochs=True):
        assert xb.min() >= 0 and xb.max() < 1
        for i, k in enumerate(keys):
            src = torch.from_numpy(truth[k]).permute(2, 0, 1).float()
            base = torch.floor(xb[i] * 256)
            if torch.equal(base, src.flip(-1)) and not torch.equal(base, src):
                flipped += 1
            else:
                assert torch.equal(base, src)
    assert 10 < flipped < 45


# ---------------------------------------------------------------- URLs
def test_file_pipe_dir_and_index_specs(tmp_path):
    pattern, truth = _write_uneven(tmp_path / "sh")
    d = tmp_path / "sh"
    specs = {
        "file": ("file://" + pattern, ""),
        "pipe": ("pipe:cat " + pattern, str(d / "u.json")),
        "pipe-noindex": ("pipe:cat " + pattern, ""),
        "dir": (str(d), ""),
        "json": (str(d / "u.json"), ""),
        "multi": (str(d / "u-{000000..000003}.tar") + "::" + str(d / "u-{000004..000006}.tar"), ""),
    }
    for name, (spec, index) in specs.items():
        cfg = _cfg(spec, index=index)
        keys = [k for _x, _y, ks in ShardLoader(cfg, batch_size=8, exact_epochs=True) for k in ks]
        assert sorted(keys) == sorted(truth), name
    assert resolve_shards(str(d)).counts == SIZES


# ---------------------------------------------------------------- check 5: the benchmark
def test_benchmark_script_measures_and_tabulates(mnist_shards):
    """The benchmark's pieces run and tabulate; the ratio itself is read from its table
    (benchmarks/RESULTS.md), never asserted on timings here."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "data_throughput.py"
    spec = importlib.util.spec_from_file_location("data_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step = bench.train_rate("mnist_tiny.yaml", batch=16, steps=2)[0]
    finally:
        torch.set_num_threads(threads)
    loader = bench.loader_rate(mnist_shards[0], 28, 1, workers=2, batch=64, n_batches=10)
    assert loader > 0 and step > 0
    res = {"rows": [("loader", loader)], "steps": {"tiny": (step, 1)}, "device": "cpu", "threads": 1}
    assert "| loader |" in bench.table(res)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_local_and_pipe_agree(tmp_path, fmt):
    from pipeline.data.reader import read_shard

    imgs = _images(4, seed=9)
    deep = "d" * 60 + "/" + ("e" * 70 if fmt != tarfile.USTAR_FORMAT else "e" * 20)
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for i in range(4):
            key = f"{deep}/k{i}"
            _add(tf, f"{key}.png", encode_png(imgs[i]))
            _add(tf, f"{key}.cls", str(i).encode())
    local = list(read_shard(str(path), 1, 4, []))
    piped = list(read_shard(f"pipe:cat {path}", 1, 4, []))
    assert local == piped and [g[0] for g in local] == [1, 2, 3]
    assert local[0][1] == f"{deep}/k1" and local[0][2]["cls"] == b"1"


def test_a_sample_cut_by_truncation_is_never_yielded(tmp_path):
    """A shard cut inside a sample's second member (its .cls) or its header: the cut sample is
    not delivered half (no image without its label); the samples before it are."""
    from pipeline.data.reader import read_shard

    pattern, _ = _write_uneven(tmp_path / "sh", sizes=[6])
    path = tmp_path / "sh" / "u-000000.tar"
    raw = path.read_bytes()
    with tarfile.open(path) as tf:
        cls3 = tf.getmembers()[2 * 3 + 1]  # the .cls of the 4th sample
    for cut in (cls3.offset_data, cls3.offset + 100, cls3.offset):  # in its data, in its header, before it
        path.write_bytes(raw[:cut])
        errors: list = []
        got = [(key, sorted(files)) for _, key, files in read_shard(str(path), 0, 6, errors)]
        assert [k for k, _ in got] == ["s0_00000", "s0_00001", "s0_00002"], cut
        assert all(exts == ["cls", "png"] for _, exts in got) and errors, cut


def test_eval_reads_a_pipe_url_with_arguments_like_training(tmp_path):
    """One shard-list syntax for training and evaluation: a ``pipe:`` URL with arguments works in
    both, and evaluation sees the same pixels the loader scales."""
    from pipeline.data.reader import iter_images, shard_urls
    from pipeline.images import to_model_space

    pattern, truth = _write_uneven(tmp_path / "sh")
    spec = f"pipe:cat {pattern}"
    images = list(iter_images(shard_urls(spec), 3))
    assert [k for k, _, _ in images] == [k for k, _, _ in iter_images(shard_urls(pattern), 3)]
    assert sorted(k for k, _, _ in images) == sorted(truth)
    assert all(np.array_equal(a, truth[k]) and lab == int(k[-5:]) % 3 for k, a, lab in images)
    ld = ShardLoader(_cfg(spec, index=str(tmp_path / "sh" / "u.json"), centered=True), batch_size=64,
                     exact_epochs=True, train=False)
    (x, _y, keys), = list(ld)
    u8 = torch.from_numpy(np.stack([truth[k] for k in keys])).permute(0, 3, 1, 2)
    assert torch.equal(x, to_model_space(u8, True))
