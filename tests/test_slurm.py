"""Slurm scripts: static checks, the multi-node launch line, and runs on a real local Slurm.

The slow tests start a single-node Slurm cluster on this machine with
tests/slurm/local_cluster.sh (installing slurm-wlm + munge from the OS packages when missing);
they skip only when the OS cannot install it.
"""
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "slurm"
LOCAL_CLUSTER = ROOT / "tests" / "slurm" / "local_cluster.sh"
TINY = ROOT / "configs" / "mnist_tiny.yaml"
SCRIPTS = sorted([*SLURM_DIR.glob("*.sbatch"), *SLURM_DIR.glob("*.sh"), LOCAL_CLUSTER])
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def _run(cmd, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 300)
    return subprocess.run(cmd, **kw)


# --------------------------------------------------------------------------- static checks
def test_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"train.sbatch", "eval.sbatch", "pipeline.sh", "common.sh", "local_cluster.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    r = _run(["bash", "-n", str(script)])
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="session")
def shellcheck():
    exe = shutil.which("shellcheck")
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        r = _run(["apt-get", "install", "-y", "shellcheck"], env=env, timeout=600)
        if r.returncode != 0:
            _run(["apt-get", "update"], env=env, timeout=600)
            _run(["apt-get", "install", "-y", "shellcheck"], env=env, timeout=600)
        exe = shutil.which("shellcheck")
    if exe is None:
        why = "not root" if os.geteuid() != 0 else "apt-get missing or failed"
        pytest.skip(f"shellcheck is not installed and cannot be installed here ({why})")
    return exe


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(shellcheck, script):
    r = _run([shellcheck, "-x", str(script.relative_to(ROOT))], cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- launch line
FAKE_SRUN = r"""#!/usr/bin/env bash
# stand-in for srun: runs the task once per node, each with its own SLURM_NODEID
printf '%s\n' "$*" >>"$FAKE_SRUN_LOG"
nodes=1
while (($#)); do
    case $1 in
        --nodes=*) nodes=${1#*=}; shift ;;
        -*) shift ;;
        *) break ;;
    esac
done
for ((i = 0; i < nodes; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 SLURMD_NODENAME=node$i "$@" || exit $?
done
"""


def _fake_allocation(tmp_path, nnodes, gpus, nodelist, extra=None):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    srun = bindir / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FPDIFF_"))}
    env.update({
        "PATH": f"{bindir}:{env['PATH']}", "FAKE_SRUN_LOG": str(tmp_path / "srun.log"),
        "FPDIFF_ROOT": str(ROOT), "FPDIFF_LAUNCH_DRYRUN": "1", "RUN_DIR": str(tmp_path / "run"),
        "SLURM_JOB_ID": "4242", "SLURM_NNODES": str(nnodes), "SLURM_JOB_NUM_NODES": str(nnodes),
        "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist, "SLURM_CPUS_PER_TASK": "32",
        # the batch shell runs on node 0: a launch line built there would give every node rank 0
        "SLURM_NODEID": "0", "SLURM_PROCID": "0",
    })
    if gpus is not None:
        env["SLURM_GPUS_ON_NODE"] = str(gpus)
    env.update(extra or {})
    return env


def _launch_lines(stdout):
    lines = [ln for ln in stdout.splitlines() if ln.startswith("FPDIFF_LAUNCH ")]
    out = []
    for ln in lines:
        words = shlex.split(ln)
        out.append((int(words[1]), words[2:]))
    return out


def _opt(words, name):
    i = words.index(name)
    return words[i + 1]


def test_launch_line_for_fake_4_node_allocation(tmp_path):
    env = _fake_allocation(tmp_path, 4, 4, "gpu-[001-004]")
    r = _run(["bash", str(SLURM_DIR / "train.sbatch"), str(TINY), "training.n_steps=7", "fpe.alpha=0.1"],
             env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tasks = _launch_lines(r.stdout)
    assert [node for node, _ in tasks] == [0, 1, 2, 3], r.stdout
    ranks, addrs, ports = [], set(), set()
    for node, words in tasks:
        assert words[:2] == ["accelerate", "launch"]
        assert "--multi_gpu" in words
        assert _opt(words, "--num_machines") == "4"
        assert int(_opt(words, "--num_processes")) == 16  # world size = nodes x GPUs per node
        ranks.append(int(_opt(words, "--machine_rank")))
        addrs.add(_opt(words, "--main_process_ip"))
        ports.add(_opt(words, "--main_process_port"))
        assert _opt(words, "-m") == "pipeline.train"
        assert _opt(words, "--config") == str(TINY)
        assert _opt(words, "--run-dir") == str(tmp_path / "run")
        assert _opt(words, "--resume") == "auto"
        assert words[-2:] == ["training.n_steps=7", "fpe.alpha=0.1"]
    assert ranks == [0, 1, 2, 3]
    assert addrs == {"gpu-001"} and len(ports) == 1
    srun_args = (tmp_path / "srun.log").read_text().split()
    assert "--ntasks-per-node=1" in srun_args and "--nodes=4" in srun_args and "--ntasks=4" in srun_args


def test_launch_line_single_process_and_cpu_multi_process(tmp_path):
    # one CPU node, no GPUs: one process, no --multi_gpu
    env = _fake_allocation(tmp_path, 1, None, "vm")
    r = _run(["bash", str(SLURM_DIR / "train.sbatch"), str(TINY)], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    [(node, words)] = _launch_lines(r.stdout)
    assert node == 0 and "--multi_gpu" not in words and _opt(words, "--num_processes") == "1"
    assert words[:4] == ["env", "ACCELERATE_USE_CPU=true", "accelerate", "launch"]
    # two CPU nodes x 2 gloo processes: --multi_gpu gives MULTI_CPU on CPU-only machines
    env = _fake_allocation(tmp_path, 2, 0, "cpu[7,9]", {"FPDIFF_PROCS_PER_NODE": "2"})
    r = _run(["bash", str(SLURM_DIR / "train.sbatch"), str(TINY)], env=env, cwd=tmp_path)
    tasks = _launch_lines(r.stdout)
    assert [int(_opt(w, "--machine_rank")) for _, w in tasks] == [0, 1]
    assert all("--multi_gpu" in w and _opt(w, "--num_processes") == "4" for _, w in tasks)
    # without it Accelerate runs each CPU process alone (DistributedType.NO), not as MULTI_CPU
    assert all(w[:2] == ["env", "ACCELERATE_USE_CPU=true"] for _, w in tasks)
    assert {_opt(w, "--main_process_ip") for _, w in tasks} == {"cpu7"}
    # "a100:8" style GPU counts
    env = _fake_allocation(tmp_path, 1, None, "g1", {"SLURM_GPUS_PER_NODE": "a100:8"})
    r = _run(["bash", str(SLURM_DIR / "train.sbatch"), str(TINY)], env=env, cwd=tmp_path)
    [(_, words)] = _launch_lines(r.stdout)
    assert _opt(words, "--num_processes") == "8" and "--multi_gpu" in words


def test_eval_launch_line(tmp_path):
    env = _fake_allocation(tmp_path, 1, 2, "g[3-4]")
    r = _run(["bash", str(SLURM_DIR / "eval.sbatch"), "fid,bpd", "--batch-size", "50", "eval.fid_num_samples=100"],
             env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tasks = _launch_lines(r.stdout)
    assert len(tasks) == 2
    for (_, words), metric in zip(tasks, ["fid", "bpd"]):
        i = words.index("-m")
        assert words[i + 1:] == ["pipeline.eval", metric, str(tmp_path / "run"), "--batch-size", "50",
                                 "eval.fid_num_samples=100"]
        assert _opt(words, "--num_processes") == "2" and "--multi_gpu" in words
    r = _run(["bash", str(SLURM_DIR / "eval.sbatch"), "fud"], env=env, cwd=tmp_path)
    assert r.returncode != 0 and "unknown metric" in r.stderr


@pytest.mark.parametrize("nodelist", ["gpu-[003-004,010],cpu1", "rack[1-2]-n[07,09]", "vm", "a,b", "x-1-[2-3]"])
def test_first_host(nodelist):
    r = _run(["bash", "-c", 'source "$1"; fpdiff_first_host "$2"', "_", str(SLURM_DIR / "common.sh"), nodelist])
    host = r.stdout.strip()
    expected = {"gpu-[003-004,010],cpu1": "gpu-003", "rack[1-2]-n[07,09]": "rack1-n07", "vm": "vm",
                "a,b": "a", "x-1-[2-3]": "x-1-2"}[nodelist]
    assert host == expected
    # cross-check with Slurm's own parser where it can run (without a slurm.conf it retries for 60 s)
    if shutil.which("scontrol") and Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).is_file():
        s = _run(["scontrol", "show", "hostnames", nodelist], timeout=90)
        if s.returncode == 0:
            assert s.stdout.split()[0] == host


def test_pipeline_dry_run_chains_dependencies(tmp_path):
    """--dry-run writes nothing and prints one sbatch line per job: one eval job per metric, each
    with only the --eval-arg options its metric takes (--num-samples: fid, not bpd), overrides to
    both; the push job depends on both and asks for no GPUs (one --gpus-per-node)."""
    r = _run([str(SLURM_DIR / "pipeline.sh"), "--dry-run", "--config", str(TINY), "--run-dir", str(tmp_path / "r"),
              "--nodes", "4", "--gpus-per-node", "8", "--metrics", "fid,bpd", "--eval-arg", "--num-samples",
              "--eval-arg", "500", "--eval-arg", "--batch-size=10", "--eval-arg", "sampling.num_steps=5",
              "--repo-id", "me/model", "--", "training.n_steps=9"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["DRYRUN_train", "DRYRUN_eval_fid,DRYRUN_eval_bpd", "DRYRUN_push"]
    assert list(tmp_path.iterdir()) == []  # nothing written, the run dir's slurm/ included
    lines = [shlex.split(ln) for ln in r.stderr.splitlines() if ln.startswith("sbatch ")]
    train, fid, bpd, push = lines
    assert "--nodes=4" in train and "--gpus-per-node=8" in train and train[-2:] == [str(TINY), "training.n_steps=9"]
    assert "--dependency=afterok:DRYRUN_train" in fid and "--dependency=afterok:DRYRUN_train" in bpd
    assert fid[fid.index("slurm/eval.sbatch"):] == ["slurm/eval.sbatch", "fid", "--num-samples", "500",
                                                     "--batch-size=10", "sampling.num_steps=5"]
    assert bpd[bpd.index("slurm/eval.sbatch"):] == ["slurm/eval.sbatch", "bpd", "--batch-size=10", "sampling.num_steps=5"]
    assert "--dependency=afterok:DRYRUN_eval_fid:DRYRUN_eval_bpd" in push
    assert [a for a in push if a.startswith("--gpus-per-node")] == ["--gpus-per-node=0"]
    wrap = shlex.split(push[push.index("--wrap") + 1])
    assert wrap[-3:] == ["push", str(tmp_path / "r"), "me/model"]
    r = _run([str(SLURM_DIR / "pipeline.sh"), "--dry-run", "--config", str(TINY)], cwd=tmp_path)
    assert r.stdout.split()[2] == "none"  # no --repo-id: no push job
    r = _run([str(SLURM_DIR / "pipeline.sh"), "--dry-run", "--config", str(TINY), "--metrics", "bpd",
              "--eval-arg", "--num-samples", "--eval-arg", "5"], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (
        "pipeline.sh: error: --eval-arg --num-samples: no metric of --metrics bpd takes it")


def test_pipeline_knows_each_metrics_options():
    """pipeline.sh's table of the options of each metric is pipeline.eval's parser's."""
    import argparse

    from pipeline.eval.cli import build_parser

    text = (SLURM_DIR / "pipeline.sh").read_text()
    common = set(re.search(r'EVAL_COMMON_OPTS=" (.*?) "', text).group(1).split())
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for metric in ("fid", "bpd", "fpe"):
        listed = common | set(re.search(rf'\[{metric}\]="\$EVAL_COMMON_OPTS (.*?) "', text).group(1).split())
        parser = subparsers.choices[metric]
        taken = {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
        assert listed == taken, metric


# --------------------------------------------------------------------------- real Slurm
MARKER = "# written by fpdiff tests/slurm/local_cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    if conf.is_file() and MARKER not in conf.read_text() and not os.environ.get("FPDIFF_SLURM_USE_EXISTING"):
        pytest.skip(f"{conf} belongs to another Slurm cluster; set FPDIFF_SLURM_USE_EXISTING=1 to submit "
                    "the test jobs to it (CPU jobs, --gpus-per-node=0, default partition)")
    r = _run(["bash", str(LOCAL_CLUSTER), "start"], timeout=900)
    if r.returncode == 3:
        pytest.skip(f"this OS cannot install Slurm: {r.stderr.strip().splitlines()[-1:]}")
    assert r.returncode == 0, f"local Slurm did not start:\n{r.stderr[-3000:]}"
    return True


def _job_env(run_dir, extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FPDIFF_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    if (Path(sys.prefix) / "bin" / "activate").is_file():
        env["FPDIFF_VENV"] = sys.prefix
    env.update({"FPDIFF_ROOT": str(ROOT), "RUN_DIR": str(run_dir), "PYTHONUNBUFFERED": "1",
                "WANDB_MODE": "offline"})
    env.update(extra or {})
    return env


LOCAL_OPTS = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=30"]


def _sbatch(args, env):
    r = _run(["sbatch", "--parsable", *args], env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def _job_info(job_id):
    r = _run(["scontrol", "-o", "show", "job", job_id], timeout=30)
    if r.returncode != 0:
        return {}
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


def _wait_done(job_id, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = _job_info(job_id)
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(2)
    _run(["scancel", job_id])
    pytest.fail(f"job {job_id} not finished after {timeout}s: {_job_info(job_id)}")


def _wait_for(path_fn, job_id, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path_fn():
            return
        if _job_info(job_id).get("JobState") in TERMINAL:
            break
        time.sleep(0.25)
    pytest.fail(f"{what} did not happen (job {job_id}: {_job_info(job_id)})")


def _history(run_dir):
    return (run_dir / "slurm" / "history.log").read_text()


def _fake_weights(n_steps):
    w = hashlib.sha256(b"init").hexdigest()
    for s in range(n_steps):
        w = hashlib.sha256(f"{w}:{s}".encode()).hexdigest()
    return w


@pytest.mark.slow
def test_requeue_plumbing_with_stand_in_trainer(slurm_cluster, tmp_path):
    """Stop signal -> STOP file -> checkpoint + exit -> scontrol requeue -> resume, with two gloo
    processes (--multi_gpu on CPU) of a torch-free stand-in trainer: fast, checks the batch shell."""
    run_dir = tmp_path / "run"
    env = _job_env(run_dir, {"FPDIFF_TRAIN_MODULE": "fake_trainer", "FPDIFF_PROCS_PER_NODE": "2",
                             "PYTHONPATH": str(ROOT / "tests" / "slurm"), "FAKE_ACCELERATE_STATE": "1"})
    n = 30
    job = _sbatch([*LOCAL_OPTS, f"--output={tmp_path}/%j.out", str(SLURM_DIR / "train.sbatch"), str(TINY),
                   f"training.n_steps={n}", "training.ckpt_every=5", "fake.step_seconds=0.3"], env)
    _wait_for(lambda: (run_dir / "checkpoints" / "step_00000005").is_dir(), job, 600, "first checkpoint")
    r = _run(["scancel", "--signal=USR1", "--batch", job], timeout=30)
    assert r.returncode == 0, r.stderr
    info = _wait_done(job, 900)
    out = (tmp_path / f"{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", out[-3000:]
    assert info.get("Restarts") == "1", info
    hist = _history(run_dir)
    assert "SIGUSR1: asking the trainer" in hist and "requeue 1" in hist, hist
    assert re.search(r"slurm_restart=1 start .*restarts=1", hist), hist
    assert hist.strip().splitlines()[-1].endswith("end: trainer finished (exit 0)"), hist
    assert (run_dir / "slurm" / "restart_count").read_text().strip() == "1"
    assert not (run_dir / "STOP").exists()
    m = re.search(r"rank 0: stop requested, checkpoint at step (\d+)", out)
    assert m and 5 <= int(m.group(1)) < n, out[-3000:]
    assert f"resumed at step {m.group(1)}" in out
    assert "rank 1/2 start" in out  # two processes per task: the --multi_gpu path ran
    # ... as one gloo process group (not two lone processes)
    assert "rank 1 accelerate DistributedType.MULTI_CPU processes=2" in out, out[-3000:]
    assert (run_dir / "export" / "ema.safetensors").read_text() == _fake_weights(n)


@pytest.mark.slow
def test_cancelled_job_is_not_requeued(slurm_cluster, tmp_path):
    """scancel (SIGTERM to everything) asks the trainer to stop but must not requeue the job."""
    run_dir = tmp_path / "run"
    env = _job_env(run_dir, {"FPDIFF_TRAIN_MODULE": "fake_trainer", "PYTHONPATH": str(ROOT / "tests" / "slurm")})
    job = _sbatch([*LOCAL_OPTS, f"--output={tmp_path}/%j.out", str(SLURM_DIR / "train.sbatch"), str(TINY),
                   "training.n_steps=200", "training.ckpt_every=5", "fake.step_seconds=0.2"], env)
    _wait_for(lambda: (run_dir / "checkpoints" / "step_00000005").is_dir(), job, 600, "first checkpoint")
    assert _run(["scancel", job], timeout=30).returncode == 0
    info = _wait_done(job, 300)
    time.sleep(3)
    info = _job_info(job) or info
    assert info["JobState"] == "CANCELLED" and info.get("Restarts") == "0", info
    hist = _history(run_dir)
    assert "SIGTERM: asking the trainer" in hist and "terminated" in hist and "requeue 1" not in hist, hist
    assert not (run_dir / "slurm" / "restart_count").exists()


@pytest.fixture(scope="session")
def slurm_shards(tmp_path_factory):
    from pipeline.data.shards import ensure_mnist_shards

    return ensure_mnist_shards(tmp_path_factory.mktemp("slurm-mnist"))


@pytest.mark.slow
def test_train_stop_requeue_resume_then_eval_on_local_slurm(slurm_cluster, slurm_shards, tmp_path):
    """The real trainer under slurm/pipeline.sh (train -> eval, afterok): stopped mid-run with the
    job's stop signal, requeued once, resumed to the same final weights (bitwise) as an
    uninterrupted Slurm run of the same config; then slurm/eval.sbatch evaluates the result."""
    import torch
    from safetensors.torch import load_file

    train_p, test_p = slurm_shards
    n, every = 24, 4
    overrides = [f"data.shards={train_p}", f"data.test_shards={test_p}", "logging.backend=none",
                 f"training.n_steps={n}", f"training.ckpt_every={every}", "training.keep_last=10",
                 "sampling.num_samples=4", "--no-progress"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"

    # uninterrupted reference (runs beside the pipeline on the second core)
    ref_job = _sbatch([*LOCAL_OPTS, f"--output={tmp_path}/ref-%j.out", str(SLURM_DIR / "train.sbatch"), str(TINY),
                       *overrides], _job_env(ref_dir))
    eval_args = ["--max-samples", "2", "--rtol", "1e-2", "--atol", "1e-2", "--no-progress"]
    cmd = [str(SLURM_DIR / "pipeline.sh"), "--config", str(TINY), "--run-dir", str(run_dir), "--gpus-per-node", "0",
           "--cpus-per-task", "1", "--time", "30", "--eval-time", "30", "--metrics", "bpd"]
    for a in eval_args:
        cmd += ["--eval-arg", a]
    r = _run(cmd + ["--", *overrides], env=_job_env(run_dir), cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    train_job, eval_job, push_job = r.stdout.split()
    assert push_job == "none"

    _wait_for(lambda: (run_dir / "checkpoints" / f"step_{every:08d}").is_dir(), train_job, 1200, "first checkpoint")
    r = _run(["scancel", "--signal=USR1", "--batch", train_job], timeout=30)
    assert r.returncode == 0, r.stderr
    assert _job_info(eval_job).get("JobState") == "PENDING"

    info = _wait_done(train_job, 1800)
    logs = "\n".join(p.read_text() for p in sorted((run_dir / "slurm").glob("*.log")))
    assert info["JobState"] == "COMPLETED", logs[-4000:]
    assert info.get("Restarts") == "1", info
    hist = _history(run_dir)
    assert "SIGUSR1: asking the trainer" in hist and "requeue 1" in hist, hist
    assert hist.strip().splitlines()[-1].endswith("end: trainer finished (exit 0)"), hist
    assert (run_dir / "slurm" / "restart_count").read_text().strip() == "1"
    m = re.search(r"stop requested: checkpoint at step (\d+) written", logs)
    assert m and every <= int(m.group(1)) < n, logs[-4000:]
    stop_step = int(m.group(1))
    assert f"resumed from {run_dir}/checkpoints/step_{stop_step:08d} at step {stop_step}" in logs
    assert (run_dir / "checkpoints" / f"step_{stop_step:08d}" / "ema.safetensors").is_file()

    ref_info = _wait_done(ref_job, 1800)
    assert ref_info["JobState"] == "COMPLETED", (ref_dir / "slurm" / f"train-{ref_job}.log").read_text()[-3000:]
    assert "requeue 1" not in _history(ref_dir)
    for rel in ["export/ema.safetensors", f"checkpoints/step_{n:08d}/model.safetensors",
                f"checkpoints/step_{n:08d}/ema.safetensors"]:
        a, b = load_file(str(ref_dir / rel)), load_file(str(run_dir / rel))
        assert a.keys() == b.keys(), rel
        for k in a:
            assert torch.equal(a[k], b[k]), f"{rel}: {k} differs from the uninterrupted run"

    # the eval job waited for the requeued training job's real end, then evaluated its result
    ev = _wait_done(eval_job, 1800)
    eval_log = "\n".join(p.read_text() for p in (run_dir / "slurm").glob("eval-*.log"))
    assert ev["JobState"] == "COMPLETED", eval_log[-4000:]
    results = list((run_dir / "eval").glob(f"bpd-step{n}.json"))
    assert results, eval_log[-4000:]
