"""The application layer: wires the stages together for the entry points (``fpdiff``, ``python -m
pipeline.train``, ``fpdiff demo``). The trainer reaches evaluation and publishing only through the
hooks built here, so no stage imports another (tests/test_layers.py)."""
from __future__ import annotations

from pathlib import Path

from pipeline.eval.cli import check_eval_inputs, evaluate_in_training
from pipeline.publish.export import write_export
from pipeline.publish.hub import HubPusher, export_folder
from pipeline.train import loop
from pipeline.train.loop import TrainHooks


def training_hooks() -> TrainHooks:
    """In-training evaluation (eval.every), the export at the end of a run, Hub pushes (hub.repo_id)
    and Hub repos as fine-tune sources (training.init_from)."""
    return TrainHooks(check_eval=check_eval_inputs, evaluate=evaluate_in_training, export=write_export,
                      hub_pusher=HubPusher.from_config, hub_export_folder=export_folder)


def train(cfg, run_dir: str | Path, **kwargs) -> int:
    """``pipeline.train.loop.train`` with every stage wired in."""
    return loop.train(cfg, run_dir, hooks=training_hooks(), **kwargs)


def train_main(argv: list[str] | None = None) -> int:
    """``fpdiff train`` / ``python -m pipeline.train``."""
    return loop.main(argv, hooks=training_hooks())
