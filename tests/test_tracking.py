"""Tracker: wandb offline run directory holds the logged metrics; resume keeps the run id."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from pipeline.config import LoggingConfig
from pipeline.train.tracking import Tracker

wandb = pytest.importorskip("wandb")


def read_wandb_records(path: Path):
    """Parse an offline ``run-<id>.wandb`` file (LevelDB-log framing of protobuf ``Record``s).

    wandb >= 0.2x no longer ships a Python reader (it lives in wandb-core, in Go), so the framing
    is decoded here: a 7-byte file header (``:W&B``, magic 0xBEE1, version), then 32 KiB blocks
    of chunks, each ``crc32 (4) | length (2) | type (1)`` followed by ``length`` bytes; types
    FULL=1, FIRST=2, MIDDLE=3, LAST=4.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += (block - pos % block) % block
            continue
        buf += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def wandb_history(run_file: Path) -> list[dict]:
    rows = []
    for rec in read_wandb_records(run_file):
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def wandb_summary(run_file: Path) -> dict:
    summary = {}
    for rec in read_wandb_records(run_file):
        if rec.WhichOneof("record_type") == "summary":
            for i in rec.summary.update:
                summary[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return summary


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.fixture(autouse=True)
def _wandb_env(monkeypatch, tmp_path):
    # no network, no user settings, nothing written outside tmp_path
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)


def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path


def test_wandb_offline_run_contains_metrics_and_resume_keeps_id(tmp_path):
    run_dir = tmp_path / "run"
    cfg = LoggingConfig(backend="wandb", project="fpdiff-test", run_name="tiny", mode="offline")
    config_dict = {"name": "tiny", "training": {"lr": 2e-4}}

    tr = Tracker(cfg, run_dir, config_dict, is_main=True)
    assert tr.run is not None, "wandb did not start"
    for step in (1, 2, 3):
        tr.log({"loss/total": 1.0 / step, "loss/dsm": 0.5 / step, "lr": 1e-4 * step}, step=step)
    tr.log_image("samples", _png(tmp_path / "grid.png"), step=3)
    tr.summary({"best_loss": 1.0 / 3})
    tr.finish()
    tr.finish()  # idempotent

    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    assert run_id and tr.run_id == run_id
    runs = offline_runs(run_dir)
    assert len(runs) == 1 and runs[0].name == f"run-{run_id}.wandb"
    hist = wandb_history(runs[0])
    losses = {r["_step"]: r["loss/total"] for r in hist if "loss/total" in r}
    assert losses == pytest.approx({1: 1.0, 2: 0.5, 3: 1.0 / 3})
    image_rows = [r for r in hist if r.get("samples/_type") == "image-file"]
    assert [r["_step"] for r in image_rows] == [3], "image not logged"
    assert list(runs[0].parent.glob("files/media/images/samples_3_*.png"))
    assert wandb_summary(runs[0])["best_loss"] == pytest.approx(1.0 / 3)

    # the human-readable record
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines if "loss/total" in ln] == [1, 2, 3]
    assert lines[-1]["summary"]["best_loss"] == pytest.approx(1.0 / 3)

    # requeued job: same run directory -> same wandb run id; the repeated steps (<= 3) are dropped
    tr2 = Tracker(cfg, run_dir, config_dict, is_main=True)
    assert tr2.run_id == run_id
    tr2.log({"loss/total": 9.0}, step=2)  # replayed after resume from an older checkpoint
    tr2.log({"loss/total": 9.0}, step=3)
    tr2.log({"loss/total": 0.25}, step=4)
    tr2.log({"loss/total": 7.0}, step=1)  # backwards: dropped, no crash
    tr2.finish()
    assert tr2.skipped_logs == 3
    runs = offline_runs(run_dir)
    assert len(runs) == 2 and all(p.name == f"run-{run_id}.wandb" for p in runs)
    resumed = {r["_step"]: r["loss/total"] for p in runs for r in wandb_history(p) if "loss/total" in r}
    assert resumed == pytest.approx({1: 1.0, 2: 0.5, 3: 1.0 / 3, 4: 0.25})
    steps = [json.loads(x).get("step") for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s is not None] == [1, 2, 3, 3, 4]  # 3 twice: metrics + image

    # a fresh (not resumed) run in the same directory: new run id, old record set aside, nothing dropped
    tr3 = Tracker(cfg, run_dir, config_dict, is_main=True, resumed=False)
    tr3.log({"loss/total": 2.0}, step=1)
    tr3.finish()
    assert tr3.run_id != run_id and tr3.skipped_logs == 0
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]
    assert len(list(run_dir.glob("metrics.*.jsonl"))) == 1


def test_backend_none_and_non_main(tmp_path):
    cfg = LoggingConfig(backend="none")
    tr = Tracker(cfg, tmp_path / "a", {"name": "x"}, is_main=True)
    assert tr.run is None
    tr.log({"loss": 1.0, "nan": float("nan")}, step=0)
    tr.finish()
    assert not (tmp_path / "a" / "wandb").exists()
    rec = json.loads((tmp_path / "a" / "metrics.jsonl").read_text())
    assert rec["loss"] == 1.0 and rec["nan"] == "nan"

    worker = Tracker(LoggingConfig(backend="wandb"), tmp_path / "b", {}, is_main=False)
    worker.log({"loss": 1.0}, step=0)
    worker.log_image("x", tmp_path / "missing.png", step=0)
    worker.summary({"a": 1})
    worker.finish()
    assert worker.run is None and not (tmp_path / "b").exists()


def test_wandb_call_failures_never_raise(tmp_path):
    cfg = LoggingConfig(backend="wandb", project="fpdiff-test", mode="offline")
    tr = Tracker(cfg, tmp_path / "run", {"name": "x"}, is_main=True)
    assert tr.run is not None
    tr.log_image("samples", tmp_path / "missing.png", step=1)  # wandb.Image raises: a warning only
    assert tr.run is not None
    tr.log({"loss": 1.0}, step=2)
    tr.finish()
    (run_file,) = offline_runs(tmp_path / "run")
    assert [r["loss"] for r in wandb_history(run_file) if "loss" in r] == [1.0]
