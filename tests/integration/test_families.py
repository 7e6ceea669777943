"""Every tiny family: LoRA trains, saves in PEFT's format, and loads back identically in PEFT and in effine."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from effine.adapters import count_parameters, inject_lora, load_adapter, lora_parameters, save_adapter
from effine.config import AdapterConfig
from effine.model.families import family_for
from effine.model.tiny import TINY_ARCHS, tiny_model

STEPS = 8
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))  # one batch, repeated


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _train(model: torch.nn.Module, params: list[torch.nn.Parameter], lr: float) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = _loss(model, IDS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_lora_trains_and_round_trips(arch: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = tiny_model(arch)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model.save_pretrained(base_dir)  # the untouched fp32 base, before any adapter goes in

    cfg = AdapterConfig(r=8, alpha=16)
    names = inject_lora(model, cfg)
    fam = family_for(model)
    assert fam is not None and {n.rsplit(".", 1)[-1] for n in names} == set(fam.target_modules)
    assert not any("lm_head" in n or "embed" in n for n in names)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total

    losses = _train(model, lora_parameters(model), lr=1e-2)
    # Starts near ln(256) = 5.55 (a random tiny model is close to uniform); 8 steps take every family down by
    # 0.45 (gemma, whose scaled embeddings learn slowest) to 0.95, so a 0.3 drop is a clear signal.
    assert losses[-1] < losses[0] - 0.3, losses

    save_adapter(model, adapter_dir, cfg, base_model_name_or_path=str(base_dir))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and set(config["target_modules"]) == set(fam.target_modules)

    with torch.no_grad():
        ours = model(input_ids=IDS).logits
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
        peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
        theirs = peft_model(input_ids=IDS).logits
        assert (ours - theirs).abs().max().item() < 1e-4

        fresh = load_adapter(tiny_model(arch), adapter_dir).eval()
        assert torch.equal(fresh(input_ids=IDS).logits, ours)


def test_full_fine_tuning_trains() -> None:
    torch.manual_seed(0)
    model = tiny_model("llama")
    params = list(model.parameters())
    assert all(p.requires_grad for p in params)
    trainable, total = count_parameters(model)
    assert trainable == total
    losses = _train(model, params, lr=1e-3)
    assert losses[-1] < losses[0] - 0.5, losses


def test_partial_targets_save_exact_regex_for_peft(tmp_path) -> None:
    """Adapting one of two q_proj layers: the suffix 'q_proj' would over-match in PEFT, so a regex is written."""
    from effine.adapters import lora_modules, wrap_modules

    model = tiny_model("llama").eval()
    model.save_pretrained(tmp_path / "base")
    cfg = AdapterConfig(r=4, alpha=4)
    wrap_modules(model, ["model.layers.1.self_attn.q_proj"], cfg)
    with torch.no_grad():
        next(iter(lora_modules(model).values())).lora_B.weight.normal_()
    save_adapter(model, tmp_path / "adapter", cfg, base_model_name_or_path="tiny-llama")
    targets = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(targets, str)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32, attn_implementation="eager")
        theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(input_ids=IDS).logits
        assert (model(input_ids=IDS).logits - theirs).abs().max().item() < 1e-4
        assert torch.equal(load_adapter(tiny_model("llama"), tmp_path / "adapter")(input_ids=IDS).logits,
                           model(input_ids=IDS).logits)


def test_load_adapter_errors(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from effine.errors import ModelError

    model = tiny_model("llama")
    cfg = AdapterConfig(r=4, alpha=8)
    inject_lora(model, cfg)
    good = save_adapter(model, tmp_path / "good", cfg, base_model_name_or_path="tiny-llama")
    tensors = load_file(str(good / "adapter_model.safetensors"))
    config = json.loads((good / "adapter_config.json").read_text())

    def variant(name: str, tensors: dict, config: dict, pickle: bool = False):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps(config))
        if pickle:
            torch.save(tensors, d / "adapter_model.bin")
        else:
            save_file(tensors, str(d / "adapter_model.safetensors"))
        return d

    with pytest.raises(ModelError, match="pickled"):
        load_adapter(tiny_model("llama"), variant("bin", tensors, config, pickle=True))
    load_adapter(tiny_model("llama"), tmp_path / "bin", allow_pickle=True)  # explicit opt-in, weights_only load

    with pytest.raises(ModelError, match="has shape"):
        load_adapter(tiny_model("llama"), variant("rank", tensors, {**config, "r": 8}))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    with pytest.raises(ModelError, match="missing tensors"):
        load_adapter(tiny_model("llama"), variant("missing", {k: v for k, v in tensors.items() if k != key}, config))
    with pytest.raises(ModelError, match="not a linear layer of this PhiForCausalLM"):
        load_adapter(tiny_model("phi"), good)  # phi has no o_proj / gate_proj
    with pytest.raises(ModelError, match="does not support: use_dora"):
        load_adapter(tiny_model("llama"), variant("dora", tensors, {**config, "use_dora": True}))
    with pytest.raises(ModelError, match="not an adapter directory"):
        load_adapter(tiny_model("llama"), tmp_path)
