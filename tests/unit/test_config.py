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
    (["adapter.method=lorra"],
     "adapter.method: 'lorra' is not allowed; choose one of lora, full. Did you mean 'lora'?"),
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
    with pytest.raises(ConfigError,
                       match=r"typo.yaml: unknown config key 'train.batchsize'. Did you mean 'train.batch_size'"):
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


def test_exponent_numbers_in_a_yaml_file_are_numbers(tmp_path):
    """`lr: 1e-4` is a string to PyYAML (YAML 1.1); effine reads it as the number everyone means."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  max_steps: 1e3\n  min_lr_ratio: 5E-2\n  weight_decay: -0e0\n"
                    "model:\n  name: v1e3\n")
    cfg = load_config(path)
    assert cfg.train.lr == 1e-4 and cfg.train.max_steps == 1000 and cfg.train.min_lr_ratio == 0.05
    assert cfg.model.name == "v1e3"  # not a number: stays text
    assert load_config(None, ["train.lr=3e-5"]).train.lr == 3e-5


@pytest.mark.parametrize("text, message", [
    ("trian:\n  lr: 0.1\n", "unknown config key 'trian'. Did you mean 'train'?"),
    ("train:\n  batch_size: [4, 8]\n", "train.batch_size: expected a number, got list [4, 8]. Write a single value"),
    ("train:\n  batch_size: -2\n", "train.batch_size: -2 is below the minimum 1. Set it to 1 or more."),
    ("train:\n  max_steps: 0\n", "train.max_steps: 0 is below the minimum 1. Set it to 1 or more (or leave it unset)."),
    ("data:\n  eval_fraction: 1.5\n", "data.eval_fraction: 1.5 is above the maximum 1.0. Set it to 1.0 or less."),
    ("train:\n  lr: '0.001x'\n", "train.lr: expected a number, got str '0.001x'. Write e.g. lr: 0.0002"),
    ("data:\n  packing: 'yes'\n", "data.packing: expected true or false, got str 'yes'. Write packing: true"),
    ("adapter:\n  target_modules: q_proj\n", "adapter.target_modules: expected a list, got str 'q_proj'. Write it as "
                                              "a YAML list, e.g. target_modules: ['q_proj']"),
    ("train: 5\n", "train: expected a mapping of keys, got int 5. Write train: on its own line"),
    ("model:\n  name: 135\n", "model.name: expected a string, got int 135. Quote it"),
])
def test_file_errors_name_the_key_path_and_the_fix(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


def test_a_config_that_is_not_utf8_is_a_clear_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"train:\n  lr: 0.1 # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not UTF-8 text .* save it as UTF-8"):
        load_config(path)
