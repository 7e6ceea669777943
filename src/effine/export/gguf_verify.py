"""Check an exported GGUF in real llama.cpp against the source model in transformers.

For each prompt (rendered through the chat template when the tokenizer has one):

1. tokenizer: llama.cpp tokenizes the rendered text to exactly the ids transformers produced;
2. logits: both run the same ids; the next-token logits at every position are compared (max |difference|, and
   how often both pick the same top token);
3. greedy: both continue greedily for ``max_new_tokens``; the continuations are compared token for token.

What passes, per type (``TOLERANCES``; logit differences relative to the largest reference logit, so the bounds
hold for any logit scale):

* f32: tokenizer identical, the same top token at every prompt position, every greedy continuation identical,
  max |logit difference| <= 1% of the largest logit.
* f16, bf16: tokenizer identical, every greedy continuation identical, top-1 agreement on prompt positions
  >= 0.98 (inside a prompt a near-tie may flip: SmolLM2 bf16 flips 1 of 115 positions, by a 0.4 logit change).
* q8_0: tokenizer identical, top-1 agreement on prompt positions >= 0.85, max |logit difference| <= 15% of the
  largest logit (measured: 7-10% on SmolLM2-135M, most of it from llama.cpp's 8-bit activations). llama.cpp
  also rounds the activations to 8 bits in q8_0 matrix products, so a greedy continuation may take the other
  branch at a near-tie (SmolLM2-135M: "What is the capital of France?" starts with two tokens 0.08 apart in
  logit); greedy agreement is reported, not required.
* q4_0: tokenizer identical, top-1 agreement >= 0.5: 4-bit blocks change logits by several units on a 135M model;
  the check is that the file is the same model, coarsely quantized.

Measured on SmolLM2-135M-Instruct (3 prompts, 16 greedy tokens): see README "Publish".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from effine.export.llama_cpp import LlamaCpp

DEFAULT_PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.",
                   "Explain in two sentences why the sky is blue."]
# type -> (min top-1 agreement on prompt positions, max |logit difference| / max |reference logit| or None,
#          greedy continuations must be identical)
TOLERANCES: dict[str, tuple[float, float | None, bool]] = {
    "f32": (1.0, 0.01, True), "f16": (0.98, None, True), "bf16": (0.98, None, True),
    "q8_0": (0.85, 0.15, False), "q4_0": (0.5, None, False),
}


def _render(tokenizer, prompt: str) -> tuple[str, list[int], bool]:
    """(text, transformers ids, whether llama.cpp should add special tokens itself)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        bos = tokenizer.bos_token_id
        if bos is not None and tokenizer("x").input_ids[:1] == [bos] and ids[:1] != [bos]:
            return text, [bos] + ids, True  # the tokenizer adds BOS; so does llama.cpp (add_bos in the file)
        return text, ids, False
    return prompt, tokenizer(prompt).input_ids, True


@torch.no_grad()
def _hf_greedy(model, ids: list[int], n: int, stop: set[int]) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         eos_token_id=sorted(stop) or None, pad_token_id=sorted(stop)[0] if stop else None,
                         top_p=None, top_k=None, temperature=None)
    return out[0, len(ids):].tolist()


def verify_gguf(path: str | Path, model_dir: str | Path, qtype: str, prompts: list[str] | None = None,
                max_new_tokens: int = 16, model=None, tokenizer=None) -> dict[str, Any]:
    """Compare the GGUF at ``path`` (of type ``qtype``) with ``model_dir`` in transformers; a report dict with
    per-prompt results, the totals and ``passed`` against ``TOLERANCES[qtype]``."""
    from transformers import AutoModelForCausalLM

    from effine.model.loader import load_tokenizer

    tokenizer = tokenizer or load_tokenizer(Path(model_dir))
    model = model or AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    prompts = list(prompts or DEFAULT_PROMPTS)
    stop = {t for t in (tokenizer.eos_token_id,) if t is not None}
    rows, max_diff, agree, positions, ref_max = [], 0.0, 0, 0, 0.0
    rendered = [_render(tokenizer, p) for p in prompts]
    n_ctx = max(len(ids) for _, ids, _ in rendered) + max_new_tokens + 8
    with LlamaCpp(path, n_ctx=n_ctx) as ll:
        for prompt, (text, ids, add_special) in zip(prompts, rendered):
            ll_ids = ll.tokenize(text, add_special=add_special, parse_special=True)
            got = ll.logits(ids)
            with torch.no_grad():
                ref = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
            diff = float(np.abs(got - ref[:, : got.shape[1]]).max())
            top = int((got.argmax(-1) == ref.argmax(-1)).sum())
            g_ll = ll.greedy(ids, max_new_tokens, stop)
            g_hf = _hf_greedy(model, ids, max_new_tokens, stop)
            same = next((i for i, (a, b) in enumerate(zip(g_ll, g_hf)) if a != b), min(len(g_ll), len(g_hf)))
            rows.append({"prompt": prompt, "tokens": len(ids), "tokenizer_match": ll_ids == ids,
                         "max_abs_logit_diff": diff, "top1_agreement": top / len(ids),
                         "greedy_same": g_ll == g_hf, "greedy_common_prefix": same,
                         "llama_cpp_text": tokenizer.decode(g_ll, skip_special_tokens=True),
                         "transformers_text": tokenizer.decode(g_hf, skip_special_tokens=True)})
            max_diff, agree, positions = max(max_diff, diff), agree + top, positions + len(ids)
            ref_max = max(ref_max, float(np.abs(ref).max()))
    min_agree, max_logit, greedy_required = TOLERANCES[qtype]
    summary = {
        "type": qtype, "prompts": rows, "max_abs_logit_diff": max_diff,
        "ref_max_abs_logit": ref_max, "top1_agreement": agree / positions,
        "tokenizer_match": all(r["tokenizer_match"] for r in rows),
        "greedy_same": sum(r["greedy_same"] for r in rows), "greedy_of": len(rows),
        "tolerance": {"min_top1_agreement": min_agree, "max_abs_logit_diff_relative": max_logit,
                      "greedy_must_match": greedy_required},
    }
    failures = []
    if not summary["tokenizer_match"]:
        failures.append("llama.cpp tokenizes a prompt differently from transformers")
    if summary["top1_agreement"] < min_agree:
        failures.append(f"top-1 agreement {summary['top1_agreement']:.3f} < {min_agree}")
    if max_logit is not None and max_diff > max_logit * ref_max:
        failures.append(f"max logit difference {max_diff:.4f} > {max_logit} x {ref_max:.2f}")
    if greedy_required and summary["greedy_same"] != len(rows):
        failures.append(f"greedy continuation differs on {len(rows) - summary['greedy_same']} prompt(s)")
    summary["passed"] = not failures
    summary["failures"] = failures
    return summary


def describe(v: dict[str, Any]) -> str:
    """One line for the console."""
    if "skipped" in v:
        return f"llama.cpp check skipped: {v['skipped']}"
    verdict = "PASSED" if v["passed"] else "FAILED (" + "; ".join(v["failures"]) + ")"
    return (f"llama.cpp check {verdict}: {v['type']}, max |logit diff| {v['max_abs_logit_diff']:.4f}, top-1 "
            f"agreement {v['top1_agreement']:.3f}, greedy same {v['greedy_same']}/{v['greedy_of']}, tokenizer "
            f"{'identical' if v['tokenizer_match'] else 'DIFFERENT'}")
