"""Walking and editing a model's module tree: the one naming rule and the one swap, for every module swap in effine.

LoRA (:mod:`effine.adapters.lora`), quantization and QAT (:mod:`effine.quant.swap`), the fused ops
(:mod:`effine.ops.swap`) and merge (:mod:`effine.export.merge`) all replace submodules of a transformers model.
They find what to replace with the same suffix rule as PEFT's ``target_modules`` (:func:`named_by`) and replace it
with :func:`set_submodule` / :func:`swap_modules`.

    named_by("model.layers.0.self_attn.q_proj", "q_proj")          # True: a suffix on a module boundary
    named_by("model.layers.0.self_attn.q_proj", "layers.0.self_attn.q_proj")   # True
    named_by("model.layers.0.self_attn.q_proj", "proj")            # False: not on a boundary
"""

from __future__ import annotations

from typing import Callable

from torch import nn


def named_by(name: str, entry: str) -> bool:
    """The suffix rule: ``entry`` is the qualified ``name`` itself or a suffix of it on a module boundary."""
    return name == entry or name.endswith("." + entry)


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` (also right for ``nn.ModuleList`` children "0", "1", ...)."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def child_slots(root: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, child) for every module below ``root``, collected before any swap."""
    return [(parent, name, child) for parent in root.modules() for name, child in parent.named_children()]


def swap_modules(root: nn.Module, want: Callable[[str, nn.Module], bool], make: Callable[[nn.Module], nn.Module]
                 ) -> int:
    """Replace every child ``c`` with ``want(qualified name, c)`` by ``make(c)``; returns how many distinct modules.

    A module reachable under two names (tied or shared) is made once and put in both places.
    ``nn.MultiheadAttention`` is not descended into: it reads its projection weights directly, not through its
    ``out_proj`` module's forward.
    """
    made: dict[nn.Module, nn.Module] = {}  # old module -> its replacement (modules hash by identity)
    for parent_name, parent in list(root.named_modules(remove_duplicate=False)):
        if isinstance(parent, nn.MultiheadAttention):
            continue
        for child_name, child in list(parent.named_children()):
            if child in made:
                setattr(parent, child_name, made[child])
                continue
            qual = f"{parent_name}.{child_name}" if parent_name else child_name
            if want(qual, child):
                made[child] = make(child)
                setattr(parent, child_name, made[child])
    return len(made)
