"""Typed configs: loading, overrides and one-line errors that name the key."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.config_files import CONFIG_DIR, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """Each value the file sets is the loaded config's (the reference: the YAML itself)."""
    cfg = load_config(path).to_dict()
    written = yaml.safe_load(path.read_text())

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    for key, value in leaves(written):
        loaded = cfg
        for part in key.split("."):
            loaded = loaded[part]
        assert loaded == (list(value) if isinstance(value, tuple) else value), key


def test_overrides_are_typed():
    cfg = load_config(CONFIG_DIR / "demo.yaml", ["training.lr=1e-4", "fpe.enabled=false", "fpe.subsample=0.25",
                                                  "model.ch_mult=[1,2]", "sampling.method=ode"])
    assert cfg.training.lr == 1e-4 and cfg.fpe.enabled is False
    assert cfg.fpe.subsample == 0.25 and cfg.model.ch_mult == [1, 2] and cfg.sampling.method == "ode"
    assert load_config(CONFIG_DIR / "demo.yaml", ["fpe.subsample=8"]).fpe.subsample == 8


@pytest.mark.parametrize("override, names", [
    ("training.learning_rate=1", "training.learning_rate: unknown key"),
    ("trainig.lr=1", "trainig: unknown key"),
    ("training.lr=fast", "training.lr: expected a number"),
    ("training.n_steps=1.5", "training.n_steps: expected an integer"),
    ("training.lr=-1e-4", "training.lr: must be > 0"),
    ("fpe.weighting=cubic", "fpe.weighting: must be one of"),
    ("data.image_size=30", "data.image_size: 30 is not divisible"),
    ("fpe.subsample=1.5", "fpe.subsample: a fraction must be <= 1"),
    ("model.ch_mult=[1,x]", "model.ch_mult[1]: expected an integer"),
    ("training.min_snr_gamma=-1", "training.min_snr_gamma: must be >= 0"),
    ("training.t_sampling=sobol", "training.t_sampling"),
])
def test_bad_values_name_the_key(override, names):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG_DIR / "demo.yaml", [override])
    msg = str(e.value)
    assert msg.startswith(names) and "\n" not in msg


def test_bad_yaml_file_names_the_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("training:\n  batch_size: 8\n  warmup: -3\n")
    with pytest.raises(ConfigError, match=r"^training.warmup: must be >= 0"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_bad_config_fails_in_one_line_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--config", str(CONFIG_DIR / "mnist_tiny.yaml"),
                        "--run-dir", str(run_dir), "training.lr=-1"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["fpdiff: config error: training.lr: must be > 0, got -1.0"]
    assert not run_dir.exists() and not (tmp_path / "runs").exists()


def test_help_lists_every_subcommand_and_option():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True).stdout
    for cmd in ("demo", "train", "data shards", "eval", "sample", "classifier", "push"):
        assert cmd in out
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--help"], capture_output=True, text=True).stdout
    for opt in ("--config", "--run-dir", "--resume", "--no-progress", "overrides"):
        assert opt in out


def test_conv_size_is_checked_when_the_config_loads():
    """score_sde's model.conv_size is read (its configs set it) but only 3 exists: refused on load."""
    assert load_config(None, ["model.conv_size=3"]).model.conv_size == 3
    with pytest.raises(ConfigError, match=r"model\.conv_size: must be one of \[3\], got 5"):
        load_config(None, ["model.conv_size=5"])


def test_a_removed_key_at_its_neutral_value_loads_and_any_other_value_is_refused(tmp_path, capsys):
    # a run dir written before training.init_ema_updates was removed must still resume (the study's
    # committed base has init_ema_updates: 0); a value that changed behaviour must not be ignored
    tree = load_config().to_dict()
    tree["training"]["init_ema_updates"] = 0
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert load_config(path).to_dict() == load_config().to_dict()
    assert "training.init_ema_updates: removed key dropped" in capsys.readouterr().err
    tree["training"]["init_ema_updates"] = 7
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"training.init_ema_updates: removed \(superseded by training.init_fresh"):
        load_config(path)


def test_each_option_is_checked_once_where_the_config_is_validated():
    """A Literal key's values are spelled once (its annotation): a config built in code, the estimator and
    the samplers all refuse a value outside them with the same one line; the estimator keeps the configured
    probe count (validate refuses too few), and div_method exact's rule is applied by validate, visibly."""
    from pipeline.config import Config, FPEConfig
    from pipeline.fpe import ResidualEstimator
    from pipeline.sampling import PREDICTORS
    from pipeline.sde import VPSDE

    cfg = Config()
    cfg.fpe.probe = "uniform"
    with pytest.raises(ConfigError, match=r"^fpe\.probe: must be one of \['rademacher', 'gaussian'\], got uniform$"):
        cfg.validate()
    with pytest.raises(ConfigError, match=r"^fpe\.probe: must be one of \['rademacher', 'gaussian'\], got uniform$"):
        ResidualEstimator(VPSDE(), probe="uniform")
    assert PREDICTORS == ("euler_maruyama", "reverse_diffusion", "ancestral", "none")
    with pytest.raises(ConfigError, match=r"^fpe\.n_probes: the unbiased norm estimator needs >= 2 probes, got 1$"):
        load_config(None, ["fpe.n_probes=1"])
    assert ResidualEstimator.from_config(FPEConfig(n_probes=1), VPSDE()).n_probes == 1  # not raised behind one's back
    assert ResidualEstimator.from_config(FPEConfig(n_probes=5), VPSDE()).n_probes == 5
    exact = load_config(None, ["fpe.div_method=exact"]).fpe
    assert (exact.n_probes, exact.norm_estimator) == (1, "single")
    est = ResidualEstimator.from_config(exact, VPSDE())
    assert (est.div_method, est.n_probes, est.norm_estimator) == ("exact", 1, "single")
    # the DSM loss's arguments are training.* keys, refused as the config refuses them
    from pipeline.losses import DSMLoss
    for refuse in (lambda: load_config(None, ["training.eps=2.0"]), lambda: DSMLoss(VPSDE(), eps=2.0)):
        with pytest.raises(ConfigError, match=r"^training\.eps: must be in \(0, T = 1\.0\), got 2\.0$"):
            refuse()


def test_model_options_fail_when_the_config_loads_not_when_the_network_is_built():
    with pytest.raises(ConfigError, match=r"^model\.num_heads/nf: channel widths \[128, 256\] must be >= 4 and "
                                          r"divisible by num_heads 3$"):
        load_config(None, ["model.num_heads=3"])
    with pytest.raises(ConfigError, match=r"^model\.scale_by_sigma: only valid with sde\.type 've'"):
        load_config(None, ["model.scale_by_sigma=true"])


@pytest.mark.parametrize("label", ["ddpmpp", "ncsnpp"])
def test_a_run_dir_with_the_old_model_name_label_loads(tmp_path, capsys, label):
    """model.name chose nothing (one network, configured by the other keys): removed; a config written
    with either label loads as the same config, another value is refused naming the key."""
    tree = load_config().to_dict()
    tree["model"]["name"] = label
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert load_config(path).to_dict() == load_config().to_dict()
    assert "model.name: removed key dropped" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"^model\.name: removed \(a label that chose nothing"):
        load_config(None, ["model.name=unet"])
