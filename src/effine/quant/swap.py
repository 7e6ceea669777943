"""Module-swap helpers (quantize / QAT a model in place) and a post-training-quantized state-dict format.

All swaps walk the model, offer every ``nn.Linear`` to a filter ``filter_fn(qualified_name, module) -> bool``
and replace the accepted ones in their parent module. The default filter (:func:`default_filter`) accepts
every Linear except the output head (a name component ``lm_head``) and anything named like an embedding
(a name component containing ``embed``, or ``wte``/``wpe``). Linears owned by ``nn.MultiheadAttention`` are
never swapped (it reads ``out_proj.weight`` directly), nor is the root module itself. A Linear reachable under
several names is replaced by one shared new module everywhere.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from effine.errors import ConfigError
from effine.module_tree import named_by, swap_modules
from effine.quant import affine
from effine.quant.linear import QuantLinear
from effine.quant.qat import FakeQuantLinear

__all__ = [
    "default_filter",
    "skip_filter",
    "check_quant_settings",
    "quantize_model",
    "apply_qat",
    "unwrap_qat",
    "ptq_quantize_state_dict",
    "load_ptq_state_dict",
]

FilterFn = Callable[[str, nn.Module], bool]


def default_filter(name: str, module: object = None) -> bool:
    """True unless ``name`` is the output head (``lm_head``) or names an embedding (``embed*``, ``wte``, ``wpe``)."""
    for part in name.lower().split("."):
        if part == "lm_head" or "embed" in part or part in ("wte", "wpe"):
            return False
    return True


def skip_filter(model: nn.Module, skip_modules: Optional[list[str]], base: Optional[FilterFn] = None) -> FilterFn:
    """``base`` (default :func:`default_filter`) minus the linears named by ``skip_modules``.

    Every entry must name at least one linear that ``base`` would otherwise accept: a typo must not silently
    quantize the layer the user meant to keep (:class:`ConfigError` naming ``quant.skip_modules``).
    """
    base = base or default_filter
    if not skip_modules:
        return base
    accepted = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n and base(n, m)]
    for entry in skip_modules:
        if not any(named_by(n, entry) for n in accepted):
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in accepted})
            raise ConfigError(f"quant.skip_modules: '{entry}' names no quantizable linear layer of this "
                              f"{type(model).__name__}; the quantizable layers end in: {', '.join(suffixes)}.")
    skip = list(skip_modules)
    return lambda n, m: base(n, m) and not any(named_by(n, e) for e in skip)


def check_quant_settings(quant, adapter_method: str) -> None:
    """Cross-key checks of a ``quant:`` config section (``QuantConfig``) before anything is loaded."""
    if quant.method != "none" and adapter_method == "full":
        raise ConfigError("quant.method: a quantized base is frozen; use adapter.method=lora with it (QLoRA).")
    if quant.skip_modules and quant.method == "none":
        raise ConfigError("quant.skip_modules: only applies to a quantized base (quant.method nf4, fp4, int8 or int4); "
                          f"quant.method is 'none'{' (QAT fake-quantizes every linear)' if quant.qat_bits else ''}. "
                          "Remove quant.skip_modules or set quant.method.")


def quantize_model(model: nn.Module, method: str = "nf4", filter_fn: Optional[FilterFn] = None,
                   skip_modules: Optional[list[str]] = None, **kw) -> int:
    """Replace the accepted ``nn.Linear`` layers of ``model`` by :class:`QuantLinear` (in place).

    ``skip_modules`` (``quant.skip_modules``) leaves the named linears as they are (see :func:`skip_filter`).
    ``kw`` goes to :meth:`QuantLinear.from_linear` (``group_size``, ``blocksize``, ``double_quant``,
    ``symmetric``, ``compute_dtype``). Layers are quantized one at a time and each replaced ``nn.Linear`` drops
    its weight and bias right away, so memory falls as the swap proceeds and at most one layer is held both
    dense and quantized (a weight shared with an unswapped module, e.g. tied embeddings, stays alive through that
    module; the dropped ``nn.Linear`` objects are unusable afterwards). Returns how many layers were swapped.
    """
    allowed = {"group_size", "blocksize", "double_quant", "symmetric", "compute_dtype"}
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise ConfigError(
            f"quantize_model got unknown option(s) {unknown} (effine.quant): the options are {sorted(allowed)}."
        )
    filter_fn = skip_filter(model, skip_modules, filter_fn)

    def make(lin: nn.Module) -> nn.Module:
        q = QuantLinear.from_linear(lin, method=method, **kw)
        lin.register_parameter("weight", None)  # free the dense weight even if someone still holds `lin`
        lin.register_parameter("bias", None)
        return q

    return swap_modules(model, lambda n, m: isinstance(m, nn.Linear) and filter_fn(n, m), make)


def apply_qat(
    model: nn.Module,
    filter_fn: Optional[FilterFn] = None,
    bits: int = 8,
    group_size: Optional[int] = 128,
    symmetric: bool = True,
) -> int:
    """Wrap the accepted ``nn.Linear`` layers in :class:`FakeQuantLinear` (in place); returns how many.

    The parameters are shared, not copied: an optimizer created before or after the swap trains the same
    tensors, and :func:`unwrap_qat` restores plain layers holding them.
    """
    filter_fn = filter_fn or default_filter
    return swap_modules(
        model,
        lambda n, m: isinstance(m, nn.Linear) and filter_fn(n, m),
        lambda lin: FakeQuantLinear(lin, bits=bits, group_size=group_size, symmetric=symmetric),
    )


def unwrap_qat(model: nn.Module, bake: bool = False) -> int:
    """Put a plain ``nn.Linear`` (with the trained parameters) back for every :class:`FakeQuantLinear`.

    ``bake=True`` first writes the fake-quantized values into the weights (see :meth:`FakeQuantLinear.to_linear`).
    Returns how many layers were unwrapped.
    """
    return swap_modules(model, lambda n, m: isinstance(m, FakeQuantLinear), lambda m: m.to_linear(bake=bake))


# ---------------------------------------------------------------------------------------------------- PTQ format

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


def ptq_quantize_state_dict(
    state_dict: dict[str, torch.Tensor],
    bits: int = 4,
    group_size: Optional[int] = 128,
    symmetric: bool = True,
    filter_fn: Optional[Callable[[str, torch.Tensor], bool]] = None,
) -> dict[str, torch.Tensor]:
    """Post-training quantization of a state dict into plain tensors (safetensors-friendly).

    Every 2-D floating ``<name>.weight`` whose ``<name>`` passes ``filter_fn(name, tensor)`` (default: the name
    rule of :func:`default_filter`) with shape ``(O, I)`` is replaced by four tensors:

    * ``<name>.qweight``: ``bits=8``: int8 ``(O, I)``; ``bits=4``: uint8 ``(O, ceil(I / 2))``, two signed
      4-bit values per byte, element ``2j`` in the high nibble (:func:`effine.quant.affine.pack_int4`).
    * ``<name>.scales``: float32 ``(O, n_groups)``, the scale ``S`` of each group of ``group_size`` input columns
      (``n_groups = ceil(I / group_size)``; 1 when ``group_size`` is None, i.e. per output row).
    * ``<name>.zeros``: int8 ``(O, n_groups)``, the zero point ``Z`` (all 0 when ``symmetric``).
    * ``<name>.qmeta``: int32 ``(4,)`` = ``[bits, group_size or 0, I, dtype code]`` with dtype code 0 = float32,
      1 = float16, 2 = bfloat16 (the original weight dtype).

    The weight is ``W[o, i] = (q[o, i] - Z[o, i // G]) * S[o, i // G]`` (affine map of the founding document).
    All other entries are passed through unchanged (same tensor objects).
    """
    if bits not in (4, 8):
        raise ConfigError(f"ptq_quantize_state_dict: bits={bits!r} is not supported; use 4 or 8 (effine.quant).")
    affine._check_group_size(group_size)
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        name = key[: -len(".weight")] if key.endswith(".weight") else None
        quantizable = (
            name is not None and isinstance(t, torch.Tensor) and t.dim() == 2 and t.dtype in _DTYPE_CODES
        )
        if not quantizable or not (filter_fn(name, t) if filter_fn else default_filter(name)):
            out[key] = t
            continue
        for suffix in (".qweight", ".scales", ".zeros", ".qmeta"):
            if name + suffix in state_dict:
                raise ConfigError(
                    f"ptq_quantize_state_dict: the state dict already has {name + suffix!r} (effine.quant): "
                    "it looks quantized already; pass the dense state dict."
                )
        rows, cols = t.shape
        scale, zero = affine.compute_qparams(
            t, bits=bits, symmetric=symmetric, group_size=group_size, per_channel=group_size is None
        )
        q = affine.quantize(t, scale, zero, bits=bits, group_size=group_size)
        out[f"{name}.qweight"] = affine.pack_int4(q) if bits == 4 else q.contiguous()
        out[f"{name}.scales"] = scale.reshape(rows, -1).contiguous()
        out[f"{name}.zeros"] = zero.reshape(rows, -1).contiguous()
        out[f"{name}.qmeta"] = torch.tensor([bits, group_size or 0, cols, _DTYPE_CODES[t.dtype]], dtype=torch.int32)
    return out


def load_ptq_state_dict(
    qstate_dict: dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None
) -> dict[str, torch.Tensor]:
    """Dequantize a state dict written by :func:`ptq_quantize_state_dict` back to dense ``<name>.weight`` tensors.

    Weights come back in their original dtype unless ``dtype`` is given; other entries pass through. The result
    can go straight into ``model.load_state_dict``.
    """
    out: dict[str, torch.Tensor] = {}
    names = [k[: -len(".qmeta")] for k in qstate_dict if k.endswith(".qmeta")]
    skip = set()
    for name in names:
        try:
            qweight, scales, zeros = (qstate_dict[f"{name}.{s}"] for s in ("qweight", "scales", "zeros"))
        except KeyError as e:
            raise ConfigError(
                f"load_ptq_state_dict: {name!r} has a .qmeta entry but no {e.args[0]!r} (effine.quant): "
                "the file is incomplete; re-export it with ptq_quantize_state_dict."
            ) from None
        bits, group, cols, dcode = (int(v) for v in qstate_dict[f"{name}.qmeta"].tolist())
        if bits not in (4, 8) or dcode not in _CODE_DTYPES:
            raise ConfigError(
                f"load_ptq_state_dict: {name}.qmeta = {[bits, group, cols, dcode]} is not a known format "
                "(effine.quant): expected [4 or 8, group_size, in_features, 0|1|2]."
            )
        q = affine.unpack_int4(qweight, cols) if bits == 4 else qweight
        w = affine.dequantize(q, scales, zeros, group_size=group or None, dtype=dtype or _CODE_DTYPES[dcode])
        out[f"{name}.weight"] = w
        skip.update(f"{name}.{s}" for s in ("qweight", "scales", "zeros", "qmeta"))
    for k, t in qstate_dict.items():
        if k not in skip:
            out[k] = t
    return out
