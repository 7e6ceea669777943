"""What effine knows about each model family, keyed by ``config.model_type``.

The table is small on purpose. LoRA target discovery is generic (every linear layer inside the decoder layers, see
:func:`effine.adapters.lora.default_targets`); this table is the cross-check. When the generic discovery finds a
different set of suffixes for a known family, :func:`effine.adapters.inject_lora` logs a warning, because it usually
means that transformers renamed a module or that the checkpoint is not the architecture its config claims.

    decoder layer                      attention suffixes         MLP suffixes
    ───────────────────────────────    ───────────────────────    ─────────────────────────────
    llama / mistral / qwen2 / qwen3 /  q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
      gemma* / olmo2 / granite / smollm3
    phi (Phi-2)                        q_proj k_proj v_proj dense  fc1 fc2
    phi3 (Phi-3 / Phi-4)               qkv_proj o_proj             gate_up_proj down_proj
    falcon                             query_key_value dense       dense_h_to_4h dense_4h_to_h

``logits`` says how the causal LM turns the output projection into logits. effine computes the loss from the
backbone's hidden states itself (:mod:`effine.ops.model_loss`), so it must apply the same transform:

    plain      logits = lm_head(h)
    softcap    logits = c * tanh(lm_head(h) / c), c = config.final_logit_softcapping (Gemma 2 / 3; None: plain)
    scaled     logits = lm_head(h) / config.logits_scaling (Granite)

A model type that is not in the table, or a known one whose config carries a logit scale the family does not
declare (:data:`LOGIT_SCALE_KEYS`), gets :func:`logit_transform` ``None``: the loss then falls back to the
model's own forward (full logits; slower, never silently wrong).

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
    logits: str = "plain"  # plain | softcap | scaled: see the module docstring

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
               "As gemma: <end_of_turn>. Attention logits are soft-capped; use eager or sdpa attention.",
               logits="softcap"),
        Family("gemma3_text", _LLAMA_ATTN, _GATED_MLP,
               "As gemma: <end_of_turn>. Text-only Gemma3ForCausalLM (e.g. gemma-3-270m, gemma-3-1b).",
               logits="softcap"),
        Family("qwen3", _LLAMA_ATTN, _GATED_MLP,
               "ChatML as qwen2 (<|im_end|>); q/k are RMS-normalised per head inside the attention."),
        Family("phi3", ("qkv_proj", "o_proj"), ("gate_up_proj", "down_proj"),
               "Phi-3 / Phi-4-mini: a turn ends with <|end|>; fused qkv and gate_up projections."),
        Family("olmo2", _LLAMA_ATTN, _GATED_MLP,
               "OLMo 2 instruct (Tulu template): an assistant turn ends with the eos <|endoftext|>. Norms come "
               "after attention and MLP (no input norms); q/k are RMS-normalised over all heads."),
        Family("granite", _LLAMA_ATTN, _GATED_MLP,
               "Granite 3: an assistant turn ends with <|end_of_text|>. Embedding, residual, attention and logit "
               "multipliers.", logits="scaled"),
        Family("smollm3", _LLAMA_ATTN, _GATED_MLP,
               "ChatML (<|im_end|>); every fourth layer has no rotary embedding (NoPE)."),
        Family("phi", ("q_proj", "k_proj", "v_proj", "dense"), ("fc1", "fc2"),
               "Phi-2 has no chat template; turns end with <|endoftext|> (chatml is used when none is given)."),
        Family("falcon", ("query_key_value", "dense"), ("dense_h_to_4h", "dense_4h_to_h"),
               "No chat template in the base checkpoints; <|endoftext|> ends a sample."),
    )
}


# Config keys that change logits after the output projection in some transformers model.
LOGIT_SCALE_KEYS = ("logits_scaling", "logit_scale", "output_multiplier_scale", "logit_scale_factor")


def family_for(model_or_type: Any) -> Family | None:
    """The family of a model, a config or a ``model_type`` string; None when effine has no entry for it."""
    if isinstance(model_or_type, str):
        return FAMILIES.get(model_or_type)
    config = getattr(model_or_type, "config", model_or_type)
    return FAMILIES.get(getattr(config, "model_type", ""))


def logit_transform(config: Any) -> tuple[float, float | None] | None:
    """(multiplier for the hidden states before the output projection, final softcap or None) that reproduce
    the causal LM's logits from its backbone's hidden states; None when effine does not know how (see the module
    docstring): the caller must then use the model's own logits."""
    fam = family_for(config)
    if fam is None:
        return None
    declared = {"scaled": "logits_scaling"}.get(fam.logits)
    if any(getattr(config, k, None) not in (None, 1, 1.0) for k in LOGIT_SCALE_KEYS if k != declared):
        return None
    scale = 1.0 / float(config.logits_scaling) if fam.logits == "scaled" else 1.0
    softcap = getattr(config, "final_logit_softcapping", None) if fam.logits == "softcap" else None
    return scale, (float(softcap) if softcap else None)
