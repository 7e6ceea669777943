"""Per-family GGUF layout: llama.cpp's architecture name, hyperparameter keys and tensor names.

transformers and llama.cpp compute the same functions with different weight conventions; what this module
changes on the way (facts of llama.cpp's loader, checked by loading every family in llama.cpp in the tests):

* llama / mistral: llama.cpp applies rotary embeddings to adjacent pairs (GPT-J style), transformers to the two
  halves of each head (rotate_half). The rows of q_proj and k_proj are permuted per head so that both compute
  the same attention scores. Qwen2, Gemma*, Phi and Falcon use the half-split ("neox") style in llama.cpp too:
  no permutation.
* gemma / gemma2 / gemma3: transformers' Gemma RMSNorm multiplies by ``1 + w``; llama.cpp by ``w``, so every
  norm weight (including Gemma-3's per-head q/k norms) is written as ``w + 1``.
* falcon (new decoder architecture): the fused query_key_value rows are grouped per key/value head
  ``[q x (heads / kv_heads), k, v]``; llama.cpp wants all q rows, then all k rows, then all v rows.
* tied embeddings: no ``output.weight``; llama.cpp reuses ``token_embd.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from effine.errors import ModelError

# effine family (transformers model_type) -> llama.cpp architecture
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma": "gemma", "gemma2": "gemma2",
             "gemma3_text": "gemma3", "gemma3": "gemma3", "phi": "phi2", "falcon": "falcon"}

# transformers module path (after the layer prefix) -> GGUF tensor name (after "blk.N.")
_DECODER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GEMMA2 = {**_DECODER, "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
           "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_norm": "attn_q_norm",
           "self_attn.k_norm": "attn_k_norm"}
_PHI = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.dense": "attn_output", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
_FALCON = {"input_layernorm": "attn_norm", "ln_attn": "attn_norm", "ln_mlp": "attn_norm_2",
           "self_attention.query_key_value": "attn_qkv", "self_attention.dense": "attn_output",
           "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"}

# (layer prefix, per-layer map, globals map)
_LAYOUT: dict[str, tuple[str, dict[str, str], dict[str, str]]] = {
    "llama": ("model.layers.", _DECODER, {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
                                          "lm_head": "output"}),
    "phi2": ("model.layers.", _PHI, {"model.embed_tokens": "token_embd", "model.final_layernorm": "output_norm",
                                     "lm_head": "output"}),
    "falcon": ("transformer.h.", _FALCON, {"transformer.word_embeddings": "token_embd",
                                           "transformer.ln_f": "output_norm", "lm_head": "output"}),
}
for _a in ("qwen2", "gemma"):
    _LAYOUT[_a] = _LAYOUT["llama"]
for _a in ("gemma2", "gemma3"):
    _LAYOUT[_a] = ("model.layers.", _GEMMA2, _LAYOUT["llama"][2])


@dataclass
class ArchInfo:
    """What the writer needs to know about one model."""

    arch: str  # llama.cpp architecture name
    n_head: int
    n_head_kv: int
    head_dim: int
    kv: dict[str, Any] = field(default_factory=dict)  # "{arch}.xxx" key suffix -> value
    layer_norm: bool = False  # LayerNorm (phi2, falcon) rather than RMSNorm


def _get(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _rope(cfg) -> tuple[float, float | None, float]:
    """(rope theta of full attention, theta of sliding layers or None, partial rotary factor)."""
    rp = dict(getattr(cfg, "rope_parameters", None) or {})
    sliding = None
    if "full_attention" in rp:  # Gemma-3: one rope per attention type
        sliding = rp.get("sliding_attention", {}).get("rope_theta")
        rp = rp["full_attention"]
    kind = rp.get("rope_type", "default")
    if kind not in ("default", None):
        raise ModelError(f"GGUF export: rope_type={kind!r} (rope scaling) is not supported yet; only plain rotary "
                         "embeddings (rope_type 'default') are exported.")
    theta = rp.get("rope_theta", _get(cfg, "rope_theta", default=10000.0))
    partial = rp.get("partial_rotary_factor", _get(cfg, "partial_rotary_factor", default=1.0))
    return float(theta), sliding, float(partial)


def arch_info(cfg) -> ArchInfo:
    """The llama.cpp architecture and hyperparameters of a transformers config."""
    model_type = cfg.model_type
    if model_type not in GGUF_ARCH:
        raise ModelError(f"GGUF export: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(sorted(set(GGUF_ARCH)))}.")
    arch = GGUF_ARCH[model_type]
    if model_type == "falcon" and not cfg.new_decoder_architecture:
        raise ModelError("GGUF export: only Falcon's new decoder architecture (Falcon-40B/180B style) is supported.")
    if model_type == "falcon" and (cfg.alibi or not cfg.parallel_attn):
        raise ModelError("GGUF export: Falcon with alibi or sequential attention/MLP has no llama.cpp equivalent.")
    n_head = cfg.num_attention_heads
    n_head_kv = _get(cfg, "num_key_value_heads", "num_kv_heads", default=n_head)
    hidden = cfg.hidden_size
    head_dim = _get(cfg, "head_dim", default=hidden // n_head)
    theta, sliding_theta, partial = _rope(cfg)
    ff = _get(cfg, "intermediate_size", "ffn_hidden_size", default=4 * hidden)
    layer_norm = arch in ("phi2", "falcon")
    eps = _get(cfg, "layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps", default=1e-5)
    kv: dict[str, Any] = {
        "context_length": int(_get(cfg, "max_position_embeddings", default=2048)),
        "embedding_length": hidden, "block_count": cfg.num_hidden_layers, "feed_forward_length": ff,
        "attention.head_count": n_head, "attention.head_count_kv": n_head_kv,
        "attention.key_length": head_dim, "attention.value_length": head_dim,
        "rope.freq_base": theta, "rope.dimension_count": int(head_dim * partial),
        ("attention.layer_norm_epsilon" if layer_norm else "attention.layer_norm_rms_epsilon"): float(eps),
    }
    # Mistral's sliding_window is not written: llama.cpp's llama architecture attends to the full context, as
    # llama.cpp's own converter does for Mistral (identical while prompts are shorter than the window).
    if arch in ("gemma2", "gemma3") and getattr(cfg, "sliding_window", None):
        kv["attention.sliding_window"] = int(cfg.sliding_window)
    if arch == "gemma2":
        kv["attn_logit_softcapping"] = float(cfg.attn_logit_softcapping or 0.0)
        kv["final_logit_softcapping"] = float(cfg.final_logit_softcapping or 0.0)
    if arch == "gemma3" and sliding_theta is not None:
        kv["rope.freq_base_swa"] = float(sliding_theta)
    return ArchInfo(arch, n_head, n_head_kv, head_dim, kv, layer_norm)


def _permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """rotate_half row order -> adjacent-pair row order, per head (weights (n_head*d, ...) and biases)."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _falcon_qkv(w: torch.Tensor, info: ArchInfo) -> torch.Tensor:
    per_group = info.n_head // info.n_head_kv
    g = w.reshape(info.n_head_kv, per_group + 2, info.head_dim, *w.shape[1:])
    q = g[:, :per_group].reshape(-1, *w.shape[1:])
    k = g[:, per_group].reshape(-1, *w.shape[1:])
    v = g[:, per_group + 1].reshape(-1, *w.shape[1:])
    return torch.cat([q, k, v], dim=0)


def _transform(info: ArchInfo, gguf_name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if info.arch == "llama" and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
        heads = info.n_head if ".attn_q." in gguf_name else info.n_head_kv
        return lambda t: _permute_rope(t, heads)
    if info.arch in ("gemma", "gemma2", "gemma3") and "norm" in gguf_name:
        return lambda t: t.float() + 1.0
    if info.arch == "falcon" and ".attn_qkv." in gguf_name:
        return lambda t: _falcon_qkv(t, info)
    return None


def gguf_tensors(state: dict[str, torch.Tensor], info: ArchInfo, tied: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in llama.cpp's convention) for every weight; raises on a weight with no GGUF name."""
    prefix, layer_map, global_map = _LAYOUT[info.arch]
    for name, t in state.items():
        module, _, kind = name.rpartition(".")  # kind: weight / bias
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if module == "lm_head" and tied:
            continue
        if module in global_map:
            out = f"{global_map[module]}.{kind}"
        elif module.startswith(prefix):
            idx, _, rest = module[len(prefix):].partition(".")
            if rest not in layer_map:
                raise ModelError(f"GGUF export ({info.arch}): no llama.cpp tensor for weight {name!r}.")
            out = f"blk.{idx}.{layer_map[rest]}.{kind}"
        else:
            raise ModelError(f"GGUF export ({info.arch}): no llama.cpp tensor for weight {name!r}.")
        fn = _transform(info, out)
        yield out, (fn(t) if fn else t)
