"""``fpdiff`` command line: one subcommand per pipeline stage.

Each subcommand forwards its arguments to the stage module's own ``main(argv)``, so
``fpdiff train ...`` and ``accelerate launch -m pipeline.train ...`` take the same options.
"""
from __future__ import annotations

import importlib
import sys

from pipeline import __version__
from pipeline.cliargs import nearest
from pipeline.quiet import quiet_third_party
from pipeline.status import fail, interrupted

USAGE = """usage: fpdiff <command> [options]

Train score-based diffusion models with the FP-Diffusion score Fokker-Planck regularizer.

commands:
  demo          train a tiny VP model on 5,000 real MNIST digits (CPU, a few minutes), write samples + summary
  train         train from a YAML config (one process; use `accelerate launch -m pipeline.train` for many)
  data shards   write WebDataset tar shards from MNIST / an image folder / .npz / CIFAR-10 pickles
  eval          evaluate a run: fid | bpd | ref-stats | fpe | conservativity
  sample        draw samples (PNG grid + .npz) from a trained run with its EMA weights; inpainting,
                class-conditional sampling
  classifier    train a time-dependent classifier on a run's data (for `sample --class-label`)
  push          upload a run's exported EMA weights, config and model card to the Hugging Face Hub
  import        import score-sde CHECKPOINT --config NAME --out RUN_DIR: a score_sde / FP-Diffusion
                checkpoint as an fpdiff run directory (sample, eval, push, fine-tune from it)
  config show   every config key with its value, type and meaning ([--config FILE] [KEY])

`fpdiff <command> --help` shows each command's options.
"""


COMMANDS = ("demo", "train", "data", "eval", "sample", "classifier", "push", "import", "config")


def _dispatch(cmd: str, argv: list[str]) -> int:
    if cmd == "data":
        if not argv or argv[0] != "shards":
            asked = bool(argv) and argv[0] in ("-h", "--help")
            hint = " (did you mean shards?)" if argv and not asked and nearest(argv[0], ["shards"]) else ""
            usage = ("usage: fpdiff data shards SOURCE --out DIR [--name NAME] [options]   "
                     "(see fpdiff data shards --help)")
            if not asked:
                return fail("data", f"need the shards subcommand{hint}; {usage}")
            print(usage)
            return 0
        argv = argv[1:]
    if cmd == "train":
        from pipeline.app import train_main  # deferred: torch; `fpdiff --help` stays fast
        return train_main(argv)
    if cmd == "config":
        from pipeline.config_doc import config_main  # deferred: torch; `fpdiff --help` stays fast
        return config_main(argv)
    if cmd == "import":
        from pipeline.publish.score_sde_import import import_main  # deferred: torch; `fpdiff --help` stays fast
        return import_main(argv)
    stages = {"demo": "pipeline.demo", "data": "pipeline.data", "eval": "pipeline.eval",
              "sample": "pipeline.sample", "push": "pipeline.publish", "classifier": "pipeline.classifier"}
    if cmd not in stages:
        close = nearest(cmd, COMMANDS)
        return fail("", f"unknown command {cmd!r}" + (f"; did you mean {close}?" if close else "") + f"\n\n{USAGE}")
    return importlib.import_module(stages[cmd]).main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    quiet_third_party()
    try:
        return int(_dispatch(argv[0], argv[1:]) or 0)
    except KeyboardInterrupt:  # every file is written atomically: nothing half-written is left
        return interrupted(argv[0])


if __name__ == "__main__":
    sys.exit(main())
