"""Swap transformers' RMSNorm and gated-MLP modules for fused ones (:mod:`effine.ops.fused`), in place.

Like LoRA injection this replaces module *instances* in the model tree; no transformers class is patched, so other
models in the process are unaffected. The replacements keep what the state dict sees:

    LlamaRMSNorm(weight, variance_epsilon)      ─►  RMSNorm(weight, eps, offset=0)   same Parameter object
    GemmaRMSNorm(weight, eps)  (+ Gemma2/3)     ─►  RMSNorm(weight, eps, offset=1)   (weights stored as w - 1)
    LlamaMLP(gate_proj, up_proj, down_proj, act_fn)
                     (+ Mistral/Qwen2/Gemma*)   ─►  GatedMLP(the same four children)

so ``state_dict()`` keys and tensors, PEFT adapter files and ``save_pretrained`` are unchanged. The MLP's
projections are kept as they are — plain, LoRA-wrapped, quantized or fake-quantized — so :func:`fuse_model`
works before or after :func:`effine.adapters.inject_lora` / quantization, and LoRA injection after fusing finds
the same target names. An MLP whose activation has no fused kernel (anything but SiLU and tanh-GELU) is left as it
is and counted. Phi (fc1/fc2, LayerNorm) and Falcon have neither module and are untouched.

``GatedMLP`` also (``recompute=True``, the default) keeps the down projection from storing its input
act(gate) * up for backward: it is recomputed from gate and up, which the fused activation keeps anyway
(:func:`effine.ops.fused.recompute_saved`). With LoRA on ``down_proj`` that is another m values per token.

The same holds for each norm's *output* (``recompute=True``): the attention block's q/k/v projections and the
MLP's gate/up projections read the normalised hidden state, and a LoRA (or trainable) projection keeps it for its
weight gradient, although the norm already keeps its input. The fused RMSNorm records its output; a forward
pre-hook on the other children of the same decoder layer (attention, MLP) finds that output among the child's
inputs and runs the child under :func:`recompute_saved`, so autograd keeps the norm's input (already kept) and
recomputes the normalised value, bit-identically, when backward reaches the projections. Another H values per
token, twice per layer (SmolLM2-135M: 2 x 576 x 2 bytes of ~29 KB per token and layer).

    counts = fuse_model(model)     # {'rms_norm': 61, 'gated_mlp': 30, 'unsupported_act': 0}
    unfuse_model(model)            # the original transformers modules back (e.g. before handing the model on)
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
from torch import nn

from effine.module_tree import child_slots
from effine.ops.fused import (fused_enabled, gated_act, gated_act_reference, recompute_saved, rms_norm,
                              rms_norm_from_rstd)

__all__ = [
    "GATED_MLP_CLASSES",
    "GatedMLP",
    "NORM_CLASSES",
    "RMSNorm",
    "activation_name",
    "fuse_model",
    "unfuse_model",
]

# class name -> (offset, cast_before_weight). Each entry was checked against transformers' source: Llama-style
# norms compute ``w * (x.float() * r).to(dtype)``, Gemma-style ``(x.float() * r * (1 + w.float())).type_as(x)``.
NORM_CLASSES: dict[str, tuple[float, bool]] = {
    "LlamaRMSNorm": (0.0, True),
    "MistralRMSNorm": (0.0, True),
    "Qwen2RMSNorm": (0.0, True),
    "GemmaRMSNorm": (1.0, False),
    "Gemma2RMSNorm": (1.0, False),
    "Gemma3RMSNorm": (1.0, False),
}

# Classes whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``.
GATED_MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP"})


class RMSNorm(nn.Module):
    """RMSNorm over the last dim through :func:`effine.ops.fused.rms_norm`, holding the original ``weight``."""

    def __init__(self, weight: nn.Parameter, eps: float, offset: float = 0.0, cast_before_weight: bool = True,
                 original: nn.Module | None = None) -> None:
        super().__init__()
        self.weight = weight  # the same Parameter object: state-dict key ``…norm.weight`` and sharing unchanged
        self.eps = float(eps)
        self.offset = float(offset)
        self.cast_before_weight = bool(cast_before_weight)
        # The transformers module, kept out of the module tree (no extra state-dict keys) for unfuse_model().
        object.__setattr__(self, "_original", original)

    @property
    def variance_epsilon(self) -> float:  # the attribute name Llama-style norms use
        return self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "recompute_output", False) and torch.is_grad_enabled() and fused_enabled():
            y, rstd = rms_norm(x, self.weight, self.eps, self.offset, cast_before_weight=self.cast_before_weight,
                               return_rstd=True)
            if y.requires_grad:
                # Recomputed from x and the row scales the norm keeps anyway: no second mean of squares.
                fn = functools.partial(rms_norm_from_rstd, offset=self.offset,
                                       cast_before_weight=self.cast_before_weight)
                _remember_output(y, fn, (x, self.weight, rstd))
            return y
        return rms_norm(x, self.weight, self.eps, self.offset, cast_before_weight=self.cast_before_weight)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset:g}"


# id(output) -> (weak reference to the output, how to recompute it, from what). An entry dies with its output.
_NORM_OUTPUTS: dict[int, tuple[weakref.ref, Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]] = {}


def _remember_output(y: torch.Tensor, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> None:
    key = id(y)
    _NORM_OUTPUTS[key] = (weakref.ref(y, lambda _ref, k=key: _NORM_OUTPUTS.pop(k, None)), fn, inputs)


def _enter_recompute(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: when the module's hidden-state input is a remembered norm output, run the module under
    :func:`recompute_saved` for it (the post-hook leaves the context)."""
    t = args[0] if args else kwargs.get("hidden_states")
    entry = _NORM_OUTPUTS.get(id(t)) if isinstance(t, torch.Tensor) else None
    cm = None
    if entry is not None and entry[0]() is t:
        cm = recompute_saved(t, entry[1], *entry[2])
        cm.__enter__()
    module.__dict__.setdefault("_effine_recompute", []).append(cm)


def _exit_recompute(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
    stack = module.__dict__.get("_effine_recompute")
    cm = stack.pop() if stack else None
    if cm is not None:
        cm.__exit__(None, None, None)


def _hook_norm_consumers(layer: nn.Module) -> int:
    """Hook the children of ``layer`` that may read one of its fused norms' outputs; returns how many."""
    if getattr(layer, "_effine_norm_hooks", None):
        return 0
    handles = []
    for child in layer.children():
        if isinstance(child, RMSNorm) or not any(True for _ in child.parameters()):
            continue
        handles.append(child.register_forward_pre_hook(_enter_recompute, with_kwargs=True))
        handles.append(child.register_forward_hook(_exit_recompute, with_kwargs=True, always_call=True))
    object.__setattr__(layer, "_effine_norm_hooks", handles)
    return len(handles) // 2


class GatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` with the fused activation-product; children kept as given."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_fn: nn.Module, act: str,
                 original: nn.Module | None = None, recompute: bool = True) -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn  # kept so that the tree (and unfuse) stays as it was; not called
        self.act = act
        self.recompute = recompute
        object.__setattr__(self, "_original", original)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if not fused_enabled():
            return self.down_proj(gated_act_reference(gate, up, self.act))
        p = gated_act(gate, up, self.act, fused=True)
        if not self.recompute:
            return self.down_proj(p)
        # A LoRA (or trainable) down_proj would keep p for its weight gradient; keep gate and up instead (the
        # gated activation saves them anyway) and recompute p bit-identically when backward reaches down_proj.
        with recompute_saved(p, functools.partial(gated_act_reference, act=self.act), gate, up):
            return self.down_proj(p)

    def extra_repr(self) -> str:
        return f"act={self.act}, recompute={self.recompute}"


def activation_name(act_fn: nn.Module) -> str | None:
    """The fused activation ("silu" / "gelu_tanh") an MLP's ``act_fn`` module computes, or None when unsupported.

    Decided by the module, not the config string, so it matches what the eager forward would have called:
    transformers' SiLUActivation / nn.SiLU; GELUTanh (gelu_pytorch_tanh), NewGELUActivation (gelu_new),
    FastGELUActivation (gelu_fast) and nn.GELU(approximate="tanh") are all the tanh approximation.
    """
    name = type(act_fn).__name__
    if isinstance(act_fn, nn.SiLU) or name in ("SiLUActivation", "SiLU"):
        return "silu"
    if isinstance(act_fn, nn.GELU):
        return "gelu_tanh" if act_fn.approximate == "tanh" else None
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation"):
        return "gelu_tanh"
    return None


def _norm_spec(module: nn.Module) -> tuple[float, float, bool] | None:
    """(eps, offset, cast_before_weight) for a supported transformers RMSNorm, else None."""
    spec = NORM_CLASSES.get(type(module).__name__)
    w = getattr(module, "weight", None)
    if spec is None or not isinstance(w, nn.Parameter) or w.dim() != 1:
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(eps, (int, float)):
        return None
    return float(eps), spec[0], spec[1]


def _is_gated_mlp(module: nn.Module) -> bool:
    return type(module).__name__ in GATED_MLP_CLASSES and all(
        isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def _detach(orig: nn.Module, names: tuple[str, ...]) -> nn.Module:
    # The original is kept only as a shell for unfuse_model(): drop its tensors/children so that it never keeps a
    # weight alive that a later swap (quantization, LoRA merge) replaced in the fused module.
    for k in names:
        setattr(orig, k, None)
    return orig


def fuse_model(model: nn.Module, recompute: bool = True, recompute_norms: bool | None = None) -> dict[str, int]:
    """Replace every supported RMSNorm and gated MLP in ``model`` with the fused modules; returns counts.

    ``recompute``: the MLPs recompute the down projection's input in backward instead of letting a LoRA (or
    trainable) ``down_proj`` keep it (see :func:`effine.ops.fused.recompute_saved`). ``recompute_norms`` (default:
    ``recompute``; config ``model.recompute_norm_outputs``): the decoder layers' norm outputs are recomputed for
    the projections that read them (see the module docstring).

    ``{'rms_norm': swapped norms, 'gated_mlp': swapped MLPs, 'unsupported_act': MLPs left alone because their
    activation has no fused kernel}``. Idempotent: already-fused modules are not counted again.
    """
    counts = {"rms_norm": 0, "gated_mlp": 0, "unsupported_act": 0}
    norm_parents: dict[int, nn.Module] = {}
    for parent, name, child in child_slots(model):
        spec = _norm_spec(child)
        if spec is not None:
            eps, offset, cast_before = spec
            fused = RMSNorm(child.weight, eps, offset, cast_before, original=_detach(child, ("weight",)))
            fused.train(child.training)
            setattr(parent, name, fused)
            counts["rms_norm"] += 1
            if (recompute if recompute_norms is None else recompute_norms) and parent is not model:
                fused.recompute_output = True
                norm_parents[id(parent)] = parent
        elif _is_gated_mlp(child):
            act = activation_name(child.act_fn)
            if act is None:
                counts["unsupported_act"] += 1
                continue
            fused = GatedMLP(child.gate_proj, child.up_proj, child.down_proj, child.act_fn, act,
                             original=_detach(child, ("gate_proj", "up_proj", "down_proj", "act_fn")),
                             recompute=recompute)
            fused.train(child.training)
            setattr(parent, name, fused)
            counts["gated_mlp"] += 1
    for parent in norm_parents.values():
        _hook_norm_consumers(parent)
    return counts


def unfuse_model(model: nn.Module) -> int:
    """Put the original transformers modules back (with the current weight / children); returns how many."""
    n = 0
    for m in model.modules():
        for h in getattr(m, "_effine_norm_hooks", None) or ():
            h.remove()
        if getattr(m, "_effine_norm_hooks", None) is not None:
            object.__setattr__(m, "_effine_norm_hooks", None)
    for parent, name, child in child_slots(model):
        orig = getattr(child, "_original", None)
        if isinstance(child, RMSNorm) and orig is not None:
            orig.weight = child.weight
        elif isinstance(child, GatedMLP) and orig is not None:
            for k in ("gate_proj", "up_proj", "down_proj", "act_fn"):
                setattr(orig, k, getattr(child, k))  # LoRA / quantization applied after fusing carries over
        else:
            continue
        orig.train(child.training)
        setattr(parent, name, orig)
        n += 1
    return n
