"""Adapters: LoRA as a module swap (:mod:`effine.adapters.lora`) and PEFT-compatible files (:mod:`.peft_io`)."""

from effine.adapters.lora import (
    LoRALinear,
    count_parameters,
    default_targets,
    inject_lora,
    is_linear_like,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    resolve_targets,
    target_modules_for,
    wrap_modules,
)
from effine.adapters.peft_io import load_adapter, save_adapter

__all__ = [
    "LoRALinear",
    "count_parameters",
    "default_targets",
    "inject_lora",
    "is_linear_like",
    "load_adapter",
    "lora_modules",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "resolve_targets",
    "save_adapter",
    "target_modules_for",
    "wrap_modules",
]
