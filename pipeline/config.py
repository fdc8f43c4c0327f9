"""Typed experiment configuration: the schema.

One dataclass per stage, each with its defaults and ``validate``; ``choices`` / ``check_choices``
for the ``Literal`` keys; the value helpers messages and options share (``short_repr``,
``finite_float``, ``type_name``). Bad values fail with one line naming the key path
(``ConfigError``). Reading and writing config files (YAML, dotted overrides): ``pipeline.config_files``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from pipeline.sde import SDE, SDE_CLASSES


class ConfigError(ValueError):
    """A configuration problem; the message names the key path."""


# --------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    # one network (score_sde's NCSN++ code): DDPM++ and NCSN++ are configurations of it, set by these keys
    nf: int = 128  # base channel count
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 4
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.1
    # "positional" (DDPM++, label 999 t) or "fourier" (NCSN++, label log sigma)
    embedding_type: Literal["positional", "fourier"] = "positional"
    fourier_scale: float = 16.0
    resblock_type: Literal["biggan", "ddpm"] = "biggan"
    resamp_with_conv: bool = True
    skip_rescale: bool = True
    fir: bool = False
    fir_kernel: list[int] = field(default_factory=lambda: [1, 3, 3, 1])
    progressive: Literal["none", "output_skip", "residual"] = "none"
    progressive_input: Literal["none", "input_skip", "residual"] = "none"
    progressive_combine: Literal["sum", "cat"] = "sum"
    init_scale: float = 0.0
    conv_size: Literal[3] = 3  # score_sde's key; its convolutions are 3x3 (checked when the config loads)
    scale_by_sigma: bool = False  # VE models divide their output by sigma(t)
    # attention heads: the math SDPA kernel is forced inside the regularizer
    num_heads: int = 1
    # > 1: the UNet sees non-overlapping p x p patches as channels (pixel unshuffle), p x smaller images
    patch_size: int = 1
    # > 0: class-conditional on K data labels (training.label_dropout trains the unconditional score
    # beside it, for classifier-free guidance: sampling.guidance_weight); 0: unconditional
    num_classes: int = 0

    def validate(self, path: str) -> None:
        _positive(self.nf, f"{path}.nf")
        if self.num_classes < 0:
            raise ConfigError(f"{path}.num_classes: must be >= 0 (0: unconditional), got {self.num_classes}")
        _positive(self.patch_size, f"{path}.patch_size")
        _positive(self.num_res_blocks, f"{path}.num_res_blocks")
        if not self.ch_mult:
            raise ConfigError(f"{path}.ch_mult: must not be empty")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{path}.dropout: must be in [0, 1), got {self.dropout}")
        _positive(self.num_heads, f"{path}.num_heads")
        bad = sorted(w for w in {self.nf * c for c in self.ch_mult} if w % self.num_heads or w < 4)
        if bad:
            raise ConfigError(f"{path}.num_heads/nf: channel widths {bad} must be >= 4 and divisible by num_heads "
                              f"{self.num_heads}")


@dataclass
class SDEConfig:
    type: Literal["vp", "subvp", "ve"] = "vp"
    beta_min: float = 0.1
    beta_max: float = 20.0
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 1000  # N: discretisation used by the PC samplers
    eps: Optional[float] = None  # smallest time for sampling (default: the SDE's default_eps, 1e-3 VP/sub-VP, 1e-5 VE)

    def validate(self, path: str) -> None:
        _positive(self.beta_min, f"{path}.beta_min")
        if self.beta_max <= self.beta_min:
            raise ConfigError(f"{path}.beta_max: must exceed beta_min ({self.beta_min}), got {self.beta_max}")
        _positive(self.sigma_min, f"{path}.sigma_min")
        if self.sigma_max <= self.sigma_min:
            raise ConfigError(f"{path}.sigma_max: must exceed sigma_min ({self.sigma_min}), got {self.sigma_max}")
        _positive(self.num_scales, f"{path}.num_scales")

    @property
    def sampling_eps(self) -> float:
        return self.eps if self.eps is not None else SDE_CLASSES[self.type].default_eps


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    # shard pattern / URL list (brace notation, file://, pipe:); empty: built by the demo
    shards: str = ""
    test_shards: str = ""
    # shard index JSON (path or URL, e.g. pipe:...) for shards with no index beside them;
    # empty: found beside local shards, else counted by one scan at start-up
    index: str = ""
    image_size: int = 32
    num_channels: int = 3
    centered: bool = False  # [-1, 1] if True else [0, 1]
    random_flip: bool = False
    uniform_dequantization: bool = False
    num_workers: int = 0
    shuffle_buffer: int = 1000
    resampled: bool = False
    # bounds on what a small shard may make the reader allocate: a tar member (a 1.5 MB gzip shard can
    # hold a 1.5 GB one) and a decoded image (a 15 KB PNG can be 11000 x 11000); larger ones are skipped
    max_member_bytes: int = 64 << 20
    max_image_pixels: int = 4096 * 4096  # the largest decoded image, in pixels (larger ones are skipped)

    def validate(self, path: str) -> None:
        _positive(self.image_size, f"{path}.image_size")
        _positive(self.max_member_bytes, f"{path}.max_member_bytes")
        _positive(self.max_image_pixels, f"{path}.max_image_pixels")
        if self.num_channels not in (1, 3, 4):
            raise ConfigError(f"{path}.num_channels: must be 1, 3 or 4, got {self.num_channels}")
        if self.num_workers < 0:
            raise ConfigError(f"{path}.num_workers: must be >= 0, got {self.num_workers}")


@dataclass
class TrainingConfig:
    batch_size: int = 64  # global batch per optimizer step
    n_steps: int = 1000
    lr: float = 2e-4
    warmup: int = 0
    lr_decay: Literal["none", "cosine"] = "none"  # cosine: from lr after the warm-up to 0 at n_steps
    grad_clip: float = 1.0  # <= 0 disables clipping
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates (score_sde)
    seed: int = 0
    likelihood_weighting: bool = False
    min_snr_gamma: float = 0.0  # > 0: min-SNR-γ loss weighting (Hang et al. 2023; 5 in the paper); 0: off
    reduce_mean: bool = True
    eps: float = 1e-5  # smallest t drawn by the DSM loss
    # how a batch's times are drawn: i.i.d. U(eps, T), or stratified (one per 1/B of the range, a shared
    # random offset: Kingma et al. 2021's low-discrepancy sampler; same expected loss, lower variance)
    t_sampling: Literal["uniform", "stratified"] = "uniform"
    grad_accum: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    compile: bool = False  # torch.compile the DSM path (the regularizer cannot be compiled)
    compile_backend: str = "inductor"
    log_every: int = 50
    ckpt_every: int = 500
    keep_last: int = 3
    sample_every: int = 0  # also a grid every N steps in RUN/samples/step_XXXXXXXX.png (0: only at the end)
    max_nonfinite: int = 10  # consecutive non-finite steps before stopping
    # a fine-tune continues this source (run dir, checkpoint, imported score_sde run, export or Hub id):
    # its raw weights, EMA, Adam state, step and data position, as FP-Diffusion's code does; the run
    # then trains n_steps more (pipeline.train.init_source)
    init_from: str = ""
    # parts of the source to start fresh instead: optimizer, ema (warm-up restarts), schedule (step 0:
    # lr warm-up, decay and seeds restart), data (the loader starts the shards anew)
    init_fresh: list[str] = field(default_factory=list)
    # class-conditional models: the share of samples trained with the "no class" label (the
    # unconditional score); Ho & Salimans 2022 use 0.1-0.2
    label_dropout: float = 0.1

    def validate(self, path: str) -> None:
        _positive(self.batch_size, f"{path}.batch_size")
        _positive(self.n_steps, f"{path}.n_steps")
        _positive(self.lr, f"{path}.lr")
        _positive(self.grad_accum, f"{path}.grad_accum")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"{path}.batch_size: {self.batch_size} not divisible by grad_accum {self.grad_accum}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{path}.ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.warmup < 0:
            raise ConfigError(f"{path}.warmup: must be >= 0, got {self.warmup}")
        if not 0.0 < self.eps < SDE.T:
            raise ConfigError(f"{path}.eps: must be in (0, T = {SDE.T}), got {self.eps}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"{path}.label_dropout: must be in [0, 1), got {self.label_dropout}")
        bad = [p for p in self.init_fresh if p not in ("optimizer", "ema", "schedule", "data")]
        if bad:
            raise ConfigError(f"{path}.init_fresh: unknown part {str(bad[0])[:40]!r} (choose from optimizer, ema, "
                              f"schedule, data)")
        if self.min_snr_gamma < 0:
            raise ConfigError(f"{path}.min_snr_gamma: must be >= 0 (0: off), got {self.min_snr_gamma}")
        if self.min_snr_gamma > 0 and self.likelihood_weighting:
            raise ConfigError(f"{path}.min_snr_gamma: cannot be combined with likelihood_weighting (both set the weight)")
        _positive(self.log_every, f"{path}.log_every")
        _positive(self.ckpt_every, f"{path}.ckpt_every")
        _positive(self.keep_last, f"{path}.keep_last")


@dataclass
class FPEConfig:
    enabled: bool = True
    alpha: float = 0.15  # weight of the FPE term (paper default)
    m: float = 2.0  # power of the residual norm
    weighting: Literal["constant", "convention", "likelihood"] = "likelihood"
    # regularized samples per step: an int count, or a float fraction of the batch (at least 1);
    # 1/64: the default model's step (DDPM++, batch 64) is 1.16x its DSM step (benchmarks/RESULTS.md)
    subsample: Union[int, float] = 0.015625
    every: int = 1  # regularize every k-th step
    points: Literal["perturbed", "clean", "uniform"] = "perturbed"
    t_min: float = 1e-3
    t_max: float = 1.0
    dt_method: Literal["jvp", "fd3", "central"] = "jvp"
    fd_step: float = 1e-3
    # divergences: hutchinson (probes) or exact (D backward passes; tiny data only): exact gives one
    # exact residual, so validate sets n_probes to 1 and norm_estimator to single
    div_method: Literal["hutchinson", "exact"] = "hutchinson"
    probe: Literal["rademacher", "gaussian"] = "rademacher"
    norm_estimator: Literal["unbiased", "single"] = "unbiased"
    n_probes: int = 2  # Hutchinson probes per residual (>= 2 for the unbiased estimator; refused below that)
    # parameter gradient of the unbiased ‖r‖²: "first" backpropagates through the first probe's
    # residual only, scaled to stay unbiased (the parameter backward is most of the cost);
    # "all": through every probe (the estimator's exact gradient, lower variance)
    probe_gradient: Literal["all", "first"] = "first"
    fused: bool = True
    # the reference code's "scalar" term; not zero at the true score, off by default
    reference_scalar_beta: float = 0.0

    def validate(self, path: str) -> None:
        if self.alpha < 0:
            raise ConfigError(f"{path}.alpha: must be >= 0, got {self.alpha}")
        _positive(self.m, f"{path}.m")
        _positive(self.every, f"{path}.every")
        if isinstance(self.subsample, bool) or self.subsample <= 0:
            raise ConfigError(f"{path}.subsample: must be a positive count or fraction, got {self.subsample}")
        if isinstance(self.subsample, float) and self.subsample > 1.0:
            raise ConfigError(f"{path}.subsample: a fraction must be <= 1, got {self.subsample}")
        if not 0.0 < self.t_min < self.t_max <= 1.0:
            raise ConfigError(f"{path}.t_min/t_max: need 0 < t_min < t_max <= 1, got {self.t_min}, {self.t_max}")
        _positive(self.fd_step, f"{path}.fd_step")
        _positive(self.n_probes, f"{path}.n_probes")
        if self.norm_estimator == "unbiased" and self.div_method == "hutchinson" and self.n_probes < 2:
            raise ConfigError(f"{path}.n_probes: the unbiased norm estimator needs >= 2 probes, got {self.n_probes}")
        self.resolve_probes()

    def resolve_probes(self) -> None:
        """div_method "exact": one exact residual (n_probes 1, norm_estimator "single")."""
        if self.div_method == "exact":
            self.n_probes, self.norm_estimator = 1, "single"


@dataclass
class SamplingConfig:
    method: Literal["pc", "ode"] = "pc"
    predictor: Literal["euler_maruyama", "reverse_diffusion", "ancestral", "none"] = "reverse_diffusion"
    corrector: Literal["langevin", "ald", "none"] = "langevin"
    snr: float = 0.16
    n_steps_each: int = 1
    num_steps: int = 0  # 0: sde.num_scales
    noise_removal: bool = True
    num_samples: int = 64
    batch_size: int = 64
    rtol: float = 1e-5
    atol: float = 1e-5
    # class-conditional models (model.num_classes = K): samples take the labels 0..K-1 in turn and
    # classifier-free guidance w (Ho & Salimans 2022, eq. 6 for scores): (1 + w) s(x,t|y) - w s(x,t);
    # 0: the conditional score alone
    guidance_weight: float = 0.0

    def validate(self, path: str) -> None:
        _positive(self.snr, f"{path}.snr")
        if self.guidance_weight < 0:
            raise ConfigError(f"{path}.guidance_weight: must be >= 0, got {self.guidance_weight}")
        _positive(self.num_samples, f"{path}.num_samples")
        if self.num_steps < 0:
            raise ConfigError(f"{path}.num_steps: must be >= 0 (0: sde.num_scales), got {self.num_steps}")
        _positive(self.batch_size, f"{path}.batch_size")
        _positive(self.rtol, f"{path}.rtol")
        _positive(self.atol, f"{path}.atol")


@dataclass
class EvalConfig:
    every: int = 0  # 0: no evaluation during training
    fid_num_samples: int = 1000
    batch_size: int = 100
    feature_extractor: str = ""  # local TorchScript file; empty: clean-fid Inception
    ref_stats: str = ""  # .npz of reference statistics, or a clean-fid dataset name
    bpd_num_batches: int = 1
    bpd_passes: int = 1
    hutchinson: Literal["rademacher", "gaussian", "exact"] = "rademacher"  # exact: D VJPs per ODE step (tiny data)
    rtol: float = 1e-5
    atol: float = 1e-5
    seed: int = 0  # sample / probe seeds (per global batch index: independent of world size)
    dequantize: bool = True  # uniform dequantisation of the bpd test data (as score_sde)
    likelihood_eps: float = 1e-5  # the likelihood ODE runs from eps to T
    kid: bool = True  # also KID when the reference statistics hold features
    sampler: Literal["config", "pc", "ode"] = "config"  # "config": sampling.method
    fpe_num_times: int = 20  # eval fpe: points of the t-grid in [fpe.t_min, fpe.t_max] (its --num-times)
    fpe_max_samples: int = 256  # eval fpe: only the first M test images (its --max-samples)
    conservativity_buckets: int = 10  # eval conservativity: equal t-buckets of [fpe.t_min, fpe.t_max] (--num-buckets)
    conservativity_max_samples: int = 256  # eval conservativity: the first M test images, >= 2 (its --max-samples)
    conservativity_probes: int = 1  # eval conservativity: Rademacher probes per image and bucket (its --probes)

    def validate(self, path: str) -> None:
        _positive(self.likelihood_eps, f"{path}.likelihood_eps")
        _positive(self.fpe_num_times, f"{path}.fpe_num_times")
        _positive(self.fpe_max_samples, f"{path}.fpe_max_samples")
        for name, low in (("conservativity_buckets", 1), ("conservativity_probes", 1), ("conservativity_max_samples", 2)):
            if getattr(self, name) < low:
                raise ConfigError(f"{path}.{name}: must be >= {low}, got {getattr(self, name)}")
        if self.every < 0:
            raise ConfigError(f"{path}.every: must be >= 0, got {self.every}")
        _positive(self.fid_num_samples, f"{path}.fid_num_samples")
        _positive(self.batch_size, f"{path}.batch_size")
        _positive(self.bpd_passes, f"{path}.bpd_passes")


@dataclass
class LoggingConfig:
    backend: Literal["wandb", "none"] = "none"
    project: str = "fpdiff"
    entity: str = ""
    run_name: str = ""
    mode: Literal["offline", "online"] = "offline"

    def validate(self, path: str) -> None:
        pass


@dataclass
class HubConfig:
    repo_id: str = ""  # empty: no push
    push_every: int = 0  # steps; 0: push only at the end
    private: bool = True
    max_retries: int = 5
    retry_backoff: float = 2.0  # seconds before the first retry; doubles each time (max 60 s)
    # empty: huggingface_hub's default (HF_ENDPOINT or https://huggingface.co); taken only from the
    # command line (hub.endpoint=URL), never from a file: the Hub token goes where it points
    endpoint: str = ""

    def validate(self, path: str) -> None:
        if self.push_every < 0:
            raise ConfigError(f"{path}.push_every: must be >= 0, got {self.push_every}")
        if self.max_retries < 0:
            raise ConfigError(f"{path}.max_retries: must be >= 0, got {self.max_retries}")
        if self.retry_backoff < 0:
            raise ConfigError(f"{path}.retry_backoff: must be >= 0, got {self.retry_backoff}")
        if self.repo_id and self.repo_id.count("/") > 1:
            raise ConfigError(f"{path}.repo_id: must look like 'user/name', got {self.repo_id!r}")


@dataclass
class Config:
    name: str = "run"
    run_dir: str = ""  # default: runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    sde: SDEConfig = field(default_factory=SDEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    fpe: FPEConfig = field(default_factory=FPEConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    # "export": written into an export by fpdiff (``exported_config``); such a config, like any out of a
    # run dir or the Hub, gets the saved-config rules (``apply_saved_config_rules``) in every command
    provenance: Literal["user", "export"] = "user"

    def validate(self) -> None:
        check_choices(self, "")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                check_choices(section, f.name)
                section.validate(f.name)
        # cross-section checks
        down = 2 ** (len(self.model.ch_mult) - 1) * self.model.patch_size
        if self.data.image_size % down:
            raise ConfigError(
                f"data.image_size: {self.data.image_size} is not divisible by the UNet's "
                f"down-sampling factor {down} (model.ch_mult has {len(self.model.ch_mult)} levels, "
                f"model.patch_size {self.model.patch_size})")
        if self.model.embedding_type == "fourier" and self.sde.type != "ve":
            raise ConfigError("model.embedding_type: 'fourier' (log-sigma labels) needs sde.type 've'")
        if self.model.scale_by_sigma and self.sde.type != "ve":
            raise ConfigError("model.scale_by_sigma: only valid with sde.type 've' (labels are sigma)")
        if self.model.embedding_type == "positional" and self.model.nf < 4:
            raise ConfigError(f"model.nf: must be >= 4, got {self.model.nf}")
        if self.sampling.guidance_weight and not self.model.num_classes:
            raise ConfigError("sampling.guidance_weight: classifier-free guidance needs a class-conditional "
                              "model (model.num_classes > 0)")
        if self.sampling.guidance_weight and not self.training.label_dropout:
            raise ConfigError("sampling.guidance_weight: needs training.label_dropout > 0 (the unconditional "
                              "score it subtracts is only trained on dropped labels)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- value checks
def _positive(value, path: str) -> None:
    if value <= 0:
        raise ConfigError(f"{path}: must be > 0, got {value}")


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def choices(section, key: str) -> tuple:
    """The values a ``Literal`` key of a config section (class or instance) allows: its annotation is the one
    place they are spelled (``Config.validate`` checks them; modules that take them as arguments ask here)."""
    return typing.get_args(_hints(section if isinstance(section, type) else type(section))[key])


def check_choices(section, path: str) -> None:
    """Every ``Literal`` key of ``section`` holds one of its values; the error names the key."""
    for f in dataclasses.fields(section):
        if typing.get_origin(_hints(type(section))[f.name]) is Literal:
            allowed, value = choices(section, f.name), getattr(section, f.name)
            if value not in allowed or isinstance(value, bool):
                raise ConfigError(f"{path + '.' if path else ''}{f.name}: must be one of {list(allowed)}, "
                                  f"got {short_repr(value)}")


MAX_SHOWN = 200  # characters of a value shown in a message (an alias bomb expands to gigabytes)


def short_repr(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters; a huge nested value is not spelled out first."""
    if isinstance(value, (list, tuple, dict)) and len(value) > 16:
        return f"<{type(value).__name__} of {len(value)} items>"
    text = value if isinstance(value, str) else repr(value)
    if isinstance(value, (list, tuple, dict)) and len(text) > limit:
        return f"<{type(value).__name__} of {len(value)} items>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def finite_float(text: str) -> float:
    """argparse ``type`` of a float option: NaN and infinity are refused like in a config."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {short_repr(text)}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
