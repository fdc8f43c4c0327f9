"""``fpdiff config show [--config FILE] [KEY]``: every config key with its value, type and meaning.

A key's meaning is the comment beside (or the comment lines above) its field in
``pipeline/config.py``, else the line in ``MEANINGS`` below (``tests/test_cli_usability.py`` checks
that every key has one).
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from typing import Optional

from pipeline.cliargs import ArgumentParser, nearest
from pipeline.config import Config, ConfigError, type_name
from pipeline.config_files import load_config, load_saved_config
from pipeline.rundir import CONFIG
from pipeline.status import fail

MEANINGS = {
    "name": "experiment name (the default run dir is runs/<name>)",
    "run_dir": "output directory (default runs/<name>; --run-dir overrides it)",
    "model.ch_mult": "channel multiplier of each resolution level (its length: the number of levels)",
    "model.num_res_blocks": "residual blocks per resolution level",
    "model.attn_resolutions": "resolutions (in pixels) with a self-attention block",
    "model.dropout": "dropout rate in the residual blocks",
    "model.fourier_scale": "scale of the Gaussian Fourier time embedding (embedding_type fourier)",
    "model.resblock_type": "residual block: biggan (up/down-sampling inside) or ddpm",
    "model.resamp_with_conv": "up/down-sample with a convolution (else pooling / nearest)",
    "model.skip_rescale": "scale skip sums by 1/sqrt(2)",
    "model.fir": "FIR-filtered up/down-sampling (StyleGAN2's)",
    "model.fir_kernel": "the FIR filter taps",
    "model.progressive": "output path: none, output_skip or residual (score_sde's progressive growing)",
    "model.progressive_input": "input path: none, input_skip or residual",
    "model.progressive_combine": "how the progressive input joins: sum or cat",
    "model.init_scale": "scale of the last convolutions' initialisation (0: zero-initialised)",
    "sde.type": "forward SDE: vp, subvp or ve",
    "sde.beta_min": "VP / sub-VP: beta(0)",
    "sde.beta_max": "VP / sub-VP: beta(1)",
    "sde.sigma_min": "VE: smallest noise level",
    "sde.sigma_max": "VE: largest noise level",
    "data.dataset": "dataset name (recorded; the data come from data.shards)",
    "data.shards": "training shards: brace pattern, folder, index .json, file:// or pipe: URL; several joined by ::",
    "data.test_shards": "test shards (bits/dim, FPE residual, inpainting, the classifier's accuracy); same syntax",
    "data.image_size": "image height and width in pixels (the shards must match)",
    "data.num_channels": "image channels: 1, 3 or 4 (the shards must match)",
    "data.random_flip": "random horizontal flips in training",
    "data.uniform_dequantization": "add uniform noise to the 8-bit training pixels",
    "data.num_workers": "DataLoader worker processes per rank (0: read in the training process)",
    "data.shuffle_buffer": "samples in the seeded shuffle buffer",
    "data.resampled": "draw shards with replacement (webdataset's resampled mode) instead of exact epochs",
    "training.n_steps": "optimizer steps of the whole run",
    "training.lr": "Adam learning rate (after the warm-up)",
    "training.warmup": "steps of linear learning-rate warm-up",
    "training.weight_decay": "Adam weight decay",
    "training.adam_beta1": "Adam beta1",
    "training.adam_beta2": "Adam beta2",
    "training.adam_eps": "Adam epsilon",
    "training.ema_decay": "decay of the EMA of the weights (what sampling and evaluation use)",
    "training.seed": "seed of the initial weights, the data order and every step's randomness",
    "training.likelihood_weighting": "DSM weight lambda(t) = g(t)^2 (else sigma(t)^2)",
    "training.reduce_mean": "DSM loss averaged over pixels (else summed)",
    "training.grad_accum": "micro-batches per optimizer step (batch_size is split over processes x grad_accum)",
    "training.mixed_precision": "autocast of the DSM term: no, bf16 or fp16 (the FPE term stays fp32)",
    "training.compile_backend": "torch.compile backend (training.compile)",
    "training.log_every": "steps between metric lines (metrics.jsonl, wandb)",
    "training.ckpt_every": "steps between checkpoints",
    "training.keep_last": "checkpoints kept (the newest)",
    "fpe.enabled": "add the score-FPE regularizer to the DSM loss",
    "fpe.weighting": "weight of the residual over t: constant, convention (sigma^2) or likelihood (g^2)",
    "fpe.points": "where the residual is taken: perturbed (the batch's x_t), clean x_0, or uniform noise",
    "fpe.t_min": "smallest t of the regularizer (and of eval fpe's t-grid)",
    "fpe.t_max": "largest t of the regularizer (and of eval fpe's t-grid)",
    "fpe.dt_method": "d/dt of the score: jvp (exact forward mode), fd3 or central finite differences",
    "fpe.fd_step": "step of the finite differences (dt_method fd3 / central)",
    "fpe.probe": "Hutchinson probe distribution: rademacher or gaussian",
    "fpe.norm_estimator": "estimate of the squared residual norm: unbiased (two probes) or single (biased up)",
    "fpe.fused": "fused custom-autograd derivatives (pipeline/fused.py)",
    "sampling.method": "sampler: pc (predictor-corrector) or ode (probability flow, adaptive RK45)",
    "sampling.predictor": "PC predictor: euler_maruyama, reverse_diffusion, ancestral or none",
    "sampling.corrector": "PC corrector: langevin, ald or none",
    "sampling.snr": "corrector signal-to-noise ratio",
    "sampling.n_steps_each": "corrector steps per predictor step",
    "sampling.noise_removal": "the last step denoises x (one score evaluation, no noise)",
    "sampling.num_samples": "samples drawn at the end of training (and fpdiff sample's default)",
    "sampling.batch_size": "samples per sampler batch",
    "sampling.rtol": "ODE sampler relative tolerance",
    "sampling.atol": "ODE sampler absolute tolerance",
    "eval.fid_num_samples": "samples of the FID during training (eval fid --num-samples default)",
    "eval.batch_size": "images per evaluation batch",
    "eval.bpd_num_batches": "test batches per rank of the bits/dim during training",
    "eval.bpd_passes": "passes of eval bpd with fresh dequantisation noise and probes",
    "eval.rtol": "likelihood ODE relative tolerance",
    "eval.atol": "likelihood ODE absolute tolerance",
    "logging.backend": "wandb or none (metrics.jsonl is always written)",
    "logging.project": "wandb project",
    "logging.entity": "wandb entity (empty: your default)",
    "logging.run_name": "wandb run name (empty: the run dir's name)",
    "logging.mode": "wandb offline (no network) or online",
    "hub.private": "create the Hub repository private",
    "hub.max_retries": "upload attempts before a push is reported failed (never fatal)",
}


def _field_comments(cls) -> dict[str, str]:
    """{field: its comment in the source}: the comment after it on its line, else the comment
    lines right above it."""
    out, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        s = line.strip()
        if s.startswith("#"):
            above.append(s.lstrip("# "))
            continue
        m = re.match(r"(\w+)\s*:[^#]*?(?:#\s*(.*))?$", s)
        if m and not s.startswith(("def ", "class ", "@")):
            text = m.group(2) or " ".join(above)
            if text:
                out[m.group(1)] = text
        above = []
    return out


def describe() -> list[tuple[str, str, str]]:
    """(key, type, meaning) of every key of ``Config``, in order."""
    rows = []
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if dataclasses.is_dataclass(hints[f.name]):
            cls = hints[f.name]
            comments, sub = _field_comments(cls), typing.get_type_hints(cls)
            for g in dataclasses.fields(cls):
                key = f"{f.name}.{g.name}"
                rows.append((key, type_text(sub[g.name]), comments.get(g.name) or MEANINGS.get(key, "")))
        else:
            rows.append((f.name, type_text(hints[f.name]), MEANINGS.get(f.name, "")))
    return rows


def type_text(tp) -> str:
    """int, float | None, one of pc|ode, list[int], int | float."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + "|".join(map(str, args))
    if origin is list:
        return f"list[{type_text(args[0])}]" if args else "list"
    if args:  # a Union
        return " | ".join("None" if a is type(None) else type_text(a) for a in args)
    return type_name(tp)


def unknown_key(key: str, keys) -> str:
    """The one-line message of an unknown config key, with the nearest known one."""
    close = nearest(key, keys)
    return f"{key}: unknown key" + (f" (did you mean {close}?)" if close else "")


def _value(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def config_main(argv: Optional[list[str]] = None) -> int:
    p = ArgumentParser(prog="fpdiff config", description="Show the config keys: value, type, meaning.")
    sub = p.add_subparsers(dest="cmd", required=True, help="show")
    s = sub.add_parser("show", help="every key (or one key / section) with its value, type and one-line meaning")
    s.add_argument("--config", default=None, help="YAML config or a run's config.yaml (default: the defaults)")
    s.add_argument("key", nargs="?", default=None, help="a key (training.lr) or a section (training)")
    args = p.parse_args(argv)
    try:
        if args.config and args.config.endswith(CONFIG):
            cfg = load_saved_config(args.config)
        else:
            cfg = load_config(args.config)
        rows = describe()
        if args.key:
            chosen = [r for r in rows if r[0] == args.key or r[0].startswith(args.key + ".")]
            if not chosen:
                raise ConfigError(unknown_key(args.key, [r[0] for r in rows] + sorted({r[0].split(".")[0] for r in rows})))
            rows = chosen
    except ConfigError as e:
        return fail("config", e)
    values = [repr(_value(cfg, key)) for key, _, _ in rows]
    kw, vw, tw = (min(max(map(len, col)), 28) for col in ([r[0] for r in rows], values, [r[1] for r in rows]))
    for (key, tp, meaning), value in zip(rows, values):
        print(f"{key:<{kw}}  {value:<{vw}}  {tp:<{tw}}  {meaning}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(config_main())
