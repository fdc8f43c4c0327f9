"""benchmarks/gpu.py, the one-shot GPU measurement (issue 16), on a CPU with --tiny: every row it
plans is measured, with sane numbers, and a failing, slow or cut row does not lose the others."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def run_script(out: Path, *extra, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out), *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text()), p.stdout


def positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_script(tmp_path_factory.mktemp("gpu") / "tiny.json")


def test_tiny_run_has_every_promised_row_with_sane_numbers(tiny_run):
    doc, table = tiny_run
    rows = {r["id"]: r for r in doc["rows"]}
    assert doc["meta"]["complete"] and doc["meta"]["tiny"] and doc["meta"]["device"] == "cpu"
    assert doc["planned"] == [r["id"] for r in doc["rows"]]  # every planned row, in order, once
    bad = {i: r.get("error") for i, r in rows.items() if r["status"] != "ok"}
    assert not bad, bad
    # the families the issue asks for
    want = [f"train/{m}/{p}/eager" for m in ("ddpmpp", "ncsnpp_deep") for p in ("fp32", "tf32", "bf16")]
    want += ["train/ddpmpp/bf16/compile", "fpe/ddpmpp/default/default_subsample", "fpe/ddpmpp/bf16/default_subsample",
             "fpe/ddpmpp/default/whole_batch", "fpe/ncsnpp_deep/default/default_subsample", "fused/ddpmpp",
             "sample/ddpmpp/pc", "sample/ddpmpp/ode", "bpd/ddpmpp"]
    assert set(want) <= set(rows), set(want) - set(rows)
    assert any(i.startswith("residual/ddpmpp/k=") for i in rows)
    for i, r in rows.items():
        assert r["id"] in table  # the printed table has a line per row

    for i in [w for w in rows if w.startswith("train/")]:
        r = rows[i]
        assert positive(r["img_per_s"]) and positive(r["step_s"]) and positive(r["peak_mem_mb"]), r
        assert r["img_per_s"] == pytest.approx(r["batch"] / r["step_s"])
        assert r["iters"] >= 1 and r["warmup"] >= 1 and len(r["times_s"]) == r["iters"]
        assert all(positive(t) for t in r["times_s"]) and positive(r["params_m"])
    assert rows["train/ddpmpp/bf16/compile"]["compile_backend"] == "eager"  # dynamo, no codegen on CPU
    assert rows["train/ddpmpp/bf16/eager"]["compile_backend"] is None

    for i in [w for w in rows if w.startswith("fpe/")]:
        r = rows[i]
        assert positive(r["dsm_step_s"]) and positive(r["reg_step_s"]) and positive(r["reg_peak_mem_mb"])
        assert r["ratio"] == pytest.approx(r["reg_step_s"] / r["dsm_step_s"])
        assert r["ratio"] > 1.0, r  # the regularized step does strictly more work
        assert positive(r["reg_per_sample_s"]) and r["oom_at_k"] == []
    assert rows["fpe/ddpmpp/default/default_subsample"]["k"] == 1  # 1/64 of 8, at least 1
    whole = rows["fpe/ddpmpp/default/whole_batch"]
    assert whole["k"] == whole["batch"]

    res = next(r for i, r in rows.items() if i.startswith("residual/"))
    assert set(res["variants"]) == {"dsm", "reference", "ours_1probe_fused", "ours_2probe_fused_first"}
    assert res["variants"]["reference"]["time_per_sample_vs_reference"] == pytest.approx(1.0)
    for v in res["variants"].values():
        assert positive(v["step_s"]) and positive(v["x_dsm"])
    assert positive(res["default_vs_reference"])
    fused = rows["fused/ddpmpp"]
    assert set(fused["variants"]) == {"pytorch", "softmax", "all"}
    assert fused["variants"]["pytorch"]["x_pytorch"] == pytest.approx(1.0)
    assert fused["fused_ops"]["all"] == ["group_norm", "silu", "softmax"]
    assert all(positive(v["step_s"]) for v in fused["variants"].values())

    pc = rows["sample/ddpmpp/pc"]
    # mnist_tiny.yaml samples with reverse_diffusion + langevin: 2 NFE per step
    assert pc["steps_run"] == pc["steps"] == 10 and not pc["extrapolated"] and pc["nfe"] == 20
    assert positive(pc["img_per_s"]) and positive(pc["seconds_for_steps"])
    for i in ("sample/ddpmpp/ode", "bpd/ddpmpp"):
        r = rows[i]
        assert isinstance(r["nfe"], int) and r["nfe"] > 0 and positive(r["img_per_s"]) and positive(r["seconds"])
        assert r["nfe_img_per_s"] == pytest.approx(r["img_per_s"] * r["nfe"])
    assert positive(rows["bpd/ddpmpp"]["bpd_untrained"])

    anchors = {a["compare"]: a["img_per_s_per_gpu"] for a in doc["anchors"]}
    assert anchors == {"train/ddpmpp": 145.0, "train/ncsnpp_deep": pytest.approx(57.1, abs=0.05)}
    assert "channels_last" in doc["notes"]  # the trainer has none: said, not measured
    assert "145.0 img/s per V100" in table and "0.56 s/step on 4 V100s" in table


def test_failed_row_is_recorded_and_the_run_continues(tmp_path):
    doc, table = run_script(tmp_path / "f.json", "--only", "sample,bpd", "--fail-row", "sample/ddpmpp/ode")
    rows = {r["id"]: r for r in doc["rows"]}
    assert list(rows) == ["sample/ddpmpp/pc", "sample/ddpmpp/ode", "bpd/ddpmpp"]
    assert rows["sample/ddpmpp/ode"]["status"] == "error" and "injected" in rows["sample/ddpmpp/ode"]["error"]
    assert rows["sample/ddpmpp/pc"]["status"] == rows["bpd/ddpmpp"]["status"] == "ok"
    assert doc["meta"]["complete"]
    again = subprocess.run([sys.executable, str(SCRIPT), "--table", str(tmp_path / "f.json")], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "injected failure" in again.stdout  # the table of a left JSON


def test_global_budget_skips_rows_but_keeps_a_valid_json(tmp_path):
    doc, _ = run_script(tmp_path / "b.json", "--only", "train/ddpmpp", "--budget-s", "0")
    assert doc["rows"] and all(r["status"] == "skipped" and "global budget" in r["error"] for r in doc["rows"])
    assert len(doc["rows"]) == len(doc["planned"]) and doc["meta"]["complete"]


def test_row_budget_is_enforced_and_json_written_after_each_row(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    out = tmp_path / "r.json"
    b = gpu.Bench(Namespace(device="cpu", tiny=True, budget_s=60.0, out=str(out), fail_rows=[]))
    b.run("slow", 1.0, lambda deadline: time.sleep(10) or {})  # interrupted by the row's alarm
    b.run("quick", 5.0, lambda deadline: {"img_per_s": 1.0})
    doc = json.loads(out.read_text())  # written before the run's end: a cut run keeps its rows
    assert [r["status"] for r in doc["rows"]] == ["error", "ok"]
    assert doc["rows"][0]["error"] == "row time budget of 1s exceeded" and doc["meta"]["complete"] is False


def test_whole_batch_row_halves_k_on_out_of_memory(tmp_path, monkeypatch):
    import torch
    spec = importlib.util.spec_from_file_location("gpu_bench2", SCRIPT)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    real = gpu.trainer_step

    def trainer_step(cfg, device, batch):  # a device that holds the regularizer's graph for k <= 8 only
        if gpu.subsample_size(cfg.fpe.subsample, batch) > 8:
            raise torch.OutOfMemoryError("simulated")
        return real(cfg, device, batch)
    monkeypatch.setattr(gpu, "trainer_step", trainer_step)
    b = gpu.Bench(Namespace(device="cpu", tiny=True, budget_s=60.0, out=str(tmp_path / "o.json"), fail_rows=[]))
    b.run("fpe/whole", 60.0, gpu.fpe_row(b, "ddpmpp", "default", 1.0, 32, 1, 1))
    r = b.rows[0]
    assert r["status"] == "ok", r
    assert r["oom_at_k"] == [32, 16] and r["k"] == 8 and r["batch"] == 32 and r["ratio"] > 1
