"""Issue 12, training side: no code from checkpoint files, no silently damaged runs, one line
(exit 2) instead of a traceback. Every test drives the real trainer on the tiny config."""
import errno
import json
import os
import shutil

import pytest
import torch

from pipeline.rundir import RunDir
from pipeline.train import checkpoint as ckpt
from pipeline.config_files import CONFIG_DIR
from pipeline.app import train_main as main
from pipeline.status import EXIT_BAD_CONFIG, EXIT_NONFINITE, EXIT_REQUEUE

TINY = str(CONFIG_DIR / "mnist_tiny.yaml")
FAST = ["logging.backend=none", "training.log_every=1", "sampling.num_steps=2", "sampling.num_samples=4",
        "fpe.enabled=false"]


class ShellPayload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def run_train(run_dir, overrides, *extra):
    return main(["--config", TINY, "--run-dir", str(run_dir), "--no-progress", *extra, *overrides])


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fpdiff:")]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, mnist_shards):
    """A 4-step run with checkpoints at steps 2 and 4."""
    overrides = [f"data.shards={mnist_shards[0]}", f"data.test_shards={mnist_shards[1]}", *FAST,
                 "training.n_steps=4", "training.ckpt_every=2", "training.keep_last=5"]
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    assert run_train(run_dir, overrides) == 0
    return run_dir, overrides


@pytest.fixture
def run_copy(finished_run, tmp_path):
    run_dir, overrides = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy, overrides


def ckpt_names(run_dir):
    return [p.name for p in RunDir(run_dir).list_checkpoints()]


def test_resume_runs_no_code_from_optimizer_pt(run_copy, tmp_path, capsys):
    run_dir, overrides = run_copy
    marker = tmp_path / "marker"
    for path in RunDir(run_dir).list_checkpoints():
        torch.save({"optimizer": ShellPayload(marker)}, path / "optimizer.pt")
    code = run_train(run_dir, overrides + ["training.n_steps=6"], "--resume", "auto")
    assert not marker.exists()
    assert code == EXIT_BAD_CONFIG
    assert "optimizer.pt" in one_line_error(capsys)


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    state = ckpt.rng_state()
    torch.save({"rng": state}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt"])
def test_truncated_newest_checkpoint_falls_back_to_the_previous(run_copy, capsys, name):
    run_dir, overrides = run_copy
    newest = RunDir(run_dir).latest_checkpoint()
    data = (newest / name).read_bytes()
    (newest / name).write_bytes(data[: len(data) // 2])
    assert run_train(run_dir, overrides, "--resume", "auto") == 0
    err = capsys.readouterr().err
    assert f"{newest.name}/{name}" in err and "resuming from the previous checkpoint step_00000002" in err
    assert "resumed from" in err and "step_00000002 at step 2" in err


def test_resume_path_that_does_not_exist(run_copy, capsys):
    run_dir, overrides = run_copy
    assert run_train(run_dir, overrides, "--resume", str(run_dir / "nope")) == EXIT_BAD_CONFIG
    assert "--resume" in one_line_error(capsys)


def test_training_into_an_earlier_run_is_refused_unless_overwrite(run_copy, capsys):
    run_dir, overrides = run_copy
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    assert run_train(run_dir, overrides + ["training.n_steps=2"]) == EXIT_BAD_CONFIG
    assert "--resume auto" in one_line_error(capsys)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    # --overwrite replaces the earlier run whole: no step-4 checkpoint outranks the new step 2
    assert run_train(run_dir, overrides + ["training.n_steps=2"], "--overwrite") == 0
    assert ckpt_names(run_dir) == ["step_00000002"]
    assert json.loads((run_dir / "export" / "metrics.json").read_text())["step"] == 2


def test_failed_start_writes_nothing(run_copy, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    assert run_train(fresh, FAST + ["data.shards=" + str(tmp_path / "missing.tar")]) == EXIT_BAD_CONFIG
    assert "data.shards" in one_line_error(capsys)
    assert not fresh.exists()
    # a model that does not fit the checkpoint: one line, and the run's config.yaml is untouched
    run_dir, overrides = run_copy
    saved = (run_dir / "config.yaml").read_bytes()
    assert run_train(run_dir, overrides + ["model.nf=32"], "--resume", "auto") == EXIT_BAD_CONFIG
    assert "model.nf: 16 in" in one_line_error(capsys)  # refused before anything loads (exact resume)
    assert run_train(run_dir, overrides + ["model.nf=32"], "--resume", "auto", "--force") == EXIT_BAD_CONFIG
    assert "weights do not match the model" in one_line_error(capsys)  # forced: the checkpoint itself refuses it
    assert (run_dir / "config.yaml").read_bytes() == saved


def test_nonfinite_stop_keeps_the_checkpoint_from_before_the_streak(finished_run, tmp_path, poison_dsm_loss,
                                                                     capsys):
    """Step 3 on is non-finite: the checkpoint at step 4 (inside the streak) is not kept, and a
    resume with a new training.lr trains with it, not with the checkpoint's."""
    _, overrides = finished_run
    run_dir = tmp_path / "run"
    poison_dsm_loss(after=2)
    common = overrides + ["training.n_steps=10", "training.ckpt_every=2", "training.max_nonfinite=3"]
    assert run_train(run_dir, common + ["training.lr=1e-2"]) == EXIT_NONFINITE
    assert ckpt_names(run_dir) == ["step_00000002"]
    assert "kept step_00000002" in capsys.readouterr().err
    poison_dsm_loss(None)
    assert run_train(run_dir, common + ["training.lr=1e-3", "training.n_steps=5"], "--resume", "auto") == 0
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"lr"' in line][-1]
    assert last["step"] == 5 and last["lr"] == pytest.approx(1e-3)  # the checkpoint's was 1e-2


def test_stop_file_is_consumed_by_the_stop_it_asked_for(run_copy, capsys):
    run_dir, overrides = run_copy
    (run_dir / "STOP").touch()
    assert run_train(run_dir, overrides + ["training.n_steps=6"], "--resume", "auto") == EXIT_REQUEUE
    assert ckpt_names(run_dir)[-1] == "step_00000005" and not (run_dir / "STOP").exists()
    assert run_train(run_dir, overrides + ["training.n_steps=6"], "--resume", "auto") == 0
    assert ckpt_names(run_dir)[-1] == "step_00000006"


def test_disk_full_while_saving_a_checkpoint(run_copy, monkeypatch, capsys):
    run_dir, overrides = run_copy

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_weights", disk_full)
    assert run_train(run_dir, overrides + ["training.n_steps=5"], "--resume", "auto") == EXIT_BAD_CONFIG
    line = one_line_error(capsys)
    assert "step_00000005" in line and os.strerror(errno.ENOSPC) in line
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert ckpt_names(run_dir) == ["step_00000002", "step_00000004"]


# --------------------------------------------------------------------------- eval on saved configs
def run_eval(*argv):
    from pipeline.eval.cli import evaluate_main

    return evaluate_main(list(argv))


FPE_EVAL = ["--max-samples", "4", "--num-times", "2", "--batch-size", "4", "--no-progress"]


def test_eval_runs_no_pipe_url_from_a_saved_config(run_copy, tmp_path, capsys):
    """An export (as downloaded) whose config.yaml names its test shards by a shell command."""
    run_dir, overrides = run_copy
    marker = tmp_path / "marker"
    test_shard = overrides[1].split("=", 1)[1]
    export = tmp_path / "download" / "snapshot"
    shutil.copytree(run_dir / "export", export)
    config = (export / "config.yaml").read_text()
    assert config.count("test_shards: ''") == 1  # an export names no data (issue 26); a tampered one
    (export / "config.yaml").write_text(config.replace("test_shards: ''",
                                                       f"test_shards: 'pipe:touch {marker}; cat {test_shard}'"))
    out = tmp_path / "fpe.json"
    assert run_eval("fpe", str(export), "--out", str(out), *FPE_EVAL) == EXIT_BAD_CONFIG
    assert not marker.exists() and not out.exists()
    assert "data.test_shards is a pipe: URL" in capsys.readouterr().err
    # the person typing the command may name the shards, a pipe: URL included
    assert run_eval("fpe", str(export), "--out", str(out), "--shards", test_shard, *FPE_EVAL) == 0
    assert out.is_file() and not marker.exists()


def test_eval_of_an_export_on_its_own_writes_only_to_out(run_copy, tmp_path, capsys):
    run_dir, overrides = run_copy
    shards = ["--shards", overrides[1].split("=", 1)[1]]  # an export names no data (issue 26)
    cache = tmp_path / "cache"
    shutil.copytree(run_dir / "export", cache / "snapshot")
    before = sorted(cache.rglob("*"))
    assert run_eval("fpe", str(cache / "snapshot"), *shards, *FPE_EVAL) == EXIT_BAD_CONFIG
    assert "--out" in capsys.readouterr().err
    assert sorted(cache.rglob("*")) == before
    out = tmp_path / "results" / "fpe.json"
    assert run_eval("fpe", str(cache / "snapshot"), "--out", str(out), *shards, *FPE_EVAL) == 0
    assert out.is_file() and sorted(cache.rglob("*")) == before
    # a run's own export still writes into the run
    assert run_eval("fpe", str(run_dir / "export"), *FPE_EVAL) == 0
    assert (run_dir / "eval" / "fpe-step4.json").is_file() and "fpe" in (run_dir / "summary.txt").read_text()


def test_eval_bpd_on_a_truncated_ema_file(run_copy, capsys):
    run_dir, _ = run_copy
    ema = RunDir(run_dir).latest_checkpoint() / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:1000])
    assert run_eval("bpd", str(run_dir), "--max-samples", "2", "--no-progress") == EXIT_BAD_CONFIG
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ema.safetensors" in err
    assert not (run_dir / "eval").exists()


# --------------------------------------------------------------------------- fpdiff data shards
def write_images(folder, n=3):
    from PIL import Image

    (folder / "a").mkdir(parents=True)
    for i in range(n):
        Image.new("L", (8, 8), 40 * i).save(folder / "a" / f"{i}.png")


def shards_cli(*argv):
    from pipeline.data.shards import shards_main

    return shards_main([str(a) for a in argv])


def test_cifar_batches_run_no_code(tmp_path, capsys):
    import pickle

    import numpy as np

    marker = tmp_path / "marker"
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    batch = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3], b"batch_label": b"b1"}
    (cifar / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    (cifar / "test_batch").write_bytes(pickle.dumps({**batch, b"labels": ShellPayload(marker)}, protocol=2))
    out = tmp_path / "out"
    assert shards_cli(cifar, "--out", out) == 2
    assert not marker.exists()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "test_batch" in err and "refused" in err
    assert not out.exists() or not list(out.iterdir())
    # a plain batch (arrays, lists, bytes) still reads
    (cifar / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    assert shards_cli(cifar, "--out", out) == 0
    assert sorted(p.name for p in out.glob("*.json")) == ["cifar-10-batches-py-test.json",
                                                         "cifar-10-batches-py-train.json"]


@pytest.mark.parametrize("fault", ["corrupt", "broken_symlink"])
def test_image_folder_with_a_bad_file(tmp_path, capsys, fault):
    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images)
    bad = images / "a" / "9.png"
    if fault == "corrupt":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    else:
        bad.symlink_to(tmp_path / "gone.png")
    assert shards_cli(images, "--out", out, "--max-samples", "1", "--no-shuffle") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err
    assert not out.exists() or not list(out.iterdir())  # no shard, no .tmp, no index


# --------------------------------------------------------------------------- config and data inputs
def test_bad_inputs_fail_in_one_line_before_anything_is_written(mnist_shards, tmp_path, capsys):
    empty_yaml, empty_json = tmp_path / "empty.yaml", tmp_path / "empty.json"
    empty_yaml.write_text("")
    empty_json.write_text("")
    run_dir = tmp_path / "run"
    cases = [(empty_yaml, [], "empty config file"),  # it would train the CIFAR-10 defaults
             (TINY, [f"data.shards={mnist_shards[0]}", "training.n_steps=1", "sampling.num_steps=-5"],
              "sampling.num_steps"),
             (TINY, [f"data.shards={empty_json}"], f"data.shards: {empty_json}")]
    for config, overrides, expected in cases:
        assert main(["--config", str(config), "--run-dir", str(run_dir), "--no-progress", *FAST, *overrides]) == 2
        assert expected in one_line_error(capsys)
        assert not run_dir.exists()


def test_fpe_subsample_larger_than_the_batch_is_said_once(mnist_shards, tmp_path, capsys):
    overrides = [f"data.shards={mnist_shards[0]}", *FAST, "fpe.enabled=true", "fpe.subsample=64",
                 "training.n_steps=2"]
    assert run_train(tmp_path / "run", overrides) == 0
    err = capsys.readouterr().err
    assert err.count("fpe.subsample=64 exceeds the 16 samples") == 1


@pytest.mark.parametrize("n", ["0", "-3"])
def test_sample_num_samples_not_positive(run_copy, capsys, n):
    from pipeline.sample.cli import sample_main

    run_dir, _ = run_copy
    before = sorted(run_dir.rglob("*"))
    assert sample_main(["--run-dir", str(run_dir), "--num-samples", n]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--num-samples" in err
    assert sorted(run_dir.rglob("*")) == before  # no empty samples/
