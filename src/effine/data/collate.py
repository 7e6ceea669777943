"""Batching: padding examples into tensors, and a resumable length-grouped batch order.

``collate`` right-pads a micro-batch. ``batch_order`` decides which examples form each batch and in what order:
examples of similar length go together (less padding, so less wasted compute), while the order of the batches is
shuffled per epoch. It is a pure function of ``(lengths, batch_size, seed, epoch)``, so a resumed run that knows
its epoch and batch index replays exactly the same remaining batches.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from effine.data.example import IGNORE, Example
from effine.data.packing import PackedRow

GROUP_BATCHES = 64
"""Batches per length-sorting window: larger pads less, smaller keeps more randomness in what meets what."""


def collate(batch: list[Example | PackedRow], pad_id: int, pad_to_multiple_of: int | None = None
            ) -> dict[str, Any]:
    """Right-pad a batch into ``input_ids``, ``labels``, ``attention_mask``, ``position_ids`` (B, T) tensors.

    Padding has label -100 and attention 0. ``position_ids`` restart at each document of a packed row (0..len-1
    for a plain example): the attention backend finds the documents where positions restart.

    Padding positions *continue* the row's last document (len, len+1, ...) instead of restarting at 0. The
    attention backend finds documents where positions restart, so padding joins the last document instead of
    becoming one-token documents of its own: a right-padded batch of plain examples is then a single dense causal
    attention call over the whole batch (on CPU 14% faster on a batch of lengths 323-355 than one call per row),
    and still exact, because with causal attention a real token never sees the padding after it. Padding
    outputs are junk but finite, carry no label, and feed only later padding.
    """
    if not batch:
        raise ValueError("collate: empty batch")
    width = max(len(x) for x in batch)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(batch), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item)
        input_ids[row, :n] = torch.tensor(item.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(item.labels, dtype=torch.long)
        attention[row, :n] = 1
        if isinstance(item, PackedRow):
            positions[row, :n] = torch.tensor(item.position_ids, dtype=torch.long)
        else:
            positions[row, :n] = torch.arange(n)
        if n < width:  # padding continues the last document's positions (see above)
            last = int(positions[row, n - 1]) if n else -1
            positions[row, n:] = torch.arange(last + 1, last + 1 + width - n)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "position_ids": positions}


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Every index exactly once, in batches of ``batch_size`` (the last may be smaller), for one epoch.

    Indices are shuffled, cut into windows of ``GROUP_BATCHES`` batches, sorted by length inside each window and
    cut into batches; then the batches are shuffled. Same arguments, same result.
    """
    if batch_size < 1:
        raise ValueError("batch_order: batch_size must be at least 1")
    rng = random.Random(f"effine-batches:{seed}:{epoch}")  # str seeds are hashed stably, unlike hash()
    indices = list(range(len(lengths)))
    rng.shuffle(indices)
    window = batch_size * GROUP_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(indices), window):
        chunk = sorted(indices[start:start + window], key=lambda i: (lengths[i], i))
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
