"""Every command in README.md runs as written after the commands before it (issue 12).

The commands are extracted from README's fenced blocks. Those that need a GPU, Slurm, the
network, data the reader brings (``path/to/...``, CIFAR-10) or minutes of CPU are listed in
``NOT_RUN`` with the reason; every other one is run, in README order, in a scratch directory
holding the repository's ``configs/`` and ``launch/``. A new README command must be put in
one group or the other (``test_every_readme_command_is_classified``).
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("fpdiff ", "accelerate ", "torchrun ", "pip ", "pytest", "slurm/", "RUN_DIR=", "python ")

# command prefix -> why it is not run here
NOT_RUN = {
    "pytest": "the test suite itself",
    "fpdiff data shards path/to/": "the reader's own CIFAR-10 / image folder",
    "fpdiff data shards arrays.npz": "the reader's own arrays",
    "accelerate launch --config_file launch/ddp": "8 GPUs / several nodes",
    "accelerate launch --config_file launch/ds_zero2.yaml": "GPUs",
    "accelerate launch --multi_gpu --num_processes 8": "8 GPUs and a trained CIFAR-10 run",
    "torchrun --nproc_per_node 2": "DeepSpeed ZeRO-2 on CPU takes minutes (tested in tests/test_distributed.py)",
    "fpdiff data shards data/cmnist.npz": "the coloured-MNIST arrays of the README's Python snippet",
    "fpdiff sample --run-dir runs/cmnist": "a colour-MNIST run trained for minutes",
    "fpdiff classifier --run-dir runs/tiny --steps 2000": "2,000 classifier steps (minutes on CPU)",
    "fpdiff sample --run-dir runs/tiny --class-label": "needs the classifier above",
    "fpdiff import score-sde": "a score_sde checkpoint downloaded by the reader",
    "fpdiff train --config runs/ddpmpp-sde": "needs the imported CIFAR-10 model",
    "fpdiff eval ref-stats --shards \"data/cifar10": "CIFAR-10 shards and the Inception download",
    "fpdiff eval fpe runs/cifar10": "a trained CIFAR-10 run",
    "fpdiff push": "the network (tested against a local fake Hub in tests/test_hub.py)",
    "slurm/": "Slurm (tested with fake Slurm commands in tests/test_slurm.py)",
    "RUN_DIR=": "Slurm",
    "python benchmarks/fpe_study.py": "about two hours of CPU (its --quick form is tests/test_fpe_study.py)",
}
# the package is installed already, and README's demo takes minutes on CPU: its smoke-test form
REWRITES = {"pip install -e \".[dev]\" && fpdiff demo": "fpdiff demo --quick"}
# appended to training commands so that each takes seconds, not minutes (same code path)
FAST_TRAINING = ["training.n_steps=4", "training.ckpt_every=2", "sampling.num_steps=4", "sampling.num_samples=4"]


def readme_commands() -> list[str]:
    """Shell commands of README's fenced blocks, continuation lines joined, comments dropped."""
    commands, in_block, pending = [], False, ""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        text = pending + line.strip()
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        text = re.sub(r"\s+#.*$", "", text).strip()
        if text.startswith(COMMANDS):
            commands.append(text)
    return commands


def not_run_reason(command: str):
    for prefix, reason in NOT_RUN.items():
        if command.startswith(prefix):
            return reason
    return None


def test_every_readme_command_is_classified():
    commands = readme_commands()
    assert any(c.startswith("fpdiff train") for c in commands) and len(commands) > 20
    runnable = [REWRITES.get(c, c) for c in commands if not_run_reason(c) is None]
    for command in runnable:  # what the runner below knows how to start
        assert command.startswith(("fpdiff ", "accelerate launch --multi_gpu --num_processes 2")), command
    assert any("--num_processes 2" in c for c in runnable)  # the CPU multi-process example runs


def _as_run(command: str) -> list[str]:
    command = REWRITES.get(command, command)
    argv = shlex.split(command)
    if argv[0] == "fpdiff":
        argv = [sys.executable, "-m", "pipeline.cli", *argv[1:]]
    elif argv[0] == "accelerate":
        argv = [sys.executable, "-m", "accelerate.commands.launch", *argv[2:]]
    if "train" in argv or "pipeline.train" in argv:
        argv += FAST_TRAINING
    return argv


@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path):
    for name in ("configs", "launch"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    for command in readme_commands():
        if not_run_reason(command) is not None:
            continue
        r = subprocess.run(_as_run(command), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"README command failed: {command}\n{r.stderr[-3000:]}"
