"""Reading and writing config files: a YAML file (or the defaults) plus dotted command-line
overrides (``training.lr=1e-4``) become a validated ``Config`` (``load_config``,
``load_saved_config``, ``config_from_dict``); ``save_config`` writes one back. Each value is
checked against its field's annotation; unknown keys, wrong types and bad values fail with one
line naming the key path (``ConfigError``), before anything is written. Keys an earlier fpdiff
wrote are handled here (``REMOVED_KEYS``). The schema itself: ``pipeline.config``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pipeline.atomic import atomic_write_text
from pipeline.config import Config, ConfigError, short_repr, type_name
from pipeline.status import note, warn


def _coerce(value: Any, tp, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: must be a finite number, got {value}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # try exact types first so ``Union[int, float]`` keeps ints as ints
        for a in args:
            if a is not type(None) and type(value) is a:
                return value
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {type_name(tp)}, got {type(value).__name__} {short_repr(value)}")
    if origin is Literal:  # its allowed values are checked by Config.validate (check_choices)
        if isinstance(value, bool):  # YAML 1.1 reads a bare `no` / `off` as false
            spelled = [a for a in (("no", "off", "false") if not value else ("yes", "on", "true")) if a in args]
            value = spelled[0] if spelled else value
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {short_repr(value)}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {short_repr(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {short_repr(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {type(value).__name__} {short_repr(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {short_repr(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    raise ConfigError(f"{path}: unsupported annotation {tp}")


# keys an earlier fpdiff wrote into configs and run dirs: a saved config that holds one at the value
# that meant today's behaviour still loads (one line says it is dropped); any other value is refused
# with what replaced it, since silently ignoring it would change what the run does
REMOVED_KEYS = {  # key: (the values that meant today's behaviour, why it went)
    "training.init_ema_updates": ((0,), "superseded by training.init_fresh: a fine-tune continues its source's "
                                        "EMA warm-up position unless training.init_fresh lists ema"),
    "model.name": (("ddpmpp", "ncsnpp"), "a label that chose nothing: DDPM++ and NCSN++ are configurations of one "
                                         "network, set by the other model keys"),
}


def _removed_key(key_path: str, value: Any) -> None:
    neutral, why = REMOVED_KEYS[key_path]
    if value not in neutral or isinstance(value, bool):
        raise ConfigError(f"{key_path}: removed ({why}); it was {short_repr(value)}, delete the key")
    note(f"{key_path}: removed key dropped ({why})")


def _build(cls, data: Any, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{short_repr(key)}" if path else short_repr(key)
        if key not in names and key_path in REMOVED_KEYS:
            _removed_key(key_path, value)
            continue
        if key not in names:
            raise ConfigError(f"{key_path}: unknown key (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], key_path)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """``["training.lr=1e-4", "fpe.enabled=false"]`` -> typed (key, value) pairs (YAML scalars)."""
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{item}: override must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        # YAML reads 1e-4 as a string (needs a dot); accept it as a number
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else value
            except ValueError:
                pass
        out.append((key.strip(), value))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                trusted: bool | None = None) -> Config:
    """Load a YAML config (or the defaults), apply dotted overrides, validate.

    A config file that came out of fpdiff (``provenance: export``, or ``looks_saved``: in an
    export, a run dir, the Hub cache) gets the saved-config rules unless ``trusted``; a
    ``hub.endpoint`` read from any file is dropped (the Hub token goes only to an endpoint from
    the environment, HF_ENDPOINT, or the command line)."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({short_repr(str(e).splitlines()[0])})") from None
        if tree is None:  # an empty file would silently train the CIFAR-10 defaults
            raise ConfigError(f"{p}: empty config file")
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    given = parse_overrides(overrides)
    for key, value in given:
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    cfg.validate()
    overridden = {key for key, _ in given}
    from pipeline.saved_config import EXPORT_PROVENANCE, apply_saved_config_rules, looks_saved  # deferred: it imports pipeline.rundir, which imports this module

    if path is not None and not trusted and (cfg.provenance == EXPORT_PROVENANCE or looks_saved(path)):
        apply_saved_config_rules(cfg, path, overridden, keep_local_paths=cfg.provenance != EXPORT_PROVENANCE)
    if path is not None and cfg.hub.endpoint and "hub.endpoint" not in overridden:
        warn(f"{p}: hub.endpoint is not read from a file (the Hub token goes only to an "
             f"endpoint from HF_ENDPOINT or the command line: hub.endpoint=URL)")
        cfg.hub.endpoint = ""
    return cfg


def load_saved_config(path: str | Path, overrides: list[str] | None = None, *,
                      keep_local_paths: bool | None = None) -> Config:
    """``load_config`` for the config.yaml of a run dir or an export: ``apply_saved_config_rules``
    (keys given again as ``overrides`` are kept). A run dir's own config keeps its local paths
    unless it is marked as exported (``provenance: export``)."""
    from pipeline.saved_config import EXPORT_PROVENANCE, apply_saved_config_rules  # deferred: it imports pipeline.rundir, which imports this module

    cfg = load_config(path, overrides, trusted=True)
    if keep_local_paths is None:
        keep_local_paths = cfg.provenance != EXPORT_PROVENANCE
    return apply_saved_config_rules(cfg, path, {key for key, _ in parse_overrides(overrides)},
                                    keep_local_paths=keep_local_paths)


def config_from_dict(tree: dict, overrides: list[str] | None = None) -> Config:
    """A validated Config from a nested dict, dotted ``overrides`` applied on top."""
    tree = copy.deepcopy(tree)
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    cfg.validate()
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


REPO_ROOT = Path(__file__).resolve().parents[1]
# the shipped configs: inside an installed package (setup.py copies configs/ to pipeline/configs),
# else the source checkout's top-level configs/ (an editable install runs from the checkout)
_PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = _PACKAGED_CONFIGS if _PACKAGED_CONFIGS.is_dir() else REPO_ROOT / "configs"
