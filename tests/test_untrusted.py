"""Issue 26, first part: a config that came out of an export, a run dir or the Hub is not trusted
(no shell command, no network fetch, no Hub endpoint, no local path from it), the export's
config.yaml says nothing about where things lived, and the Hub token goes only to an endpoint from
the environment or the command line. Exports are written directly (random tiny weights): no
training is needed to read them back."""
import os
from pathlib import Path

import yaml

from pipeline.config_files import CONFIG_DIR, load_config
from pipeline.publish.export import write_export
from pipeline.rundir import RunDir

TINY = str(CONFIG_DIR / "mnist_tiny.yaml")


def make_export(folder, overrides=()):
    """An export of the tiny model (random weights) trained, as its config says, with ``overrides``."""
    from pipeline.models import build_model

    cfg = load_config(TINY, ["logging.backend=none", *overrides])
    return write_export(folder, build_model(cfg).state_dict(), cfg.to_dict(), {"step": 0})


def edit_config(path, **sections):
    tree = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(tree))


def test_the_exported_config_keeps_no_location(tmp_path, mnist_shards):
    secret = "pipe:curl -s https://alice:s3cret@example.org/train.tar"
    export = make_export(tmp_path / "export", [f"data.shards={mnist_shards[0]}", f"data.test_shards={secret}",
                                               f"data.index={tmp_path}/index.json", "hub.repo_id=alice/tiny",
                                               "hub.endpoint=https://hub.example.org", f"eval.feature_extractor={tmp_path}/f.pt",
                                               f"training.init_from={tmp_path}/run", f"run_dir={tmp_path}/run"])
    text = (export / "config.yaml").read_text()
    for leaked in ("s3cret", "pipe:", str(tmp_path), mnist_shards[0], "alice/tiny", "hub.example.org"):
        assert leaked not in text
    saved = yaml.safe_load(text)
    assert saved["provenance"] == "export"
    assert saved["model"]["nf"] == 16 and saved["training"]["lr"] == 1e-3  # the model and its training stay
    assert "alice/tiny" in (export / "README.md").read_text()  # the card still says where it is published


def test_train_from_an_exported_config_runs_no_shell_command(tmp_path, mnist_shards, capsys):
    """Fine-tuning from a downloaded export's config: its data.index is a shell command, the data
    is given on the command line."""
    from pipeline.app import train_main as main

    export = make_export(tmp_path / "download")
    marker = tmp_path / "marker"
    index = Path(mnist_shards[0]).parent / "mnist-train.json"
    edit_config(export / "config.yaml", data={"index": f"pipe:touch {marker}; cat {index}"},
                training={"n_steps": 1})
    for provenance in ("export", "user"):  # the mark removed: still beside the weights it came with
        tree = yaml.safe_load((export / "config.yaml").read_text())
        tree["provenance"] = provenance
        (export / "config.yaml").write_text(yaml.safe_dump(tree))
        run_dir = tmp_path / f"run-{provenance}"
        code = main(["--config", str(export / "config.yaml"), "--run-dir", str(run_dir), "--no-progress",
                     f"data.shards={mnist_shards[0]}", "sampling.num_steps=2", "sampling.num_samples=4",
                     "fpe.enabled=false"])
        assert not marker.exists()
        assert code == 0
        assert "data.index is a pipe: URL (a shell command), not taken from a saved config" in capsys.readouterr().err
        assert "pipe:" not in (run_dir / "config.yaml").read_text()


def test_a_run_dirs_config_gives_no_url_and_a_downloaded_export_no_path(tmp_path, mnist_shards, capsys):
    """``fpdiff sample --inpaint`` and friends read the test shards of the saved config: an http(s)
    URL there would be fetched (curl), a local path of an export would be read."""
    from pipeline.rundir import load_for_eval

    run = RunDir(tmp_path / "run")
    make_export(run.export)
    url = "https://example.org/test-{000000..000003}.tar"
    run.config.write_text(yaml.safe_dump(
        {**load_config(TINY).to_dict(), "data": {"shards": mnist_shards[0], "test_shards": url,
                                                  "image_size": 28, "num_channels": 1}}))
    _, cfg, _ = load_for_eval(run.path)
    assert cfg.data.test_shards == "" and cfg.data.shards == mnist_shards[0]  # its own local data stays
    assert "data.test_shards is a URL, not taken from a saved config" in capsys.readouterr().err
    # an export on its own (as downloaded), tampered to name local files: none is read
    download = make_export(tmp_path / "snapshot")
    edit_config(download / "config.yaml", data={"shards": mnist_shards[0]}, eval={"feature_extractor": "/etc/passwd"})
    _, cfg, _ = load_for_eval(download)
    assert cfg.data.shards == "" and cfg.eval.feature_extractor == ""
    # the person typing the command may name them
    _, cfg, _ = load_for_eval(download, overrides=[f"data.shards={mnist_shards[0]}"])
    assert cfg.data.shards == mnist_shards[0]


def test_the_hub_token_goes_to_no_endpoint_read_from_a_file(tmp_path, capsys):
    from pipeline.publish.hub import HubPusher

    config = tmp_path / "mine.yaml"
    config.write_text(open(TINY).read() + "hub:\n  repo_id: me/tiny\n  endpoint: https://evil.example.org\n")
    cfg = load_config(config)
    assert cfg.hub.endpoint == "" and cfg.hub.repo_id == "me/tiny"
    assert "hub.endpoint is not read from a file" in capsys.readouterr().err
    assert "evil" not in HubPusher.from_config(cfg.hub, token="t").api.endpoint
    # on the command line it counts
    cfg = load_config(config, ["hub.endpoint=http://127.0.0.1:9"])
    assert HubPusher.from_config(cfg.hub, token="t").api.endpoint == "http://127.0.0.1:9"
    # a run dir's config chooses no repo either: fine-tuning from it pushes nowhere unless told
    run = RunDir(tmp_path / "run")
    make_export(run.export, ["hub.repo_id=mallory/grab"])
    run.config.write_text(yaml.safe_dump({**load_config(TINY).to_dict(), "hub": {"repo_id": "mallory/grab"}}))
    assert load_config(run.config).hub.repo_id == ""
    assert load_config(run.config, ["hub.repo_id=me/tiny"]).hub.repo_id == "me/tiny"


def test_a_hard_link_in_the_export_is_not_uploaded(tmp_path):
    from pipeline.publish.hub import HubPusher

    export = make_export(tmp_path / "run" / "export")
    secret = tmp_path / "id_rsa"
    secret.write_text("private key")
    os.unlink(export / "metrics.json")
    os.link(secret, export / "metrics.json")
    staging = HubPusher.snapshot(export)
    assert sorted(p.name for p in staging.iterdir()) == ["README.md", "config.yaml", "ema.safetensors"]
    # the snapshots of earlier pushes (hard links the pusher made itself) do not count
    again = HubPusher.snapshot(export)
    assert sorted(p.name for p in again.iterdir()) == ["README.md", "config.yaml", "ema.safetensors"]
