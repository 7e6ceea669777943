"""Real weights (the packaged SmolLM2-135M and Gemma-3-270M): effine's training forward (its attention backend,
fused ops, the loss's own head projection and soft-cap) reproduces transformers' eager logits within bf16 error,
and a short fine-tune of Gemma-3 lowers the held-out loss (SmolLM2's: tests/integration/test_smollm2.py)."""

from __future__ import annotations

import pytest
import torch

from effine.config import load_config
from effine.model.loader import load_model, load_tokenizer, resolve_model_dir
from effine.ops.attention import enable
from effine.ops.swap import fuse_model
from effine.ops.model_loss import loss_sum, model_inputs

pytestmark = pytest.mark.slow

TEXT = [{"role": "user", "content": "What is the tallest mountain in Europe, and how high is it?"},
        {"role": "assistant", "content": "Mount Elbrus in the Caucasus, 5,642 metres above sea level."}]


def _effine_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The logits effine's loss sees: the backbone's hidden states through the head (and Gemma's final soft-cap)."""
    batch = {"input_ids": ids, "position_ids": torch.arange(ids.shape[1])[None], "labels": ids}
    h = model.base_model(**model_inputs(batch)).last_hidden_state
    logits = (h @ model.get_output_embeddings().weight.T).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_effine_forward_matches_eager_within_bf16_error(name: str) -> None:
    d = resolve_model_dir(name)
    tok = load_tokenizer(d)
    text = (tok.apply_chat_template(TEXT, tokenize=False) if tok.chat_template
            else "Question: " + TEXT[0]["content"] + "\nAnswer: " + TEXT[1]["content"])
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        exact = load_model(d, "fp32", attn="eager")(input_ids=ids).logits.float()
        ref_model = load_model(d, "bf16", attn="eager")
        eager = ref_model(input_ids=ids).logits.float()
        ref_loss = ref_model(input_ids=ids, labels=ids).loss.item()
        del ref_model
        ours_model = load_model(d, "bf16", attn="sdpa")
        backend = enable(ours_model)
        counts = fuse_model(ours_model)
        ours = _effine_logits(ours_model, ids)
        total, n = loss_sum(ours_model, {"input_ids": ids, "labels": ids,
                                         "position_ids": torch.arange(ids.shape[1])[None]})
    assert backend in ("tiled", "eager") and counts["rms_norm"] > 0 and counts["gated_mlp"] > 0
    # effine's bf16 path is as close to the fp32 model as transformers' own bf16 eager path is
    err_eager, err_ours = (eager - exact).abs().max().item(), (ours - exact).abs().max().item()
    assert err_ours <= 1.5 * err_eager + 0.05, (err_ours, err_eager)
    assert (ours - eager).abs().max().item() < 2 * err_eager + 0.05
    agree = (ours.argmax(-1) == exact.argmax(-1)).float().mean().item()
    assert agree >= (eager.argmax(-1) == exact.argmax(-1)).float().mean().item() - 0.05
    assert abs(total.item() / n - ref_loss) < 0.02, (total.item() / n, ref_loss)


def test_short_gemma3_run_lowers_eval_loss(tmp_path) -> None:
    from effine.train.run import run_training

    cfg = load_config("configs/gemma3-270m-lora.yaml", [
        f"output.dir={tmp_path}/run", "train.max_steps=4", "train.batch_size=4", "data.max_length=48",
        "data.max_eval_rows=6", "train.lr=1e-3", "train.warmup_steps=1", "eval.max_new_tokens=4",
        "eval.prompts_from_eval=0", "eval.prompts=[]", "train.eval_every=null", "data.limit=120"])
    summary = run_training(cfg)
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"] - 0.05, summary
