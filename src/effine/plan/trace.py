"""Activation bytes of a decoder layer, measured from the ops themselves: a traced forward, not a formula.

The planner needs what autograd keeps for backward per decoder layer. Instead of restating each op's saved tensors
by hand (a parallel formula that every change to ``effine.ops`` would have to follow), it builds ONE decoder layer
of the model exactly as training does — the same transformers module, effine's attention backend, LoRA adapters
(fp32), fused RMSNorm / gated MLP, QAT — and runs its forward on real CPU tensors under
``torch.autograd.graph.saved_tensors_hooks``, counting each saved storage once (parameters and buffers excluded).

    one layer of the config (num_hidden_layers = 1)  on the meta device: no weights read, no memory
        -> inject_lora / apply_qat / fuse_model / attention backend, as build_model does
        -> materialise that one layer on the CPU with constant weights (the values do not change what is saved,
           only its size matters)
        -> forward of (B, T, H) hidden states with input grad (or without: layer 0 under LoRA reads the frozen
           embedding's output), count saved bytes S(B, T)

Saved bytes are linear in B at a fixed T (rows are independent; a (T, T) mask is shared by the batch). In T they
are linear for the backends without a (T, T) term (tiled on CPU, SDPA / flash without an explicit mask), so two
short traces give the slope and the intercept exactly; eager attention (T^2 probabilities) and a sliding window
shorter than T under SDPA (an explicit (T, T) mask) are traced at the planned T itself.

What is not traced: quantization of the frozen base (a frozen linear keeps its input only for the adapter, and the
dequantized weight is a transient of the forward, not saved: the same bytes as the dense base — a test checks it),
and flash-attn on a CPU-only machine (SDPA stands in: both keep q, k, v, the output and the log-sum-exp).
Cost: one layer's weights in the run's dtype (SmolLM2: 3.5 MB; a 7B model: ~0.4 GB) and a few short forwards.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass

import torch
from effine.config import Config
from effine.dtypes import DTYPES
from effine.plan.measure import saved_for_backward_bytes

SHORT_T = (16, 32)  # trace lengths for the backends that are linear in T


@dataclass(frozen=True)
class LayerBytes:
    """Saved bytes of one decoder layer at one T: ``per_row * B + per_call``, plus what every layer of the model
    shares (``shared_row * B + shared_call``, e.g. the rotary cos/sin all layers read: counted once per model)."""

    per_row: float  # bytes per batch row at this T (per token: per_row / T)
    per_call: float  # bytes per layer call whatever B (e.g. a (T, T) mask)
    shared_row: float = 0.0
    shared_call: float = 0.0

    def at(self, batch: int) -> int:
        return int(self.per_row * batch + self.per_call)

    def shared_at(self, batch: int) -> int:
        return int(self.shared_row * batch + self.shared_call)


def _one_layer_config(config, layer: int):
    """The text config with only decoder layer ``layer`` (its attention type kept)."""
    get = getattr(config, "get_text_config", None)
    c = copy.deepcopy(get() if callable(get) else config)
    types = getattr(c, "layer_types", None)
    if types:
        c.layer_types = [types[layer]]
    nope = getattr(c, "no_rope_layers", None)  # SmolLM3-style per-layer RoPE switch
    if isinstance(nope, list) and nope:
        c.no_rope_layers = [nope[layer]]
    c.num_hidden_layers = 1
    return c


def layer_kinds(config) -> list[int]:
    """Indices of the layers that differ (layer 0, and the first layer of every other attention type)."""
    get = getattr(config, "get_text_config", None)
    c = get() if callable(get) else config
    keys = [tuple(str(v[i]) if isinstance(v, list) and i < len(v) else "" for v in
                  (getattr(c, "layer_types", None), getattr(c, "no_rope_layers", None)))
            for i in range(int(getattr(c, "num_hidden_layers", 1)))]
    first: dict[tuple, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    return sorted({0, *first.values()})


def _kind_of(config, layer: int) -> int:
    get = getattr(config, "get_text_config", None)
    c = get() if callable(get) else config

    def key(i):
        return tuple(str(v[i]) if isinstance(v, list) and i < len(v) else "" for v in
                     (getattr(c, "layer_types", None), getattr(c, "no_rope_layers", None)))

    return next(i for i in layer_kinds(config) if key(i) == key(layer))


class _LayerUnderTest:
    """One decoder layer built as training builds it, materialised uninitialised on the CPU."""

    def __init__(self, config, layer: int, cfg: Config, attn: str, fused: bool):
        from transformers import AutoModelForCausalLM

        c = _one_layer_config(config, layer)
        dtype = DTYPES[cfg.model.dtype]
        tlog = logging.getLogger("transformers")
        old = tlog.level
        tlog.setLevel(logging.ERROR)
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(c, dtype=dtype,
                                                         trust_remote_code=cfg.model.trust_remote_code)
        finally:
            tlog.setLevel(old)
        # A model without transformers' attention interface runs its own attention: its eager path needs a (T, T)
        # mask (and keeps (T, T) probabilities), its sdpa path takes none (causal, no T^2 term)
        self.effine_attention = bool(getattr(model, "_supports_attention_backend", False))
        self.own_eager = not self.effine_attention and getattr(model.config, "_attn_implementation", "") == "eager"
        # The layer as training builds it (build_model), minus the quantization of the frozen base: a frozen linear
        # keeps the same bytes for backward whether its weight is dense or quantized (only the adapter needs x).
        from effine.recipe import ModelRecipe, build_model

        recipe = ModelRecipe.from_config(cfg).replace(attn=attn, device="cpu", gradient_checkpointing=False,
                                                      fused_ops=fused, quant={"method": "none", "skip_modules": ()})
        from effine.ops.attention import default_backend, set_backend

        before = default_backend()
        try:
            model = build_model(recipe, base=model)
        finally:
            set_backend(before)  # planning must not change the process's attention default (enable() sets it)
        self.attn = attn
        from effine.plan.inventory import _layer_stack

        _, stack = _layer_stack(model)
        self.layer = stack[0].to_empty(device="cpu")
        with torch.no_grad():  # any finite values do: what is saved depends on shapes, not values (QAT needs finite)
            for t in self.layer.parameters():
                if t.is_floating_point():
                    t.fill_(0.01)
        self.layer.train()
        self.model, self.dtype = model, dtype
        self.hidden = int(c.hidden_size)
        self.layer_type = (getattr(c, "layer_types", None) or [None])[0]
        self.kwargs = set(inspect.signature(type(stack[0]).forward).parameters)

    def _position_embeddings(self, B: int, T: int):
        rot = getattr(self.model.base_model, "rotary_emb", None)
        if rot is None:
            return None
        args = []
        if "layer_type" in inspect.signature(type(rot).forward).parameters:  # Gemma-3: one rotary per layer type
            args.append(self.layer_type)
        with torch.device("meta"):
            cos, sin = rot(torch.empty(B, T, self.hidden, dtype=self.dtype), torch.arange(T).expand(B, T), *args)
        return torch.zeros(cos.shape, dtype=cos.dtype), torch.zeros(sin.shape, dtype=sin.dtype)

    def saved(self, B: int, T: int, input_grad: bool, calls: int = 1) -> int:
        """Saved bytes of ``calls`` chained calls of the layer (2 calls tell what the calls share)."""
        h = torch.zeros(B, T, self.hidden, dtype=self.dtype, requires_grad=input_grad)
        kw = {"attention_mask": None, "position_ids": None, "use_cache": False}
        if "position_embeddings" in self.kwargs:
            kw["position_embeddings"] = self._position_embeddings(B, T)
        if "alibi" in self.kwargs:
            kw["alibi"] = None
        if self.own_eager:  # its own eager attention: an additive causal (B, 1, T, T) mask, built once
            kw["attention_mask"] = torch.full((T, T), float("-inf"), dtype=self.dtype).triu(1).expand(B, 1, T, T)
        kw = {k: v for k, v in kw.items() if k in self.kwargs or "kwargs" in self.kwargs}

        def forward():
            x = h
            for _ in range(calls):
                x = self.layer(x, **kw)
                x = x[0] if isinstance(x, tuple) else x
            return x

        from effine.ops.attention import attention_backend

        with attention_backend(self.attn if self.effine_attention else None):
            return saved_for_backward_bytes(self.layer, forward, keep=False)


def quadratic_in_t(config, layer: int, attn: str, T: int) -> bool:
    """Whether this layer keeps a (T, T) term: eager attention, or an SDPA call with an explicit sliding-window
    mask (a window shorter than T)."""
    if attn == "eager":
        return True
    if attn != "sdpa":
        return False
    get = getattr(config, "get_text_config", None)
    c = get() if callable(get) else config
    window = getattr(c, "sliding_window", None)
    types = getattr(c, "layer_types", None)
    windowed = ("sliding" in str(types[layer])) if types else bool(window)
    return bool(window) and windowed and T > int(window)


_TRACED: dict[tuple, LayerBytes] = {}  # (config JSON, layer, run settings, attn, fused, T, input grad) -> bytes


def trace_layer(config, layer: int, cfg: Config, attn: str, fused: bool, T: int, input_grad: bool) -> LayerBytes:
    """Saved bytes of decoder layer ``layer`` for rows of ``T`` tokens (see the module docstring). Results are kept
    by content (the config's JSON and the settings that change what is saved), so planning one model for several
    GPU sizes traces once."""
    a, q, m = cfg.adapter, cfg.quant, cfg.model
    key = (config.to_json_string(use_diff=False), layer, m.dtype, m.recompute_norm_outputs, a.method, a.r,
           a.dropout, tuple(a.target_modules or ()), q.qat_bits, q.group_size, attn, fused, T, input_grad)
    if key not in _TRACED:
        _TRACED[key] = _trace(config, layer, cfg, attn, fused, T, input_grad)
    return _TRACED[key]


def _trace(config, layer: int, cfg: Config, attn: str, fused: bool, T: int, input_grad: bool) -> LayerBytes:
    import gc

    lut = _LayerUnderTest(config, layer, cfg, attn, fused)
    try:
        return _measure(lut, config, layer, attn, T, input_grad)
    finally:
        # The layer's weights (a 7B model's layer: ~0.4 GB) sit in reference cycles (module hooks); free them now,
        # not whenever the cyclic collector next runs, or planning many configs holds them all at once.
        del lut
        gc.collect()


def _measure(lut: _LayerUnderTest, config, layer: int, attn: str, T: int, input_grad: bool) -> LayerBytes:

    def point(B: int, t: int) -> tuple[int, int]:
        """(bytes one more layer adds, bytes the layers share) for B rows of t tokens."""
        one, two = lut.saved(B, t, True), lut.saved(B, t, True, calls=2)
        shared = 2 * one - two
        own = (one if input_grad else lut.saved(B, t, False)) - shared
        return own, shared

    def rows_and_call(b1: tuple[int, int], b2: tuple[int, int]) -> tuple[tuple[float, float], tuple[float, float]]:
        # values at B = 1 and B = 2, same t: per row = v2 - v1, per call = 2 v1 - v2
        return ((b2[0] - b1[0], 2 * b1[0] - b2[0]), (b2[1] - b1[1], 2 * b1[1] - b2[1]))

    with torch.random.fork_rng(devices=[]):  # LoRA dropout masks must not move the caller's RNG
        if quadratic_in_t(config, layer, attn, T) or lut.own_eager or T <= SHORT_T[1]:
            (row, call), (srow, scall) = rows_and_call(point(1, T), point(2, T))
            return LayerBytes(row, call, srow, scall)
        t1, t2 = SHORT_T
        p1, p2 = point(1, t1), point(1, t2)
        (_, call), (_, scall) = rows_and_call(p2, point(2, t2))

    def per_row_at_t(v1: float, v2: float, per_call: float) -> float:
        slope = (v2 - v1) / (t2 - t1)  # bytes per token of one row
        return slope * T + (v2 - per_call - slope * t2)  # + bytes per row independent of T

    return LayerBytes(per_row_at_t(p1[0], p2[0], call), call, per_row_at_t(p1[1], p2[1], scall), scall)


def model_layer_bytes(config, cfg: Config, attn: str, fused: bool, T: int) -> tuple[list[LayerBytes], list[LayerBytes]]:
    """(saved bytes of every decoder layer, one entry per distinct layer kind for the bytes the layers share).

    Layer 0 under LoRA reads the frozen embedding's output: it is traced without an input gradient."""
    get = getattr(config, "get_text_config", None)
    c = get() if callable(get) else config
    L = int(getattr(c, "num_hidden_layers"))
    frozen_first = cfg.adapter.method != "full"
    layers = [trace_layer(config, _kind_of(config, i), cfg, attn, fused, T, input_grad=not (frozen_first and i == 0))
              for i in range(L)]
    kinds = [trace_layer(config, k, cfg, attn, fused, T, input_grad=True) for k in layer_kinds(config)]
    return layers, kinds


def clear_cache() -> None:
    _TRACED.clear()


__all__ = ["LayerBytes", "layer_kinds", "model_layer_bytes", "trace_layer", "quadratic_in_t", "clear_cache"]
