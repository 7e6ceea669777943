"""Tiny random-initialised models of every supported family, and large configs for benchmarks.

Tests need each family's real transformers code path (module names, attention variants, tied embeddings) but not
its weights. A tiny model keeps the architecture and shrinks every dimension:

    vocab 256 ─► embed (256, 64) ─► 2 × decoder layer ─► norm ─► lm_head (64 → 256)
                                     attention: 4 query heads × 16, 2 key/value heads (GQA) where supported
                                     MLP: 64 → 128 → 64

    model = tiny_model("gemma2")          # Gemma2ForCausalLM, ~0.1M parameters, eager attention
    cfg = random_large_config("llama-1b") # a LlamaConfig only; nothing is allocated

Family notes: ``gemma3`` is the text-only ``Gemma3ForCausalLM`` (model_type ``gemma3_text``); ``phi`` is Phi-2's
``PhiForCausalLM``; ``falcon`` uses the new decoder architecture (Falcon-40B/180B style: grouped key/value heads,
parallel attention and MLP, separate layer norms) with rotary embeddings and no biases.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

TINY_ARCHS = ("llama", "gemma", "gemma2", "gemma3", "mistral", "phi", "falcon", "qwen2")

# effine arch name -> transformers model_type
_MODEL_TYPE = {"gemma3": "gemma3_text"}

_COMMON: dict[str, Any] = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)

# Per-family changes to the common shape. Gemma defaults to head_dim 256 (not hidden / heads), so it is pinned to
# 16 = 64 / 4. Falcon names its dimensions differently.
_ARCH: dict[str, dict[str, Any]] = {
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=32),
    "gemma3": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=32),
    "mistral": dict(sliding_window=None),
    "falcon": dict(num_key_value_heads=None, intermediate_size=None, num_kv_heads=2, ffn_hidden_size=128,
                   new_decoder_architecture=True, parallel_attn=True, alibi=False, bias=False),
}


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """The config of a tiny ``arch`` model (one of TINY_ARCHS); keyword overrides win over the defaults."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    kw = {**_COMMON, **_ARCH.get(arch, {}), **overrides}
    kw = {k: v for k, v in kw.items() if not (v is None and k in ("num_key_value_heads", "intermediate_size"))}
    return AutoConfig.for_model(_MODEL_TYPE.get(arch, arch), **kw)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, attn: str = "eager",
               **overrides: Any) -> PreTrainedModel:
    """A randomly initialised tiny ``arch`` causal LM; the same seed gives the same weights.

    The global RNG is left untouched (the init runs in a forked RNG), so building a model inside a test does not
    change the random numbers that the test draws afterwards.
    """
    if attn not in ("eager", "sdpa"):
        raise ValueError(f"attn must be 'eager' or 'sdpa', got {attn!r}")
    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    return model


# Llama-shaped models for benchmarks. Parameter counts (untied embeddings unless noted):
#   llama-0.5b: 2·32000·1024 + 28·(2.5M attention + 12.6M MLP) ≈ 0.49B
#   llama-1b:   Llama-3.2-1B's shape, tied embeddings ≈ 1.24B
#   mistral-7b: Mistral-7B's shape ≈ 7.24B
_LARGE: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-0.5b": ("llama", dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                                 num_key_value_heads=4, intermediate_size=4096, max_position_embeddings=4096)),
    "llama-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                               num_key_value_heads=8, intermediate_size=8192, max_position_embeddings=131072,
                               tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                          "rope_theta": 500000.0})),
    "mistral-7b": ("mistral", dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=14336, max_position_embeddings=32768,
                                   sliding_window=None)),
}


def random_large_config(name: str, **overrides: Any) -> PretrainedConfig:
    """The config of a benchmark-sized model (llama-0.5b, llama-1b, mistral-7b); builds no weights."""
    if name not in _LARGE:
        raise ValueError(f"unknown large config {name!r}; choose one of {', '.join(_LARGE)}")
    model_type, kw = _LARGE[name]
    return AutoConfig.for_model(model_type, **{**kw, **overrides})
