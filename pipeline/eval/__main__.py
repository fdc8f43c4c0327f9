"""``python -m pipeline.eval`` / ``accelerate launch -m pipeline.eval``: the evaluation stage."""
import sys

from pipeline.eval.cli import evaluate_main as main

sys.exit(main())
