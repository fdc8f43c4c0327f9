"""Hub push end to end through huggingface_hub's real client against a local fake Hub.

The fake Hub (tests/helpers/fake_hub.py, fixture ``fake_hub``) implements just the endpoints the
client uses; only the HTTP boundary is fake.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from pipeline.publish import hub
from pipeline.publish.export import write_export
from pipeline.rundir import EXPORT_FILES
from pipeline.config_files import config_from_dict

from helpers.fake_hub import TOKEN


def tiny_config() -> dict:
    cfg = config_from_dict({
        "name": "hubtest",
        "model": {"nf": 8, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        "sde": {"type": "vp"},
        "data": {"dataset": "mnist", "image_size": 8, "num_channels": 1},
        "hub": {"repo_id": "alice/fpdiff-tiny"},
    })
    return cfg.to_dict()


def tiny_export(tmp_path: Path, step: int = 100):
    from pipeline.models import build_model

    cfg_dict = tiny_config()
    torch.manual_seed(0)
    model = build_model(config_from_dict(cfg_dict))
    export = write_export(tmp_path / "run" / "export", model.state_dict(), cfg_dict,
                          {"step": step, "loss/total": 0.123, "fid": float("nan")})
    return export, model, cfg_dict


def test_write_export_layout(tmp_path):
    export, model, cfg_dict = tiny_export(tmp_path)
    assert sorted(p.name for p in export.iterdir()) == sorted(EXPORT_FILES)
    card = (export / "README.md").read_text()
    assert card.startswith("---\n") and "VP SDE" in card and "mnist" in card
    assert "Training step**: 100" in card and "| loss/total | 0.123 |" in card
    assert 'load_pretrained("alice/fpdiff-tiny")' in card
    assert json.loads((export / "metrics.json").read_text()) == {"step": 100, "loss/total": 0.123, "fid": "nan"}
    # rewriting replaces the folder atomically and leaves no temporary siblings; images join the card
    from PIL import Image

    Image.new("L", (8, 8), 128).save(tmp_path / "grid.png")
    write_export(export, model.state_dict(), cfg_dict, {"step": 200},
                 images={"samples.png": tmp_path / "grid.png", "gone.png": tmp_path / "missing.png"})
    assert json.loads((export / "metrics.json").read_text())["step"] == 200
    assert (export / "samples.png").is_file() and not (export / "gone.png").exists()
    assert "![samples](samples.png)" in (export / "README.md").read_text()
    assert [p.name for p in export.parent.iterdir()] == ["export"]
    # loading back from the folder (and from the run dir holding export/) gives the same weights
    for src in (export, export.parent):
        loaded, cfg = hub.load_pretrained(src)
        assert cfg.data.image_size == 8 and not loaded.training
        for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert k == k2 and torch.equal(a, b)
    # training.init_from: an export / run dir / weights file, DDP and compile prefixes stripped
    from pipeline.models import build_model
    from safetensors.torch import save_file

    torch.manual_seed(1)
    fresh = build_model(config_from_dict(cfg_dict))
    assert hub.load_weights_into(fresh, export.parent) == export / "ema.safetensors"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    prefixed = {f"module._orig_mod.{k}": v.clone() for k, v in model.state_dict().items()}
    save_file(prefixed, str(tmp_path / "prefixed.safetensors"))
    hub.load_weights_into(fresh, tmp_path / "prefixed.safetensors")
    with pytest.raises(ValueError, match="missing"):
        hub.load_weights_into(torch.nn.Linear(2, 2), export)


def test_push_end_to_end_and_load_back(fake_hub, tmp_path):
    export, model, cfg_dict = tiny_export(tmp_path)
    pusher = hub.HubPusher("alice/fpdiff-tiny", endpoint=fake_hub.url, token=TOKEN, private=True, backoff=0.05)
    assert pusher.push(export, "step 100")
    assert pusher.wait(timeout=60)
    st = pusher.status()
    assert st["pushes_ok"] == 1 and st["pushes_failed"] == 0, st
    assert fake_hub.repos["alice/fpdiff-tiny"]["private"] is True
    assert f"Bearer {TOKEN}" in fake_hub.auth_headers
    (commit,) = fake_hub.commits
    assert commit["summary"] == "step 100"
    assert sorted(commit["files"]) == sorted(EXPORT_FILES)
    for name in EXPORT_FILES:
        assert commit["files"][name] == (export / name).read_bytes()
    card = commit["files"]["README.md"].decode()
    assert "# hubtest" in card and "from pipeline.publish.hub import load_pretrained" in card and "0.123" in card

    # load the model back by repo id through snapshot_download against the same server
    loaded, cfg = hub.load_pretrained("alice/fpdiff-tiny", endpoint=fake_hub.url, token=TOKEN,
                                      cache_dir=str(tmp_path / "cache"))
    expected = config_from_dict(cfg_dict)  # what describes the model (an export names no data location)
    assert (cfg.model, cfg.sde, cfg.training, cfg.fpe) == (expected.model, expected.sde, expected.training, expected.fpe)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)

    # a second push of an updated export: the repo already exists (409 -> exist_ok) and is updated
    write_export(export, model.state_dict(), cfg_dict, {"step": 200})
    pusher2 = hub.HubPusher("alice/fpdiff-tiny", endpoint=fake_hub.url, token=TOKEN, backoff=0.05)
    pusher2.push(export, "step 200")
    assert pusher2.wait(60) and pusher2.status()["pushes_ok"] == 1
    assert json.loads(fake_hub.commits[-1]["files"]["metrics.json"])["step"] == 200


@pytest.mark.parametrize("endpoint_kind", ["create", "commit"])
def test_push_retries_500s_while_caller_keeps_working(fake_hub, tmp_path, endpoint_kind):
    """Two HTTP 500s, then success: the upload completes and push() never blocked the caller.

    A 500 from repo creation is retried by HubPusher (backoff); a 500 from the commit endpoint
    is first retried inside huggingface_hub itself (http_backoff), then by HubPusher if needed.
    """
    export, _, _ = tiny_export(tmp_path)
    fake_hub.fail[endpoint_kind] = 2
    pusher = hub.HubPusher("alice/fpdiff-tiny", endpoint=fake_hub.url, token=TOKEN, backoff=0.3)
    t0 = time.monotonic()
    assert pusher.push(export, "step 100")
    t_returned = time.monotonic()
    # the "training loop": keeps stepping while the upload retries in the background
    step_times = []
    while pusher.status()["pushes_ok"] + pusher.status()["pushes_failed"] == 0:  # until the push has ended
        torch.randn(32, 32) @ torch.randn(32, 32)
        step_times.append(time.monotonic())
        time.sleep(0.01)
        assert time.monotonic() - t0 < 90, "upload did not finish"
    assert pusher.wait(10)
    st = pusher.status()
    assert st["pushes_ok"] == 1 and st["pushes_failed"] == 0, st
    assert fake_hub.failed[endpoint_kind] == 2
    if endpoint_kind == "create":
        assert st["attempts"] == 3 and "500" in st["last_error"]
    # non-blocking: push() returned before the upload got past its failures, and the caller
    # kept stepping between the first injected 500 and the successful commit
    first_fail, commit_t = fake_hub.fail_times[0], fake_hub.commit_times[-1]
    assert t_returned < fake_hub.fail_times[-1] < commit_t
    during = [t for t in step_times if first_fail < t < commit_t]
    assert len(during) >= 5, (len(during), commit_t - first_fail)
    (commit,) = fake_hub.commits
    assert sorted(commit["files"]) == sorted(EXPORT_FILES)


def test_push_failure_is_reported_not_raised(fake_hub, tmp_path, capsys):
    export, _, _ = tiny_export(tmp_path)
    fake_hub.fail["create"] = 100
    pusher = hub.HubPusher("alice/fpdiff-tiny", endpoint=fake_hub.url, token=TOKEN,
                           max_retries=2, backoff=0.01)
    pusher.push(export, "step 1")
    assert pusher.wait(30)
    st = pusher.status()
    assert st["pushes_ok"] == 0 and st["pushes_failed"] == 1 and st["attempts"] == 3, st
    assert "500" in st["last_error"]
    assert any("giving up" in line for line in capsys.readouterr().err.splitlines())
    assert not fake_hub.commits
    # a missing folder is reported too, without raising
    assert pusher.push(tmp_path / "nope", "x") is False
    assert pusher.status()["pushes_failed"] == 2


def test_push_main_cli(fake_hub, tmp_path, capsys):
    export, _, _ = tiny_export(tmp_path)
    run_dir = export.parent
    rc = hub.push_main([str(run_dir), "--repo-id", "bob/cli-push", "--public", "--endpoint", fake_hub.url,
                        "--token", TOKEN])
    assert rc == 0, capsys.readouterr().err
    assert fake_hub.repos["bob/cli-push"]["private"] is False
    assert fake_hub.commits[-1]["summary"] == "fpdiff export, step 100"
    assert sorted(fake_hub.commits[-1]["files"]) == sorted(EXPORT_FILES)

    rc = hub.push_main([str(tmp_path / "missing"), "--repo-id", "bob/x", "--endpoint", fake_hub.url])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "run directory not found" in err
    (tmp_path / "empty_run").mkdir()
    rc = hub.push_main([str(tmp_path / "empty_run"), "--repo-id", "bob/x", "--endpoint", fake_hub.url])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "no export in" in err


def test_push_uploads_only_the_export_files_never_symlinks(fake_hub, tmp_path, capsys):
    """A link to a file outside the export, stray files and folders are not uploaded."""
    export, _, _ = tiny_export(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the export")
    (export / "notes.txt").symlink_to(secret)
    (export / "extra.bin").write_bytes(b"x")
    (export / "sub").mkdir()
    (export / "sub" / "y.txt").write_text("y")
    os.replace(export / "metrics.json", tmp_path / "metrics.json")
    (export / "metrics.json").symlink_to(tmp_path / "metrics.json")  # even a known name, as a link
    rc = hub.push_main([str(export.parent), "--repo-id", "bob/links", "--endpoint", fake_hub.url, "--token", TOKEN])
    assert rc == 0, capsys.readouterr().err
    assert sorted(fake_hub.commits[-1]["files"]) == sorted(set(EXPORT_FILES) - {"metrics.json"})
