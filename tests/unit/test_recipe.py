"""The model recipe: how a run's model is built, recorded in every run dir and rebuilt from it."""

from __future__ import annotations

import json

import pytest
import torch

from effine.config import load_config
from effine.errors import ConfigError
from effine.recipe import RECIPE_NAME, ModelRecipe, build_model, read_recipe, write_recipe


def _cfg(*overrides):
    return load_config(None, ["model.name=some/model", *overrides])


def test_recipe_from_config_takes_every_quant_and_adapter_field():
    cfg = _cfg("quant.method=nf4", "quant.blocksize=32", "quant.skip_modules=[v_proj]", "adapter.r=8",
               "adapter.target_modules=[q_proj, v_proj]", "model.dtype=fp32", "model.fused_ops=false")
    r = ModelRecipe.from_config(cfg)
    assert (r.base, r.dtype, r.fused_ops) == ("some/model", "fp32", False)
    assert (r.quant.method, r.quant.blocksize, r.quant.skip_modules) == ("nf4", 32, ("v_proj",))
    assert (r.adapter.r, r.adapter.target_modules) == (8, ("q_proj", "v_proj"))
    with pytest.raises(Exception):
        r.dtype = "bf16"  # frozen


def test_recipe_round_trips_through_its_file(tmp_path):
    r = ModelRecipe.from_config(_cfg("quant.qat_bits=4", "quant.group_size=32", "adapter.rslora=true"))
    write_recipe(tmp_path, r, base_dir="/models/x")
    got, source = read_recipe(tmp_path)
    assert got == r and source == str(tmp_path / RECIPE_NAME)
    record = json.loads((tmp_path / RECIPE_NAME).read_text())
    assert record["base_model"] == "/models/x" and record["quant"]["qat_bits"] == 4  # version-1 keys kept


def test_version_1_record_and_config_yaml_fallback(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / RECIPE_NAME).write_text(json.dumps(
        {"model_dtype": "fp32", "quant": {"method": "int4", "group_size": 32, "skip_modules": ["v_proj"]}}))
    got, _ = read_recipe(tmp_path / "a")
    assert (got.dtype, got.quant.method, got.quant.group_size, got.quant.skip_modules) == ("fp32", "int4", 32,
                                                                                           ("v_proj",))
    (tmp_path / "b").mkdir()
    from effine.config import save_config

    save_config(_cfg("quant.method=fp4"), tmp_path / "b" / "config.yaml")
    got, source = read_recipe(None, tmp_path / "b")
    assert got.quant.method == "fp4" and source.endswith("config.yaml")
    assert read_recipe(tmp_path / "nothing-here") is None


def test_unreadable_records_say_where(tmp_path):
    (tmp_path / RECIPE_NAME).write_text('{"recipe": {"base": "x", "warp_drive": true}}')
    with pytest.raises(ConfigError, match=f"{RECIPE_NAME}.*not a recipe this effine can read"):
        read_recipe(tmp_path)
    (tmp_path / RECIPE_NAME).write_text('{"recipe": ')
    with pytest.raises(ConfigError, match=f"{RECIPE_NAME}:1: not valid JSON"):
        read_recipe(tmp_path)
    (tmp_path / RECIPE_NAME).write_text(json.dumps({"recipe": {"base": "x", "quant": {"method": "nf7"}}}))
    with pytest.raises(ConfigError, match="cannot rebuild that base"):
        read_recipe(tmp_path)


def test_build_model_for_training_and_for_inference(tiny_llama_dir):
    from effine.adapters import lora_modules
    from effine.ops.swap import RMSNorm
    from effine.quant import QuantLinear

    r = ModelRecipe(base=str(tiny_llama_dir), dtype="fp32", device="cpu",
                    quant=ModelRecipe(base="x").quant.__class__(method="int8", group_size=32))
    logs: list[str] = []
    model = build_model(r, log=logs.append)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(lora_modules(model)) == 14 and any(isinstance(m, RMSNorm) for m in model.modules())
    assert all(isinstance(m.base, QuantLinear) for m in lora_modules(model).values())
    assert any("quantized 14 linear layers to int8" in line for line in logs), logs
    # inference: the same quantized base, no adapters unless asked, no fused modules, eval mode, bf16 compute
    plain = build_model(r, train=False, compute_dtype="bf16")
    assert not lora_modules(plain) and not any(isinstance(m, RMSNorm) for m in plain.modules())
    q = [m for m in plain.modules() if isinstance(m, QuantLinear)]
    assert len(q) == 14 and all(m.compute_dtype == torch.bfloat16 for m in q) and not plain.training
    want = {n: b for n, b in model.named_buffers() if "qweight" in n}
    got = {n.replace(".base", ""): b for n, b in plain.named_buffers() if "qweight" in n}
    assert {k.replace(".base", ""): v for k, v in want.items()}.keys() == got.keys()
    assert all(torch.equal(v, got[k.replace(".base", "")]) for k, v in want.items())  # same codes
