"""The export folder of a run and loading a model back from it (or from a Hub repo).

Layout written by ``write_export`` (the trainer writes it to ``RUN_DIR/export/``)::

    RUN_DIR/export/
        ema.safetensors   EMA weights of the score network (what sampling/evaluation use)
        config.yaml       the full experiment config (``pipeline.config`` schema)
        metrics.json      metrics so far, including ``step``
        README.md         generated model card: what the model is, SDE, data, metrics, how to load

The folder is replaced atomically (written to a temporary sibling, then renamed), so a reader
or an upload in progress never sees a half-written export. ``load_pretrained("user/name" or a
folder)`` returns ``(model, cfg)``; uploading is ``pipeline.hub``'s job.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

from .tracking import plain_json

EXPORT_SUBDIR = "export"
WEIGHTS_NAME = "ema.safetensors"
CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.json"
CARD_NAME = "README.md"
EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME, METRICS_NAME, CARD_NAME)
_STRIP_PREFIXES = ("module.", "_orig_mod.")


# ============================================================================ export
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _sde_line(sde: Mapping) -> str:
    kind = sde.get("type", "?")
    if kind == "ve":
        return (f"VE SDE (variance exploding), sigma_min={sde.get('sigma_min')}, "
                f"sigma_max={sde.get('sigma_max')}, N={sde.get('num_scales')}")
    name = {"vp": "VP SDE (variance preserving)", "subvp": "sub-VP SDE"}.get(kind, f"{kind} SDE")
    return f"{name}, beta_min={sde.get('beta_min')}, beta_max={sde.get('beta_max')}, N={sde.get('num_scales')}"


def model_card(config_dict: Mapping, metrics: Mapping, repo_id: str | None = None,
               images: list[str] | tuple = ()) -> str:
    """The README.md of an export: YAML metadata, description, metrics so far, how to load."""
    model = config_dict.get("model", {}) or {}
    data = config_dict.get("data", {}) or {}
    fpe = config_dict.get("fpe", {}) or {}
    training = config_dict.get("training", {}) or {}
    step = metrics.get("step")
    name = config_dict.get("name", "run")
    load_id = repo_id or "user/repo"
    fpe_line = (f"trained with the score Fokker-Planck regularizer (FP-Diffusion), alpha={fpe.get('alpha')}, "
                f"m={fpe.get('m')}, weighting={fpe.get('weighting')}"
                if fpe.get("enabled") else "trained with denoising score matching only (FPE regularizer off)")
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in metrics.items()
                     if not isinstance(v, (dict, list)))
    net = (f"{model.get('name', '?')} UNet, nf={model.get('nf')}, ch_mult={model.get('ch_mult')}, "
           f"num_res_blocks={model.get('num_res_blocks')}, attention at {model.get('attn_resolutions')}")
    return f"""---
library_name: fpdiff
tags:
- diffusion
- score-based-generative-modeling
- fokker-planck
- unconditional-image-generation
---

# {name}: score-based diffusion model (fpdiff)

Score network of a score-based diffusion model, {fpe_line}.
The weights are the exponential moving average (decay {training.get('ema_decay')}) of the training
weights, which is what sampling and evaluation use.

- **Network**: {net}
- **SDE**: {_sde_line(config_dict.get('sde', {}) or {})}
- **Data**: {data.get('dataset', '?')}, {data.get('image_size')}x{data.get('image_size')}, \
{data.get('num_channels')} channels, {'centered to [-1, 1]' if data.get('centered') else 'scaled to [0, 1]'}
- **Training step**: {step if step is not None else 'unknown'} of {training.get('n_steps', '?')}
  (global batch {training.get('batch_size')}, lr {training.get('lr')})

## Metrics so far

| metric | value |
|---|---|
{rows or '| (none yet) | |'}

{"".join(f"![{Path(n).stem}]({n})" + chr(10) + chr(10) for n in images)}## Files

- `{WEIGHTS_NAME}`: EMA weights (safetensors)
- `{CONFIG_NAME}`: the full training configuration
- `{METRICS_NAME}`: the metrics above, as JSON

## How to load

```python
from pipeline.hub import load_pretrained

model, cfg = load_pretrained("{load_id}")  # or a local export folder
```

`model(x, labels)` takes labels sigma(t) for the VE SDE and 999*t for VP / sub-VP;
`pipeline.score.get_score_fn(model, pipeline.sde.build_sde(cfg.sde))` gives the score function
and `fpdiff sample` draws images from it.
"""


def _cpu_tensors(state_dict: Mapping) -> dict:
    import torch

    out = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            continue
        # clone: safetensors refuses tensors that share storage
        out[str(k)] = v.detach().to("cpu").contiguous().clone()
    return out


@contextlib.contextmanager
def atomic_directory(dest: str | Path):
    """Yield a fresh staging folder beside ``dest``; on success it replaces ``dest`` whole (an
    old ``dest`` is moved aside first, then deleted), on any error it is removed and ``dest`` is
    left as it was."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_export(export_dir: str | Path, ema_state_dict: Mapping, config_dict: Mapping,
                 metrics: Mapping | None = None, repo_id: str | None = None,
                 images: Mapping[str, str | Path] | None = None) -> Path:
    """Write the export folder (layout in the module docstring) atomically; returns its path.

    ``metrics`` should hold ``step``; ``repo_id`` only changes the load example in the card
    (default: ``config_dict["hub"]["repo_id"]``); ``images`` ({"samples.png": path}) are copied
    into the folder and shown in the card (missing files are skipped).
    """
    from safetensors.torch import save_file

    export_dir = Path(export_dir)
    metrics = plain_json(dict(metrics or {}))
    config_dict = plain_json(dict(config_dict))
    if repo_id is None:
        repo_id = ((config_dict.get("hub") or {}).get("repo_id") or None)
    with atomic_directory(export_dir) as tmp:
        meta = {"format": "pt", "producer": "fpdiff"}
        if metrics.get("step") is not None:
            meta["step"] = str(metrics["step"])
        save_file(_cpu_tensors(ema_state_dict), str(tmp / WEIGHTS_NAME), metadata=meta)
        (tmp / CONFIG_NAME).write_text(yaml.safe_dump(config_dict, sort_keys=False))
        (tmp / METRICS_NAME).write_text(json.dumps(metrics, indent=1))
        shown = []
        for name, src in (images or {}).items():
            if Path(src).is_file():
                shutil.copyfile(src, tmp / name)
                shown.append(name)
        (tmp / CARD_NAME).write_text(model_card(config_dict, metrics, repo_id, shown))
    return export_dir


def find_export(run_dir: str | Path) -> Path | None:
    """``RUN_DIR/export`` or ``RUN_DIR`` itself when it holds ``ema.safetensors`` + ``config.yaml``."""
    run_dir = Path(run_dir)
    for cand in (run_dir / EXPORT_SUBDIR, run_dir):
        if (cand / WEIGHTS_NAME).is_file() and (cand / CONFIG_NAME).is_file():
            return cand
    return None


# ============================================================================ loading
def _resolve_folder(path_or_repo_id: str | Path, *, revision: str | None = None, token: str | None = None,
                    endpoint: str | None = None, cache_dir: str | None = None) -> Path:
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir():
        return find_export(p) or p
    if p.exists() or str(path_or_repo_id).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path_or_repo_id}: not an export folder (need {WEIGHTS_NAME} and {CONFIG_NAME})")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(str(path_or_repo_id), revision=revision, token=token, endpoint=endpoint,
                                  cache_dir=cache_dir, allow_patterns=list(EXPORT_FILES))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise FileNotFoundError(f"{path_or_repo_id}: not a local folder, and loading it as a Hub repo id failed "
                                f"({type(e).__name__}: {first})") from e
    return Path(local)


def _clean_keys(state: Mapping) -> dict:
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for pre in _STRIP_PREFIXES:
                if k.startswith(pre):
                    k, changed = k[len(pre):], True
        out[k] = v
    return out


def load_state_into(model, state: Mapping, *, source: str = "weights") -> None:
    """``model.load_state_dict`` (strict) after stripping ``module.`` / ``_orig_mod.`` prefixes,
    with a one-line error naming the first missing / unexpected keys."""
    state = _clean_keys(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the model built from its config "
                         f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, "
                         f"e.g. {unexpected[:3]})")
    model.load_state_dict(state, strict=True)


def load_pretrained(path_or_repo_id: str | Path, device: str = "cpu", *, revision: str | None = None,
                    token: str | None = None, endpoint: str | None = None, cache_dir: str | None = None):
    """Load ``(model, cfg)`` from an export folder, a run dir holding ``export/``, or a Hub repo id.

    The model is built with ``pipeline.models.build_model(cfg)``, loaded with the EMA weights and
    put in eval mode on ``device``.
    """
    from safetensors.torch import load_file

    from .config import config_from_dict, strip_shell_urls
    from .models import build_model

    folder = _resolve_folder(path_or_repo_id, revision=revision, token=token, endpoint=endpoint,
                             cache_dir=cache_dir)
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for f in (cfg_path, w_path):
        if not f.is_file():
            raise FileNotFoundError(f"{path_or_repo_id}: missing {f.name}")
    cfg = strip_shell_urls(config_from_dict(yaml.safe_load(cfg_path.read_text()) or {}), cfg_path)
    model = build_model(cfg)
    load_state_into(model, load_file(str(w_path), device="cpu"), source=str(path_or_repo_id))
    return model.to(device).eval(), cfg


def load_weights_into(model, source: str | Path, *, token: str | None = None,
                      endpoint: str | None = None) -> Path:
    """Initialise ``model`` from EMA weights (``training.init_from``): a ``.safetensors`` file, an
    export folder, a checkpoint folder (``checkpoints/step_*``), a run dir (its ``export/`` or
    newest checkpoint), or a Hub repo id. Returns the weights file used."""
    from safetensors.torch import load_file

    p = Path(source).expanduser()
    if p.is_file():
        w = p
    elif p.is_dir():
        w = None
        exp = find_export(p)
        if exp is not None:
            w = exp / WEIGHTS_NAME
        elif (p / WEIGHTS_NAME).is_file():
            w = p / WEIGHTS_NAME
        else:
            from .checkpoint import latest_checkpoint

            ck = latest_checkpoint(p)
            if ck is not None and (ck / WEIGHTS_NAME).is_file():
                w = ck / WEIGHTS_NAME
        if w is None:
            raise FileNotFoundError(f"training.init_from: no {WEIGHTS_NAME} in {p} (nor its export/ or checkpoints/)")
    else:
        w = _resolve_folder(str(source), token=token, endpoint=endpoint) / WEIGHTS_NAME
    load_state_into(model, load_file(str(w), device="cpu"), source=str(source))
    return w
