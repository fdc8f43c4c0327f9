"""The run directory: its layout, where its weights are, and reading / writing weight files.

Every module that reads or writes a run goes through ``RunDir``; no other module spells a file
name of this layout::

    RUN/
        config.yaml                 the full experiment config (``pipeline.config``)
        checkpoints/step_XXXXXXXX/  model.safetensors, ema.safetensors, optimizer.pt, state.json
                                    (last: marks it complete) and, under DeepSpeed, deepspeed/
        checkpoints/.tmp-step_*     a checkpoint being written (``pipeline.train.checkpoint``)
        export/                     ema.safetensors, config.yaml, metrics.json, README.md (model
                                    card), samples.png: what is pushed (``pipeline.publish``)
        metrics.jsonl               training metrics, one JSON object a line; wandb_run_id.txt, wandb/
        eval/                       metrics.jsonl (in-training evaluation), <metric>-step<S>.json
        samples.png, samples.npz    the final samples; samples/ (grids during training; sample-NNN/: one
                                    ``fpdiff sample`` call each: samples.npz, grid.png, samples.json, or
                                    inpaint.* / colorize.*)
        summary.json, summary.txt   the end of training (and one line per ``fpdiff eval``)
        STOP                        asks a running trainer to checkpoint and exit
        .lock                       the pid of the process training into it (``RunLock``)
        classifier/                 ``fpdiff classifier``: model.safetensors, classifier.json
        imported/                   ``fpdiff import``: model.safetensors, optimizer.pt, import.json
        init_from.json              a fine-tune's source and what it continued (``training.init_from``)

``find_weights(path)`` resolves what a person may pass for "a trained model" (a run dir, its
export/, an export on its own, a checkpoint folder, a weights file) to ``Weights`` (file, its
config, its run); ``load_for_eval`` builds the EMA model from it. Uses ``pipeline.config_files``,
``pipeline.models`` and safetensors.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.atomic import shared_mode
from pipeline.config import ConfigError
from pipeline.config_files import load_saved_config
from pipeline.models import build_model
from pipeline.status import say

# file names of a run (and of its export folder, checkpoints and sample folders)
CONFIG = "config.yaml"
EMA_WEIGHTS = "ema.safetensors"
MODEL_WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
CHECKPOINT_STATE = "state.json"
CHECKPOINTS_DIR = "checkpoints"
DEEPSPEED_DIR = "deepspeed"  # a checkpoint's partitioned optimizer states (DeepSpeed's tag)
EXPORT_DIR = "export"
EXPORT_METRICS = "metrics.json"
MODEL_CARD = "README.md"
EXPORT_FILES = (EMA_WEIGHTS, CONFIG, EXPORT_METRICS, MODEL_CARD)
METRICS_LOG = "metrics.jsonl"
WANDB_ID = "wandb_run_id.txt"
EVAL_DIR = "eval"
SAMPLES_PNG = "samples.png"
SAMPLES_NPZ = "samples.npz"
SAMPLES_DIR = "samples"
SAMPLE_FOLDER_PREFIX = "sample-"
SAMPLE_GRID = "grid.png"  # a sample-NNN folder's grid, beside samples.npz and
SAMPLE_RECORD = "samples.json"  # its record (sampler, seed, NFE, ...)
SUMMARY_JSON = "summary.json"
SUMMARY_TXT = "summary.txt"
STOP_FILE = "STOP"
CLASSIFIER_DIR = "classifier"
CLASSIFIER_META = "classifier.json"  # beside the classifier's model.safetensors
IMPORTED_DIR = "imported"
IMPORT_RECORD = "import.json"
INIT_SOURCE = "init_from.json"
STEP_PREFIX = "step_"
LOCK_FILE = ".lock"  # held by the process training into the run (``RunLock``)
# every name above: no other module spells one (tests/test_layers.py)
LAYOUT_NAMES = (CONFIG, EMA_WEIGHTS, MODEL_WEIGHTS, OPTIMIZER, CHECKPOINT_STATE, CHECKPOINTS_DIR, DEEPSPEED_DIR,
                EXPORT_DIR, EXPORT_METRICS, MODEL_CARD, METRICS_LOG, WANDB_ID, EVAL_DIR, SAMPLES_PNG, SAMPLES_NPZ,
                SAMPLES_DIR, SAMPLE_GRID, SAMPLE_RECORD, SUMMARY_JSON, SUMMARY_TXT, STOP_FILE, CLASSIFIER_DIR, CLASSIFIER_META,
                IMPORTED_DIR, IMPORT_RECORD, INIT_SOURCE, LOCK_FILE)
_STRIP_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (nothing is created by asking)."""

    path: Path

    def __init__(self, path):
        object.__setattr__(self, "path", Path(path))

    # ------------------------------------------------------------------ layout
    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{STEP_PREFIX}{step:08d}"

    def staging(self, step: int) -> Path:
        """Where checkpoint ``step`` is assembled (by every rank, for DeepSpeed) before its rename."""
        return self.checkpoints / f".tmp-{STEP_PREFIX}{step:08d}"

    def stale_staging(self) -> list[Path]:
        """Checkpoint staging folders left by a save that did not finish."""
        return list(self.checkpoints.glob(".tmp-*"))

    @property
    def export(self) -> Path:
        return self.path / EXPORT_DIR

    @property
    def metrics_log(self) -> Path:
        return self.path / METRICS_LOG

    @property
    def wandb_id(self) -> Path:
        return self.path / WANDB_ID

    @property
    def eval(self) -> Path:
        return self.path / EVAL_DIR

    @property
    def eval_log(self) -> Path:
        return self.eval / METRICS_LOG

    def eval_result(self, metric: str, step: Optional[int]) -> Path:
        return self.eval / f"{metric}-step{step if step is not None else 'unknown'}.json"

    @property
    def samples_png(self) -> Path:
        return self.path / SAMPLES_PNG

    @property
    def samples_npz(self) -> Path:
        return self.path / SAMPLES_NPZ

    @property
    def samples_dir(self) -> Path:
        return self.path / SAMPLES_DIR

    def new_samples_folder(self) -> Path:
        """A new, empty ``samples/sample-NNN`` (the next free number) for one ``fpdiff sample`` call."""
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        cut = len(SAMPLE_FOLDER_PREFIX)
        taken = [int(p.name[cut:]) for p in self.samples_dir.glob(f"{SAMPLE_FOLDER_PREFIX}*") if p.name[cut:].isdigit()]
        n = max(taken, default=0) + 1
        while True:
            folder = self.samples_dir / f"{SAMPLE_FOLDER_PREFIX}{n:03d}"
            try:
                folder.mkdir()
                return folder
            except FileExistsError:  # another call took it meanwhile
                n += 1

    def sample_grid(self, step: int) -> Path:
        return self.samples_dir / f"{STEP_PREFIX}{step:08d}.png"

    @property
    def summary_json(self) -> Path:
        return self.path / SUMMARY_JSON

    @property
    def summary_txt(self) -> Path:
        return self.path / SUMMARY_TXT

    @property
    def stop_file(self) -> Path:
        return self.path / STOP_FILE

    @property
    def classifier(self) -> Path:
        return self.path / CLASSIFIER_DIR

    @property
    def imported(self) -> Path:
        return self.path / IMPORTED_DIR

    @property
    def import_record(self) -> Path:
        """What ``fpdiff import score-sde`` imported (source, step, EMA decay and updates)."""
        return self.imported / IMPORT_RECORD

    @property
    def init_source(self) -> Path:
        """Where a fine-tune started (``training.init_from``) and what it continued."""
        return self.path / INIT_SOURCE

    @property
    def outputs(self) -> tuple[Path, ...]:
        """What a training run writes (what ``--overwrite`` removes; other files are left)."""
        return (self.checkpoints, self.export, self.metrics_log, self.eval, self.summary_json, self.summary_txt,
                self.samples_png, self.samples_npz, self.samples_dir, self.stop_file,
                self.init_source)

    def add_summary_line(self, line: str) -> None:
        """Append one line to summary.txt (the run's human-readable record)."""
        with open(self.summary_txt, "a") as fh:
            fh.write(line.rstrip("\n") + "\n")

    # ------------------------------------------------------------------ an earlier run in it
    def check_free(self, resume: Optional[str], overwrite: bool) -> None:
        """Refuse to start a fresh run over an earlier one: its checkpoints would count as newer,
        its metrics be cut and its export replaced by a different model."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path}: the run dir is a file, not a folder; choose another --run-dir")
        if resume or overwrite:
            return
        found = [p.name for p in (self.checkpoints, self.export, self.metrics_log) if p.exists()]
        if found:
            raise ConfigError(f"{self.path}: holds an earlier run ({', '.join(found)}); continue it with --resume "
                              f"auto, train into a new --run-dir, or replace it with --overwrite")

    def clear_outputs(self) -> None:
        """``--overwrite``: remove an earlier run's outputs (other files in the run dir are left)."""
        for target in self.outputs:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()

    # ------------------------------------------------------------------ where the weights are
    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoints (``state.json`` written), oldest first."""
        if not self.checkpoints.is_dir():
            return []
        done = [p for p in self.checkpoints.iterdir()
                if p.is_dir() and checkpoint_step(p) is not None and (p / CHECKPOINT_STATE).is_file()]
        return sorted(done, key=checkpoint_step)

    def latest_checkpoint(self) -> Optional[Path]:
        ckpts = self.list_checkpoints()
        return ckpts[-1] if ckpts else None

    def find_export(self) -> Optional[Path]:
        """``RUN/export``, or the folder itself when it is an export (``ema.safetensors`` + ``config.yaml``)."""
        for cand in (self.export, self.path):
            if (cand / EMA_WEIGHTS).is_file() and (cand / CONFIG).is_file():
                return cand
        return None


class SampleSet(NamedTuple):
    """The files of one set of samples: the samples (uint8 .npz), their PNG grid, their JSON record."""

    npz: Path
    grid: Path
    record: Path


def sample_set(folder, kind: Optional[str] = None) -> SampleSet:
    """The files ``fpdiff sample`` writes into ``folder`` (a ``samples/sample-NNN`` or ``--out``):
    samples.npz, grid.png, samples.json; for ``kind`` inpaint / colorize KIND.npz, .png, .json."""
    folder = Path(folder)
    if kind is None:
        return SampleSet(folder / SAMPLES_NPZ, folder / SAMPLE_GRID, folder / SAMPLE_RECORD)
    return SampleSet(folder / f"{kind}.npz", folder / f"{kind}.png", folder / f"{kind}.json")


def has_deepspeed_state(checkpoint: Path) -> bool:
    """Whether a checkpoint folder holds DeepSpeed's partitioned optimizer states."""
    return (Path(checkpoint) / DEEPSPEED_DIR).is_dir()


def checkpoint_step(folder: Path) -> Optional[int]:
    """The step of a ``checkpoints/step_XXXXXXXX`` folder, from its name (None: not such a name)."""
    name = Path(folder).name
    return int(name[len(STEP_PREFIX):]) if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX):].isdigit() else None


class Weights(NamedTuple):
    """EMA weights found by ``find_weights``: the file, the config.yaml that describes them (None:
    not known) and the run dir they belong to (None: an export or file on its own, whose results
    must not land in the folder above it)."""

    file: Path
    config: Optional[Path]
    run: Optional[RunDir]

    @property
    def step(self) -> Optional[int]:
        """The training step of the weights, from the JSON files beside them or the folder's name."""
        folder = self.file.parent
        for name in (CHECKPOINT_STATE, EXPORT_METRICS, "metadata.json", "export.json"):
            f = folder / name
            if f.is_file():
                try:
                    d = json.loads(f.read_text())
                except (OSError, ValueError):
                    continue
                for key in ("step", "checkpoint_step", "steps"):
                    if isinstance(d.get(key), int):
                        return d[key]
                if isinstance(d.get("metrics"), dict) and isinstance(d["metrics"].get("step"), int):
                    return d["metrics"]["step"]
        return checkpoint_step(folder)


def _run_of_export(export: Path) -> Optional[RunDir]:
    """The run an export folder belongs to (``RUN/export``), or None for one on its own (a Hub
    download in a cache, a copied folder)."""
    run = RunDir(export.parent)
    if export.name == run.export.name and (run.config.is_file() or run.checkpoints.is_dir()):
        return run
    return None


def find_weights(path, *, prefer_export: bool = False, need_config: bool = True) -> Weights:
    """The EMA weights of a run dir, its export/, an export folder on its own, a checkpoint folder
    or (``need_config=False``) a weights file or a folder holding just ``ema.safetensors``.

    A run dir gives its newest complete checkpoint, else its export/ (evaluation, sampling:
    the newest weights); ``prefer_export`` turns that round (``training.init_from``: the export
    first). Raises FileNotFoundError with one line.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"no run, export or checkpoint at {p}")
    if p.is_file():
        if not need_config:
            return Weights(p, None, None)
        if p.suffix == ".safetensors":
            p = p.parent
    run = RunDir(p)
    if prefer_export and run.find_export() == run.export:
        return Weights(run.export / EMA_WEIGHTS, run.export / CONFIG, run)
    if (p / EMA_WEIGHTS).is_file():
        if (p / CONFIG).is_file():  # an export folder; a run's own is described by the run's config
            owner = _run_of_export(p)
            return Weights(p / EMA_WEIGHTS, owner.config if owner and owner.config.is_file() else p / CONFIG, owner)
        owner = RunDir(p.parents[1]) if len(p.parents) > 1 else None
        if p.parent.name == run.checkpoints.name and owner is not None and owner.config.is_file():
            return Weights(p / EMA_WEIGHTS, owner.config, owner)
        if not need_config:
            return Weights(p / EMA_WEIGHTS, None, None)
        raise FileNotFoundError(f"{p}: EMA weights found but no {CONFIG} beside them or in the run dir")
    ckpt = run.latest_checkpoint()
    if ckpt is not None and (ckpt / EMA_WEIGHTS).is_file() and (run.config.is_file() or not need_config):
        return Weights(ckpt / EMA_WEIGHTS, run.config if run.config.is_file() else None, run)
    if not prefer_export and (run.export / EMA_WEIGHTS).is_file():
        return Weights(run.export / EMA_WEIGHTS, run.config if run.config.is_file() else run.export / CONFIG, run)
    if prefer_export:
        raise FileNotFoundError(f"no {EMA_WEIGHTS} in {p} (nor its export/ or checkpoints/)")
    raise FileNotFoundError(f"{p}: no checkpoints/{STEP_PREFIX}*/{EMA_WEIGHTS} (with {CONFIG}) "
                            f"and no export/{EMA_WEIGHTS}")


# ============================================================================ weight files
def write_errors() -> tuple:
    """What writing a weights file raises on a full disk, a quota or a lost mount: OSError from
    Python, RuntimeError from torch.save, SafetensorError from safetensors."""
    return (OSError, RuntimeError, SafetensorError)


def write_error_text(e: BaseException) -> str:
    """One line for ``write_errors()``: the OS's reason when there is one."""
    text = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{type(e).__name__}: {text[:200]}"


def save_weights(path, state_dict: Mapping, metadata: Optional[dict] = None) -> Path:
    """The tensors of ``state_dict`` as a safetensors file (other entries are left out). Not atomic
    on its own: written into a staging folder (``pipeline.atomic.atomic_directory``) by every caller."""
    # contiguous CPU copies that own their memory: safetensors refuses tensors that share storage
    tensors = {str(k): v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, str(path), metadata=metadata)
    shared_mode(path, 0o666)  # safetensors writes 0600
    return Path(path)


def check_finite(state: Mapping, source: str) -> Mapping:
    """``state`` unchanged; a one-line ConfigError naming ``source`` when a float tensor in it holds
    NaN or infinity (bytes corrupted inside the data of a file that still parses, a diverged run)."""
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConfigError(f"{source}: weights are not finite ({len(bad)} tensors hold NaN or infinity, "
                          f"e.g. {str(bad[0])[:100]})")
    return state


def read_weights(path) -> dict:
    """A safetensors file on CPU; an unreadable one (truncated, not safetensors) or one holding
    non-finite values is a one-line ConfigError naming it."""
    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - truncated or not a safetensors file
        raise ConfigError(f"{path}: unreadable weights file ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:200]})") from None
    return check_finite(state, str(path))


def _clean_keys(state: Mapping) -> dict:
    out = {}
    for k, v in state.items():
        while k.startswith(_STRIP_PREFIXES):  # each prefix is one dotted segment, however nested
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def load_state_into(model, state: Mapping, *, source: str = "weights") -> None:
    """``model.load_state_dict`` (strict) after stripping ``module.`` / ``_orig_mod.`` prefixes,
    with a one-line error naming the first missing / unexpected keys."""
    state = _clean_keys(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the model built from its config "
                         f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, "
                         f"e.g. {unexpected[:3]})")
    wrong = [k for k, v in own.items() if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise ConfigError(f"{source}: weights do not match the model built from its config ({len(wrong)} of another "
                         f"shape, e.g. {k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model)")
    model.load_state_dict(state, strict=True)


def load_for_eval(source, device="cpu", overrides: Optional[list[str]] = None):
    """(EMA model in eval mode on ``device``, Config, step or None) from a run dir, its export/
    folder, an export on its own or a checkpoint folder (``find_weights``), or ``Weights`` found
    before. ``overrides``: dotted config overrides applied to the saved config."""
    weights = source if isinstance(source, Weights) else find_weights(source)
    cfg = load_saved_config(weights.config, overrides)
    model = build_model(cfg)
    load_state_into(model, read_weights(weights.file), source=str(weights.file))
    model.to(device).eval().requires_grad_(False)
    return model, cfg, weights.step


# ============================================================================ one writer per run
class RunLock:
    """An exclusive lock on a run dir (``RUN/.lock``, flock, holding the writer's pid), held for a
    training run: a second writer is refused with one line; a lock left by a process that died is
    taken over with one line. ``release()`` (or the holder's exit) frees it."""

    def __init__(self, run_dir):
        self.path = RunDir(run_dir).path / LOCK_FILE
        self._fh = None

    def acquire(self) -> "RunLock":
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fh = open(self.path, "a+")
            except OSError as e:  # a file in the way, a read-only filesystem, no permission
                raise ConfigError(f"{self.path.parent}: cannot write the run dir here "
                                  f"({e.strerror or type(e).__name__}: {e.filename})") from None
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                holder = fh.read().strip() or "?"
                fh.close()
                raise ConfigError(f"{self.path.parent}: another process (pid {holder}) is training into this run "
                                  f"dir; wait for it, stop it, or choose another --run-dir") from None
            # the file may have been released and removed between our open and our lock: lock the one on disk
            try:
                same = os.stat(self.path).st_ino == os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            fh.close()
        fh.seek(0)
        stale = fh.read().strip()
        if stale and stale != str(os.getpid()):
            say(f"{self.path}: taking over the lock of process {stale}, which is no longer running")
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self.path.unlink(missing_ok=True)  # while still held: no one else can be holding it
            self._fh.close()
            self._fh = None

    def __del__(self):
        self.release()
