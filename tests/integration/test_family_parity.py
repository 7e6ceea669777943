"""effine's training path == transformers' eager path, per family, in fp32 on tiny random models.

effine's path: its attention backend (``enable``), the fused RMSNorm / gated MLP (``fuse_model``), LoRA on the
discovered linears (``inject_lora``) and its own loss from the backbone's hidden states (``loss_sum``). The
reference: the same weights in transformers' eager attention with PEFT's LoRA on ``target_modules="all-linear"``
and transformers' own loss (``labels=``). Both get the same (random, non-zero) adapter weights; the loss and every
adapter gradient must agree, and effine's discovered targets must be PEFT's all-linear choice.
"""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoConfig

from effine.adapters import inject_lora, lora_modules
from effine.config import AdapterConfig
from effine.model.families import family_for, logit_transform
from effine.model.tiny import TINY_ARCHS, VARIANTS, tiny_config, tiny_model
from effine.ops.attention import enable
from effine.ops.swap import fuse_model
from effine.ops.model_loss import loss_sum

CASES = [*TINY_ARCHS, *VARIANTS, "cohere (unknown family)"]
NO_RMSNORM = {"phi", "falcon", "falcon-7b-layout", "cohere (unknown family)"}  # LayerNorm families
NO_GATED_MLP = NO_RMSNORM | {"phi3"}  # phi3 fuses gate and up into one gate_up_proj: left plain
ATTENTION_INTERFACE_FREE = {"falcon", "falcon-7b-layout"}  # Falcon keeps its own attention code
B, T = 2, 24


def _model(name: str):
    if name.startswith("cohere"):  # not in effine's family table: the logged fallbacks must keep it exact
        return tiny_model(AutoConfig.for_model("cohere", **{k: v for k, v in tiny_config("llama").to_dict().items()
                                                           if k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                                    "num_attention_heads", "num_key_value_heads",
                                                                    "intermediate_size")},
                                               bos_token_id=1, eos_token_id=2, pad_token_id=0, logit_scale=0.5))
    return tiny_model(name)


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(T).expand(B, T)}


@pytest.mark.parametrize("name", CASES)
def test_effine_path_matches_transformers_eager(name: str, caplog) -> None:
    ours, ref = _model(name).train(), _model(name).train()
    ref = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    theirs = {n.removeprefix("base_model.model."): m for n, m in ref.named_modules() if isinstance(m, LoraLayer)}

    with caplog.at_level(logging.INFO):
        backend = enable(ours)
        counts = fuse_model(ours)
        names = inject_lora(ours, AdapterConfig(r=4, alpha=8))
    assert names == sorted(theirs, key=names.index) and set(names) == set(theirs)  # PEFT's all-linear choice
    if name in ATTENTION_INTERFACE_FREE:
        assert backend.endswith("(model's own)") and "keeps its own" in caplog.text
    else:
        assert backend == ("eager" if "gemma2" in name else "tiled")  # softcap: effine's eager kernel
    assert (counts["rms_norm"] > 0) == (name not in NO_RMSNORM)
    assert (counts["gated_mlp"] > 0) == (name not in NO_GATED_MLP)
    if name == "phi3":
        assert "Phi3MLP" in caplog.text and "left as the plain modules" in caplog.text

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, m in lora_modules(ours).items():
            for ab in ("lora_A", "lora_B"):
                w = torch.randn(getattr(m, ab).weight.shape, generator=g) * 0.2
                getattr(m, ab).weight.copy_(w)
                getattr(theirs[n], ab)["default"].weight.copy_(w)

    batch = _batch()
    with caplog.at_level(logging.WARNING):
        total, n_sup = loss_sum(ours, batch)
    loss = total / n_sup
    ref_loss = ref(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert n_sup == B * (T - 5)
    assert abs(loss.item() - ref_loss.item()) < 2e-5, (loss.item(), ref_loss.item())
    # known families take the fast loss (hidden states -> chunked head); only the unknown one falls back
    assert (logit_transform(ours.config) is None) == name.startswith("cohere")
    assert ("model's own forward" in caplog.text) == name.startswith("cohere")
    loss.backward()
    ref_loss.backward()
    for n, m in lora_modules(ours).items():
        for ab in ("lora_A", "lora_B"):
            g_ours, g_ref = getattr(m, ab).weight.grad, getattr(theirs[n], ab)["default"].weight.grad
            scale = g_ref.abs().max().item()
            assert scale > 0, f"{n}.{ab}: no gradient in the reference"
            assert (g_ours - g_ref).abs().max().item() <= 1e-4 * scale + 1e-7, f"{n}.{ab}"


def test_granite_logits_scaling_is_honoured_by_the_loss() -> None:
    """Without the 1 / logits_scaling the loss differs: the parity above would catch a dropped multiplier."""
    model = tiny_model("granite-multipliers")
    batch = _batch()
    with torch.no_grad():
        ours = loss_sum(model, batch)[0] / (B * (T - 5))
        model.config.logits_scaling = 1.0
        unscaled = loss_sum(model, batch)[0] / (B * (T - 5))
    assert abs(ours.item() - unscaled.item()) > 1e-3


def test_known_family_with_an_undeclared_logit_scale_falls_back() -> None:
    cfg = tiny_config("llama")
    assert logit_transform(cfg) == (1.0, None)
    cfg.logit_scale = 0.5  # something transformers would apply that the llama family entry does not declare
    assert family_for(cfg) is not None and logit_transform(cfg) is None
    assert logit_transform(tiny_config("granite", logits_scaling=4.0)) == (0.25, None)
    assert logit_transform(tiny_config("gemma2", final_logit_softcapping=3.0)) == (1.0, 3.0)
