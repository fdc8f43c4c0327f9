"""Every command block of README.md runs as pasted, in README order (issues 12 and 27).

The commands (and the Python snippet that writes ``data/cmnist.npz``) are taken from README's
fenced blocks and run in a scratch directory holding the repository's ``configs/``, ``launch/``
and ``slurm/``, with small stand-ins for the data a reader brings (``path/to/...``: a CIFAR-10
python folder of 50 + 10 random images, an image folder, ``.npz`` arrays, MNIST IDX files).
What would take minutes is reduced, never rewritten: training commands get a few steps, a
CIFAR-10 model a small width, ``--num-samples`` / ``--passes`` / ``--steps`` small values (an
option given again wins), the FID a small TorchScript feature network instead of the Inception
download. GPU lines run as their CPU equivalent: the same command with the launcher
(``accelerate launch --config_file ...`` / ``--num_processes 8``) replaced by ``python``; the
alternatives of one block (DDP, multi-node DDP, ZeRO-2) must be the same command after their
launcher, so one runs. ``slurm/pipeline.sh`` runs with ``--dry-run``. What needs Slurm, a
score_sde checkpoint, the network or minutes more is in ``NOT_RUN`` with the reason; the shard
names those commands use must still be files the commands before them wrote.
"""
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers.eval_fixtures import build_extractor
from helpers.sources import cifar10_batches, write_idx

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("fpdiff ", "accelerate ", "torchrun ", "pip ", "pytest", "slurm/", "RUN_DIR=", "python ", "OMP_NUM_THREADS=")

# command prefix (or, ending in $, the whole command) -> why it is not run here
NOT_RUN = {
    "pytest": "the test suite itself",
    "torchrun --nproc_per_node 2": "DeepSpeed ZeRO-2 on CPU takes minutes (tested in tests/test_distributed.py)",
    "fpdiff import score-sde": "a score_sde checkpoint downloaded by the reader (tests/test_import.py)",
    "fpdiff train --config runs/ddpmpp-sde": "needs the imported CIFAR-10 model",
    "fpdiff push runs/tiny --repo-id you/fpdiff-mnist-tiny$": "the network (tests/test_hub.py: a local fake Hub)",
    "RUN_DIR=": "Slurm (tests/test_slurm.py)",
    "python benchmarks/fpe_study.py": "about 6 hours of 2 CPU cores, resumable (its --quick form is tests/test_fpe_study.py)",
}
# the package is installed already, and README's demo takes minutes on CPU: its smoke-test form
REWRITES = {"pip install -e \".[dev]\" && fpdiff demo": "fpdiff demo --quick"}
# appended to every training command: seconds, not minutes (same code path)
FAST_TRAINING = ["training.n_steps=4", "training.ckpt_every=2", "sampling.num_steps=4", "sampling.num_samples=4",
                 "training.log_every=2"]
# appended to the CIFAR-10 training commands: DDPM++'s layout at a small width and batch
SMALL_CIFAR = ["model.nf=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[]",
               "training.batch_size=4", "training.warmup=0"]
# command prefix -> what is appended (later options win)
REDUCTIONS = {
    "fpdiff demo": ["training.n_steps=4", "sampling.num_steps=4", "training.log_every=2"],
    "fpdiff train --config configs/demo.yaml": ["training.batch_size=8"],
    "fpdiff data shards path/to/cifar-10-batches-py": ["--max-samples", "1"],  # 50 + 10 images: 50 + 10 shards
    "fpdiff classifier": ["--steps", "5", "--eval-samples", "20", "--batch-size", "8"],
    "fpdiff eval ref-stats": ["--feature-extractor", "tiny_extractor.pt"],
    "python -m pipeline.eval fid": ["--num-samples", "4", "--batch-size", "4", "--feature-extractor",
                                    "tiny_extractor.pt", "sampling.num_steps=2"],
    "python -m pipeline.eval bpd": ["--passes", "1", "--max-samples", "2", "--rtol", "1e-2", "--atol", "1e-2"],
    "fpdiff eval fpe": ["--num-times", "2", "--max-samples", "2"],
    "fpdiff eval conservativity": ["--num-buckets", "2", "--max-samples", "2"],
    "fpdiff sample --run-dir runs/tiny --method ode": ["sampling.rtol=1e-2", "sampling.atol=1e-2"],
}
GPU_LAUNCHERS = (r"accelerate launch --config_file \S+ ", r"accelerate launch --multi_gpu --num_processes 8 ")


def readme_items() -> list[tuple[str, str]]:
    """("sh", command) and ("python", code) of README's fenced blocks in order: shell commands with
    continuation lines joined and comments dropped; a Python block only if it writes a file the
    commands use (np.savez)."""
    items, fence, pending, code = [], None, "", []
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if fence is None:
                fence, pending, code = line[3:].strip() or "sh", "", []
            else:
                if fence == "python" and "np.savez" in "\n".join(code):
                    items.append(("python", "\n".join(code)))
                fence = None
            continue
        if fence == "python":
            code.append(line)
        elif fence is not None:
            text = pending + line.strip()
            if text.endswith("\\"):
                pending = text[:-1] + " "
                continue
            pending = ""
            text = re.sub(r"\s+#.*$", "", text).strip()
            if text.startswith(COMMANDS):
                items.append(("sh", text))
    return items


def readme_commands() -> list[str]:
    return [text for kind, text in readme_items() if kind == "sh"]


def not_run_reason(command: str):
    for prefix, reason in NOT_RUN.items():
        if command == prefix[:-1] if prefix.endswith("$") else command.startswith(prefix):
            return reason
    return None


def cpu_equivalent(command: str) -> str:
    """A GPU line with its launcher replaced by ``python`` (other lines unchanged)."""
    for launcher in GPU_LAUNCHERS:
        command = re.sub("^" + launcher, "python ", command)
    return command


def as_run(command: str) -> tuple[list[str], dict]:
    """(argv, extra environment) of a README command as this test runs it."""
    command = cpu_equivalent(REWRITES.get(command, command))
    env = {}
    while re.match(r"^[A-Z_]+=\S+ ", command):  # VAR=value before the command
        assignment, command = command.split(" ", 1)
        env[assignment.split("=")[0]] = assignment.split("=", 1)[1]
    argv = shlex.split(command)
    extra = [a for prefix, args in REDUCTIONS.items() if command.startswith(prefix) for a in args]
    if argv[0] == "fpdiff":
        argv = [sys.executable, "-m", "pipeline.cli", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    elif argv[0] == "accelerate":
        argv = [sys.executable, "-m", "accelerate.commands.launch", *argv[2:]]
    elif argv[0] == "slurm/pipeline.sh":
        argv = [argv[0], "--dry-run", *argv[1:]]
    argv += extra
    if "train" in argv or "pipeline.train" in argv:
        argv += FAST_TRAINING + (SMALL_CIFAR if "configs/cifar10_ddpmpp.yaml" in argv else [])
    return argv, env


def test_every_readme_command_is_classified():
    commands = readme_commands()
    assert any(c.startswith("fpdiff train") for c in commands) and len(commands) > 30
    assert [kind for kind, _ in readme_items()].count("python") == 1  # data/cmnist.npz
    for command in commands:
        if not_run_reason(command) is None:
            argv, _ = as_run(command)
            assert Path(argv[0]).name.startswith("python") or argv[0] == "slurm/pipeline.sh", command
    gpu = [cpu_equivalent(c) for c in commands if c.startswith("accelerate launch --config_file")]
    assert len(gpu) == 3 and len(set(gpu)) == 1  # DDP, multi-node DDP, ZeRO-2: one command after the launcher


def _reader_data(root: Path) -> None:
    """Stand-ins for the data README's `path/to/...` and `arrays.npz` name."""
    from PIL import Image

    to = root / "path" / "to"
    cifar10_batches(to, sizes=(30, 20, 10))  # 50 training + 10 test images, as CIFAR-10 has 50,000 + 10,000
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (to / "images" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(to / "images" / cls / f"{i}.png")
    np.savez(root / "arrays.npz", x=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8), y=np.arange(6) % 2)
    x, y = rng.integers(0, 256, (9, 28, 28), dtype=np.uint8), np.arange(9) % 10
    np.savez(to / "mnist.npz", x_train=x[:6], y_train=y[:6], x_test=x[6:], y_test=y[6:])
    (to / "mnist-idx").mkdir()
    for stem, a in (("train-images-idx3-ubyte", x[:6]), ("train-labels-idx1-ubyte", y[:6]),
                    ("t10k-images-idx3-ubyte", x[6:]), ("t10k-labels-idx1-ubyte", y[6:])):
        write_idx(to / "mnist-idx" / stem, a, gz=False)


def _local_shard_specs(command: str) -> list[str]:
    """The local shard patterns a command names (data.shards=, data.test_shards=, --shards)."""
    argv = shlex.split(command)
    specs = [a.split("=", 1)[1] for a in argv if a.startswith(("data.shards=", "data.test_shards="))]
    specs += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--shards"]
    return [s for s in specs if "://" not in s and not s.startswith("pipe:")]


def _expand(pattern: str) -> list[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    width = len(m.group(1))
    return [pattern[:m.start()] + f"{i:0{width}d}" + pattern[m.end():] for i in range(int(m.group(1)), int(m.group(2)) + 1)]


# console entry points (pyproject's `fpdiff`, the stages' ``python -m``) run in this process: the
# same argv reaches the same main(), without an interpreter start per command
IN_PROCESS = {"pipeline.cli": "pipeline.cli:main", "pipeline.train": "pipeline.train.loop:main",
              "pipeline.eval": "pipeline.eval.cli:evaluate_main"}


def _run(argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """Run a command; an IN_PROCESS one here, with cwd, environment and output redirected."""
    import contextlib
    import importlib
    import io

    if len(argv) < 3 or argv[:2] != [sys.executable, "-m"] or argv[2] not in IN_PROCESS:
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    module, _, name = IN_PROCESS[argv[2]].partition(":")
    main = getattr(importlib.import_module(module), name)
    out, err, old_cwd, old_env = io.StringIO(), io.StringIO(), os.getcwd(), dict(os.environ)
    try:
        os.chdir(cwd)
        os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv[3:])
            except SystemExit as e:
                code = e.code
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
    return subprocess.CompletedProcess(argv, int(code or 0), out.getvalue(), err.getvalue())


@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path):
    for name in ("configs", "launch", "slurm"):
        (tmp_path / name).symlink_to(ROOT / name)
    _reader_data(tmp_path)
    build_extractor(tmp_path / "tiny_extractor.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline",
           "FPDIFF_ROOT": str(tmp_path)}
    env.pop("DS_ACCELERATOR", None)
    ran_gpu_line = False
    for kind, text in readme_items():
        if kind == "python":
            (tmp_path / "data").mkdir(exist_ok=True)
            old_cwd = os.getcwd()
            try:
                os.chdir(tmp_path)
                exec(compile(text, "README.md (python block)", "exec"), {})
            finally:
                os.chdir(old_cwd)
            continue
        if not_run_reason(text) is not None:
            for spec in _local_shard_specs(text):  # the names it uses are files written before it
                missing = [p for p in _expand(spec) if not (tmp_path / p).is_file()]
                assert not missing, f"README command names shards never written: {text}\n{missing[:3]}"
            continue
        if text.startswith("accelerate launch --config_file"):
            if ran_gpu_line:  # the block's alternatives are one command after the launcher (checked above)
                continue
            ran_gpu_line = True
        argv, extra_env = as_run(text)
        t0 = time.time()
        r = _run(argv, tmp_path, {**env, **extra_env})
        print(f"{time.time() - t0:6.1f}s  {text[:100]}")
        assert r.returncode == 0, f"README command failed: {text}\n{r.stderr[-3000:]}"
        last = (r.stdout.strip().splitlines() or [""])[-1]
        if argv[0] != "slurm/pipeline.sh":  # every command ends with where its outputs are
            assert last.startswith("[fpdiff] ") or last.startswith("pushed "), f"{text}: last line {last!r}"
        # (tests/test_cli_usability.py checks a fresh `fpdiff` process for third-party warnings)
        assert "Setting accelerator to CPU" not in r.stdout + r.stderr, text
