"""``python -m pipeline.train`` / ``accelerate launch -m pipeline.train``: the training stage."""
import sys

from pipeline.app import train_main

sys.exit(train_main())
