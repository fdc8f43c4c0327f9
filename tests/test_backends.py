"""Backend selection and the configurations the regularizer cannot run under (clear errors)."""
import json

import pytest

from pipeline.train.backends import AccelerateBackend, DeepSpeedBackend, build_backend
from pipeline.config import ConfigError
from pipeline.config_files import CONFIG_DIR, load_config


def test_zero3_is_refused_with_the_reason(tmp_path):
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="ZeRO stage 3 is not supported: .*jvp"):
        DeepSpeedBackend(load_config(CONFIG_DIR / "mnist_tiny.yaml"), str(ds))


def test_deepspeed_low_precision_is_refused():
    cfg = load_config(CONFIG_DIR / "mnist_tiny.yaml", ["training.mixed_precision=bf16"])
    with pytest.raises(ConfigError, match="^training.mixed_precision: DeepSpeed"):
        DeepSpeedBackend(cfg, str(CONFIG_DIR.parent / "launch" / "ds_zero2.json"))


def test_missing_deepspeed_json_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="DeepSpeed config not found: .*nope.json"):
        DeepSpeedBackend(load_config(CONFIG_DIR / "mnist_tiny.yaml"), str(tmp_path / "nope.json"))


def test_accelerate_deepspeed_launch_without_json_is_an_error(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    with pytest.raises(ConfigError, match="deepspeed_config_file"):
        build_backend(load_config(CONFIG_DIR / "mnist_tiny.yaml"))


def test_one_process_uses_accelerate():
    backend = build_backend(load_config(CONFIG_DIR / "mnist_tiny.yaml"))
    try:
        assert isinstance(backend, AccelerateBackend) and backend.world == 1 and backend.is_main
    finally:
        backend.end()
