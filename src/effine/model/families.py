"""What effine knows about each model family, keyed by ``config.model_type``.

The table is small on purpose. LoRA target discovery is generic (every linear layer inside the decoder layers, see
:func:`effine.adapters.lora.default_targets`); this table is the cross-check. When the generic discovery finds a
different set of suffixes for a known family, :func:`effine.adapters.inject_lora` logs a warning, because it usually
means that transformers renamed a module or that the checkpoint is not the architecture its config claims.

    decoder layer                      attention suffixes         MLP suffixes
    ───────────────────────────────    ───────────────────────    ─────────────────────────────
    llama / mistral / qwen2 / gemma*   q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
    phi (Phi-2)                        q_proj k_proj v_proj dense  fc1 fc2
    falcon                             query_key_value dense       dense_h_to_4h dense_4h_to_h

``eot`` notes which token ends an assistant turn in the family's instruct checkpoints: the data pipeline must put a
label on it, otherwise a fine-tuned model never learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_LLAMA_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_GATED_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    model_type: str
    attention: tuple[str, ...]  # linear suffixes of the attention block, in forward order
    mlp: tuple[str, ...]  # linear suffixes of the MLP block, in forward order
    eot: str = ""  # end-of-turn token(s) of the instruct checkpoints, and how they behave

    @property
    def target_modules(self) -> tuple[str, ...]:
        """The default LoRA targets: every attention and MLP projection."""
        return self.attention + self.mlp


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", _LLAMA_ATTN, _GATED_MLP,
               "Llama 3 instruct ends a turn with <|eot_id|> (not the eos <|end_of_text|>); Llama 2 chat with </s>."),
        Family("mistral", _LLAMA_ATTN, _GATED_MLP,
               "[INST] ... [/INST] answer </s>: the answer's </s> is the end of turn and must be supervised."),
        Family("qwen2", _LLAMA_ATTN, _GATED_MLP,
               "ChatML: a turn ends with <|im_end|>; the base models' eos is <|endoftext|>."),
        Family("gemma", _LLAMA_ATTN, _GATED_MLP,
               "A turn ends with <end_of_turn>; generation should stop on it as well as on <eos>."),
        Family("gemma2", _LLAMA_ATTN, _GATED_MLP,
               "As gemma: <end_of_turn>. Attention logits are soft-capped; use eager or sdpa attention."),
        Family("gemma3_text", _LLAMA_ATTN, _GATED_MLP,
               "As gemma: <end_of_turn>. Text-only Gemma3ForCausalLM (e.g. gemma-3-270m, gemma-3-1b)."),
        Family("phi", ("q_proj", "k_proj", "v_proj", "dense"), ("fc1", "fc2"),
               "Phi-2 has no chat template; turns end with <|endoftext|> (chatml is used when none is given)."),
        Family("falcon", ("query_key_value", "dense"), ("dense_h_to_4h", "dense_4h_to_h"),
               "No chat template in the base checkpoints; <|endoftext|> ends a sample."),
    )
}


def family_for(model_or_type: Any) -> Family | None:
    """The family of a model, a config or a ``model_type`` string; None when effine has no entry for it."""
    if isinstance(model_or_type, str):
        return FAMILIES.get(model_or_type)
    config = getattr(model_or_type, "config", model_or_type)
    return FAMILIES.get(getattr(config, "model_type", ""))
