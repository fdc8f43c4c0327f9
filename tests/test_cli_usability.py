"""What a newcomer meets at the command line (issue 27): commands that need test data say so in
one line when a run has none (never reading the training shards instead), and write nothing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


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
