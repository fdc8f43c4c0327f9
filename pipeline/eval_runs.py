"""Loading a trained model for evaluation: a run dir (newest checkpoint, else export/), its
export/ folder or a checkpoints/step_XXXXXXXX folder -> (EMA model, Config, step)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def _find_step(folder: Path) -> Optional[int]:
    for name in ("state.json", "metrics.json", "metadata.json", "export.json"):
        f = folder / name
        if f.is_file():
            try:
                d = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            for key in ("step", "checkpoint_step", "steps"):
                if isinstance(d.get(key), int):
                    return d[key]
            if isinstance(d.get("metrics"), dict) and isinstance(d["metrics"].get("step"), int):
                return d["metrics"]["step"]
    if folder.name.startswith("step_") and folder.name[5:].isdigit():
        return int(folder.name[5:])
    return None


def _run_of_export(export: Path) -> Optional[Path]:
    """The run dir an export folder belongs to (``RUN/export``), or None for one on its own (a Hub
    download in a cache, a copied folder): results must not land in the folder above those."""
    run = export.parent
    if export.name == "export" and ((run / "config.yaml").is_file() or (run / "checkpoints").is_dir()):
        return run
    return None


def resolve_eval_source(path: str | Path) -> tuple[Path, Path, Optional[Path]]:
    """(weights file, config.yaml, run dir or None) for a run dir, its export/, an export folder
    on its own (run dir None) or a checkpoint dir.

    A run dir resolves to its newest complete checkpoint, else its export/ folder.
    """
    from .checkpoint import latest_checkpoint

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no run, export or checkpoint at {p}")
    if p.is_file() and p.suffix == ".safetensors":
        p = p.parent
    if (p / "ema.safetensors").is_file():
        if (p / "config.yaml").is_file():  # an export folder
            return p / "ema.safetensors", p / "config.yaml", _run_of_export(p)
        if p.parent.name == "checkpoints" and (p.parents[1] / "config.yaml").is_file():
            return p / "ema.safetensors", p.parents[1] / "config.yaml", p.parents[1]
        raise FileNotFoundError(f"{p}: EMA weights found but no config.yaml beside them or in the run dir")
    ckpt = latest_checkpoint(p)
    if ckpt is not None and (ckpt / "ema.safetensors").is_file() and (p / "config.yaml").is_file():
        return ckpt / "ema.safetensors", p / "config.yaml", p
    if (p / "export" / "ema.safetensors").is_file():
        return p / "export" / "ema.safetensors", p / "export" / "config.yaml", p
    raise FileNotFoundError(f"{p}: no checkpoints/step_*/ema.safetensors (with config.yaml) and no export/ema.safetensors")


def load_for_eval(path: str | Path, device="cpu", overrides: Optional[list[str]] = None):
    """(EMA model in eval mode on ``device``, Config, step or None) from a run dir, its
    export/ folder or a checkpoints/step_XXXXXXXX folder. ``overrides``: dotted config
    overrides applied to the run's saved config."""
    from safetensors.torch import load_file

    from .config import load_saved_config
    from .models import build_model

    weights, cfg_path, _ = resolve_eval_source(path)
    cfg = load_saved_config(cfg_path, overrides)
    from .hub import load_state_into

    model = build_model(cfg)
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as e:  # noqa: BLE001 - truncated or not a safetensors file
        from .config import ConfigError
        raise ConfigError(f"{weights}: unreadable weights file ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:200]})") from None
    load_state_into(model, state, source=str(weights))
    model.to(device).eval().requires_grad_(False)
    return model, cfg, _find_step(weights.parent)
