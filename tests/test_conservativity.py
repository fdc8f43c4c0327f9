"""`fpdiff eval conservativity`: the relative asymmetry E‖(J − Jᵀ)v‖² / E‖Jv‖² of the score's Jacobian
against closed forms: a Gaussian score (a gradient field: 0), a rotated score (exactly 4 sin²θ for every
Rademacher probe), a random linear map (‖A − Aᵀ‖_F² / ‖A‖_F² within the reported standard error); Jv and
Jᵀv of the real UNet against its full Jacobian; the CLI's JSON and summary line."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from gaussian import GaussianData
from helpers.eval_fixtures import EVAL_WORKER, ROOT, TINY_OVERRIDES, clean_env, make_export, run_eval, write_test_shards


def _setup(n: int, side: int = 4, seed: int = 0, overrides=()):
    from pipeline.config_files import load_config
    from pipeline.sde import build_sde

    cfg = load_config(None, TINY_OVERRIDES + [f"data.image_size={side}", *overrides])
    u8 = torch.randint(0, 256, (n, 1, side, side), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return cfg, build_sde(cfg.sde), u8


def _linear_score(sde, A: torch.Tensor):
    """s(x, t) = A x: a linear field with Jacobian A at every x and t."""
    return lambda x, t: (x.flatten(1) @ A.T).reshape(x.shape)


def _evaluate(score_fn, n=16, side=4, num_buckets=3, batch_size=5):
    from pipeline.eval.conservativity import evaluate_conservativity

    cfg, sde, u8 = _setup(n, side, overrides=[f"eval.conservativity_buckets={num_buckets}",
                                              f"eval.batch_size={batch_size}", f"eval.conservativity_max_samples={n}"])
    return evaluate_conservativity(torch.nn.Identity(), cfg, sde, images=u8, score_fn=score_fn(sde), progress=False)


def test_gaussian_score_is_conservative():
    """∇ log N(aμ, a²Σ + σ²I) with symmetric Σ: J symmetric, the asymmetry is float rounding (fp32 in/out)."""
    data = GaussianData.random(16, seed=1)
    res = _evaluate(data.score_fn, n=12)
    assert res["N"] == 12 and len(res["ratio"]) == len(res["t"]) == 3
    assert all(b > 1.0 for b in res["jv_sq"])  # a real, non-zero Jacobian was probed
    assert max(res["ratio"]) < 1e-10 and abs(res["value"]) < 1e-10


@pytest.mark.parametrize("theta", [0.3, math.pi / 2])
def test_rotated_score_gives_closed_form(theta):
    """s = −R_θ x: R_θ rotates each coordinate pair by θ. R − Rᵀ = 2 sinθ K with K skew, K² = −I, so
    ‖(R − Rᵀ)v‖² = 4 sin²θ D and ‖Rv‖² = D for every v in {±1}^D: the ratio is 4 sin²θ exactly."""
    D = 16
    R = torch.zeros(D, D)
    c, s = math.cos(theta), math.sin(theta)
    for i in range(0, D, 2):
        R[i:i + 2, i:i + 2] = torch.tensor([[c, -s], [s, c]])
    res = _evaluate(lambda sde: _linear_score(sde, -R))
    expected = 4 * s * s
    assert res["ratio"] == pytest.approx([expected] * 3, rel=1e-5)
    assert res["value"] == pytest.approx(expected, rel=1e-5)
    assert res["stderr"] < 1e-5 * expected  # the same value for every image and probe


def test_random_linear_map_matches_frobenius_ratio():
    """For a general A the ratio of means tends to ‖A − Aᵀ‖_F² / ‖A‖_F² (E[vvᵀ] = I); the reported standard
    error covers the difference."""
    D = 16
    A = torch.randn(D, D, generator=torch.Generator().manual_seed(4))
    A = A + 0.5 * A.T  # partly symmetric: the ratio is away from both 0 and its maximum
    expected = float((A - A.T).pow(2).sum() / A.pow(2).sum())
    res = _evaluate(lambda sde: _linear_score(sde, A), n=600, num_buckets=2, batch_size=200)
    assert 0 < res["stderr"] < 0.05 * expected
    for r, se in zip(res["ratio"], res["ratio_stderr"]):
        assert abs(r - expected) < 4 * se, (r, expected, se)
    assert abs(res["value"] - expected) < 4 * res["stderr"]


def test_jvp_and_vjp_of_the_unet_match_its_jacobian():
    from pipeline.config_files import load_config
    from pipeline.eval.conservativity import jvp_and_vjp
    from pipeline.models import build_model
    from pipeline.score import get_score_fn
    from pipeline.sde import build_sde

    cfg = load_config(None, TINY_OVERRIDES)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # off the zero-initialised output layer: a Jacobian of order 1
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    score_fn = get_score_fn(model, build_sde(cfg.sde))
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(1, 1, 8, 8, generator=g), torch.tensor([0.4])
    v = torch.randint(0, 2, x.shape, generator=g).float() * 2 - 1
    jv, jtv = jvp_and_vjp(score_fn, x, t, v)
    J = torch.autograd.functional.jacobian(lambda y: score_fn(y.reshape(x.shape), t).flatten(), x.flatten())
    scale = float(J.abs().max())
    assert scale > 0.1
    assert jv.flatten() == pytest.approx(J @ v.flatten(), abs=1e-4 * scale)
    assert jtv.flatten() == pytest.approx(J.T @ v.flatten(), abs=1e-4 * scale)
    assert float((J - J.T).abs().max()) > 0.1 * scale  # a network's Jacobian is not symmetric


def test_cli_writes_json_and_summary(tmp_path):
    pattern = write_test_shards(tmp_path / "shards", sizes=(5, 2))
    export = make_export(tmp_path / "run")
    worker = EVAL_WORKER
    r = run_eval(worker, ["conservativity", str(export), "--shards", pattern, "--batch-size", "3",
                          "--num-buckets", "2", "--max-samples", "6", "--no-progress"], 1, clean_env())
    res = json.loads((tmp_path / "run" / "eval" / "conservativity-step7.json").read_text())
    assert res["metric"] == "conservativity" and res["N"] == 6 and res["checkpoint_step"] == 7
    assert len(res["ratio"]) == 2 and all(0 < x < 8 for x in res["ratio"]) and res["value"] > 0
    assert "eval conservativity: relative Jacobian asymmetry" in r.stdout
    assert "eval conservativity" in (tmp_path / "run" / "summary.txt").read_text()
    bad = subprocess.run([sys.executable, str(worker), "conservativity", str(export), "--num-buckets", "0"],
                         cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--num-buckets: must be >= 1" in bad.stderr


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    """7 images in batches of 3 (the last partial) over 2 ranks: the same per-image draws (seeded by global
    batch index), so the same ratios and standard errors as 1 rank."""
    pattern = write_test_shards(tmp_path / "shards", sizes=(5, 2))
    export = make_export(tmp_path / "run")
    worker = EVAL_WORKER
    out = {}
    for procs in (1, 2):
        run_eval(worker, ["conservativity", str(export), "--shards", pattern, "--batch-size", "3", "--num-buckets", "2",
                          "--max-samples", "7", "--no-progress", "--out", str(tmp_path / f"c{procs}.json")],
                 procs, clean_env())
        out[procs] = json.loads((tmp_path / f"c{procs}.json").read_text())
    assert out[1]["N"] == out[2]["N"] == 7 and out[2]["world_size"] == 2
    assert out[2]["ratio"] == pytest.approx(out[1]["ratio"], rel=1e-6)
    assert out[2]["stderr"] == pytest.approx(out[1]["stderr"], rel=1e-5)
