"""``python -m pipeline.eval`` / ``accelerate launch -m pipeline.eval``: the evaluation stage."""
import sys

from pipeline.quiet import quiet_third_party

quiet_third_party()  # before Accelerate (and DeepSpeed with it) is imported
from pipeline.eval.cli import evaluate_main as main  # noqa: E402

sys.exit(main())
