"""Config: YAML + --set overrides, typed validation with key paths and suggestions, every shipped YAML valid."""

from pathlib import Path

import pytest

from effine.config import Config, describe, load_config, save_config
from effine.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.lr=1e-4", "adapter.r=8", "data.packing=true", "adapter.target_modules=[q_proj]"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.adapter.r == 8 and cfg.data.packing is True
    assert cfg.adapter.target_modules == ["q_proj"]
    assert cfg.train.batch_size == Config().train.batch_size


@pytest.mark.parametrize("override, message", [
    (["train.lrr=1"], "unknown config key 'train.lrr'. Did you mean 'train.lr'?"),
    (["trian.lr=1"], "unknown config key 'trian'. Did you mean 'train'?"),
    (["adapter.method=lorra"], "adapter.method: 'lorra' is not allowed; choose one of lora, full. Did you mean 'lora'?"),
    (["train.batch_size=0"], "train.batch_size: 0 is below the minimum 1."),
    (["train.batch_size=2.5"], "train.batch_size: expected a whole number"),
    (["data.packing=maybe"], "data.packing: expected true or false"),
    (["train.lr"], "expected key.path=value"),
])
def test_errors_name_key_path(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert message in str(e.value)


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: x\ntrain:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'train.batchsize'. Did you mean 'train.batch_size'"):
        load_config(typo)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.max_steps=3", "model.name=gemma3-270m"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_every_key_documented():
    rows = describe()
    assert len(rows) > 40
    assert all(help_ for _, _, help_ in rows), [p for p, _, h in rows if not h]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    assert CONFIGS, "configs/ must hold examples"
    load_config(path)
