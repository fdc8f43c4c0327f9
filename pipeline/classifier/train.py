"""The classifier stage: trains the time-dependent classifier p_t(y | x_t) (``pipeline.models.classifier``)
for class-conditional sampling (Song et al. 2021, §5).

``fpdiff classifier --run-dir RUN`` trains one on the run's shards (labels from ``.cls``) with
cross-entropy on x_t ~ p_0t(· | x_0), t ~ U[eps, 1], under the run's SDE, and writes
``RUN/classifier/`` (``model.safetensors`` + ``classifier.json``: its settings and test accuracy
per t-bucket). ``fpdiff sample --run-dir RUN --class-label Y`` then samples with
s + scale·∇x log p_t(y | x) (``pipeline.controllable.classifier_guided_score``).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.cliargs import ArgumentParser
from pipeline.config import ConfigError, finite_float
from pipeline.config_files import load_saved_config
from pipeline.data.loader import build_eval_loader, build_train_loader
from pipeline.fpe import mean_by_t_bucket
from pipeline.models.classifier import NoiseConditionalClassifier, input_scale, save_classifier
from pipeline.data.test_set import require_test_shards
from pipeline.rundir import RunDir
from pipeline.sde import SDE, build_sde
from pipeline.status import fail, result


def classifier_loss(clf, sde: SDE, x0: torch.Tensor, y: torch.Tensor, eps: float,
                    generator=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy on x_t at t ~ U[eps, 1]; returns (loss, per-sample correct (bool), t)."""
    gdev = generator.device if generator is not None else x0.device
    t = (eps + (1 - eps) * torch.rand(x0.shape[0], generator=generator, device=gdev)).to(x0.device)
    z = torch.randn(x0.shape, generator=generator, device=gdev).to(x0.device)
    logits = clf(sde.perturb(x0, t, z)[0], t, input_scale(sde, t))
    return F.cross_entropy(logits, y), logits.argmax(1) == y, t


# --------------------------------------------------------------------------- training
@torch.no_grad()
def accuracy_by_t(clf, sde: SDE, cfg, eps: float, *, max_samples: int, batch_size: int, device,
                  n_buckets: int = 4, seed: int = 0) -> dict:
    """Test accuracy of ``clf`` on x_t, per t-bucket of [eps, 1] and overall."""
    g = torch.Generator(device=device).manual_seed(seed)
    ts, hits, seen = [], [], 0
    for images, labels, _ in build_eval_loader(cfg, batch_size=batch_size, num_workers=0):
        if seen >= max_samples:
            break
        images, labels = images[: max_samples - seen].to(device), labels[: max_samples - seen].to(device)
        seen += images.shape[0]
        _, correct, t = classifier_loss(clf, sde, images, labels, eps, g)
        ts.append(t)
        hits.append(correct.float())
    t, hit = torch.cat(ts), torch.cat(hits)
    out = mean_by_t_bucket(t, hit, n_buckets, t_min=eps, t_max=1.0, prefix="acc")
    out["acc"] = float(hit.mean())
    out["test_samples"] = seen
    return out


def train_classifier(cfg, out: Path, *, steps: int, batch_size: int, lr: float, nf: int, num_classes: int,
                     device, seed: int = 0, eval_samples: int = 1000, progress: bool = True) -> dict:
    sde = build_sde(cfg.sde)
    eps = cfg.training.eps
    torch.manual_seed(seed)
    clf = NoiseConditionalClassifier(cfg.data.num_channels, num_classes, nf).to(device).train()
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    g = torch.Generator(device=device).manual_seed(seed)
    loader = iter(build_train_loader(cfg, batch_size=batch_size, seed=seed))
    t0, losses = time.time(), []
    bar = tqdm(range(steps), desc="classifier", dynamic_ncols=True, disable=not progress)
    for step in bar:
        images, labels, _ = next(loader)
        if bool((labels < 0).any()) or bool((labels >= num_classes).any()):
            raise ValueError(f"classifier: labels must lie in [0, {num_classes}) (the shards' .cls), "
                             f"got {int(labels.min())}..{int(labels.max())}")
        loss, _, _ = classifier_loss(clf, sde, images.to(device), labels.to(device), eps, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    clf.eval()
    acc = accuracy_by_t(clf, sde, cfg, eps, max_samples=eval_samples, batch_size=batch_size, device=device)
    meta = {"steps": steps, "batch_size": batch_size, "lr": lr, "seconds": time.time() - t0,
            "final_loss": losses[-1] if losses else None, "sde": cfg.sde.type, **acc}
    save_classifier(out, clf, meta)
    return meta


def classifier_main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="fpdiff classifier", description=(
        "Train a time-dependent classifier p_t(y|x_t) on a run's shards (for `fpdiff sample --class-label`)."))
    p.add_argument("--run-dir", required=True, help="run directory (its config.yaml gives data and SDE)")
    p.add_argument("--out", default=None, help="output folder (default RUN/classifier)")
    p.add_argument("--steps", type=int, default=2000, help="training steps")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=finite_float, default=2e-3, help="Adam learning rate")
    p.add_argument("--nf", type=int, default=32, help="channels of the first block")
    p.add_argument("--num-classes", type=int, default=10, help="classes (the shards' .cls labels lie in [0, K))")
    p.add_argument("--eval-samples", type=int, default=1000, help="test images for the accuracy report")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and noise")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.shards=...")
    args = p.parse_args(argv)
    run = RunDir(args.run_dir)
    try:
        if not run.config.is_file():
            raise FileNotFoundError(f"--run-dir {run.path}: no {run.config.name} there")
        cfg = load_saved_config(run.config, args.overrides)
        cfg.data.test_shards = require_test_shards(cfg, None, command="fpdiff classifier (its test accuracy)",
                                                   flag="data.test_shards=")
        for name in ("steps", "batch_size", "nf", "num_classes", "eval_samples"):
            if getattr(args, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(args, name)}")
        out = Path(args.out or run.classifier)
        meta = train_classifier(cfg, out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, nf=args.nf,
                                num_classes=args.num_classes, device=args.device, seed=args.seed,
                                eval_samples=args.eval_samples)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        return fail("classifier", e)
    buckets = ", ".join(f"{k[4:]}: {v:.2f}" for k, v in meta.items() if k.startswith("acc_t"))
    result(f"classifier: {args.steps} steps in {meta['seconds']:.0f}s, test accuracy {meta['acc']:.3f} "
           f"({buckets}): {out}")
    return 0


if __name__ == "__main__":
    sys.exit(classifier_main())
