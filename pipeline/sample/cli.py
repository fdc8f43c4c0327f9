"""Sampling stage: ``fpdiff sample --run-dir RUN`` draws samples with the EMA weights
and writes a PNG grid, the samples as uint8 ``.npz`` and a JSON record. ``--inpaint MASK``
fills in the hidden part of the first test images instead, ``--colorize`` colours their gray
versions (``pipeline.controllable``)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_write_json
from pipeline.images import to_model_space, write_sample_set
from pipeline.rundir import RunDir, load_for_eval, sample_set
from pipeline.cliargs import ArgumentParser
from pipeline.config import ConfigError, SamplingConfig, choices, finite_float
from pipeline.config_files import parse_overrides
from pipeline.config_doc import unknown_key
from pipeline.controllable import MASKS, classifier_guided_score, colorize, inpaint, make_mask
from pipeline.data.reader import shard_urls
from pipeline.data.test_set import rank_test_batches, require_test_shards
from pipeline.models.classifier import input_scale, load_classifier, log_prob_fn
from pipeline.sampling import batch_sizes, sample
from pipeline.score import cycled_labels, get_score_fn, sampling_score_fn
from pipeline.sde import build_sde
from pipeline.status import fail, result


def sample_main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="fpdiff sample", description="Draw samples from a trained run (EMA weights).")
    p.add_argument("--run-dir", required=True, help="run directory, its export/ folder, or a checkpoint directory")
    p.add_argument("--num-samples", type=int, default=None,
                   help="samples to draw, or test images for --inpaint / --colorize (default: the run's sampling.num_samples)")
    p.add_argument("--method", choices=choices(SamplingConfig, "method"), default=None, help="override sampling.method")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler's noise (and of --inpaint random's mask)")
    p.add_argument("--out", default=None, help="output directory (default RUN/samples)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--inpaint", default=None, metavar="MASK",
                   help="inpaint the first test images: left, right, top, bottom (the half kept), center "
                        "(hide the central square) or random (keep half the pixels); PC sampler only")
    p.add_argument("--colorize", action="store_true",
                   help="colorize the gray versions (channel mean) of the first test images; 3-channel models, "
                        "PC sampler only")
    p.add_argument("--class-label", default=None, metavar="Y",
                   help="class-conditional sampling with the run's time-dependent classifier "
                        "(`fpdiff classifier`): a label, or 'all' for labels 0,1,2,... in turn")
    p.add_argument("--guidance-scale", type=finite_float, default=1.0,
                   help="weight of ∇x log p_t(y|x) (1: the conditional score by Bayes' rule)")
    p.add_argument("--classifier", default=None, help="classifier folder (default RUN/classifier)")
    p.add_argument("--data", default=None, help="test shards for --inpaint / --colorize (default the run's data.test_shards)")
    p.add_argument("overrides", nargs="*", help="sampling.* overrides, e.g. sampling.snr=0.17 sampling.num_steps=500")
    args = p.parse_args(argv)
    try:
        if args.num_samples is not None and args.num_samples <= 0:  # before anything (samples/ included) is created
            raise ConfigError(f"--num-samples: must be > 0, got {args.num_samples}")
        model, cfg, step = load_for_eval(args.run_dir, device=args.device)
        for key, value in parse_overrides(args.overrides):
            section, _, name = key.partition(".")
            if section != "sampling":
                raise ConfigError(f"{key}: fpdiff sample takes sampling.* overrides only (the rest is the trained model's)")
            if not hasattr(cfg.sampling, name):
                raise ConfigError(unknown_key(key, [f"sampling.{f}" for f in cfg.sampling.__dataclass_fields__]))
            setattr(cfg.sampling, name, value)
        if args.num_samples is None:
            args.num_samples = cfg.sampling.num_samples
        if args.method:
            cfg.sampling.method = args.method
        cfg.sampling.validate("sampling")
        if args.inpaint is not None:
            if args.inpaint not in MASKS:
                raise ConfigError(f"--inpaint: unknown mask {args.inpaint!r} (choose from {', '.join(MASKS)})")
            if cfg.sampling.method != "pc":
                raise ConfigError("--inpaint: needs the PC sampler (sampling.method=pc)")
            for other, given in (("--class-label", args.class_label is not None), ("--colorize", args.colorize)):
                if given:
                    raise ConfigError(f"--inpaint and {other}: choose one")
        if args.colorize:
            if cfg.data.num_channels != 3:
                raise ConfigError(f"--colorize: needs a 3-channel model, this one has {cfg.data.num_channels}")
            if cfg.sampling.method != "pc":
                raise ConfigError("--colorize: needs the PC sampler (sampling.method=pc)")
            if args.class_label is not None:
                raise ConfigError("--colorize and --class-label: choose one")
        if args.inpaint is not None or args.colorize:  # test images, never the training shards
            args.data = require_test_shards(cfg, args.data, flag="--data",
                                            command=f"fpdiff sample --{'colorize' if args.colorize else 'inpaint'}")
        sde = build_sde(cfg.sde)
        # a class-conditional model: labels 0..K-1 in turn, classifier-free guidance (sampling.guidance_weight)
        score_fn, _ = sampling_score_fn(model, sde, cfg)
        labels, clf = None, None
        if args.class_label is not None:
            score_fn, labels, clf = _guided(args, get_score_fn(model, sde), sde)
            cfg.sampling.batch_size = args.num_samples  # the labels go with the whole batch
    except (ConfigError, FileNotFoundError, ValueError) as e:
        return fail("sample", e)
    # a new folder each call (RUN/samples/sample-001, -002, ...): no call overwrites an earlier one's
    out = Path(args.out) if args.out else RunDir(args.run_dir).new_samples_folder()
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    shape = (args.num_samples, cfg.data.num_channels, cfg.data.image_size, cfg.data.image_size)
    if args.inpaint is not None or args.colorize:
        try:
            return _conditional_main(args, model, cfg, sde, out, g, shape, step)
        except (FileNotFoundError, ValueError) as e:
            return fail("sample", e)
    t0 = time.time()
    if clf is None:  # streamed to disk batch by batch: any --num-samples in bounded memory
        return _stream_samples(args, cfg, score_fn, sde, shape, g, out, step)
    x, nfe = sample(cfg.sampling, cfg.sde.sampling_eps, score_fn, sde, shape,
                    device=args.device, generator=g, progress=True)
    seconds = time.time() - t0
    t_end = torch.full((x.shape[0],), cfg.sde.sampling_eps, device=x.device)
    with torch.no_grad():
        logp = torch.log_softmax(clf(x, t_end, input_scale(sde, t_end)).float(), 1)
    files = sample_set(out)
    grid = write_sample_set(files.npz, files.grid, [x], shape, cfg.data.centered, labels=labels.cpu().numpy())
    record = {"num_samples": args.num_samples, "seed": args.seed, "method": cfg.sampling.method, "nfe": int(nfe),
              "checkpoint_step": step, "seconds": seconds, "grid": str(grid),
              "class_labels": labels.tolist(), "guidance_scale": args.guidance_scale,
              "classifier_agrees": float((logp.argmax(1) == labels).float().mean()),
              "classifier_log_prob": float(logp.gather(1, labels[:, None]).mean())}
    atomic_write_json(files.record, record)
    result(f"{args.num_samples} samples ({cfg.sampling.method}, {nfe} score evaluations, {seconds:.1f}s): {grid}")
    return 0


GRID_MAX = 256  # samples shown in grid.png (all of them are in samples.npz)


def _stream_samples(args, cfg, score_fn, sde, shape, g, out: Path, step) -> int:
    """Draw ``shape[0]`` samples in batches of ``sampling.batch_size`` (the same draws as one
    ``sample`` call: it batches the same way) and write each to samples.npz as it comes."""
    sizes = batch_sizes(shape[0], cfg.sampling.batch_size)
    conditional = cfg.model.num_classes > 0  # labels 0..K-1 in turn in each batch (``sampling_score_fn``)
    nfes, t0 = [], time.time()

    def image_batches():
        for size in sizes:
            x, nfe = sample(cfg.sampling, cfg.sde.sampling_eps, score_fn, sde, (size, *shape[1:]),
                            device=args.device, generator=g, progress=True)
            nfes.append(nfe)
            yield x

    labels = (np.concatenate([cycled_labels(size, cfg.model.num_classes).numpy() for size in sizes])
              if conditional else None)
    files = sample_set(out)
    grid = write_sample_set(files.npz, files.grid, image_batches(), shape, cfg.data.centered, labels=labels,
                            grid_max=GRID_MAX)
    seconds = time.time() - t0
    nfe = round(sum(nfes) / len(nfes))
    record = {"num_samples": args.num_samples, "seed": args.seed, "method": cfg.sampling.method, "nfe": int(nfe),
              "checkpoint_step": step, "seconds": seconds, "grid": str(grid)}
    if conditional:  # the labels of the samples in the grid (all of them are in samples.npz)
        record.update(class_labels=[int(y) for y in labels[:GRID_MAX]], guidance_weight=cfg.sampling.guidance_weight)
    atomic_write_json(files.record, record)
    result(f"{args.num_samples} samples ({cfg.sampling.method}, {nfe} score evaluations, {seconds:.1f}s): "
           f"{files.npz}, the first {min(args.num_samples, GRID_MAX)} in {grid}")
    return 0


def _guided(args, score_fn, sde):
    """(guided score, labels (n,), classifier) for --class-label."""
    folder = Path(args.classifier) if args.classifier else RunDir(args.run_dir).classifier
    clf, _ = load_classifier(folder, args.device)
    k = clf.settings["num_classes"]
    n = args.num_samples
    if args.class_label == "all":
        labels = cycled_labels(n, k)
    else:
        try:
            y = int(args.class_label)
        except ValueError:
            y = -1
        if not 0 <= y < k:
            raise ValueError(f"--class-label: need 'all' or an integer in [0, {k}), got {args.class_label!r}")
        labels = torch.full((n,), y)
    labels = labels.to(args.device)
    return classifier_guided_score(score_fn, log_prob_fn(clf, sde), labels, args.guidance_scale), labels, clf


def _conditional_main(args, model, cfg, sde, out: Path, g, shape, step) -> int:
    """--inpaint / --colorize on the first ``--num-samples`` test images."""
    spec = args.data  # the test shards (require_test_shards, checked before anything was written)
    shard_urls(spec or "", key="--data")  # a missing shard: one line naming it, before any sampling
    n = args.num_samples
    batches = [u8 for _, u8 in rank_test_batches(None, spec, cfg.data.num_channels, n, 0, 1, max_samples=n)]
    u8 = torch.cat(batches) if batches else torch.zeros(0)
    if u8.shape[0] == 0 or tuple(u8.shape[1:]) != tuple(shape[1:]):
        raise ValueError(f"--data {spec}: need images of shape {tuple(shape[1:])}, got "
                         f"{tuple(u8.shape[1:]) if u8.numel() else 'none'}")
    data = to_model_space(u8, cfg.data.centered).to(args.device)
    sc = cfg.sampling
    pc = dict(predictor=sc.predictor, corrector=sc.corrector, snr=sc.snr, n_steps_each=sc.n_steps_each,
              num_steps=sc.num_steps or None, eps=cfg.sde.sampling_eps, noise_removal=sc.noise_removal,
              generator=g, progress=True)
    score_fn = get_score_fn(model, sde)
    t0 = time.time()
    if args.colorize:
        kind, gray = "colorize", data.mean(1, keepdim=True)
        x, nfe = colorize(score_fn, sde, gray, **pc)
        shown = gray.expand_as(data)
        low = -1.0 if cfg.data.centered else 0.0
        err = float((x.clamp(low, 1.0) - data).pow(2).mean())  # as saved (clipped to the data range)
        record = {"mse": err, "mse_gray_baseline": float((shown - data).pow(2).mean()),
                  "out_of_range": float(((x < low) | (x > 1.0)).float().mean()),
                  "max_gray_deviation": float((x.mean(1, keepdim=True) - gray).abs().max())}
        extra = {}
        what = f"colorized {data.shape[0]} gray test images (MSE to the originals {err:.4f}, gray itself " \
               f"{record['mse_gray_baseline']:.4f})"
    else:
        kind = "inpaint"
        mask = make_mask(args.inpaint, tuple(data.shape), generator=torch.Generator().manual_seed(args.seed))
        mask = mask.to(args.device)
        x, nfe = inpaint(score_fn, sde, data, mask, **pc)
        low = -1.0 if cfg.data.centered else 0.0  # hidden pixels shown black
        shown = data * mask + low * (1 - mask)
        # as saved (clipped to the data range), like colorization's
        hidden = (1 - mask).sum() * data.shape[1]
        err = float((x.clamp(low, 1.0) - data).pow(2).mul(1 - mask).sum() / hidden.clamp_min(1))
        record = {"mask": args.inpaint, "mse_hidden": err}
        extra = {"masks": mask.cpu().numpy().astype(np.uint8)}
        what = f"inpainted {data.shape[0]} test images (mask {args.inpaint}; MSE on the hidden pixels {err:.4f})"
    seconds = time.time() - t0
    # per image: original, masked, filled (inpaint) / gray input, colorized, original (colorize)
    cols = [data, shown, x] if kind == "inpaint" else [shown, x, data]
    rows = torch.stack(cols, 1).flatten(0, 1)
    files = sample_set(out, kind)
    grid = write_sample_set(files.npz, files.grid, [x], tuple(x.shape), cfg.data.centered,
                            extra={"originals": u8.numpy(), **extra}, grid_images=rows,
                            nrow=3 * min(4, data.shape[0]))
    record = {"num_samples": int(data.shape[0]), **record, "nfe": int(nfe), "data": spec,
              "checkpoint_step": step, "seconds": seconds, "grid": str(grid)}
    atomic_write_json(files.record, record)
    result(f"{what}, {nfe} score evaluations, {seconds:.1f}s: {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(sample_main())
