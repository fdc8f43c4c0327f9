"""The export folder of a run: what is pushed to the Hub and what ``load_pretrained`` reads.

Layout written by ``write_export`` (the trainer writes it to ``RUN/export/``; names in
``pipeline.rundir``)::

    RUN/export/
        ema.safetensors   EMA weights of the score network (what sampling/evaluation use)
        config.yaml       the experiment config (``pipeline.config`` schema) without where things lived
                          (``exported_config``: no data locations, paths, Hub endpoint; marked
                          ``provenance: export``, so every command reading it distrusts it)
        metrics.json      metrics so far, including ``step``
        README.md         generated model card: what the model is, SDE, data, metrics, how to load

The folder is replaced atomically (``pipeline.atomic.atomic_directory``), so a reader or an
upload in progress never sees a half-written export. Uploading and loading back are
``pipeline.publish.hub``'s job.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import yaml

from pipeline.atomic import atomic_directory, plain_json
from pipeline.config import ConfigError
from pipeline.rundir import CONFIG, EMA_WEIGHTS, EXPORT_METRICS, MODEL_CARD, save_weights, write_error_text, write_errors
from pipeline.saved_config import exported_config


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
    net = (f"NCSN++ / DDPM++ UNet ({model.get('embedding_type')} time embedding, {model.get('resblock_type')} "
           f"blocks), nf={model.get('nf')}, ch_mult={model.get('ch_mult')}, "
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

- `{EMA_WEIGHTS}`: EMA weights (safetensors)
- `{CONFIG}`: the full training configuration
- `{EXPORT_METRICS}`: the metrics above, as JSON

## How to load

```python
from pipeline.publish.hub import load_pretrained

model, cfg = load_pretrained("{load_id}")  # or a local export folder
```

`model(x, labels)` takes labels sigma(t) for the VE SDE and 999*t for VP / sub-VP;
`pipeline.score.get_score_fn(model, pipeline.sde.build_sde(cfg.sde))` gives the score function
and `fpdiff sample` draws images from it.
"""


def write_export(export_dir: str | Path, ema_state_dict: Mapping, config_dict: Mapping,
                 metrics: Mapping | None = None, repo_id: str | None = None,
                 images: Mapping[str, str | Path] | None = None) -> Path:
    """Write the export folder (layout in the module docstring) atomically; returns its path.

    ``metrics`` should hold ``step``; ``repo_id`` only changes the load example in the card
    (default: ``config_dict["hub"]["repo_id"]``); ``images`` ({"samples.png": path}) are copied
    into the folder and shown in the card (missing files are skipped).
    """
    export_dir = Path(export_dir)
    metrics = plain_json(dict(metrics or {}))
    config_dict = plain_json(dict(config_dict))
    if repo_id is None:
        repo_id = ((config_dict.get("hub") or {}).get("repo_id") or None)
    config_dict = exported_config(config_dict)  # no data locations, shell commands, paths, Hub endpoint
    try:
        _write_export_files(export_dir, ema_state_dict, config_dict, metrics, repo_id, images)
    except write_errors() as e:  # a full disk: the export folder is left as it was
        raise ConfigError(f"{export_dir}: export not written ({write_error_text(e)})") from None
    return export_dir


def _write_export_files(export_dir: Path, ema_state_dict, config_dict: dict, metrics: dict, repo_id, images) -> None:
    with atomic_directory(export_dir) as tmp:
        meta = {"format": "pt", "producer": "fpdiff"}
        if metrics.get("step") is not None:
            meta["step"] = str(metrics["step"])
        save_weights(tmp / EMA_WEIGHTS, ema_state_dict, metadata=meta)
        (tmp / CONFIG).write_text(yaml.safe_dump(config_dict, sort_keys=False))
        (tmp / EXPORT_METRICS).write_text(json.dumps(metrics, indent=1))
        shown = []
        for name, src in (images or {}).items():
            if Path(src).is_file():
                shutil.copyfile(src, tmp / name)
                shown.append(name)
        (tmp / MODEL_CARD).write_text(model_card(config_dict, metrics, repo_id, shown))
