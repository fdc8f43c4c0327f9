"""A stand-in for ``pipeline.train`` with the same Slurm-facing contract, without torch.

Used by tests/test_slurm.py to check the sbatch plumbing (stop file, signals, exit 75,
requeue, resume) quickly. Same command line as ``python -m pipeline.train``:
``--config CFG --run-dir DIR --resume auto [training.n_steps=N training.ckpt_every=K ...]``.

The "weights" are a hash chain over the steps, so a resumed run ends with the same bytes as an
uninterrupted one only if it resumed from the right step. Each step sleeps
``fake.step_seconds`` (default 0.2) so that a test can stop it mid-run. With
FAKE_ACCELERATE_STATE=1 it also prints how Accelerate sees the process (MULTI_CPU, world size).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--resume", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    opts = {"training.n_steps": "20", "training.ckpt_every": "5", "fake.step_seconds": "0.2"}
    opts.update(o.split("=", 1) for o in args.overrides)
    n_steps, every = int(opts["training.n_steps"]), int(opts["training.ckpt_every"])
    step_s = float(opts["fake.step_seconds"])
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))

    if os.environ.get("FAKE_ACCELERATE_STATE"):
        # how Accelerate sees this process (checks the launcher's environment, e.g. MULTI_CPU)
        from accelerate import Accelerator

        st = Accelerator()  # as pipeline.train builds it
        print(f"[fake] rank {rank} accelerate {st.distributed_type} processes={st.num_processes}", flush=True)

    run = Path(args.run_dir)
    stop = {"flag": False}
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.__setitem__("flag", True))

    ckroot = run / "checkpoints"
    step, weights = 0, hashlib.sha256(b"init").hexdigest()
    done = sorted(ckroot.glob("step_*/state.json")) if args.resume == "auto" else []
    if done:
        state = json.loads(done[-1].read_text())
        step, weights = state["step"], state["weights"]
        print(f"[fake] rank {rank}/{world} resumed at step {step}", flush=True)
    print(f"[fake] rank {rank}/{world} start step {step} of {n_steps}", flush=True)

    def save(s: int) -> None:
        if rank != 0:
            return
        d = ckroot / f"step_{s:08d}"
        tmp = ckroot / f".tmp-step_{s:08d}"
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "ema.safetensors").write_text(weights)
        (tmp / "model.safetensors").write_text(weights)
        (tmp / "state.json").write_text(json.dumps({"step": s, "weights": weights}))
        tmp.rename(d)

    while step < n_steps:
        time.sleep(step_s)
        weights = hashlib.sha256(f"{weights}:{step}".encode()).hexdigest()
        step += 1
        print(f"[fake] rank {rank} step {step}", flush=True)
        stop_now = stop["flag"] or (run / "STOP").exists()
        if step % every == 0 or step == n_steps or stop_now:
            save(step)
        if stop_now and step < n_steps:
            print(f"[fake] rank {rank}: stop requested, checkpoint at step {step}, exit 75", flush=True)
            return 75
    if rank == 0:
        (run / "export").mkdir(parents=True, exist_ok=True)
        (run / "export" / "ema.safetensors").write_text(weights)
    print(f"[fake] rank {rank} finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
