"""What a newcomer meets at the command line (issue 27): commands that need test data say so in
one line when a run has none (never reading the training shards instead), and write nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mnist_tiny.yaml")


def _run_without_test_shards(tmp_path, train_shards: str, overrides=()) -> Path:
    """A run directory (config.yaml + export/ of a tiny real model) trained on ``train_shards``
    with no data.test_shards, as `fpdiff train` without that override leaves it."""
    from pipeline.config_files import load_config, save_config
    from pipeline.models import build_model
    from pipeline.publish.export import write_export

    from helpers.eval_fixtures import TINY_OVERRIDES

    cfg = load_config(None, TINY_OVERRIDES + [f"data.shards={train_shards}", *overrides])
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    write_export(run / "export", build_model(cfg).state_dict(), cfg.to_dict(), {"step": 7})
    return run


@pytest.mark.parametrize("command", ["eval bpd", "eval fpe", "sample --inpaint left", "classifier --steps 1"])
def test_commands_needing_test_data_refuse_a_run_without_it(tmp_path, capsys, command):
    from pipeline.cli import main
    from helpers.eval_fixtures import write_test_shards

    run = _run_without_test_shards(tmp_path, write_test_shards(tmp_path / "train"))
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    argv = command.split()
    argv = argv[:2] + [str(run)] + argv[2:] if argv[0] == "eval" else [argv[0], "--run-dir", str(run), *argv[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "needs test data, and this run has none (data.test_shards is empty)" in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing written


def _bar_lines(err: str) -> list[str]:
    """The states a tqdm bar drew on stderr (carriage returns separate them)."""
    return [s.strip() for s in err.replace("\r", "\n").splitlines() if s.strip()]


def test_long_evaluations_show_images_with_a_total(tmp_path, capsys):
    """bits/dim and the FPE residual count test images against the total (read from the shard
    index), with an ETA; reference statistics count images against theirs."""
    from pipeline.config_files import load_config
    from pipeline.eval.bpd import evaluate_bpd
    from pipeline.eval.fid import compute_ref_stats
    from pipeline.eval.fpe import evaluate_fpe
    from pipeline.sde import build_sde

    from helpers.eval_fixtures import write_test_shards
    from helpers.eval_fixtures import TINY_OVERRIDES
    from helpers.standin import StandIn

    shards = write_test_shards(tmp_path / "test", sizes=(5, 2, 4))  # 11 images, no index: headers counted
    cfg = load_config(None, TINY_OVERRIDES)
    sde, model = build_sde(cfg.sde), StandIn(1)
    capsys.readouterr()
    bpd_cfg = load_config(None, TINY_OVERRIDES + [f"data.test_shards={shards}", "eval.batch_size=4", "eval.bpd_passes=2",
                                                  "eval.rtol=1e-2", "eval.atol=1e-2"])
    evaluate_bpd(model, bpd_cfg, sde, progress=True)
    bars = _bar_lines(capsys.readouterr().err)
    assert bars[-1].startswith("bits/dim, 2 passes") and "| 11/11 img [" in bars[-1]
    assert any("/11 img [" in b and "<" in b for b in bars[:-1])  # moving, with elapsed<remaining
    fpe_cfg = load_config(None, TINY_OVERRIDES + [f"data.test_shards={shards}", "eval.batch_size=4",
                                                  "eval.fpe_num_times=2", "eval.fpe_max_samples=7"])
    evaluate_fpe(model, fpe_cfg, sde, progress=True)
    bars = _bar_lines(capsys.readouterr().err)
    assert bars[-1].startswith("FPE residual at 2 times") and "| 7/7 img [" in bars[-1]
    compute_ref_stats([f"{tmp_path}/test/test-{i:06d}.tar" for i in range(3)], lambda u8: u8.flatten(1).double(),
                      channels=1, batch_size=4, counts=[5, 2, 4])
    assert "11/11" in _bar_lines(capsys.readouterr().err)[-1]


def test_ode_sampler_bar_has_an_eta(capsys):
    from pipeline.config_files import load_config
    from pipeline.sampling import ode_sample
    from pipeline.sde import build_sde

    sde = build_sde(load_config(None, []).sde)
    ode_sample(lambda x, t: -x, sde, (3, 1, 4, 4), rtol=1e-2, atol=1e-2, progress=True)
    bars = _bar_lines(capsys.readouterr().err)
    assert bars and all(b.startswith("sampling ode, 3 samples") and "<" in b for b in bars)


# --------------------------------------------------------------------------- train: outputs, resume
def test_train_ends_with_where_its_outputs_are_and_resume_reuses_the_run_config(tmp_path, tiny_overrides, capsys):
    """`fpdiff train` ends with the summary line and the run dir; `--resume auto` without --config
    continues RUN/config.yaml (its data overrides included) with new overrides on top, printing
    each change; a change that breaks exact resume is refused in one line unless --force."""
    from pipeline.cli import main

    run = tmp_path / "tiny"
    fast = ["training.ckpt_every=2", "training.log_every=1", "sampling.num_steps=2", "sampling.num_samples=2",
            "sampling.corrector=none", "fpe.enabled=false", "--no-progress"]
    assert main(["train", "--config", TINY_CONFIG, "--run-dir", str(run), "training.n_steps=2", "eval.every=2",
                 "eval.batch_size=2", "eval.rtol=1e-2", "eval.atol=1e-2", *tiny_overrides, *fast]) == 0
    evals = [json.loads(ln) for ln in (run / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2] and evals[0]["eval/bpd_n"] == 2  # eval.every = n_steps: evaluated
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].startswith("[fpdiff] train: 2 steps in ") and f"samples {run / 'samples.png'}" in out[-2]
    assert out[-1].startswith(f"[fpdiff] outputs in {run}/: checkpoints/, export/")

    assert main(["train", "--run-dir", str(run), "--resume", "auto", "training.n_steps=3", "training.lr=5e-4",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "[fpdiff] resume: training.n_steps 2 -> 3" in err and "[fpdiff] resume: training.lr 0.001 -> 0.0005" in err
    assert "resumed from" in err and (run / "checkpoints" / "step_00000003").is_dir()
    before = sorted(p.name for p in (run / "checkpoints").iterdir())

    for argv in (["training.batch_size=8"], ["--config", TINY_CONFIG, "training.n_steps=4"]):
        assert main(["train", "--run-dir", str(run), "--resume", "auto", *argv, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "does not continue the same run" in err and "--force" in err
    assert "training.batch_size: 16 in" in err or "data.shards: " in err  # the --config one lacks the data
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert main(["train", "--run-dir", str(run), "--resume", "auto", "training.n_steps=4", "training.seed=7",
                 "--force", "--no-progress"]) == 0
    assert "[fpdiff] resume: training.seed 0 -> 7 (forced)" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(tmp_path / "none"), "--resume", "auto"]) == 2
    assert "config.yaml not found (no run to continue there)" in capsys.readouterr().err


# --------------------------------------------------------------------------- the command line
COMMANDS = [["demo"], ["train"], ["data", "shards"], ["eval", "fid"], ["eval", "bpd"], ["eval", "ref-stats"],
            ["eval", "fpe"], ["sample"], ["classifier"], ["push"], ["import", "score-sde"], ["config", "show"]]


def _parsers_of(argv, monkeypatch) -> list:
    """Every parser that `fpdiff ARGV --help` builds (it exits 0)."""
    import argparse

    from pipeline.cli import main

    built = []
    real_init = argparse.ArgumentParser.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        built.append(self)
    monkeypatch.setattr(argparse.ArgumentParser, "__init__", init)
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return built


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_every_option_has_help_text(argv, monkeypatch, capsys):
    parsers = _parsers_of(argv, monkeypatch)
    assert parsers
    for parser in parsers:
        missing = [a.option_strings or a.dest for a in parser._actions if not a.help]
        assert not missing, f"{parser.prog}: no help for {missing}"
    usage = capsys.readouterr().out
    assert f"usage: fpdiff {argv[0]}" in usage  # not `python -m pipeline.train`


def test_typos_suggest_the_nearest_command_option_or_config_key(capsys):
    from pipeline.cli import main

    assert main(["trian"]) == 2
    assert "fpdiff: unknown command 'trian'; did you mean train?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", "c.yaml", "--lr", "1e-4"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fpdiff train: error: unrecognized arguments: --lr (--lr: config keys are dotted overrides: training.lr=1e-4)")
    with pytest.raises(SystemExit):
        main(["eval", "bpd", "RUN", "--pases", "3"])
    assert "(--pases: did you mean --passes?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "fdi", "RUN"])
    assert "invalid choice: 'fdi'" in capsys.readouterr().err
    assert main(["data", "--help"]) == 0 and "fpdiff data shards SOURCE --out DIR" in capsys.readouterr().out
    assert main(["data"]) == 2


def test_config_show_lists_every_key_with_value_type_and_meaning(capsys):
    import dataclasses

    from pipeline.cli import main
    from pipeline.config import Config
    from pipeline.config_files import load_config

    assert main(["config", "show", "--config", TINY_CONFIG]) == 0
    lines = capsys.readouterr().out.splitlines()
    cfg = load_config(TINY_CONFIG).to_dict()
    n_keys = sum(len(v) if isinstance(v, dict) else 1 for v in cfg.values())
    assert len(lines) == n_keys == len([f for f in dataclasses.fields(Config)]) - 9 + sum(
        len(v) for v in cfg.values() if isinstance(v, dict))
    row = next(ln for ln in lines if ln.startswith("training.n_steps "))
    assert row.split()[1:3] == ["40", "int"] and "optimizer steps" in row  # the file's value, not the default
    assert all(len(ln.split(None, 3)) == 4 for ln in lines)  # key, value, type, a meaning
    assert main(["config", "show", "sampling.method"]) == 0
    assert capsys.readouterr().out.split()[:5] == ["sampling.method", "'pc'", "one", "of", "pc|ode"]
    assert main(["config", "show", "trainig.lr"]) == 2
    assert capsys.readouterr().err.strip() == "fpdiff config: trainig.lr: unknown key (did you mean training.lr?)"


# --------------------------------------------------------------------------- sample, push
def test_sample_writes_a_new_folder_each_call_with_the_runs_sample_count(tmp_path, capsys):
    import json

    import numpy as np
    from PIL import Image

    from pipeline.cli import main

    run = _run_without_test_shards(tmp_path, "unused-{0..1}.tar", ["sampling.num_samples=3", "sampling.num_steps=2"])
    for n in (1, 2):
        assert main(["sample", "--run-dir", str(run), "--seed", str(n), "--device", "cpu"]) == 0
        out = run / "samples" / f"sample-{n:03d}"
        assert capsys.readouterr().out.strip().endswith(f"{out / 'samples.npz'}, the first 3 in {out / 'grid.png'}")
        assert np.load(out / "samples.npz")["images"].shape == (3, 1, 8, 8)  # the run's sampling.num_samples
        assert json.loads((out / "samples.json").read_text())["seed"] == n
    assert not np.array_equal(*(np.load(run / "samples" / f"sample-00{n}" / "samples.npz")["images"] for n in (1, 2)))
    for bad, said in (("sampling.num_step=5", "sampling.num_step: unknown key (did you mean sampling.num_steps?)"),
                      ("training.lr=1", "training.lr: fpdiff sample takes sampling.* overrides only")):
        assert main(["sample", "--run-dir", str(run), bad]) == 2
        assert capsys.readouterr().err.strip().startswith(f"fpdiff sample: {said}")
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["sample-001", "sample-002"]

    cond = _run_without_test_shards(tmp_path / "c", "unused-{0..1}.tar",
                                    ["model.num_classes=10", "sampling.num_samples=20", "sampling.num_steps=1"])
    assert main(["sample", "--run-dir", str(cond), "--device", "cpu"]) == 0
    w, h = Image.open(cond / "samples" / "sample-001" / "grid.png").size
    assert round(w / h) == 5  # 10 columns (the digits 0-9 in a row), 2 rows


def test_label_columns():
    from pipeline.images import label_columns

    assert label_columns([0, 1, 2, 0, 1, 2, 0]) == 3 and label_columns(list(range(10)) * 2) == 10
    assert label_columns([3, 3, 3]) is None and label_columns(None) is None


def test_push_dry_run_lists_the_upload_and_touches_no_network(tmp_path, capsys, monkeypatch):
    from pipeline.cli import main

    run = _run_without_test_shards(tmp_path, "unused-{0..1}.tar")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a request would fail
    assert main(["push", str(run), "--repo-id", "me/model", "--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any(ln.strip().startswith("ema.safetensors (") for ln in out)
    assert out[-1].startswith(f"[fpdiff] dry run: would push ") and f"of {run / 'export'} to me/model (private)" in out[-1]


def test_offline_mode_is_not_retried():
    from huggingface_hub.errors import OfflineModeIsEnabled

    from pipeline.publish.hub import is_retryable

    assert not is_retryable(OfflineModeIsEnabled("offline")) and is_retryable(ConnectionError("reset"))


def test_no_third_party_warnings_on_a_cpu_eval(tmp_path):
    """`fpdiff eval fpe` (Accelerate, DeepSpeed installed, forward-mode AD) prints its result and
    no warning the user cannot act on (DeepSpeed's accelerator guess, torch's jit deprecation)."""
    import os
    import subprocess
    import sys

    from helpers.eval_fixtures import write_test_shards

    shards = write_test_shards(tmp_path / "test", sizes=(2,))
    run = _run_without_test_shards(tmp_path, shards)
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "PYTHONWARNINGS")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", "fpe", str(run), "--shards", shards,
                        "--num-times", "2", "--max-samples", "2", "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("[fpdiff] eval fpe: mean residual") and r.stderr.strip() == ""


def test_import_help_lists_the_score_sde_config_names(capsys):
    from pipeline.cli import main
    from pipeline.publish.score_sde_import import SCORE_SDE_CONFIGS

    with pytest.raises(SystemExit):
        main(["import", "score-sde", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in SCORE_SDE_CONFIGS)
