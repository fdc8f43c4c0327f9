"""The training loop in one process: outputs, bitwise resume after SIGKILL, preemption, faults."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pipeline.rundir import RunDir
from pipeline.train import checkpoint as ckpt
from pipeline.config import ConfigError
from pipeline.config_files import CONFIG_DIR, load_config
from pipeline.app import train
from pipeline.status import EXIT_NONFINITE, EXIT_REQUEUE

TINY = str(CONFIG_DIR / "mnist_tiny.yaml")


def train_cmd(run_dir, overrides, resume=None):
    cmd = [sys.executable, "-m", "pipeline.train", "--config", TINY, "--run-dir", str(run_dir), "--no-progress"]
    if resume:
        cmd += ["--resume", resume]
    return cmd + list(overrides)


def final_weights(run_dir):
    last = RunDir(run_dir).latest_checkpoint()
    return load_file(str(last / "model.safetensors")), load_file(str(last / "ema.safetensors")), last


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, mnist_shards):
    """An uninterrupted 24-step run of the tiny config (FPE on)."""
    train_p, test_p = mnist_shards
    overrides = [f"data.shards={train_p}", f"data.test_shards={test_p}", "logging.backend=none",
                 "training.n_steps=24", "training.ckpt_every=4", "training.keep_last=10"]
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    r = subprocess.run(train_cmd(run_dir, overrides), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir, overrides


def test_run_writes_checkpoints_export_samples_summary(reference_run):
    run_dir, _ = reference_run
    names = [p.name for p in RunDir(run_dir).list_checkpoints()]
    assert names == [f"step_{s:08d}" for s in (4, 8, 12, 16, 20, 24)]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "samples.png").is_file()
    assert (run_dir / "export" / "ema.safetensors").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["images_per_s"] > 0 and len(summary["loss_curve"]) >= 4
    state = json.loads((RunDir(run_dir).latest_checkpoint() / "state.json").read_text())
    assert state["step"] == 24 and "loader" in state
    from PIL import Image
    assert Image.open(run_dir / "samples.png").size[0] > 28 * 4  # a grid, not one image


def test_sigkill_then_resume_is_bitwise_equal(reference_run, tmp_path):
    run_dir_ref, overrides = reference_run
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(run_dir, overrides), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # kill at a random point after the first checkpoint exists
    target = random.Random(os.getpid()).choice([4, 8, 12])
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        last = RunDir(run_dir).latest_checkpoint()
        if last is not None and int(last.name.split("_")[1]) >= target:
            break
        time.sleep(0.05)
    time.sleep(random.Random(1).random() * 0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert RunDir(run_dir).latest_checkpoint() is not None
    r = subprocess.run(train_cmd(run_dir, overrides, resume="auto"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    model_a, ema_a, last_a = final_weights(run_dir_ref)
    model_b, ema_b, last_b = final_weights(run_dir)
    assert last_a.name == last_b.name
    assert_bitwise(model_a, model_b)
    assert_bitwise(ema_a, ema_b)


def test_sigusr1_checkpoints_and_exits_for_requeue(reference_run, tmp_path):
    run_dir_ref, overrides = reference_run
    run_dir = tmp_path / "run"
    overrides = overrides + ["training.ckpt_every=100"]  # only the stop request writes a checkpoint
    proc = subprocess.Popen(train_cmd(run_dir, overrides), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():  # first steps logged
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_REQUEUE, err[-3000:]
    stopped = RunDir(run_dir).latest_checkpoint()
    assert stopped is not None and 0 < int(stopped.name.split("_")[1]) < 24
    assert "stop requested" in err
    r = subprocess.run(train_cmd(run_dir, overrides, resume="auto"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    model_a, ema_a, _ = final_weights(run_dir_ref)
    model_b, ema_b, _ = final_weights(run_dir)
    assert_bitwise(model_a, model_b)
    assert_bitwise(ema_a, ema_b)


def test_nonfinite_steps_are_skipped_then_stop(tiny_overrides, tmp_path, poison_dsm_loss):
    """Steps 3.. produce a NaN loss: updates are skipped and counted, the run stops after
    training.max_nonfinite in a row, and the checkpoint from before the streak is kept."""
    poison_dsm_loss(after=2)
    cfg = load_config(TINY, tiny_overrides + ["training.n_steps=20", "training.ckpt_every=2",
                                              "training.max_nonfinite=4", "fpe.enabled=false"])
    run_dir = tmp_path / "run"
    code = train(cfg, run_dir, progress=False)
    assert code == EXIT_NONFINITE
    last = RunDir(run_dir).latest_checkpoint()
    state = ckpt.load_checkpoint(last)
    # the checkpoint kept is the last one from before the streak (none is written during it)
    assert last.name == "step_00000002" and state["state"]["counters"]["consecutive_nonfinite"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (run_dir / "summary.json").exists()


def _logged(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss/fpe" in r]


def test_bf16_dsm_keeps_the_fpe_term_in_fp32(tiny_overrides, tmp_path):
    """Under bf16 autocast only the DSM term is low precision: the regularizer runs in fp32 with
    autocast off, so its loss at step 1 (same weights, x_t, t and probes) equals the fp32 run's."""
    common = tiny_overrides + ["training.n_steps=2", "training.log_every=1", "fpe.subsample=4"]
    out = {}
    for mp in ("no", "bf16"):
        cfg = load_config(TINY, common + [f"training.mixed_precision={mp}"])
        assert train(cfg, tmp_path / mp, progress=False) == 0
        out[mp] = _logged(tmp_path / mp)
    for row in out["bf16"]:
        assert all(isinstance(row[k], float) for k in ("loss/dsm", "loss/fpe", "fpe/residual"))
    assert out["bf16"][0]["loss/fpe"] == pytest.approx(out["no"][0]["loss/fpe"], rel=1e-5)
    # the DSM gradient of step 1 was computed in bf16, so step 2 starts from other weights
    assert out["bf16"][1]["loss/dsm"] != out["no"][1]["loss/dsm"]


@pytest.mark.slow
def test_compiled_dsm_path_trains_with_the_regularizer(tiny_overrides, tmp_path):
    cfg = load_config(TINY, tiny_overrides + ["training.n_steps=2", "training.log_every=1",
                                              "training.compile=true", "training.compile_backend=aot_eager"])
    assert train(cfg, tmp_path / "run", progress=False) == 0
    assert isinstance(_logged(tmp_path / "run")[0]["loss/fpe"], float)


def test_sample_every_writes_grids_and_leaves_training_unchanged(tiny_overrides, tmp_path):
    """training.sample_every=2 draws a grid at steps 2 and 4 of a 5-step run (the end has its
    own samples.png); the weights and losses are bitwise those of the run without it (the grids
    leave the global RNG streams alone)."""
    common = tiny_overrides + ["training.n_steps=5", "training.log_every=1", "training.ckpt_every=5",
                               "sampling.num_samples=4", "sampling.num_steps=3"]
    for every in (0, 2):
        cfg = load_config(TINY, common + [f"training.sample_every={every}"])
        assert train(cfg, tmp_path / f"every{every}", progress=False) == 0
    grids = sorted(p.name for p in (tmp_path / "every2" / "samples").glob("*.png"))
    assert grids == ["step_00000002.png", "step_00000004.png"]
    assert not (tmp_path / "every0" / "samples").exists()
    losses = [[r["loss/total"] for r in _logged(tmp_path / f"every{e}")] for e in (0, 2)]
    assert len(losses[0]) == 5 and losses[0] == losses[1]
    a, b = final_weights(tmp_path / "every0"), final_weights(tmp_path / "every2")
    assert_bitwise(a[0], b[0])
    assert_bitwise(a[1], b[1])


def test_lr_cosine_decay_after_warmup():
    """training.lr_decay=cosine: linear warm-up, then half a cosine from lr to 0 at n_steps; a resumed
    LambdaLR (which calls the factor with its step count) continues the same curve."""
    import math

    from pipeline.train.step import lr_lambda

    f = lr_lambda(10, "cosine", 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-12)
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert all(lr_lambda(10)(s) == 1.0 for s in (10, 60, 110))  # the default keeps a constant lr
    with pytest.raises(ConfigError, match=r"training.lr_decay: must be one of"):
        load_config(TINY, ["training.lr_decay=linear"])
