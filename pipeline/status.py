"""How fpdiff reports to people and launch scripts: the one place that writes a "[fpdiff]" line or an
error line, the exit codes, and the error class every stage shares for a missing input file (core:
any stage may import it).

Status lines (``say``, ``note``, ``warn``) and errors (``fail``: ``fpdiff COMMAND: what is wrong``,
returning the exit code) go to stderr, one line each, unbuffered, so that a command's stdout holds
only what it produced: the tables and the final ``result`` line that names its outputs. Nothing
here goes through ``logging``: a library logger without a handler drops its messages, and these
must reach the person who ran the command (data-loader worker processes too)."""
from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran but its work failed (an upload, a verification); the line says which
EXIT_BAD_CONFIG = 2  # bad configuration or input: a one-line error naming the file / key, nothing half-written
EXIT_NONFINITE = 3  # training stopped after training.max_nonfinite non-finite steps in a row
EXIT_REQUEUE = 75  # stopped by SIGUSR1 / SIGTERM / a STOP file after a checkpoint: requeue and resume
EXIT_INTERRUPTED = 130  # Ctrl-C outside training (128 + SIGINT, as a shell reports it)

PREFIX = "[fpdiff]"


def say(msg: str) -> None:
    """A status line (stderr, unbuffered)."""
    print(f"{PREFIX} {msg}", file=sys.stderr, flush=True)


def note(msg: str) -> None:
    """Something the user may want to know that changes nothing they asked for."""
    say(f"note: {msg}")


def warn(msg: str) -> None:
    """Something was skipped, dropped or fell back; the run goes on."""
    say(f"warning: {msg}")


def result(msg: str) -> None:
    """The line naming what a command produced (stdout: what a script captures)."""
    print(f"{PREFIX} {msg}", flush=True)


def fail(command: str, msg, code: int = EXIT_BAD_CONFIG) -> int:
    """A command's error: ``fpdiff COMMAND: msg`` on stderr (one line: it names the file or key); returns
    the exit code, ``return fail("sample", e)``."""
    print(f"fpdiff{' ' + command if command else ''}: {msg}", file=sys.stderr, flush=True)
    return code


def interrupted(command: str) -> int:
    """Ctrl-C outside training: one line below the terminal's ^C; nothing half-written is left."""
    print(file=sys.stderr)
    return fail(command, "interrupted", EXIT_INTERRUPTED)


class MissingFileError(RuntimeError):
    """A file a stage needs is missing and cannot be downloaded; one-line message."""
