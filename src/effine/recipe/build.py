"""``build_model(recipe)``: the one way effine makes a model, for training and for everything after it.

Training (``train=True``): the base in ``recipe.dtype`` on ``recipe.device``, effine's attention backend, frozen
linears quantized / fake-quantized, fresh fp32 LoRA adapters (or every weight trainable), fused ops and gradient
checkpointing as the recipe says.

Inference (``train=False``: generate, merge, export, eval): the same base (same quantization, so the same codes
and scales), the saved adapter from ``adapter_dir`` when given (fp32, as training made it), no fused ops, no
checkpointing; ``compute_dtype`` casts the floating weights afterwards (the quantized codes stay as they are:
they are what training quantized).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from effine.recipe.spec import ModelRecipe

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def build_model(recipe: ModelRecipe, *, train: bool = True, model_dir: Path | None = None,
                adapter_dir: Path | None = None, compute_dtype: str | None = None, log: Log | None = None,
                base: nn.Module | None = None) -> nn.Module:
    """Build the model ``recipe`` describes; see the module docstring for what ``train`` changes.

    ``base``: an already instantiated base model to build on instead of loading ``recipe.base`` (the planner
    passes one decoder layer built on the meta device, :mod:`effine.plan.trace`)."""
    from effine.model.loader import DTYPES, load_model, resolve_device, resolve_model_dir
    from effine.quant import check_quant_settings

    log = log or _quiet
    check_quant_settings(recipe.quant, recipe.adapter.method)
    device = resolve_device(recipe.device) if train else torch.device("cpu")
    if base is not None:
        model, device = base, next(base.parameters()).device
    else:
        if model_dir is None:
            model_dir = resolve_model_dir(recipe.base, recipe.cache_dir, recipe.revision)
        model = load_model(model_dir, recipe.dtype, attn="sdpa", trust_remote_code=recipe.trust_remote_code,
                           device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    if train:
        _enable_attention(model, recipe, device, log)
    _build_base(model, recipe, log)
    if adapter_dir is not None:
        _load_adapter(model, adapter_dir)
        log(f"adapter: {adapter_dir}")
    elif train:
        _make_trainable(model, recipe, log)
    if compute_dtype is not None and DTYPES[compute_dtype] != DTYPES[recipe.dtype]:
        cast_floats(model, DTYPES[compute_dtype])
    if train:
        _training_options(model, recipe, log)
    else:
        model.eval()
    return model


def _enable_attention(model: nn.Module, recipe: ModelRecipe, device: torch.device, log: Log) -> None:
    from effine.ops.attention import enable

    from effine.ops.attention import keeps_documents_apart

    backend = enable(model, None if recipe.attn == "auto" else recipe.attn)
    log(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    log(f"attention: effine backend '{backend}' (model.attn={recipe.attn}; "
        + ("packed rows keep attention within each document)" if keeps_documents_apart(model)
           else "the model's own attention cannot keep packed documents apart: no packing)"))


def _build_base(model: nn.Module, recipe: ModelRecipe, log: Log) -> None:
    """Quantize and/or fake-quantize the frozen base as the recipe says (nothing for a plain base)."""
    q = recipe.quant
    if q.method != "none":
        from effine.quant import quantize_model
        from effine.system.heap import release_free_heap

        n = quantize_model(model, q.method, group_size=q.group_size, blocksize=q.blocksize,
                           double_quant=q.double_quant, skip_modules=list(q.skip_modules))
        kept = f" (kept in {recipe.dtype}: {', '.join(q.skip_modules)})" if q.skip_modules else ""
        log(f"quantized {n} linear layers to {q.method}{kept}")
        release_free_heap()  # the freed dense weights' pages go back to the OS, not just to the heap
    if q.qat_bits:
        from effine.quant import apply_qat

        n = apply_qat(model, bits=q.qat_bits, group_size=q.group_size)
        log(f"QAT: fake-quantizing {n} linear layers to {q.qat_bits} bits")


def _load_adapter(model: nn.Module, adapter_dir: Path) -> None:
    """The saved adapter in fp32 (as training made it), without touching the caller's RNG state (new LoRA layers
    draw an initialisation that the loaded tensors then overwrite)."""
    from effine.adapters import load_adapter

    with torch.random.fork_rng(devices=[]):
        load_adapter(model, adapter_dir, dtype=torch.float32)


def _make_trainable(model: nn.Module, recipe: ModelRecipe, log: Log) -> None:
    a = recipe.adapter
    if a.method == "lora":
        from effine.adapters import count_parameters, inject_lora
        from effine.config import AdapterConfig

        # Adapters train in fp32 even on a bf16 base: AdamW updates of bf16 weights lose most small steps.
        cfg = AdapterConfig(method="lora", r=a.r, alpha=a.alpha, dropout=a.dropout, rslora=a.rslora,
                            target_modules=list(a.target_modules) if a.target_modules else None)
        names = inject_lora(model, cfg, dtype=torch.float32)
        trainable, total = count_parameters(model)
        log(f"LoRA r={a.r} alpha={a.alpha} on {len(names)} modules: "
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        log(f"full fine-tuning: {sum(p.numel() for p in model.parameters()):,} parameters")


def _training_options(model: nn.Module, recipe: ModelRecipe, log: Log) -> None:
    if recipe.fused_ops:
        from effine.ops.swap import fuse_model

        counts = fuse_model(model, recompute_norms=recipe.recompute_norm_outputs)
        log(f"fused ops: {counts['rms_norm']} RMSNorm, {counts['gated_mlp']} gated MLP modules"
            + (f" ({counts['unsupported_act']} MLPs with an unsupported activation left as they are)"
               if counts["unsupported_act"] else ""))
    if recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False


def cast_floats(model: nn.Module, dtype: torch.dtype) -> None:
    """Compute in ``dtype``: cast floating parameters and set quantized layers' compute dtype. The quantized
    buffers (codes, fp32 scales) stay as they are: they are what training quantized. (``model.to(dtype)`` would
    also cast buffers such as the rotary ``inv_freq``, which transformers keeps in fp32.)"""
    from effine.quant import QuantLinear

    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.compute_dtype = dtype
    model.config.dtype = dtype
