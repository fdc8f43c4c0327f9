"""Experiment tracking: wandb (optional) plus a plain ``metrics.jsonl`` in the run directory.

``Tracker(cfg.logging, run_dir, cfg.to_dict(), is_main=accelerator.is_main_process)``

* ``logging.backend: wandb`` logs to Weights & Biases (``logging.mode: offline`` needs no network
  and writes ``run_dir/wandb/offline-run-*``; sync later with ``wandb sync``); ``backend: none``
  disables it. The wandb run id is kept in ``run_dir/wandb_run_id.txt`` and the run is opened with
  ``resume="allow"``, so a requeued job continues the same run.
* Every metric is also appended, one JSON object per line, to ``run_dir/metrics.jsonl``
  (``{"step": 10, "loss": 0.5, "time": ...}``): a record that needs no wandb.
* ``resumed``: True (or None, the default: decided by what is in ``run_dir``) continues the
  run id and the step count found there; False (training starts at step 0 in a used directory)
  sets the old ``metrics.jsonl`` and run id aside and starts a new wandb run.
* Steps only go forward. After a resume the trainer repeats the steps between its last checkpoint
  and the kill; a log whose step is below the last step already logged (or not above the last
  step logged before the resume) is dropped and counted in ``skipped_logs``, never an error.
* ``finish()`` flushes the offline run file (``wandb.teardown()``), so it is complete on return.
* Only the main process logs: with ``is_main=False`` every method is a no-op.
* wandb failures never stop training: a failed init switches wandb off (warning), a failed
  log call is a warning, and 5 failed calls in a row switch it off; the JSONL record goes on.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Mapping

from pipeline.atomic import atomic_write_text, plain_json
from pipeline.rundir import RunDir
from pipeline.status import warn


MAX_WANDB_ERRORS = 5


def last_logged_step(metrics_path: str | Path) -> int | None:
    """The largest ``step`` in an existing ``metrics.jsonl`` (reads only its tail)."""
    p = Path(metrics_path)
    if not p.is_file():
        return None
    size = p.stat().st_size
    with p.open("rb") as f:
        f.seek(max(0, size - 65536))
        tail = f.read().decode("utf-8", errors="replace").splitlines()
    best = None
    for line in tail:
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue  # first (partial) line or a torn last line
        if isinstance(step, int) and (best is None or step > best):
            best = step
    return best


def _aside(path: Path, stamp: str) -> Path:
    """Where an earlier run's file is set aside: metrics.jsonl -> metrics.<stamp>.jsonl."""
    return path.with_name(f"{path.stem}.{stamp}{path.suffix}")


class Tracker:
    """Main-process metric logging to wandb and ``run_dir/metrics.jsonl``."""

    def __init__(self, cfg_logging, run_dir: str | Path, config_dict: dict | None = None,
                 is_main: bool = True, resumed: bool | None = None):
        self.is_main = bool(is_main)
        self.run_dir = Path(run_dir)
        self.cfg = cfg_logging
        self.run = None  # the wandb run, when active
        self.run_id: str | None = None
        self.skipped_logs = 0
        self._wandb_errors = 0
        self._last_step: int | None = None
        self._resume_floor: int | None = None
        self._jsonl = None
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = RunDir(self.run_dir).metrics_log
        self.id_file = RunDir(self.run_dir).wandb_id
        if resumed is False:
            self._start_fresh()
        # a resumed job continues after the last step it already logged
        self._resume_floor = last_logged_step(self.metrics_path)
        self._last_step = self._resume_floor
        self._jsonl = self.metrics_path.open("a", buffering=1)  # line-buffered
        if getattr(cfg_logging, "backend", "none") == "wandb":
            self._init_wandb(config_dict or {})

    def _start_fresh(self) -> None:
        """A run that starts from step 0 in a used directory: set the old record aside
        (``metrics.<time>.jsonl``) and forget the old wandb run id, so nothing is dropped."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if self.metrics_path.is_file() and self.metrics_path.stat().st_size:
            os.replace(self.metrics_path, _aside(self.metrics_path, stamp))
        if self.id_file.is_file():
            os.replace(self.id_file, _aside(self.id_file, stamp))

    # ------------------------------------------------------------------ wandb
    def _init_wandb(self, config_dict: dict) -> None:
        id_file = self.id_file
        try:
            import wandb  # deferred: wandb takes over a second to import; logging.backend=wandb only

            if id_file.is_file() and id_file.read_text().strip():
                run_id = id_file.read_text().strip()
            else:
                run_id = secrets.token_hex(6)  # wandb ids: [a-z0-9]
                atomic_write_text(id_file, run_id + "\n")
            name = self.cfg.run_name or config_dict.get("name") or None
            self.run = wandb.init(
                project=self.cfg.project or None,
                entity=self.cfg.entity or None,
                name=name,
                id=run_id,
                resume="allow",
                dir=str(self.run_dir),
                mode=self.cfg.mode,
                config=config_dict,
                settings=wandb.Settings(silent=True, console="off"),
            )
            self.run_id = self.run.id
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self._disable_wandb(f"wandb init failed ({type(e).__name__}: {e}); logging to {self.metrics_path.name} only")

    def _disable_wandb(self, message: str) -> None:
        warn(message)
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass

    def _wandb_error(self, what: str, exc: Exception) -> None:
        """One failed wandb call is a warning; MAX_WANDB_ERRORS in a row switch wandb off."""
        self._wandb_errors += 1
        if self._wandb_errors >= MAX_WANDB_ERRORS:
            self._disable_wandb(f"wandb {what} failed {self._wandb_errors} times in a row "
                                f"({type(exc).__name__}: {exc}); wandb switched off, {self.metrics_path.name} continues")
        else:
            warn(f"wandb {what} failed ({type(exc).__name__}: {exc})")

    # ------------------------------------------------------------------ API
    def _accept(self, step: int) -> bool:
        step = int(step)
        if self._resume_floor is not None and step <= self._resume_floor:
            self.skipped_logs += 1
            return False
        if self._last_step is not None and step < self._last_step:
            self.skipped_logs += 1
            return False
        self._last_step = step
        return True

    def _write_jsonl(self, record: dict) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalar metrics at ``step`` (dropped if ``step`` goes backwards)."""
        if not self.is_main or not self._accept(step):
            return
        plain = {str(k): plain_json(v) for k, v in metrics.items()}
        self._write_jsonl({"step": int(step), "time": round(time.time(), 3), **plain})
        if self.run is not None:
            try:
                self.run.log(plain, step=int(step))
                self._wandb_errors = 0
            except Exception as e:  # noqa: BLE001
                self._wandb_error("log", e)

    def log_image(self, key: str, png_path: str | Path, step: int) -> None:
        """Log an image file (e.g. a sample grid); the JSONL record keeps its path."""
        if not self.is_main or not self._accept(step):
            return
        self._write_jsonl({"step": int(step), "time": round(time.time(), 3), key: str(png_path)})
        if self.run is not None:
            try:
                import wandb  # deferred: wandb takes over a second to import; logging.backend=wandb only

                self.run.log({key: wandb.Image(str(png_path))}, step=int(step))
                self._wandb_errors = 0
            except Exception as e:  # noqa: BLE001
                self._wandb_error(f"image {png_path}", e)

    def summary(self, values: Mapping[str, Any]) -> None:
        """Final / best values (wandb run summary; a ``{"summary": ...}`` line in the JSONL)."""
        if not self.is_main:
            return
        plain = {str(k): plain_json(v) for k, v in values.items()}
        self._write_jsonl({"summary": plain, "time": round(time.time(), 3)})
        if self.run is not None:
            try:
                for k, v in plain.items():
                    self.run.summary[k] = v
            except Exception as e:  # noqa: BLE001
                self._wandb_error("summary", e)

    def finish(self) -> None:
        """Flush and close (idempotent)."""
        if not self.is_main:
            return
        if self.run is not None:
            run, self.run = self.run, None
            try:
                run.finish()
                import wandb  # deferred: wandb takes over a second to import; logging.backend=wandb only

                # wandb-core writes the run file asynchronously; shutting the service down flushes it
                # now (otherwise only at interpreter exit). Skipped if another run is active.
                if wandb.run is None:
                    wandb.teardown()
            except Exception as e:  # noqa: BLE001
                warn(f"wandb finish failed ({type(e).__name__}: {e})")
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish()
        return False
