"""``effine plan --world N --parallel ddp|fsdp``: the memory of one process of an N-process run.

:func:`effine.plan.memory.plan_memory` plans one process training alone; :func:`per_rank` turns that plan into
the plan of one rank of a DDP or FSDP2 run (see :mod:`effine.train.distributed`).
"""

from __future__ import annotations

from dataclasses import replace

from effine.config import Config
from effine.plan.memory import GiB, MemoryPlan
from effine.plan.inventory import _Inventory


def per_rank(plan: MemoryPlan, inv: _Inventory, cfg: Config, b: int, world: int, parallel: str) -> MemoryPlan:
    """One process of a ``world``-process run (``effine plan --world N --parallel ddp|fsdp``).

    Every rank runs its own micro-batch of ``train.batch_size``: activations, loss and workspace are those of one
    process. DDP keeps a full replica and adds its gradient buckets (one more copy of the trainable gradients).
    FSDP2 divides weights, adapters, gradients and AdamW states by N and adds what is unsharded while it computes:
    the root group (embeddings, output head, final norm) for the whole step, and two decoder layers (the one
    running and the one prefetched). ``train.fsdp_cpu_offload`` on a GPU moves the shards, gradients and AdamW
    states to host RAM (not counted on the card).
    """
    parallel = ("ddp" if world > 1 else "none") if parallel == "auto" else parallel
    notes = list(plan.notes) + [f"per process of {world} ({parallel}); global batch {cfg.train.batch_size} x "
                                f"{cfg.train.grad_accum} x {world}"]
    if parallel == "ddp":
        return replace(plan, gradients=plan.gradients + plan.n_trainable * (4 if cfg.adapter.method != "full" else b),
                       notes=notes + ["DDP: gradient buckets add one copy of the trainable gradients"])
    if parallel != "fsdp":
        return replace(plan, notes=notes)
    weights = plan.weights_quantized + plan.weights_dense
    root = inv.V * inv.H * b * (1 if inv.tied else 2)
    per_layer = max(0, weights - root) // max(1, inv.L)
    unsharded = min(weights, root + 2 * per_layer)
    sharded = dict(weights_quantized=plan.weights_quantized // world, weights_dense=plan.weights_dense // world,
                   adapters=plan.adapters // world, gradients=plan.gradients // world,
                   optimizer=plan.optimizer // world)
    if cfg.train.fsdp_cpu_offload and plan.device == "cuda":
        sharded = {k: 0 for k in sharded}
        notes.append("fsdp_cpu_offload: shards, gradients and AdamW states live in host RAM (not counted here)")
    notes.append(f"FSDP2: weights, gradients and AdamW states / {world}; + {unsharded / GiB:.3f} GiB unsharded while "
                 "computing (embeddings + head + 2 decoder layers), counted in the workspace")
    return replace(plan, **sharded, workspace=plan.workspace + unsharded, notes=notes)
