"""Saved configs: a config.yaml that came out of fpdiff (an export, a run dir, the Hub) is not
trusted. ``apply_saved_config_rules`` takes nothing from it that says where things live (no shell
command, no URL, no Hub endpoint or repo, no local path); ``exported_config`` is what an export's
config.yaml holds (those keys dropped, marked ``provenance: export``); ``looks_saved`` tells such a
file by where it lies. ``pipeline.config_files.load_config`` / ``load_saved_config`` apply them."""
from __future__ import annotations

import copy
import re
import typing
from pathlib import Path

from pipeline.config import Config, short_repr
from pipeline.rundir import CHECKPOINTS_DIR, EMA_WEIGHTS, EXPORT_DIR, METRICS_LOG
from pipeline.status import warn

# keys that say where things live on a machine (data, weights, feature extractors, the Hub, wandb):
# a saved config (an export, a run dir, a Hub download) may not choose them, and an export drops them
LOCATION_KEYS = ("data.shards", "data.test_shards", "data.index", "training.init_from", "eval.feature_extractor",
                 "eval.ref_stats", "hub.repo_id", "hub.endpoint", "logging.entity", "run_dir")
# of those, the ones a run dir's own config may keep when they name local files (its data, its
# feature extractor): the trainer on this machine wrote them there
RUN_LOCAL_KEYS = ("data.shards", "data.test_shards", "data.index", "training.init_from", "eval.feature_extractor",
                  "eval.ref_stats")
EXPORT_PROVENANCE = "export"


def _get(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _set(cfg: Config, key: str, value) -> None:
    *parents, name = key.split(".")
    node = cfg
    for part in parents:
        node = getattr(node, part)
    setattr(node, name, value)


def _is_local_path(value: str) -> bool:
    """A plain path (no ``pipe:`` shell command, no ``scheme://`` URL of any part of a ``::`` list)."""
    return not any(part.strip().startswith("pipe:") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", part.strip())
                   and not part.strip().startswith("file://") for part in value.split("::"))


def apply_saved_config_rules(cfg: Config, origin: str | Path, overridden: typing.Iterable[str] = (), *,
                             keep_local_paths: bool = False) -> Config:
    """The saved-config rules for a config.yaml out of an export, a run dir or the Hub (which may
    have been downloaded): no shell command, no network fetch, no Hub endpoint or repo, no local
    path is taken from it. Each ``LOCATION_KEYS`` value it sets is blanked, with one line on
    stderr naming it, unless the person typing the command gave that key (``overridden``).
    ``keep_local_paths``: a run dir's own config keeps its local data / feature-extractor paths
    (``RUN_LOCAL_KEYS``), never a ``pipe:`` command or a URL."""
    overridden = set(overridden)
    for key in LOCATION_KEYS:
        value = _get(cfg, key)
        if key in overridden or not value:
            continue
        if keep_local_paths and key in RUN_LOCAL_KEYS and _is_local_path(value):
            continue
        _set(cfg, key, "")
        what = "a pipe: URL (a shell command)" if "pipe:" in value else \
            "a URL" if not _is_local_path(value) else "a location on the machine that wrote it"
        warn(f"{short_repr(origin)}: {key} is {what}, not taken from a saved config; give it on the command line")
    cfg.provenance = "user"  # what is left describes the model and its training
    return cfg


def looks_saved(path: str | Path) -> bool:
    """Whether a config file came out of fpdiff rather than from the user: beside weights (an
    export, a checkpoint), in a run dir (``checkpoints/``, ``export/`` beside it) or in the
    Hugging Face cache (``models--*``)."""
    p = Path(path).resolve()
    folder = p.parent
    if any((folder / name).exists() for name in (EMA_WEIGHTS, CHECKPOINTS_DIR, EXPORT_DIR, METRICS_LOG)):
        return True
    return any(part.startswith("models--") for part in p.parts)


def exported_config(cfg_dict: dict) -> dict:
    """The config.yaml of an export: the model and how it was trained, not where the data, the
    weights or the Hub lived on the machine that trained it (``LOCATION_KEYS`` blanked), and
    marked ``provenance: export`` so that every command reading it applies the saved-config rules."""
    out = copy.deepcopy(dict(cfg_dict))
    for key in LOCATION_KEYS:
        node = out
        *parents, name = key.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and name in node:
            node[name] = ""
    out["provenance"] = EXPORT_PROVENANCE
    return out
