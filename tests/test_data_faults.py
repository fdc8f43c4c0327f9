"""Issue 26, the reader: a sample it cannot represent exactly is skipped and counted (named by
its real mode), the index's sha256 and counts are checked when a shard is opened, and a small
shard cannot make it allocate gigabytes (members and decoded images are capped first)."""
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.loader import ShardLoader
from helpers.shard_files import png, write_shards
from pipeline.data.decode import decode_sample
from pipeline.data.reader import iter_images, read_shard


def png_rgb16(h: int, w: int) -> bytes:
    """A 16-bit RGB PNG (PIL writes none, and reads one as 8-bit RGB)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + bytes(range(w * 6)) for _ in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def gray(i):
    return png(Image.new("L", (8, 8), 10 * i))


def loaded_keys(index, capsys, **cfg):
    """(keys, skip count, the status lines it wrote)."""
    capsys.readouterr()
    loader = ShardLoader(DataConfig(shards=str(index), image_size=8, num_channels=1, **cfg), batch_size=2,
                         exact_epochs=True, train=False)
    keys = [k for _x, _y, ks in loader for k in ks]
    return sorted(keys), loader.corrupt_count, capsys.readouterr().err


def test_samples_that_would_change_are_skipped_and_counted_with_their_real_mode(tmp_path, capsys):
    a16 = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    odd = {"k16": png(Image.fromarray(a16)), "krgba": png(Image.new("RGBA", (8, 8), (1, 2, 3, 128))),
           "krgb": png(Image.new("RGB", (8, 8), (200, 10, 10))), "krgb16": png_rgb16(8, 8)}
    index = write_shards(tmp_path / "sh", [[("a0", gray(0)), *odd.items(), ("a1", gray(1))]])
    keys, corrupt, log = loaded_keys(index, capsys)
    assert keys == ["a0", "a1"] and corrupt == 4
    for real in ("16-bit gray", "RGB with alpha", "8-bit RGB", "16-bit RGB"):
        assert f"a {real} image" in log
    # evaluation / --inpaint read the same way: an RGB image is not grayed for a 1-channel model
    skipped = []
    got = [k for k, _, _ in iter_images([str(index.parent / "t-000000.tar")], 1, skipped=skipped)]
    assert got == ["a0", "a1"] and len(skipped) == 4
    # conversions that keep every value still read: gray into a 3-channel model
    arr, label = decode_sample({"png": gray(3), "cls": b"1"}, 8, 8, 3)
    assert arr.shape == (8, 8, 3) and (arr == 30).all() and label == 1


def test_a_label_that_is_no_int64_is_a_bad_sample():
    with pytest.raises(ValueError, match="bad .cls"):
        decode_sample({"png": gray(1), "cls": b"12345678901234567890123"})


def test_the_index_sha256_and_count_are_checked_when_a_shard_is_opened(tmp_path, capsys):
    index = write_shards(tmp_path / "sh", [[("a0", gray(0)), ("a1", gray(1))], [("b0", gray(2)), ("b1", gray(3))],
                                           [("c0", gray(4)), ("c1", gray(5)), ("c2", gray(6))]])
    folder = index.parent
    # shard 0 replaced by another valid shard of the same count; shard 2's count understated
    (folder / "t-000000.tar").write_bytes((folder / "t-000001.tar").read_bytes())
    tree = json.loads(index.read_text())
    tree["shards"][2]["count"] = 2
    tree["shards"][2]["sha256"] = ""
    index.write_text(json.dumps(tree))
    keys, corrupt, log = loaded_keys(index, capsys)
    assert keys == ["b0", "b1"] and corrupt == 4
    assert "t-000000.tar" in log and "sha256 differs" in log
    assert "it holds 3 samples" in log


def test_a_huge_member_is_not_read(tmp_path, capsys):
    """A gzip shard of a few KB whose one member inflates to 4 MB, with a 1 MB cap."""
    big = png(Image.new("L", (8, 8))) + bytes(4 << 20)  # a valid PNG with trailing zeros
    index = write_shards(tmp_path / "sh", [[("a0", gray(0)), ("big", big), ("a1", gray(1))]], gzip=True)
    assert (index.parent / "t-000000.tar").stat().st_size < 20000
    errors = []
    got = [key for _, key, _ in read_shard(str(index.parent / "t-000000.tar"), errors=errors,
                                             max_member_bytes=1 << 20)]
    assert got == ["a0"] and "more than the 1048576 allowed" in errors[0][1]
    keys, corrupt, log = loaded_keys(index, capsys, max_member_bytes=1 << 20)
    assert keys == ["a0"] and corrupt == 2


def test_a_huge_image_is_refused_before_it_is_decoded(monkeypatch):
    small_file = png(Image.new("L", (3000, 3000)))
    assert len(small_file) < 20000
    decoded = []
    original = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or original(self))
    with pytest.raises(ValueError, match="at most 1000000 pixels"):
        decode_sample({"png": small_file}, max_pixels=1_000_000)
    with pytest.raises(ValueError, match="expected 8x8"):
        decode_sample({"png": small_file}, 8, 8, 1)
    assert decoded == []


def test_data_shards_bad_sources_and_out_are_one_line(tmp_path, capsys):
    from pipeline.data.shards import shards_main

    objects = tmp_path / "objects.npz"
    np.savez(objects, x=np.array([np.zeros((8, 8)), "not an image"], dtype=object), y=np.zeros(2))
    not_npz = tmp_path / "fake.npz"
    not_npz.write_bytes(b"PK\x03\x04 but not a zip")
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(4, np.int64))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for source, out, expected in ((objects, tmp_path / "o1", "objects.npz"), (not_npz, tmp_path / "o2", "fake.npz"),
                                  (good, a_file, "a_file"), (good, a_file / "sub", "a_file")):
        assert shards_main([str(source), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and expected in err
        assert not out.exists() or out == a_file
