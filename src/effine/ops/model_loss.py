"""One forward pass to a summed next-token loss, shared by training and evaluation.

We call the model's backbone (the decoder stack, without the output head) and compute the loss ourselves, so the
output projection runs only where a label exists and the full (B, T, V) fp32 logits never exist
(``effine.ops.loss``). The loss is a SUM over supervised tokens; the caller divides by the number of supervised
tokens of the whole accumulation window, which is what makes batch 8 x accum 1 equal batch 1 x accum 8.
"""

from __future__ import annotations

import torch
from torch import nn

from effine.ops.loss import next_token_loss


def count_supervised(labels: torch.Tensor) -> int:
    """Tokens that are a prediction target: labels shifted by one (position t predicts t+1)."""
    return int((labels[:, 1:] != -100).sum())


def model_inputs(batch: dict) -> dict:
    """Backbone kwargs for a collated batch.

    Right-padded rows need no attention mask: with causal attention a real token never sees the padding that
    follows it, and leaving the mask out lets SDPA take its ``is_causal`` path, which skips the upper triangle.
    (``collate`` continues the positions through the padding, so padding forms no documents of its own and the
    whole batch is one attention call.)
    Packed rows (several documents per row) pass position ids restarting at 0 per document: the attention backend
    (``effine.ops.attention``) derives the document boundaries from them and keeps attention inside each document.
    """
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device`` (collation builds them on the CPU); other entries as they are."""
    if all(not isinstance(v, torch.Tensor) or v.device == device for v in batch.values()):
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def loss_sum(model: nn.Module, batch: dict, impl: str = "chunked") -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over supervised tokens, and their count."""
    batch = to_device(batch, model.get_input_embeddings().weight.device)
    hidden = model.base_model(**model_inputs(batch)).last_hidden_state  # (B, T, H)
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    labels = batch["labels"]
    if isinstance(head, nn.Linear) and head.bias is None:
        loss, n = next_token_loss(hidden, head.weight, labels, impl=impl, softcap=softcap)
        return loss, int(n)
    # An adapted or biased head: project only the supervised positions through the module itself.
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != -100
    logits = head(h[keep]).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return nn.functional.cross_entropy(logits, y[keep], reduction="sum"), int(keep.sum())
