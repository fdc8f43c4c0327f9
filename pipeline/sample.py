"""Sampling stage: ``fpdiff sample --run-dir RUN`` draws samples with the EMA weights
and writes a PNG grid, the samples as uint8 ``.npz`` and a JSON record."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def sample_main(argv: list[str] | None = None) -> int:
    from .config import ConfigError, parse_overrides
    from .evaluate import load_for_eval
    from .images import save_grid, to_uint8
    from .sampling import sample
    from .score import get_score_fn
    from .sde import build_sde

    p = argparse.ArgumentParser(prog="fpdiff sample", description="Draw samples from a trained run (EMA weights).")
    p.add_argument("--run-dir", required=True, help="run directory, its export/ folder, or a checkpoint directory")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--method", choices=["pc", "ode"], default=None, help="override sampling.method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default RUN/samples)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*", help="sampling.* overrides, e.g. sampling.snr=0.17 sampling.num_steps=500")
    args = p.parse_args(argv)
    try:
        model, cfg, step = load_for_eval(args.run_dir, device=args.device)
        for key, value in parse_overrides(args.overrides):
            section, _, name = key.partition(".")
            if section != "sampling" or not hasattr(cfg.sampling, name):
                raise ConfigError(f"{key}: only sampling.* keys can be overridden here")
            setattr(cfg.sampling, name, value)
        if args.method:
            cfg.sampling.method = args.method
        cfg.sampling.validate("sampling")
    except (ConfigError, FileNotFoundError) as e:
        print(f"fpdiff sample: {e}", file=sys.stderr)
        return 2
    sde = build_sde(cfg.sde)
    out = Path(args.out or Path(args.run_dir) / "samples")
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    shape = (args.num_samples, cfg.data.num_channels, cfg.data.image_size, cfg.data.image_size)
    t0 = time.time()
    x, nfe = sample(cfg.sampling, cfg.sde.sampling_eps, get_score_fn(model, sde), sde, shape,
                    device=args.device, generator=g, progress=True)
    seconds = time.time() - t0
    grid = save_grid(x, out / "grid.png", centered=cfg.data.centered)
    np.savez_compressed(out / "samples.npz", images=to_uint8(x, cfg.data.centered).cpu().numpy())
    record = {"num_samples": args.num_samples, "method": cfg.sampling.method, "nfe": int(nfe),
              "checkpoint_step": step, "seconds": seconds, "grid": str(grid)}
    (out / "samples.json").write_text(json.dumps(record, indent=1))
    print(f"[fpdiff] {args.num_samples} samples ({cfg.sampling.method}, {nfe} score evaluations, {seconds:.1f}s): {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(sample_main())
