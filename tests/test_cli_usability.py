"""What a newcomer meets at the command line (issue 27): commands that need test data say so in
one line when a run has none (never reading the training shards instead), and write nothing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mnist_tiny.yaml")


def _run_without_test_shards(tmp_path, train_shards: str) -> Path:
    """A run directory (config.yaml + export/ of a tiny real model) trained on ``train_shards``
    with no data.test_shards, as `fpdiff train` without that override leaves it."""
    from pipeline.config import load_config, save_config
    from pipeline.models import build_model
    from pipeline.publish.export import write_export

    from test_fid import TINY_OVERRIDES

    cfg = load_config(None, TINY_OVERRIDES + [f"data.shards={train_shards}"])
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    write_export(run / "export", build_model(cfg).state_dict(), cfg.to_dict(), {"step": 7})
    return run


@pytest.mark.parametrize("command", ["eval bpd", "eval fpe", "sample --inpaint left", "classifier --steps 1"])
def test_commands_needing_test_data_refuse_a_run_without_it(tmp_path, capsys, command):
    from pipeline.cli import main
    from test_evaluate import write_test_shards

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
    from pipeline.config import load_config
    from pipeline.eval.bpd import evaluate_bpd
    from pipeline.eval.fid import compute_ref_stats
    from pipeline.eval.fpe import evaluate_fpe
    from pipeline.sde import build_sde

    from test_evaluate import write_test_shards
    from test_fid import STANDIN, TINY_OVERRIDES

    shards = write_test_shards(tmp_path / "test", sizes=(5, 2, 4))  # 11 images, no index: headers counted
    ns: dict = {}
    exec(STANDIN, ns)
    cfg = load_config(None, TINY_OVERRIDES)
    sde, model = build_sde(cfg.sde), ns["StandIn"](1)
    capsys.readouterr()
    evaluate_bpd(model, cfg, sde, shards=shards, batch_size=4, passes=2, rtol=1e-2, atol=1e-2, progress=True)
    bars = _bar_lines(capsys.readouterr().err)
    assert bars[-1].startswith("bits/dim, 2 passes") and "| 11/11 img [" in bars[-1]
    assert any("/11 img [" in b and "<" in b for b in bars[:-1])  # moving, with elapsed<remaining
    evaluate_fpe(model, cfg, sde, shards=shards, batch_size=4, num_times=2, max_samples=7, progress=True)
    bars = _bar_lines(capsys.readouterr().err)
    assert bars[-1].startswith("FPE residual at 2 times") and "| 7/7 img [" in bars[-1]
    compute_ref_stats([f"{tmp_path}/test/test-{i:06d}.tar" for i in range(3)], lambda u8: u8.flatten(1).double(),
                      channels=1, batch_size=4, counts=[5, 2, 4])
    assert "11/11" in _bar_lines(capsys.readouterr().err)[-1]


def test_ode_sampler_bar_has_an_eta(capsys):
    from pipeline.config import load_config
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
    assert main(["train", "--config", TINY_CONFIG, "--run-dir", str(run), "training.n_steps=2",
                 *tiny_overrides, *fast]) == 0
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
