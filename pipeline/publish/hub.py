"""Hugging Face Hub: background push of a run's export folder, and loading a model back.

The export folder is written by ``pipeline.publish.export``; this module holds the uploader
(``HubPusher``), ``fpdiff push``, and loading from a local folder or a Hub repo id
(``load_pretrained``, ``load_weights_into`` for ``training.init_from``). Which file of a folder
holds the weights is ``pipeline.rundir``'s job.

``HubPusher`` uploads such a folder in a background thread (training never waits on the
network): ``push()`` snapshots the folder (hard links) and returns at once, failed uploads are
retried with exponential backoff and reported (log + counters), never raised. ``wait()`` at the
end of training. ``fpdiff push RUN_DIR --repo-id user/name`` does the same by hand
(``push_main``). ``load_pretrained("user/name" or a folder)`` returns ``(model, cfg)``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from pipeline.cliargs import ArgumentParser
from pipeline.config import ConfigError, finite_float
from pipeline.config_files import load_saved_config
from pipeline.models import build_model
from pipeline.rundir import (CONFIG, EMA_WEIGHTS, EXPORT_FILES, EXPORT_METRICS, SAMPLES_PNG, RunDir, find_weights,
                             load_state_into, read_weights)
from pipeline.status import EXIT_FAILED, fail, result, warn


# what an upload takes from an export folder, nothing else (no symlinks, no stray files)
EXPORT_UPLOADS = EXPORT_FILES + (SAMPLES_PNG,)


# ============================================================================ push
def is_retryable(exc: BaseException) -> bool:
    """Client errors (bad token, no permission, bad request) are not worth retrying."""
    resp = getattr(exc, "response", None)
    code = getattr(resp, "status_code", None)
    if isinstance(code, int) and 400 <= code < 500 and code not in (408, 409, 425, 429):
        return False
    if isinstance(exc, (ValueError, FileNotFoundError, PermissionError)) and code is None:
        return False
    if type(exc).__name__ == "OfflineModeIsEnabled":  # HF_HUB_OFFLINE=1: no retry can succeed
        return False
    return True


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:300]


def _linked_elsewhere(src: Path, parent: Path) -> bool:
    """Whether ``src`` is a hard link of a file outside its export: more links than itself and
    the snapshots of earlier pushes (``.push-*`` beside the export) account for."""
    st = src.stat()
    if st.st_nlink <= 1:
        return False
    ours = sum(1 for f in parent.glob(".push-*/*")
               if not f.is_symlink() and (f.stat().st_dev, f.stat().st_ino) == (st.st_dev, st.st_ino))
    return st.st_nlink > 1 + ours


class _Job:
    def __init__(self, staging: Path, message: str, owned: bool):
        self.staging, self.message, self.owned = staging, message, owned


class HubPusher:
    """Upload export folders to ``repo_id`` in a background thread, with retries.

    ``push(folder, msg)`` returns at once; a newer push replaces a queued one that has not
    started (only the latest export matters). An upload that fails is retried after
    ``backoff * 2**k`` seconds (capped at ``max_backoff``) up to ``max_retries`` times, then
    counted in ``pushes_failed`` and logged; nothing is ever raised to the caller.
    """

    def __init__(self, repo_id: str, *, max_retries: int = 5, private: bool = True,
                 token: str | None = None, endpoint: str | None = None, backoff: float = 2.0,
                 max_backoff: float = 60.0, repo_type: str = "model"):
        from huggingface_hub import HfApi  # deferred: huggingface_hub is needed only to push

        if not repo_id:
            raise ValueError("hub.repo_id: empty")
        self.repo_id = repo_id
        self.max_retries = int(max_retries)
        self.private = private
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.repo_type = repo_type
        self.api = HfApi(endpoint=endpoint or None, token=token)
        self.pushes_ok = 0
        self.pushes_failed = 0
        self.pushes_superseded = 0
        self.attempts = 0
        self.last_error: str | None = None
        self.last_commit_url: str | None = None
        self.last_ok_message: str | None = None
        self._repo_ready = False
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._pending: _Job | None = None
        self._busy = False
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, hub_cfg, token: str | None = None) -> "HubPusher":
        # hub.endpoint is only ever set from the command line (``load_config`` drops one read from
        # a file): the token goes to no server a downloaded config chose
        return cls(hub_cfg.repo_id, max_retries=hub_cfg.max_retries, private=hub_cfg.private,
                   token=token, endpoint=getattr(hub_cfg, "endpoint", "") or None,
                   backoff=getattr(hub_cfg, "retry_backoff", 2.0))

    # ------------------------------------------------------------------ caller side
    def push(self, folder: str | Path, commit_message: str = "Upload fpdiff export") -> bool:
        """Queue ``folder`` for upload; never blocks on the network. False if it was not queued."""
        folder = Path(folder)
        try:
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: not a folder")
            staging, owned = self.snapshot(folder), True
        except Exception as e:  # noqa: BLE001 - never fatal
            with self._lock:
                self.pushes_failed += 1
                self.last_error = _short(e)
            warn(f"hub push to {self.repo_id} not queued: {_short(e)}")
            return False
        with self._cond:
            if self._closed:
                shutil.rmtree(staging, ignore_errors=True)
                warn(f"hub push to {self.repo_id} not queued: pusher is closed")
                return False
            if self._pending is not None:
                self._discard(self._pending)
                self.pushes_superseded += 1
            self._pending = _Job(staging, commit_message, owned)
            self._cond.notify_all()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._worker, name=f"hub-push-{self.repo_id}", daemon=True)
                self._thread.start()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every queued push is done (uploaded or given up). True if nothing is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    warn(f"hub push to {self.repo_id} still running after {timeout:.0f}s; not waiting longer")
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """``wait(timeout)``, then stop the worker (a retry sleeping is cut short)."""
        done = self.wait(timeout)
        with self._cond:
            self._closed = True
            self._stop.set()
            self._cond.notify_all()
        return done

    def status(self) -> dict:
        with self._lock:
            return {"repo_id": self.repo_id, "pushes_ok": self.pushes_ok, "pushes_failed": self.pushes_failed,
                    "pushes_superseded": self.pushes_superseded, "attempts": self.attempts,
                    "pending": self._pending is not None, "in_progress": self._busy,
                    "last_error": self.last_error, "last_commit_url": self.last_commit_url}

    @staticmethod
    def snapshot(folder: Path) -> Path:
        """Hard-link (copy where linking fails) the export's own files (``EXPORT_UPLOADS``, regular
        files, not symlinks) into a private staging dir, so the trainer may rewrite the export
        while the upload runs."""
        try:  # next to the folder: same file system, so hard links work
            staging = Path(tempfile.mkdtemp(prefix=".push-", dir=folder.parent))
        except OSError:
            staging = Path(tempfile.mkdtemp(prefix="fpdiff-push-"))
        try:
            for name in EXPORT_UPLOADS:
                src = folder / name
                if src.is_symlink() or not src.is_file():
                    continue
                if _linked_elsewhere(src, folder.parent):
                    warn(f"hub push: {src} is hard-linked to a file outside the export; not uploaded")
                    continue
                dst = staging / name
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _discard(job: _Job) -> None:
        if job.owned:
            shutil.rmtree(job.staging, ignore_errors=True)

    def _worker(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stop.is_set():
                    self._cond.wait()
                if self._pending is None:
                    return
                job, self._pending, self._busy = self._pending, None, True
            try:
                self._run_job(job)
            except BaseException as e:  # noqa: BLE001 - the worker must survive anything
                with self._lock:
                    self.pushes_failed += 1
                    self.last_error = _short(e)
                warn(f"hub push to {self.repo_id} crashed: {_short(e)}")
            finally:
                self._discard(job)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _upload_once(self, job: _Job):
        if not self._repo_ready:
            self.api.create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type=self.repo_type)
            self._repo_ready = True
        return self.api.upload_folder(repo_id=self.repo_id, folder_path=str(job.staging),
                                      commit_message=job.message, repo_type=self.repo_type)

    def _run_job(self, job: _Job) -> None:
        for attempt in range(self.max_retries + 1):
            with self._lock:
                self.attempts += 1
            try:
                info = self._upload_once(job)
            except Exception as e:  # noqa: BLE001
                err = _short(e)
                with self._lock:
                    self.last_error = err
                retry = is_retryable(e) and attempt < self.max_retries and not self._stop.is_set()
                if not retry:
                    with self._lock:
                        self.pushes_failed += 1
                    warn(f"hub push to {self.repo_id} failed after {attempt + 1} attempt(s), giving up on "
                         f"{job.message!r}: {err}")
                    return
                delay = min(self.max_backoff, self.backoff * (2 ** attempt))
                warn(f"hub push to {self.repo_id} failed (attempt {attempt + 1}/{self.max_retries + 1}): {err}; "
                     f"retrying in {delay:.1f}s")
                if self._stop.wait(delay):
                    with self._lock:
                        self.pushes_failed += 1
                    return
                continue
            with self._lock:
                self.pushes_ok += 1
                self.last_commit_url = getattr(info, "commit_url", None) or str(info)
                self.last_ok_message = job.message
            return


# ============================================================================ CLI
PUSH_USAGE = "fpdiff push RUN_DIR --repo-id USER/NAME [--private|--public] [--endpoint URL] [--token T]"


def push_main(argv: list[str] | None = None) -> int:
    """``fpdiff push RUN_DIR --repo-id X``: upload RUN_DIR/export (or RUN_DIR if it is an export)."""
    ap = ArgumentParser(prog="fpdiff push", description="Upload a run's export (EMA weights, "
                                 "config, model card) to the Hugging Face Hub.")
    ap.add_argument("run_dir", metavar="RUN_DIR", help="run directory (holding export/) or an export folder")
    ap.add_argument("--repo-id", required=True, help="target repository, user/name")
    vis = ap.add_mutually_exclusive_group()
    vis.add_argument("--private", dest="private", action="store_true", default=True,
                     help="create the repo private if it does not exist (default)")
    vis.add_argument("--public", dest="private", action="store_false", help="create the repo public")
    ap.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    ap.add_argument("--token", default=None, help="access token (default: HF_TOKEN or the saved login)")
    ap.add_argument("--commit-message", default=None, help="commit message (default: 'fpdiff export, step S')")
    ap.add_argument("--max-retries", type=int, default=3, help="upload attempts after the first (network errors only)")
    ap.add_argument("--retry-backoff", type=finite_float, default=2.0,
                    help="seconds before the first retry; doubles each time (max 60 s)")
    ap.add_argument("--dry-run", action="store_true", help="list what would be uploaded, and where; no network")
    args = ap.parse_args(argv)

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        return fail("push", f"run directory not found: {run_dir}")  # bad input: exit 2, like any command
    export = RunDir(run_dir).find_export()
    if export is None:
        return fail("push", f"no export in {run_dir} (expected {RunDir(run_dir).export}/{EMA_WEIGHTS} and {CONFIG}; "
                            f"the trainer writes it at the end of training and every hub.push_every steps)")
    message = args.commit_message
    if message is None:
        try:
            step = json.loads((export / EXPORT_METRICS).read_text()).get("step")
        except (OSError, ValueError):
            step = None
        message = f"fpdiff export, step {step}" if step is not None else "fpdiff export"
    if args.dry_run:
        files = [f for f in sorted(export.iterdir()) if f.name in EXPORT_UPLOADS and f.is_file() and not f.is_symlink()]
        for f in files:
            print(f"  {f.name} ({f.stat().st_size:,} bytes)")
        result(f"dry run: would push {len(files)} files of {export} to {args.repo_id} "
               f"({'private' if args.private else 'public'}), message {message!r}; nothing uploaded")
        return 0
    pusher = HubPusher(args.repo_id, max_retries=args.max_retries, private=args.private, token=args.token,
                       endpoint=args.endpoint, backoff=args.retry_backoff)
    pusher.push(export, message)
    pusher.close()
    st = pusher.status()
    if st["pushes_ok"] < 1:
        return fail("push", f"upload to {args.repo_id} failed: {st['last_error']}", EXIT_FAILED)
    result(f"pushed {export} to {args.repo_id}: {st['last_commit_url']}")
    return 0


# ============================================================================ loading back
def export_folder(path_or_repo_id: str | Path, *, revision: str | None = None, token: str | None = None,
                   endpoint: str | None = None, cache_dir: str | None = None) -> Path:
    """A local folder (its export/ when it has one) or the export files of a Hub repo, downloaded."""
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir():
        return RunDir(p).find_export() or p
    if p.exists() or str(path_or_repo_id).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path_or_repo_id}: not an export folder (need {EMA_WEIGHTS} and {CONFIG})")
    from huggingface_hub import snapshot_download  # deferred: huggingface_hub is needed only for a Hub id

    try:
        local = snapshot_download(str(path_or_repo_id), revision=revision, token=token, endpoint=endpoint,
                                  cache_dir=cache_dir, allow_patterns=list(EXPORT_FILES))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise FileNotFoundError(f"{path_or_repo_id}: not a local folder, and loading it as a Hub repo id failed "
                                f"({type(e).__name__}: {first})") from e
    return Path(local)


def load_pretrained(path_or_repo_id: str | Path, device: str = "cpu", *, revision: str | None = None,
                    token: str | None = None, endpoint: str | None = None, cache_dir: str | None = None):
    """Load ``(model, cfg)`` from an export folder, a run dir holding ``export/``, or a Hub repo id.

    The model is built with ``pipeline.models.build_model(cfg)``, loaded with the EMA weights and
    put in eval mode on ``device``.
    """
    folder = export_folder(path_or_repo_id, revision=revision, token=token, endpoint=endpoint,
                            cache_dir=cache_dir)
    cfg_path, w_path = folder / CONFIG, folder / EMA_WEIGHTS
    for f in (cfg_path, w_path):
        if not f.is_file():
            raise FileNotFoundError(f"{path_or_repo_id}: missing {f.name}")
    cfg = load_saved_config(cfg_path, keep_local_paths=False)
    model = build_model(cfg)
    load_state_into(model, read_weights(w_path), source=str(path_or_repo_id))
    return model.to(device).eval(), cfg


def load_weights_into(model, source: str | Path, *, token: str | None = None,
                      endpoint: str | None = None) -> Path:
    """Initialise ``model`` from EMA weights (``training.init_from``): a weights file, an export
    folder, a checkpoint folder, a run dir (its ``export/``, else its newest checkpoint:
    ``find_weights(prefer_export=True)``), or a Hub repo id. Returns the weights file used."""
    p = Path(source).expanduser()
    try:
        if p.exists():
            w = find_weights(p, prefer_export=True, need_config=False).file
        else:
            w = export_folder(str(source), token=token, endpoint=endpoint) / EMA_WEIGHTS
        load_state_into(model, read_weights(w), source=str(w))
    except (FileNotFoundError, ValueError) as e:  # ConfigError included: one line naming the key
        raise ConfigError(f"training.init_from: {e}") from None
    return w
