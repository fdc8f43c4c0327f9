"""Issue 26, the trainer: one writer per run dir, no exit 0 with non-finite weights, finite
float options, one line instead of a traceback. Every test drives the real trainer on the tiny
config (a few steps)."""
import json
import os
import subprocess
import sys

import pytest

from pipeline.config import CONFIG_DIR, ConfigError, load_config
from pipeline.rundir import RunDir
from pipeline.train.loop import EXIT_BAD_CONFIG, EXIT_NONFINITE, main

TINY = str(CONFIG_DIR / "mnist_tiny.yaml")
FAST = ["logging.backend=none", "training.log_every=1", "sampling.num_steps=2", "sampling.num_samples=4",
        "fpe.enabled=false", "training.n_steps=2", "training.ckpt_every=2"]


def run_train(run_dir, mnist_shards, *extra):
    return main(["--config", TINY, "--run-dir", str(run_dir), "--no-progress", f"data.shards={mnist_shards[0]}",
                 *FAST, *extra])


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fpdiff:")]
    assert len(err) == 1, err
    return err[0]


# --------------------------------------------------------------------------- one writer per run dir
HOLD_LOCK = """import fcntl, os, sys
fh = open(sys.argv[1], "a+")
fcntl.flock(fh, fcntl.LOCK_EX)
fh.write(f"{os.getpid()}\\n"); fh.flush()
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, mnist_shards, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / ".lock"
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        assert run_train(run_dir, mnist_shards) == EXIT_BAD_CONFIG
        line = one_line_error(capsys)
        assert f"pid {other.pid}" in line and str(run_dir) in line
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing of the second run
    finally:
        other.stdin.close()
        other.wait(timeout=30)
    # it died without removing its lock file: taken over in one line, and released at the end
    assert lock.read_text().strip() == str(other.pid)
    assert run_train(run_dir, mnist_shards) == 0
    err = capsys.readouterr().err
    assert err.count(f"taking over the lock of process {other.pid}") == 1
    assert not lock.exists()


def test_run_dir_that_is_a_file_or_under_one(tmp_path, mnist_shards, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    for run_dir in (a_file, a_file / "run"):
        assert run_train(run_dir, mnist_shards) == EXIT_BAD_CONFIG
        assert str(a_file) in one_line_error(capsys)
    assert a_file.read_text() == "not a folder"


# --------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("key", ["training.lr", "training.grad_clip", "fpe.alpha", "sde.beta_max", "fpe.subsample",
                                 "hub.retry_backoff"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999"])
def test_float_options_refuse_nan_and_infinity(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: must be a finite number"):
        load_config(TINY, [f"{key}={value}"])


def test_lr_nan_on_the_command_line_is_one_line(tmp_path, mnist_shards, capsys):
    assert run_train(tmp_path / "run", mnist_shards, "training.lr=.nan") == EXIT_BAD_CONFIG
    assert "training.lr: must be a finite number" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_a_run_ending_in_non_finite_steps_does_not_exit_0(tmp_path, mnist_shards, poison_dsm_loss, capsys):
    """Steps 3-4 of 4 are non-finite (fewer than training.max_nonfinite): no export of that run, no
    checkpoint from inside the streak, exit 3."""
    run_dir = tmp_path / "run"
    poison_dsm_loss(after=2)
    assert run_train(run_dir, mnist_shards, "training.n_steps=4", "training.max_nonfinite=10") == EXIT_NONFINITE
    assert "non-finite" in capsys.readouterr().err
    assert not RunDir(run_dir).export.exists()
    assert [p.name for p in RunDir(run_dir).list_checkpoints()] == ["step_00000002"]


def test_non_finite_weights_are_never_exported(tmp_path, mnist_shards, monkeypatch, capsys):
    """The updates are applied (finite gradients) but the weights are not finite at the end."""
    import torch

    import pipeline.train.loop as loop

    original = loop.EMA.update

    def poisoned(self, model, *args, **kwargs):
        original(self, model, *args, **kwargs)
        with torch.no_grad():
            next(self.model.parameters()).fill_(float("nan"))

    monkeypatch.setattr(loop.EMA, "update", poisoned)
    run_dir = tmp_path / "run"
    assert run_train(run_dir, mnist_shards) == EXIT_NONFINITE
    assert "not finite" in capsys.readouterr().err
    assert not RunDir(run_dir).export.exists()
    assert not RunDir(run_dir).summary_json.exists()
