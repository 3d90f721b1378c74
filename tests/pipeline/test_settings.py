"""Root settings: defaults < YAML < environment < flags, REDIS_URL, and clear errors for bad values."""

from __future__ import annotations

import argparse

import pytest

from engine.config import EngineConfig
from pipeline.config import ConfigError, add_config_args, load_settings, overrides_from_args


def test_precedence_yaml_env_flags(tmp_path, monkeypatch):
    cfg = tmp_path / "valora.yaml"
    cfg.write_text("engine:\n  max_num_seqs: 7\n  lora_slots: 5\nworker:\n  max_deliveries: 9\n")
    monkeypatch.setenv("VALORA_ENGINE__LORA_SLOTS", "11")
    settings = load_settings(cfg, {"worker.max_deliveries": 2})
    assert settings.engine.max_num_seqs == 7  # from YAML
    assert settings.engine.lora_slots == 11  # env beats YAML
    assert settings.worker.max_deliveries == 2  # flags beat YAML
    assert settings.ingest.jpeg_quality == 85  # default


def test_redis_url_env(monkeypatch):
    monkeypatch.delenv("VALORA_REDIS__URL", raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://example:6390/1")
    assert load_settings().redis.url == "redis://example:6390/1"
    monkeypatch.delenv("REDIS_URL")
    assert load_settings().redis.url is None


def test_bad_values_name_the_field(tmp_path, monkeypatch):
    monkeypatch.setenv("VALORA_ENGINE__MAX_NUM_SEQS", "zero")
    with pytest.raises(ConfigError, match="engine.max_num_seqs"):
        load_settings()
    monkeypatch.delenv("VALORA_ENGINE__MAX_NUM_SEQS")
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  no_such_field: 1\n")
    with pytest.raises(ConfigError, match="no_such_field"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.yaml")


def test_flags_reuse_descriptions():
    parser = argparse.ArgumentParser()
    add_config_args(parser, "engine", EngineConfig, ["max_num_seqs", "cuda_graphs", "pinned_adapters"])
    help_text = " ".join(parser.format_help().split())
    assert EngineConfig.model_fields["max_num_seqs"].description in help_text
    args = parser.parse_args(["--max-num-seqs", "3", "--no-cuda-graphs", "--pinned-adapters", "a", "b"])
    over = overrides_from_args(args)
    assert over == {"engine.max_num_seqs": 3, "engine.cuda_graphs": False, "engine.pinned_adapters": ["a", "b"]}
    assert load_settings(overrides=over).engine.pinned_adapters == ["a", "b"]
