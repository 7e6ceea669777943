"""Every shipped config (configs/*.yaml): valid, its header quotes the current plan, and one optimizer step of it
runs on a tiny random model of the same architecture (the shipped hub config.json, shrunk; no network)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from effine.config import load_config
from effine.plan.config_headers import entry, render, shipped_configs, sized_for, stale
from effine.model.hub_configs import shipped_config_dir, shipped_hub_ids
from effine.model.registry import PACKAGED_MODELS
from effine.model.tiny import shrink_hub_config

CONFIGS = shipped_configs()
IDS = [p.stem for p in CONFIGS]


def test_every_family_and_method_the_issue_asks_for_is_shipped() -> None:
    models = {load_config(str(p)).model.name for p in CONFIGS}
    assert {"HuggingFaceH4/zephyr-7b-beta", "tiiuae/falcon-7b", "microsoft/phi-2", "google/gemma-2b",
            "google/gemma-7b", "meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-3B-Instruct",
            "meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct",
            "Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "mistralai/Mistral-7B-v0.1",
            "smollm2-135m-instruct", "gemma3-270m"} <= models
    methods = {entry(p).method for p in CONFIGS}
    assert {"lora", "qlora-nf4", "full", "lora+qat4"} <= methods
    hub_models = {m for m in models if m not in PACKAGED_MODELS}
    assert hub_models == set(shipped_hub_ids())  # every hub model's architecture is shipped, and nothing else


def test_headers_quote_the_current_plan(tmp_path) -> None:
    assert stale(CONFIGS) == [], "run: python -m effine.plan.config_headers --write"
    for p in CONFIGS:
        text = p.read_text()
        assert sized_for(text, p) and f"# {entry(p).model}, " in text
    # a hand-edited quote is caught
    edited = tmp_path / CONFIGS[0].name
    text = CONFIGS[0].read_text()
    shutil.copy(CONFIGS[0], edited)
    number = text.split("predicted peak GPU memory: ")[1].split(" GiB")[0]
    edited.write_text(text.replace(f"memory: {number} GiB", f"memory: {float(number) + 0.01:.2f} GiB"))
    assert stale([edited]) == [edited] and render(edited) == text


def _architecture(name: str) -> dict:
    if name in PACKAGED_MODELS:
        from effine.model.loader import resolve_model_dir

        return json.loads((resolve_model_dir(name) / "config.json").read_text())
    d = shipped_config_dir(name)
    assert d is not None, f"no shipped config.json for {name}"
    return json.loads((d / "config.json").read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_one_optimizer_step_on_a_tiny_model_of_the_same_architecture(path, tmp_path) -> None:
    from effine.ops.model_loss import loss_sum
    from effine.train.optim import build_optimizer
    from effine.recipe import ModelRecipe, build_model

    cfg = load_config(str(path))
    hub = _architecture(cfg.model.name)
    config = shrink_hub_config(hub)
    assert config.model_type == hub["model_type"] and config.hidden_size == 64
    from effine.model.tiny import tiny_model

    tiny_model(config).save_pretrained(tmp_path / "tiny", safe_serialization=True)
    cfg.model.name, cfg.model.device = str(tmp_path / "tiny"), "cpu"
    logs: list[str] = []
    model = build_model(ModelRecipe.from_config(cfg), model_dir=tmp_path / "tiny", log=logs.append)
    if cfg.quant.method != "none":
        assert any(f"to {cfg.quant.method}" in line for line in logs), logs
    if cfg.quant.qat_bits:
        assert any("QAT" in line for line in logs), logs
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    before = [p.detach().clone() for _, p in trainable]
    opt = build_optimizer(trainable, cfg.train)
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(16).expand(2, 16)}
    model.train()
    total, n = loss_sum(model, batch)
    (total / n).backward()
    opt.step()
    assert math.isfinite(total.item()) and abs(total.item() / n - math.log(256)) < 1.5
    assert any(not torch.equal(b, p.detach()) for b, (_, p) in zip(before, trainable))


def test_config_list_shows_every_shipped_config(capsys) -> None:
    from effine.cli import main

    assert main(["config", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["config", "model", "method", "sized", "for"]
    rows = {line.split()[0]: line.split() for line in out[1:]}
    assert set(rows) == {p.name for p in CONFIGS}
    zephyr = rows["zephyr-7b-beta-qlora.yaml"]
    e = entry(next(p for p in CONFIGS if p.name == "zephyr-7b-beta-qlora.yaml"))
    assert zephyr[1:4] == ["HuggingFaceH4/zephyr-7b-beta", "qlora-nf4", "24"] and zephyr[6] == f"{e.peak_gib:.2f}"
    assert f"{e.peak_gib:.2f} GiB" in e.path.read_text()  # the header quotes the same number
