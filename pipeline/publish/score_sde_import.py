"""``fpdiff import score-sde CHECKPOINT --config NAME --out RUN_DIR``: a score_sde_pytorch (or
sony/fp-diffusion) checkpoint -> an fpdiff run directory.

The checkpoint format (score_sde_pytorch ``utils.save_checkpoint``) is a dict with ``model``
(the ``torch.nn.DataParallel`` state dict: every key prefixed ``module.``, and NCSNpp's
``sigmas`` buffer, the ``num_scales`` geometric noise levels from ``sigma_max`` to ``sigma_min``
in float64), ``ema`` (``decay``, ``num_updates``, ``shadow_params``: one tensor per trainable
parameter, in ``model.parameters()`` order), ``optimizer`` and ``step``. NAME is the score_sde
config it was trained with (``vp/cifar10_ddpmpp_continuous``, ...; ``SCORE_SDE_CONFIGS``).

The file is read with ``torch.load(weights_only=True)``: a checkpoint that needs arbitrary
unpickling is refused, nothing from it is executed. Every key is checked (``sigmas`` against the
config's noise levels, every weight by name and shape; the first mismatch is reported in one
line) before anything is written; the run directory appears whole (temp dir, then rename).

Written: ``RUN/config.yaml`` (fpdiff config: model, SDE, data, training as in score_sde),
``RUN/export/`` (``ema.safetensors`` + card: what ``fpdiff sample`` / ``eval`` / ``push`` and
``training.init_from`` read), ``RUN/imported/model.safetensors`` (the raw, non-EMA weights) and
``RUN/imported/optimizer.pt`` (the checkpoint's Adam moments and step, mapped from score_sde's
``model.parameters()`` order to fpdiff's trainable parameters, every shape checked) and
``RUN/imported/import.json`` (source, step, EMA decay and updates). ``training.init_from=RUN``
then continues the checkpoint as FP-Diffusion's fine-tune does (``pipeline.train.init_source``);
a checkpoint without an ``optimizer`` entry imports with a one-line note (the fine-tune then
starts a fresh Adam).
"""
from __future__ import annotations

import copy
import json
import pickle
import sys
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from pipeline.atomic import atomic_directory
from pipeline.cliargs import ArgumentParser
from pipeline.config import ConfigError
from pipeline.config_files import config_from_dict, save_config
from pipeline.data.reader import file_sha256
from pipeline.models import build_model
from pipeline.publish.export import write_export
from pipeline.rundir import MODEL_WEIGHTS, OPTIMIZER, RunDir, check_finite, save_weights
from pipeline.status import fail, note, result


# --------------------------------------------------------------------------- score_sde configs
_CIFAR = {"data": {"dataset": "cifar10", "image_size": 32, "num_channels": 3, "centered": False, "random_flip": True},
          "sde": {"sigma_min": 0.01, "sigma_max": 50.0, "num_scales": 1000},
          "model": {"nf": 128, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 4, "attn_resolutions": [16],
                    "dropout": 0.1, "resblock_type": "biggan", "resamp_with_conv": True, "skip_rescale": True,
                    "fir_kernel": [1, 3, 3, 1], "progressive_combine": "sum", "init_scale": 0.0,
                    "fourier_scale": 16.0, "conv_size": 3, "num_heads": 1},
          "training": {"batch_size": 128, "lr": 2e-4, "warmup": 5000, "grad_clip": 1.0, "reduce_mean": False},
          "sampling": {"method": "pc", "predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16}}
_DDPMPP = {"model": {"embedding_type": "positional", "fir": False, "progressive": "none",
                     "progressive_input": "none", "scale_by_sigma": False},
           "data": {"centered": True}, "training": {"ema_decay": 0.9999, "reduce_mean": True},
           "sampling": {"predictor": "euler_maruyama", "corrector": "none"}}
_NCSNPP_CIFAR = {"sde": {"type": "ve"}, "training": {"ema_decay": 0.999},
                 "model": {"embedding_type": "fourier", "fir": True, "progressive": "none",
                           "progressive_input": "residual", "scale_by_sigma": True}}
# the 256x256 NCSN++ configs (score_sde's default_lsun_configs + model settings)
_HIGHRES = {"data": {"image_size": 256, "num_channels": 3, "centered": False, "random_flip": True},
            "sde": {"type": "ve", "sigma_min": 0.01, "num_scales": 2000},
            "model": {"nf": 128, "ch_mult": [1, 1, 2, 2, 2, 2, 2], "num_res_blocks": 2,
                      "attn_resolutions": [16], "dropout": 0.0, "embedding_type": "fourier", "fir": True,
                      "progressive": "output_skip", "progressive_input": "input_skip", "scale_by_sigma": True},
            "training": {"batch_size": 64, "ema_decay": 0.999}, "sampling": {"snr": 0.075}}
_FFHQ_1024 = {"data": {"dataset": "ffhq", "image_size": 1024},
              "sde": {"sigma_max": 1348.0},
              "model": {"nf": 16, "ch_mult": [1, 2, 4, 8, 16, 32, 32, 32], "num_res_blocks": 1},
              "training": {"batch_size": 8, "ema_decay": 0.9999, "reduce_mean": True}, "sampling": {"snr": 0.15}}


def _merge(*trees: Mapping) -> dict:
    out: dict = {}
    for tree in trees:
        for k, v in tree.items():
            out[k] = _merge(out.get(k, {}), v) if isinstance(v, Mapping) else copy.deepcopy(v)
    return out


def _deep(tree: Mapping) -> dict:
    return _merge(tree, {"model": {"num_res_blocks": 8}})


def _hr(dataset: str, sigma_max: float) -> dict:
    return _merge(_CIFAR, _HIGHRES, {"data": {"dataset": dataset}, "sde": {"sigma_max": sigma_max}})


_VP = _merge(_CIFAR, _DDPMPP, {"sde": {"type": "vp"}})
_SUBVP = _merge(_CIFAR, _DDPMPP, {"sde": {"type": "subvp"}})
_VE = _merge(_CIFAR, _NCSNPP_CIFAR)
SCORE_SDE_CONFIGS: dict[str, dict] = {
    "vp/cifar10_ddpmpp_continuous": _VP,
    "vp/cifar10_ddpmpp_deep_continuous": _deep(_VP),
    "subvp/cifar10_ddpmpp_continuous": _SUBVP,
    "subvp/cifar10_ddpmpp_deep_continuous": _deep(_SUBVP),
    "ve/cifar10_ncsnpp_continuous": _VE,
    "ve/cifar10_ncsnpp_deep_continuous": _deep(_VE),
    "ve/celebahq_256_ncsnpp_continuous": _hr("celebahq", 348.0),
    "ve/ffhq_256_ncsnpp_continuous": _hr("ffhq", 348.0),
    "ve/church_ncsnpp_continuous": _hr("lsun_church", 380.0),
    "ve/bedroom_ncsnpp_continuous": _hr("lsun_bedroom", 378.0),
    "ve/ffhq_ncsnpp_continuous": _merge(_hr("ffhq", 348.0), _FFHQ_1024),
    # the same 1024x1024 network; score_sde sums (not averages) its loss here
    "ve/celebahq_ncsnpp_continuous": _merge(_hr("celebahq", 348.0), _FFHQ_1024,
                                            {"data": {"dataset": "celebahq"}, "training": {"reduce_mean": False}}),
}


class ImportFailure(ValueError):
    """One-line reason a checkpoint cannot be imported (the CLI prints it and exits 2)."""


def fpdiff_config(name: str, overrides: list[str] | None = None):
    """The fpdiff ``Config`` of score_sde config NAME (dotted ``overrides`` applied on top)."""
    if name not in SCORE_SDE_CONFIGS:
        raise ImportFailure(f"--config {name!r}: unknown score_sde config (known: {', '.join(SCORE_SDE_CONFIGS)})")
    tree = _merge(SCORE_SDE_CONFIGS[name], {"name": "score_sde-" + name.replace("/", "-")})
    return config_from_dict(tree, overrides)


def noise_levels(cfg) -> torch.Tensor:
    """score_sde's ``sigmas`` buffer for ``cfg.sde``: exp(linspace(log σ_max, log σ_min, N)), float64."""
    s = cfg.sde
    return torch.from_numpy(np.exp(np.linspace(np.log(s.sigma_max), np.log(s.sigma_min), s.num_scales)))


# --------------------------------------------------------------------------- loading and checking
def load_checkpoint(path: str | Path) -> dict:
    """``torch.load(weights_only=True)`` on CPU; refuses (ImportFailure) anything else."""
    path = Path(path)
    if not path.is_file():
        raise ImportFailure(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln or "GLOBAL" in ln),
                   str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise ImportFailure(f"{path}: refused: it needs arbitrary unpickling, which could run code from the file "
                            f"({why}); nothing from it was executed") from None
    except Exception as e:  # not a torch file, truncated zip, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ImportFailure(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or not {"model", "ema"} <= set(ckpt):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ImportFailure(f"{path}: not a score_sde checkpoint (need 'model' and 'ema' entries, found {keys})")
    return ckpt


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else ()


def _check_sigmas(state: dict, cfg, name: str) -> None:
    want = noise_levels(cfg)
    if "sigmas" not in state:
        raise ImportFailure(f"model: missing key 'module.sigmas' (config {name} expects shape {tuple(want.shape)})")
    got = state.pop("sigmas")
    if _shape(got) != tuple(want.shape):
        raise ImportFailure(f"model: key 'module.sigmas': checkpoint shape {_shape(got)}, "
                            f"config {name} expects {tuple(want.shape)}")
    if not torch.allclose(got.double(), want, rtol=1e-5, atol=0):
        raise ImportFailure(f"model: key 'module.sigmas': noise levels {float(got[0]):g}..{float(got[-1]):g} differ "
                            f"from config {name}'s {float(want[0]):g}..{float(want[-1]):g} (N={len(want)})")


def model_state(ckpt: Mapping, cfg, name: str, reference: Mapping[str, torch.Tensor]) -> dict:
    """Checkpoint ``model`` entry -> fpdiff state dict (strict: every key by name and shape)."""
    raw = ckpt["model"]
    if not isinstance(raw, Mapping):
        raise ImportFailure(f"model: expected a state dict, found {type(raw).__name__}")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in raw.items()}
    _check_sigmas(state, cfg, name)
    for k, ref in reference.items():
        if k not in state:
            raise ImportFailure(f"model: missing key 'module.{k}' (config {name} expects shape {tuple(ref.shape)})")
        if _shape(state[k]) != tuple(ref.shape):
            raise ImportFailure(f"model: key 'module.{k}': checkpoint shape {_shape(state[k])}, "
                                f"config {name} expects {tuple(ref.shape)}")
    extra = [k for k in state if k not in reference]
    if extra:
        raise ImportFailure(f"model: unexpected key 'module.{extra[0]}' (shape {_shape(state[extra[0]])}) "
                            f"for config {name}")
    return {k: state[k].to(ref.dtype) for k, ref in reference.items()}


def ema_state(ckpt: Mapping, name: str, model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> dict:
    """score_sde's EMA (``shadow_params`` over the trainable parameters in order) -> state dict;
    frozen parameters (the Fourier ``W``) keep the model weights' value."""
    ema = ckpt["ema"]
    shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
    if not isinstance(shadow, (list, tuple)):
        raise ImportFailure("ema: expected a dict with 'decay', 'num_updates' and a 'shadow_params' list")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for i, n in enumerate(names):
        if i >= len(shadow):
            raise ImportFailure(f"ema: shadow_params has {len(shadow)} tensors; config {name} expects "
                                f"{len(names)} (first missing: {n}, shape {tuple(weights[n].shape)})")
        if _shape(shadow[i]) != tuple(weights[n].shape):
            raise ImportFailure(f"ema: shadow_params[{i}] ({n}): checkpoint shape {_shape(shadow[i])}, "
                                f"config {name} expects {tuple(weights[n].shape)}")
    if len(shadow) != len(names):
        raise ImportFailure(f"ema: shadow_params has {len(shadow)} tensors; config {name} expects {len(names)}")
    out = dict(weights)
    out.update({n: t.to(weights[n].dtype) for n, t in zip(names, shadow)})
    return out


def optimizer_state(ckpt: Mapping, name: str, model: torch.nn.Module) -> dict | None:
    """score_sde's Adam state (built over ``model.parameters()``, frozen ones included) -> the state
    dict of fpdiff's Adam (over the trainable parameters, same order); None when the checkpoint has
    no ``optimizer`` entry. Every moment's shape is checked against its parameter."""
    opt = ckpt.get("optimizer")
    if opt is None:
        return None
    groups = opt.get("param_groups") if isinstance(opt, Mapping) else None
    if not (isinstance(opt, Mapping) and isinstance(opt.get("state"), Mapping) and isinstance(groups, (list, tuple))
            and len(groups) == 1 and isinstance(groups[0], Mapping)):
        raise ImportFailure("optimizer: expected torch.optim.Adam's state dict with one param group")
    params = dict(model.named_parameters())
    names = list(params)
    trainable = [n for n in names if params[n].requires_grad]
    ids = list(groups[0].get("params", []))
    if len(ids) != len(names):
        raise ImportFailure(f"optimizer: its param group has {len(ids)} parameters; config {name} builds "
                            f"{len(names)} (score_sde's optimizer takes model.parameters())")
    state = {}
    for pos, pid in enumerate(ids):
        st = opt["state"].get(pid)
        if st is None:  # a parameter that never had a gradient (score_sde's frozen Fourier W)
            continue
        n = names[pos]
        if not params[n].requires_grad:
            raise ImportFailure(f"optimizer: state for parameter {pos} ({n}), which config {name} keeps frozen")
        for key in ("exp_avg", "exp_avg_sq"):
            if _shape(st.get(key)) != tuple(params[n].shape):
                raise ImportFailure(f"optimizer: parameter {pos} ({n}) {key}: checkpoint shape {_shape(st.get(key))}, "
                                    f"config {name} expects {tuple(params[n].shape)}")
        step = st.get("step")
        if not isinstance(step, (int, float, torch.Tensor)) or _shape(step) not in ((), (1,)):
            raise ImportFailure(f"optimizer: parameter {pos} ({n}) has no scalar 'step'")
        state[trainable.index(n)] = {"step": torch.tensor(float(step), dtype=torch.float32),
                                     "exp_avg": st["exp_avg"].float(), "exp_avg_sq": st["exp_avg_sq"].float()}
    g = groups[0]
    group = {"lr": float(g.get("lr", 0.0)), "betas": tuple(float(b) for b in g.get("betas", (0.9, 0.999))),
             "eps": float(g.get("eps", 1e-8)), "weight_decay": float(g.get("weight_decay", 0.0)), "amsgrad": False,
             "params": list(range(len(trainable)))}
    return {"state": state, "param_groups": [group]}


def convert(ckpt: Mapping, cfg, name: str) -> tuple[dict, dict, dict | None]:
    """(model weights, EMA weights, Adam state or None) as fpdiff state dicts for ``cfg``;
    ImportFailure on any mismatch."""
    with torch.device("meta"):
        model = build_model(cfg)
    reference = model.state_dict()
    weights = model_state(ckpt, cfg, name, reference)
    return weights, ema_state(ckpt, name, model, weights), optimizer_state(ckpt, name, model)


# --------------------------------------------------------------------------- run directory
def write_run(out: str | Path, cfg, weights: dict, ema: dict, info: dict, optimizer: dict | None = None) -> Path:
    """Write the run directory atomically (staging folder, then one rename)."""
    out = Path(out)
    with atomic_directory(out) as tmp:
        run = RunDir(tmp)
        save_config(cfg, run.config)
        run.imported.mkdir()
        save_weights(run.imported / MODEL_WEIGHTS, weights,
                     metadata={"format": "pt", "producer": "fpdiff import score-sde"})
        if optimizer is not None:
            torch.save({"optimizer": optimizer}, run.imported / OPTIMIZER)
        run.import_record.write_text(json.dumps(info, indent=1))
        write_export(run.export, ema, cfg.to_dict(), metrics={"step": info.get("step"), "imported_from": info["source"]})
    return out


def import_score_sde(checkpoint: str | Path, name: str, out: str | Path, overrides: list[str] | None = None) -> Path:
    """Check everything, then write the run directory; ImportFailure (nothing written) otherwise."""
    out = Path(out)
    if out.exists():
        raise ImportFailure(f"--out {out}: already exists (choose a new run directory)")
    try:
        cfg = fpdiff_config(name, overrides)
    except ConfigError as e:
        raise ImportFailure(f"config error: {e}") from None
    ckpt = load_checkpoint(checkpoint)
    weights, ema, optimizer = convert(ckpt, cfg, name)
    try:  # bytes corrupted inside a tensor's data still unpickle
        check_finite(weights, f"{checkpoint} (model)")
        check_finite(ema, f"{checkpoint} (ema)")
        if optimizer is not None:
            for i, st in optimizer["state"].items():
                check_finite({k: v for k, v in st.items() if k != "step"}, f"{checkpoint} (optimizer, parameter {i})")
    except ConfigError as e:
        raise ImportFailure(str(e)) from None
    e = ckpt["ema"]
    step = ckpt.get("step")
    info = {"source": str(checkpoint), "sha256": file_sha256(Path(checkpoint)), "score_sde_config": name,
            "overrides": list(overrides or []), "step": int(step) if isinstance(step, (int, torch.Tensor)) else None,
            "ema_decay": float(e["decay"]) if "decay" in e else None,
            "ema_num_updates": int(e["num_updates"]) if e.get("num_updates") is not None else None,
            "optimizer": optimizer is not None}
    return write_run(out, cfg, weights, ema, info, optimizer)


def import_main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="fpdiff import", description=(
        "Import a score_sde_pytorch / FP-Diffusion checkpoint (checkpoint_N.pth or checkpoints-meta/checkpoint.pth) "
        "as an fpdiff run directory (EMA + raw weights as safetensors, fpdiff config)."))
    p.add_argument("kind", choices=["score-sde"], help="checkpoint format")
    p.add_argument("checkpoint", help="the .pth file")
    p.add_argument("--config", required=True, metavar="NAME", choices=sorted(SCORE_SDE_CONFIGS),
                   help="score_sde config the checkpoint was trained with: " + ", ".join(sorted(SCORE_SDE_CONFIGS)))
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="new run directory")
    p.add_argument("overrides", nargs="*", help="dotted fpdiff config overrides (e.g. data.shards=...)")
    args = p.parse_intermixed_args(argv)
    try:
        out = import_score_sde(args.checkpoint, args.config, args.out, args.overrides)
    except ImportFailure as e:
        return fail("import", e)
    if not (RunDir(out).imported / OPTIMIZER).is_file():
        note(f"{args.checkpoint} has no optimizer entry; a fine-tune from it starts a fresh Adam")
    result(f"imported {args.checkpoint} ({args.config}) -> {out} (EMA weights in {RunDir(out).export})")
    return 0


if __name__ == "__main__":
    sys.exit(import_main())
