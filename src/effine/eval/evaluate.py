"""Held-out evaluation: loss per supervised token and perplexity = exp(loss)."""

from __future__ import annotations

import math

import torch

from effine.data import collate
from effine.ops.model_loss import loss_sum


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list, batch_size: int, pad_id: int, max_batches: int | None = None,
             impl: str = "chunked") -> dict:
    """Mean next-token loss over every supervised token of `examples` (batched in length order: less padding)."""
    if not examples:
        return {"eval_loss": float("nan"), "eval_ppl": float("nan"), "eval_tokens": 0}
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, n = 0.0, 0
    for b, start in enumerate(range(0, len(order), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        batch = collate([examples[i] for i in order[start:start + batch_size]], pad_id)
        loss, k = loss_sum(model, batch, impl=impl)
        total, n = total + float(loss), n + k
    model.train(was_training)
    loss = total / max(n, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": n}
