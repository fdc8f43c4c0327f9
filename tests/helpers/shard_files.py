"""Shards written by hand for the reader's fault tests: PNG bytes of an image and tars of given
(key, png bytes) samples with an index beside them, as `fpdiff data shards` writes it."""
import io
import json
import tarfile

from PIL import Image

from pipeline.data.reader import file_sha256


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder, shards: list[list[tuple[str, bytes]]], *, gzip=False):
    """``shards``: per shard, (key, png bytes) samples; an index beside them as `fpdiff data shards`
    writes it. Returns the index path."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for s, samples in enumerate(shards):
        path = folder / f"t-{s:06d}.tar"
        with tarfile.open(path, "w:gz" if gzip else "w") as tf:
            for key, data in samples:
                for name, payload in ((f"{key}.png", data), (f"{key}.cls", b"1")):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
        entries.append({"file": path.name, "count": len(samples), "bytes": path.stat().st_size,
                        "sha256": file_sha256(path)})
    index = folder / "t.json"
    index.write_text(json.dumps({"format": "fpdiff-shards", "version": 1, "name": "t", "height": 8, "width": 8,
                                 "channels": 1, "class_names": ["0", "1"], "shards": entries}))
    return index
