"""``python -m pipeline.train`` / ``accelerate launch -m pipeline.train``: the training stage."""
import sys

from pipeline.train.loop import main

sys.exit(main())
