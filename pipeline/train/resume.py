"""Which config a (resumed) training run uses (``fpdiff train``'s command line, before ``train``).

A fresh run: ``--config FILE`` plus dotted overrides. A resumed one (``--resume``) continues the
run's own ``RUN/config.yaml`` -- the config it was started with, its overrides applied -- so
``fpdiff train --run-dir RUN --resume auto training.n_steps=62`` needs no ``--config``; a
``--config`` given again (Slurm requeues do) is read as before. Every key that differs from the
run's is printed, and a change that breaks exact resume (the data a step sees, the batch split, the
random streams, the network) is refused in one line unless ``--force``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pipeline.collectives import is_main_rank
from pipeline.config import Config, ConfigError
from pipeline.config_files import load_config, load_saved_config
from pipeline.rundir import RunDir
from pipeline.status import say

# a different value here makes the resumed steps differ from the uninterrupted run's (data order
# and position, micro-batch split, seeds) or the checkpoint unloadable (network, SDE)
EXACT_RESUME_KEYS = ("training.batch_size", "training.grad_accum", "training.seed", "training.t_sampling",
                     "data.shards", "data.index", "data.image_size", "data.num_channels", "data.centered",
                     "data.random_flip", "data.uniform_dequantization", "data.shuffle_buffer", "data.resampled",
                     "model.", "sde.")


def flat(tree: dict, prefix: str = "") -> dict:
    """{"training.lr": 1e-4, ...} of a nested config dict."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(before: Config, after: Config) -> list[tuple[str, object, object]]:
    """(key, run's value, new value) of every key that differs."""
    a, b = flat(before.to_dict()), flat(after.to_dict())
    return [(k, a[k], b[k]) for k in a if a[k] != b.get(k)]


def breaks_exact_resume(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in EXACT_RESUME_KEYS)


def training_config(config: Optional[str], run_dir: Optional[str], resume: Optional[str], overrides: list[str],
                    force: bool = False) -> tuple[Config, Path]:
    """(config, run dir) of ``fpdiff train``; see the module docstring."""
    if config is None and not resume:
        raise ConfigError("--config: required for a new run (a resumed one, --resume, reads RUN/config.yaml)")
    if config is None and run_dir is None:
        raise ConfigError("--resume without --config: name the run with --run-dir")
    if run_dir is None:  # the run dir named by the config file
        cfg = load_config(config, overrides)
        run_dir = cfg.run_dir or f"runs/{cfg.name}"
    saved = RunDir(run_dir).config
    if not resume or not saved.is_file():
        if config is None:
            raise ConfigError(f"--resume: {saved} not found (no run to continue there); pass --config for a new run")
        return load_config(config, overrides), Path(run_dir)
    run_cfg = load_config(saved)  # only compared with: its pipe: URLs are not run from here
    cfg = load_config(config, overrides) if config else load_saved_config(saved, overrides)
    changes = config_changes(run_cfg, cfg)
    refused = [c for c in changes if breaks_exact_resume(c[0])]
    if refused and not force:
        key, old, new = refused[0]
        raise ConfigError(f"{key}: {old!r} in {saved}, {new!r} now; a resumed run with another {key} does not "
                          f"continue the same run (give the run's value, train into a new --run-dir, or pass --force)")
    if is_main_rank():
        for key, old, new in changes:
            say(f"resume: {key} {old!r} -> {new!r}" + (" (forced)" if breaks_exact_resume(key) else ""))
    return cfg, Path(run_dir)
