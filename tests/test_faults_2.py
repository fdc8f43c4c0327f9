"""Issue 26, the trainer: one writer per run dir, no exit 0 with non-finite weights, finite
float options, one line instead of a traceback. Every test drives the real trainer on the tiny
config (a few steps)."""
import os
import subprocess
import sys

import pytest

from pipeline.app import train_main as main
from pipeline.config import ConfigError
from pipeline.config_files import CONFIG_DIR, load_config
from pipeline.rundir import RunDir
from pipeline.status import EXIT_BAD_CONFIG, EXIT_NONFINITE

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


def test_run_dir_on_a_read_only_filesystem(tmp_path, mnist_shards, monkeypatch, capsys):
    import errno

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr("pipeline.rundir.open", read_only, raising=False)  # the first file a run writes
    assert run_train(tmp_path / "run", mnist_shards) == EXIT_BAD_CONFIG
    line = one_line_error(capsys)
    assert str(tmp_path / "run") in line and os.strerror(errno.EROFS) in line


# --------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("key", ["training.lr", "training.grad_clip", "fpe.alpha", "sde.beta_max", "fpe.subsample",
                                 "hub.retry_backoff"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999"])
def test_float_options_refuse_nan_and_infinity(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: must be a finite number"):
        load_config(TINY, [f"{key}={value}"])


@pytest.mark.parametrize("argv", [["sample", "--run-dir", "RUN", "--guidance-scale", "nan"],
                                  ["eval", "bpd", "RUN", "--rtol", "inf"], ["classifier", "--run-dir", "RUN", "--lr=-inf"],
                                  ["push", "RUN", "--repo-id", "a/b", "--retry-backoff", "nan"],
                                  ["data", "shards", "mnist", "--out", "OUT", "--test-fraction", "nan"]])
def test_float_flags_refuse_nan_and_infinity(argv, tmp_path, capsys):
    from pipeline.cli import main as cli

    with pytest.raises(SystemExit) as stopped:
        cli([str(tmp_path / a) if a in ("RUN", "OUT") else a for a in argv])
    assert stopped.value.code == 2
    assert "must be a finite number" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


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

    from pipeline.ema import EMA

    original = EMA.update

    def poisoned(self, model, *args, **kwargs):
        original(self, model, *args, **kwargs)
        with torch.no_grad():
            next(self.model.parameters()).fill_(float("nan"))

    monkeypatch.setattr(EMA, "update", poisoned)
    run_dir = tmp_path / "run"
    assert run_train(run_dir, mnist_shards) == EXIT_NONFINITE
    assert "not finite" in capsys.readouterr().err
    assert not RunDir(run_dir).export.exists()
    assert not RunDir(run_dir).summary_json.exists()


# --------------------------------------------------------------------------- imported and loaded weights
def test_a_score_sde_checkpoint_with_nan_inside_a_tensor_is_not_imported(tmp_path, capsys):
    """Bytes corrupted inside a tensor's data: the file still unpickles, the values are NaN."""
    from helpers.score_sde_ckpt import run_import, small_overrides, write_checkpoint
    from pipeline.publish.score_sde_import import fpdiff_config

    name = "vp/cifar10_ddpmpp_continuous"
    write_checkpoint(tmp_path / "c.pth", fpdiff_config(name, small_overrides(name)),
                     edit=lambda c: c["ema"]["shadow_params"][3].view(-1)[:5].fill_(float("nan")))
    assert run_import(tmp_path, name, tmp_path / "c.pth") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "c.pth" in err and "not finite" in err
    assert not (tmp_path / "run").exists()


def tiny_export(folder, edit=None):
    """An export of the tiny model (random weights), its tensors changed by ``edit(state)``."""
    from pipeline.models import build_model
    from pipeline.publish.export import write_export

    cfg = load_config(TINY, ["logging.backend=none"])
    state = build_model(cfg).state_dict()
    if edit:
        edit(state)
    return write_export(folder, state, cfg.to_dict(), {"step": 1})


def nan_first(state):
    next(iter(state.values())).view(-1)[0] = float("nan")


def wrong_shape(state):
    key = next(k for k, v in state.items() if v.ndim == 4)
    state[key] = state[key].repeat(2, 1, 1, 1)  # twice the output channels


@pytest.mark.parametrize("edit, expected", [(nan_first, "not finite"), (wrong_shape, "of another shape")])
def test_export_weights_that_are_not_finite_or_do_not_fit(tmp_path, mnist_shards, capsys, edit, expected):
    from pipeline.sample.cli import sample_main

    export = tiny_export(tmp_path / "download" / "export", edit)
    out = tmp_path / "samples"
    assert sample_main(["--run-dir", str(export), "--num-samples", "2", "--out", str(out), "--device", "cpu",
                        "sampling.num_steps=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err and "ema.safetensors" in err
    assert not out.exists()
    # fine-tuning from it: one line naming training.init_from, nothing written
    assert run_train(tmp_path / "run", mnist_shards, f"training.init_from={export}") == EXIT_BAD_CONFIG
    line = one_line_error(capsys)
    assert "training.init_from" in line and expected in line
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_with_non_finite_weights_is_passed_over_on_resume(tmp_path, mnist_shards, capsys):
    from safetensors.torch import load_file, save_file

    run_dir = tmp_path / "run"
    assert run_train(run_dir, mnist_shards, "training.n_steps=4", "training.keep_last=5") == 0
    newest = RunDir(run_dir).latest_checkpoint()
    state = load_file(str(newest / "ema.safetensors"))
    nan_first(state)
    save_file(state, str(newest / "ema.safetensors"))
    capsys.readouterr()
    assert run_train(run_dir, mnist_shards, "training.n_steps=5", "training.keep_last=5", "--resume", "auto") == 0
    err = capsys.readouterr().err
    assert "not finite" in err and "resuming from the previous checkpoint step_00000002" in err


# --------------------------------------------------------------------------- bounded work
def test_sample_streams_to_disk_in_batches(tmp_path, monkeypatch):
    """--num-samples is drawn and written batch by batch (no more than sampling.batch_size in memory),
    and gives the same samples as drawing them all at once."""
    import numpy as np
    import torch

    import pipeline.sample.cli as sample_cli
    from pipeline.sample.cli import sample_main

    export = tiny_export(tmp_path / "export")
    original, asked = sample_cli.sample, []

    def recording(cfg, eps, score_fn, sde, shape, **kw):
        asked.append(shape[0])
        return original(cfg, eps, score_fn, sde, shape, **kw)

    monkeypatch.setattr(sample_cli, "sample", recording)  # the sampler as the sampling stage calls it
    out = tmp_path / "out"
    assert sample_main(["--run-dir", str(export), "--num-samples", "7", "--out", str(out), "--device", "cpu",
                        "--seed", "3", "sampling.num_steps=2", "sampling.batch_size=3"]) == 0
    assert asked == [3, 3, 1]
    streamed = np.load(out / "samples.npz")["images"]
    from pipeline.images import to_uint8
    from pipeline.rundir import load_for_eval
    from pipeline.sde import build_sde
    from pipeline.score import get_score_fn

    model, cfg, _ = load_for_eval(export)
    cfg.sampling.num_steps, cfg.sampling.batch_size = 2, 3
    sde = build_sde(cfg.sde)
    x, _ = original(cfg.sampling, cfg.sde.sampling_eps, get_score_fn(model, sde), sde, (7, 1, 28, 28),
                    device="cpu", generator=torch.Generator().manual_seed(3))
    assert streamed.shape == (7, 1, 28, 28) and np.array_equal(streamed, to_uint8(x, cfg.data.centered).numpy())


def test_an_alias_bomb_in_a_typed_field_is_one_short_line(tmp_path, mnist_shards, capsys):
    """Six nested aliases of 9: half a million values, 1.6 MB when spelled out."""
    levels = ["&a [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [f"&{c} [{', '.join([f'*{p}'] * 9)}]"
                                                     for p, c in zip("abcde", "bcdef")]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"model:\n  ch_mult: [{', '.join(levels)}]\n")
    assert len(bomb.read_bytes()) < 1000
    assert main(["--config", str(bomb), "--run-dir", str(tmp_path / "run"), *FAST]) == EXIT_BAD_CONFIG
    line = one_line_error(capsys)
    assert len(line) < 500 and "model.ch_mult" in line


# --------------------------------------------------------------------------- one line, not a traceback
def disk_full_safetensors(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                          '"No space left on device" })')


def disk_full_torch(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                       "data/0: file write failed")


@pytest.mark.parametrize("target, fault", [("pipeline.train.checkpoint.save_weights", disk_full_safetensors),
                                           ("torch.save", disk_full_torch),
                                           ("pipeline.publish.export.save_weights", disk_full_safetensors)])
def test_disk_full_while_writing_a_checkpoint_or_the_export(tmp_path, mnist_shards, monkeypatch, capsys,
                                                            target, fault):
    run_dir = tmp_path / "run"
    monkeypatch.setattr(target, fault)
    assert run_train(run_dir, mnist_shards) == EXIT_BAD_CONFIG
    line = one_line_error(capsys)
    written = "export" if "export" in target else "step_00000002"
    assert f"{written}: " in line and ("No space left" in line or "file write failed" in line)
    assert not list(run_dir.rglob(".*tmp*")) and not RunDir(run_dir).export.exists()


@pytest.mark.parametrize("content", ['{"step": "two"}', "[]", '{"step": 3}', '{"step": 4, "loader": 7}'])
def test_a_state_json_with_wrong_content_falls_back_to_the_previous_checkpoint(tmp_path, mnist_shards, capsys,
                                                                             content):
    run_dir = tmp_path / "run"
    assert run_train(run_dir, mnist_shards, "training.n_steps=4", "training.keep_last=5") == 0
    (RunDir(run_dir).latest_checkpoint() / "state.json").write_text(content)
    capsys.readouterr()
    assert run_train(run_dir, mnist_shards, "training.n_steps=5", "training.keep_last=5", "--resume", "auto") == 0
    err = capsys.readouterr().err
    assert "step_00000004/state.json" in err and "resuming from the previous checkpoint step_00000002" in err


def test_ctrl_c_checkpoints_like_sigterm(tmp_path, mnist_shards, monkeypatch, capsys):
    import signal

    import pipeline.losses as losses

    original, calls = losses.DSMLoss.__call__, []

    def interrupted_at_step_3(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(losses.DSMLoss, "__call__", interrupted_at_step_3)
    before = signal.getsignal(signal.SIGINT)
    run_dir = tmp_path / "run"
    assert run_train(run_dir, mnist_shards, "training.n_steps=10", "training.ckpt_every=100") == 75
    assert [p.name for p in RunDir(run_dir).list_checkpoints()] == ["step_00000003"]
    assert "Ctrl-C" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # the trainer's handler goes with the run


def test_ctrl_c_in_sample_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import pipeline.sample.cli as sample_cli
    from pipeline.cli import main as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_cli, "sample", interrupted)
    out = tmp_path / "out"
    assert cli(["sample", "--run-dir", str(tiny_export(tmp_path / "export")), "--out", str(out),
                "--num-samples", "4", "--device", "cpu"]) == 130
    assert capsys.readouterr().err.strip() == "fpdiff sample: interrupted"
    assert not out.exists() or not list(out.iterdir())


def test_files_are_shared_like_the_umask_says(tmp_path, mnist_shards):
    from pipeline.atomic import atomic_write_text

    old = os.umask(0o022)
    try:
        run_dir = tmp_path / "run"
        assert run_train(run_dir, mnist_shards) == 0
        modes = {p.relative_to(run_dir).as_posix(): p.stat().st_mode & 0o777 for p in run_dir.rglob("*")}
        assert {m for p, m in modes.items() if not (run_dir / p).is_dir()} == {0o644}, modes
        assert {m for p, m in modes.items() if (run_dir / p).is_dir()} == {0o755}, modes
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
        assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_messages_that_say_what_is_wrong(tmp_path, mnist_shards, capsys):
    from pipeline.data.test_set import rank_test_batches

    not_a_tar = tmp_path / "x.tar"
    not_a_tar.write_bytes(b"this is not a tar file" * 100)
    assert main(["--config", TINY, "--run-dir", str(tmp_path / "run"), "--no-progress", *FAST,
                 f"data.shards={not_a_tar}"]) == EXIT_BAD_CONFIG
    assert f"{not_a_tar} is not a readable tar shard" in one_line_error(capsys)
    # test images of two sizes (for --inpaint): the image named, not numpy's message
    from helpers.shard_files import png, write_shards
    from PIL import Image

    write_shards(tmp_path / "mixed", [[("a", png(Image.new("L", (8, 8)))), ("b", png(Image.new("L", (9, 9))))]])
    with pytest.raises(ValueError, match="test image b is 9x9, the first ones 8x8"):
        list(rank_test_batches(None, str(tmp_path / "mixed" / "t-000000.tar"), 1, 4, 0, 1))
