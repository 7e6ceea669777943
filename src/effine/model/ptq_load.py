"""Loading an ``effine ptq`` export (int4/int8 group-wise codes + scales in ``effine_ptq.safetensors``).

The writer is :mod:`effine.export.ptq` (its docstring has the format); the reader lives here, below the exporters,
because the model loader (:func:`effine.model.loader.load_model`) opens such a dir like any other model dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from effine.errors import ConfigError, ModelError

PTQ_WEIGHTS_NAME = "effine_ptq.safetensors"
PTQ_CONFIG_KEY = "effine_ptq"
PTQ_FORMAT = 1


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    from effine.model.loader import DTYPES

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"ptq: dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def is_ptq_dir(path: str | Path) -> bool:
    """True for a dir written by :func:`ptq_export`."""
    return (Path(path) / PTQ_WEIGHTS_NAME).is_file()


def _quant_linear_from(qstate: dict[str, torch.Tensor], name: str, symmetric: bool, dtype: torch.dtype,
                       out_features: int) -> nn.Module:
    """A :class:`~effine.quant.QuantLinear` holding the file's integer codes as they are (no requantization)."""
    from effine.quant import QuantLinear

    bits, group, cols, _ = (int(v) for v in qstate[f"{name}.qmeta"].tolist())
    bias = qstate.get(f"{name}.bias")
    mod = QuantLinear(cols, out_features, bias=bias is not None, method="int4" if bits == 4 else "int8",
                      group_size=group or None, symmetric=symmetric, compute_dtype=dtype)
    zeros = qstate[f"{name}.zeros"]
    if symmetric and bool(zeros.any()):
        raise ModelError(f"load_ptq_model: {name}.zeros is not all 0 but the export says symmetric=True.")
    with torch.no_grad():
        for buf in ("qweight", "scales") if symmetric else ("qweight", "scales", "zeros"):
            src, dst = qstate[f"{name}.{buf}"], getattr(mod, buf)
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ModelError(f"load_ptq_model: {name}.{buf} is {src.dtype} {tuple(src.shape)}, expected "
                                 f"{dst.dtype} {tuple(dst.shape)} for QuantLinear({cols} -> {out_features}).")
            setattr(mod, buf, src.clone())
        if bias is not None:
            mod.bias.copy_(bias)
    return mod


def load_ptq_model(
    model_dir: str | Path,
    dtype: str | torch.dtype | None = "bf16",
    keep_quantized: bool = False,
    attn: str = "sdpa",
    trust_remote_code: bool = False,
) -> nn.Module:
    """Build the model of a :func:`ptq_export` dir from its config and load the quantized weights into it.

    ``keep_quantized=False``: every quantized linear gets its dequantized weight ``(q - Z) * S`` as a dense
    ``nn.Linear`` in ``dtype``. ``keep_quantized=True``: those layers become :class:`~effine.quant.QuantLinear`
    (method int4/int8) holding the stored integer codes and scales (computing in ``dtype``); 4-bit weights then
    take about a seventh of the fp32 memory. ``dtype=None`` keeps the dtype recorded in config.json.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from effine.quant import load_ptq_state_dict

    model_dir = Path(model_dir)
    if not is_ptq_dir(model_dir):
        raise ModelError(f"load_ptq_model: {model_dir} has no {PTQ_WEIGHTS_NAME}; it is not an effine PTQ export.")
    raw = json.loads((model_dir / "config.json").read_text())
    settings = raw.get(PTQ_CONFIG_KEY)
    if not isinstance(settings, dict) or settings.get("format", PTQ_FORMAT) != PTQ_FORMAT:
        raise ModelError(f"load_ptq_model: {model_dir}/config.json has no usable '{PTQ_CONFIG_KEY}' entry "
                         f"(format {PTQ_FORMAT} expected); re-export with effine ptq.")
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if hasattr(config, PTQ_CONFIG_KEY):
        delattr(config, PTQ_CONFIG_KEY)  # the built model is dense or effine-quantized; not a config matter
    torch_dtype = _torch_dtype(dtype) or getattr(config, "dtype", None) or torch.float32
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    with no_init_weights():  # every weight is overwritten from the file below (checked)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation=attn,
                                                 trust_remote_code=trust_remote_code)
    qstate = load_file(str(model_dir / PTQ_WEIGHTS_NAME), device="cpu")
    with safe_open(str(model_dir / PTQ_WEIGHTS_NAME), "pt") as f:
        tied = json.loads((f.metadata() or {}).get("effine_tied", "{}"))
    names = [k[: -len(".qmeta")] for k in qstate if k.endswith(".qmeta")]

    if keep_quantized:
        symmetric = bool(settings.get("symmetric", True))
        for name in names:
            lin = model.get_submodule(name)
            if not isinstance(lin, nn.Linear):
                raise ModelError(f"load_ptq_model: {name} is a {type(lin).__name__} in {type(model).__name__}, "
                                 "not an nn.Linear; the export does not fit this architecture.")
            mod = _quant_linear_from(qstate, name, symmetric, torch_dtype, lin.out_features)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, mod)
        done = {f"{n}.{s}" for n in names for s in ("qweight", "scales", "zeros", "qmeta", "bias")}
        state = {k: v for k, v in qstate.items() if k not in done}
        expected_quant = {f"{n}.{s}" for n in names for s in ("qweight", "scales", "zeros", "bias")}
    else:
        state = load_ptq_state_dict(qstate, dtype=torch_dtype)
        expected_quant = set()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in tied and k not in expected_quant]
    if missing or unexpected:
        raise ModelError(f"load_ptq_model: {model_dir}/{PTQ_WEIGHTS_NAME} does not fit the model built from its "
                         f"config: missing {missing[:5]}, unexpected {list(unexpected)[:5]}.")
    if tied:
        model.tie_weights()
        for alias, stored in tied.items():
            try:
                same = model.get_parameter(alias).data_ptr() == model.get_parameter(stored).data_ptr()
            except AttributeError:
                same = False
            if not same:
                raise ModelError(f"load_ptq_model: {alias} was tied to {stored} when exported but the model built "
                                 "from config.json does not tie them (tie_word_embeddings?).")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model
