"""``python -m pipeline.train`` / ``accelerate launch -m pipeline.train``: the training stage."""
import sys

from pipeline.quiet import quiet_third_party

quiet_third_party()  # before Accelerate (and DeepSpeed with it) is imported
from pipeline.app import train_main  # noqa: E402

sys.exit(train_main())
