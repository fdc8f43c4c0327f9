"""How the FP-Diffusion study (benchmarks/fpe_study.py) writes, commits and runs: paths made portable
for committed files, atomic JSON results committed one at a time, fpdiff commands with their logs, and
--jobs side by side."""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.atomic import atomic_write_json
from pipeline.cli import main as fpdiff_main
from pipeline.status import EXIT_BAD_CONFIG

ROOT = Path(__file__).resolve().parents[1]
T0 = time.time()


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.0f}s] {msg}", flush=True)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class StudyFiles:
    """Where the study reads and writes (``work``: runs, shards, samples; ``out``: the committed results)
    and how it runs fpdiff; ``a`` is the parsed command line."""

    def __init__(self, a):
        self.a = a
        self.work, self.out = Path(a.work).resolve(), Path(a.out).resolve()
        self.done = self.skipped = 0
        self.lock = threading.Lock()

    def rel(self, p: Path | str) -> str:
        """A path as committed files hold it: relative to the repository root, else WORK/..., OUT/...,
        else its name."""
        p = Path(p).resolve()
        for base, label in ((ROOT, ""), (self.work, "WORK"), (self.out, "OUT")):
            if p == base or base in p.parents:
                r = p.relative_to(base)
                return str(Path(label) / r) if label else str(r)
        return p.name

    def arg(self, p: Path) -> str:
        """A path as commands get it: relative to the repository root (their working directory) when under it."""
        p = Path(p).resolve()
        return str(p.relative_to(ROOT)) if ROOT in p.parents else str(p)

    def portable(self, obj):
        """``obj`` with every absolute path in its strings made relative (``rel``), also inside KEY=PATH."""
        if isinstance(obj, dict):
            return {k: self.portable(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.portable(v) for v in obj]
        if isinstance(obj, Path):
            return self.rel(obj)
        if isinstance(obj, str) and "/" in obj:
            return re.sub(r"(?<![\w.~])/[^\s:,'\"]+", lambda m: self.rel(m.group(0)), obj)
        return obj

    def write(self, path: Path, obj, what: str) -> None:
        atomic_write_json(path, self.portable(obj))
        with self.lock:
            self.done += 1
        self.commit([path], what)

    def commit(self, paths: list[Path], what: str) -> None:
        if not self.a.commit:
            return
        with self.lock:  # one git index: --jobs commit one at a time
            self._commit(paths, what)

    def _commit(self, paths: list[Path], what: str) -> None:
        top = subprocess.run(["git", "-C", str(self.out), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
        if top.returncode:
            raise SystemExit(f"fpe_study: --commit: {self.out} is not in a git work tree")
        files, repo = [str(p) for p in paths], top.stdout.strip()
        subprocess.run(["git", "-C", repo, "add", "--", *files], check=True)
        if subprocess.run(["git", "-C", repo, "diff", "--cached", "--quiet", "--", *files]).returncode:
            subprocess.run(["git", "-C", repo, "commit", "-q", "-m", f"fpe_study: {what}", "--only", "--", *files],
                           check=True)

    def skip(self, what: str) -> None:
        with self.lock:
            self.skipped += 1
        say(f"skip {what} (done)")

    def parallel(self, fn, items: list) -> None:
        """fn(*item) for every item, --jobs at a time (each a chain of fpdiff subprocesses)."""
        if self.a.jobs <= 1:
            for it in items:
                fn(*it)
            return
        with ThreadPoolExecutor(self.a.jobs) as pool:
            list(pool.map(lambda it: fn(*it), items))

    def fpdiff(self, args: list, log: str) -> None:
        """fpdiff ARGS with its output in WORK/logs/LOG.log (a subprocess ``python -m pipeline.cli``, or
        ``pipeline.cli.main`` in this process with --in-process); a failure stops the study."""
        path = self.work / "logs" / f"{log}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        args = [str(a) for a in args]
        with open(path, "a") as fh:
            fh.write(f"$ fpdiff {' '.join(args)}\n")
            fh.flush()
            if not self.a.in_process:
                rc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, stdout=fh,
                                    stderr=subprocess.STDOUT).returncode
            else:
                cwd = os.getcwd()
                try:
                    os.chdir(ROOT)
                    with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                        rc = fpdiff_main(args)
                except SystemExit as e:  # argparse errors
                    rc = e.code if isinstance(e.code, int) else EXIT_BAD_CONFIG
                finally:
                    os.chdir(cwd)
        if rc:
            tail = "".join(path.read_text().splitlines(keepends=True)[-15:])
            raise SystemExit(f"fpe_study: `fpdiff {' '.join(args[:2])}` exited {rc}; log {path}:\n{tail}")
