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

``VARIANTS`` switch on one feature of a family each (Llama 3 rope scaling, Mistral's sliding window, Gemma 2's
soft-capping, Granite's multipliers, Falcon-7B's multi-query layout); ``shrink_hub_config`` turns a hub
``config.json`` into a tiny config of the same architecture (tests of the shipped configs).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

TINY_ARCHS = ("llama", "gemma", "gemma2", "gemma3", "mistral", "phi", "falcon", "qwen2", "qwen3", "phi3", "olmo2",
              "granite", "smollm3")

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
    "qwen3": dict(head_dim=16),
    "phi3": dict(pad_token_id=0, eos_token_id=2),  # the defaults (32000) are outside the tiny vocabulary
    "olmo2": dict(pad_token_id=0, eos_token_id=2),
    "smollm3": dict(no_rope_layers=[1, 0], pad_token_id=0, bos_token_id=1, eos_token_id=2),  # layer 1 is NoPE
}

# Variants of a family that exercise one feature each: (arch, overrides). With T = 24 tokens in the tests, a window
# of 8 and soft-caps of 2-3 change the result (a random tiny model's logits are O(1)).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3-rope": ("llama", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral-sliding": ("mistral", dict(sliding_window=8)),
    "gemma2-softcap": ("gemma2", dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=8)),
    # Granite 3's multipliers are 12 / 0.22 / 1/128 / 8; non-trivial values so that a dropped one shows.
    "granite-multipliers": ("granite", dict(embedding_multiplier=4.0, residual_multiplier=0.5,
                                            attention_multiplier=0.125, logits_scaling=4.0)),
    "falcon-7b-layout": ("falcon", dict(new_decoder_architecture=False, multi_query=True, num_kv_heads=None,
                                        parallel_attn=True)),
}


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """The config of a tiny ``arch`` model (one of TINY_ARCHS); keyword overrides win over the defaults."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    kw = {**_COMMON, **_ARCH.get(arch, {}), **overrides}
    kw = {k: v for k, v in kw.items() if not (v is None and k in ("num_key_value_heads", "intermediate_size"))}
    return AutoConfig.for_model(_MODEL_TYPE.get(arch, arch), **kw)


def variant_config(name: str, **overrides: Any) -> PretrainedConfig:
    """The config of a tiny model from :data:`TINY_ARCHS` or :data:`VARIANTS`."""
    arch, kw = VARIANTS.get(name, (name, {}))
    return tiny_config(arch, **{**kw, **overrides})


# Hub config keys that hold a dimension or a per-layer list; shrink_hub_config() replaces or truncates them.
_TINY_DIMS: dict[str, Any] = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=256,
                                  max_position_embeddings=256, ffn_hidden_size=128)


def shrink_hub_config(config: dict[str, Any]) -> PretrainedConfig:
    """A tiny config of the same architecture as a hub ``config.json`` (a dict): the same model_type and layout
    flags (GQA / MQA / MHA, tied embeddings, partial rotary, rope scaling type, sliding window, soft-caps,
    parallel attention), every dimension small. Token ids outside the tiny vocabulary become 0 / 1 / 2."""
    c = dict(config)
    layers = c.get("num_hidden_layers") or c.get("n_layer")
    heads = c.get("num_attention_heads") or c.get("n_head")
    kv = c.get("num_key_value_heads") or c.get("num_kv_heads") or heads
    for k in ("n_layer", "n_head", "architectures", "transformers_version", "torch_dtype", "dtype"):
        c.pop(k, None)
    c.update({k: v for k, v in _TINY_DIMS.items() if k in c or k in ("hidden_size", "num_hidden_layers",
                                                                      "vocab_size")})
    c["num_attention_heads"] = 4
    tiny_kv = 4 if kv == heads else (1 if kv == 1 else 2)  # keep MHA / MQA / GQA
    c["num_kv_heads" if c["model_type"] == "falcon" else "num_key_value_heads"] = tiny_kv
    if "head_dim" in c:
        c["head_dim"] = 16
    if "query_pre_attn_scalar" in c:
        c["query_pre_attn_scalar"] = 16
    for k in ("sliding_window", "max_window_layers"):
        if isinstance(c.get(k), int):
            c[k] = min(c[k], 32 if k == "sliding_window" else 2)
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(c.get(key), dict) and "original_max_position_embeddings" in c[key]:
            c[key] = {**c[key], "original_max_position_embeddings": 32}
    for k, v in list(c.items()):
        if isinstance(v, list) and layers and len(v) == layers:
            c[k] = v[:2]  # per-layer lists: layer_types, no_rope_layers
    for k, small in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        v = c.get(k)
        if isinstance(v, list):
            c[k] = [t if t < 256 else small for t in v]
        elif isinstance(v, int) and v >= 256:
            c[k] = small
    model_type = c.pop("model_type")
    return AutoConfig.for_model(model_type, **c)


def tiny_model(arch: str | PretrainedConfig, seed: int = 0, dtype: torch.dtype = torch.float32, attn: str = "eager",
               **overrides: Any) -> PreTrainedModel:
    """A randomly initialised tiny ``arch`` causal LM (a name from TINY_ARCHS / VARIANTS, or a config); the same
    seed gives the same weights.

    The global RNG is left untouched (the init runs in a forked RNG), so building a model inside a test does not
    change the random numbers that the test draws afterwards.
    """
    if attn not in ("eager", "sdpa"):
        raise ValueError(f"attn must be 'eager' or 'sdpa', got {attn!r}")
    config = arch if isinstance(arch, PretrainedConfig) else variant_config(arch, **overrides)
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
