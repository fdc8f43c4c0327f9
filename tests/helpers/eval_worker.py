"""``fpdiff eval`` with the stand-in score network (tests/helpers/standin.py) as every run's model: the
real CLI path (loading, start-up checks, sampling, distributed statistics, results) in seconds.
Run as a script (one process, or under ``accelerate launch``): its folder is first on sys.path."""
import sys

import torch

import pipeline.rundir
from pipeline.eval.cli import evaluate_main
from standin import StandIn

torch.set_num_threads(1)
# the runs' weights are the stand-in's: load_for_eval builds it instead of the config's UNet
pipeline.rundir.build_model = lambda cfg: StandIn(cfg.data.num_channels)
sys.exit(evaluate_main(sys.argv[1:]))
