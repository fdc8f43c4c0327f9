"""How fpdiff reports to people and launch scripts: status lines on stderr, the exit codes, and the
error class every stage shares for a missing input file (core: any stage may import it)."""
from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_BAD_CONFIG = 2  # bad configuration or input: a one-line error naming the file / key, nothing half-written
EXIT_NONFINITE = 3  # training stopped after training.max_nonfinite non-finite steps in a row
EXIT_REQUEUE = 75  # stopped by SIGUSR1 / SIGTERM / a STOP file after a checkpoint: requeue and resume


def say(msg: str) -> None:
    """A status line (stderr, unbuffered)."""
    print(f"[fpdiff] {msg}", file=sys.stderr, flush=True)


class MissingFileError(RuntimeError):
    """A file a stage needs is missing and cannot be downloaded; one-line message."""
