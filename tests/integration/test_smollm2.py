"""The small real model: SmolLM2-135M-Instruct (packaged offline), PEFT interoperability and a short real run."""

from __future__ import annotations

import pytest
import torch

from effine.adapters import inject_lora, save_adapter
from effine.config import AdapterConfig, load_config
from effine.model.loader import load_model

pytestmark = pytest.mark.slow


def test_peft_reproduces_effine_logits(tmp_path, smollm2_dir, smol_tokenizer):
    """An effine adapter loaded with peft.PeftModel.from_pretrained gives the same logits (fp32, < 1e-4)."""
    from peft import PeftModel

    torch.manual_seed(0)
    model = load_model(smollm2_dir, "fp32")
    inject_lora(model, AdapterConfig(r=8, alpha=16))
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    save_adapter(model, tmp_path / "adapter", AdapterConfig(r=8, alpha=16), str(smollm2_dir))
    text = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Hi! How are you today?"}],
                                              tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([smol_tokenizer(text, add_special_tokens=False).input_ids])
    model.eval()
    with torch.no_grad():
        ours = model(ids).logits
        peft_model = PeftModel.from_pretrained(load_model(smollm2_dir, "fp32"), str(tmp_path / "adapter")).eval()
        theirs = peft_model(ids).logits
        base = load_model(smollm2_dir, "fp32")(ids).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter does change the output ...
    assert (ours - theirs).abs().max() < 1e-4  # ... and PEFT reproduces it


def test_short_real_run_lowers_eval_loss(tmp_path):
    """A few LoRA steps on real chat data lower the held-out loss of the real model."""
    from effine.train.run import run_training

    cfg = load_config("configs/smollm2-135m-lora.yaml", [
        f"output.dir={tmp_path}/run", "train.max_steps=6", "train.batch_size=4", "data.max_length=96",
        "data.max_eval_rows=12", "train.lr=1e-3", "train.warmup_steps=1", "eval.max_new_tokens=8",
        "eval.prompts_from_eval=1", "data.limit=200"])
    summary = run_training(cfg)
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"] - 0.05
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "run" / "loss.png").exists()
