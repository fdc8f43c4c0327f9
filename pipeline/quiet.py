"""Silence third-party messages a user of fpdiff cannot act on (called by every entry point):

* DeepSpeed's "Setting accelerator to CPU. If you have GPU ..." on every import on a CPU-only
  machine (it is imported with Accelerate): told the accelerator instead (``DS_ACCELERATOR=cpu``,
  only where CUDA is absent, so GPU machines still detect theirs);
* torch's "`torch.jit.script` is deprecated" FutureWarning, raised inside torch the first time
  forward-mode AD (the regularizer's exact ∂t s) loads its decompositions.
"""
from __future__ import annotations

import os
import warnings


def quiet_third_party() -> None:
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    if "DS_ACCELERATOR" not in os.environ:
        import torch  # deferred: torch; every entry point calls this, `fpdiff --help` stays fast

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
