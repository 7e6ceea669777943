"""Packed rows for attention: the document boundaries of rows that hold several documents.

A boundary is where the position does not continue (``pos[t] != pos[t-1] + 1``, the rule transformers uses for its
own packed-sequence masks): the data pipeline restarts positions at every document of a packed row.
:mod:`effine.ops.attention` turns that into ``cu_seqlens`` (flash-attn's varlen layout) or per-row document
segments, so that attention never crosses a document on any backend.
"""

from __future__ import annotations

import torch

def _check_cu_seqlens(cu: torch.Tensor) -> torch.Tensor:
    if cu.dim() != 1 or cu.numel() < 2 or cu.dtype not in (torch.int32, torch.int64):
        raise ValueError("cu_seqlens must be a 1-D int tensor [0, end_1, ..., total] with at least two entries")
    if int(cu[0]) != 0 or bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0 and strictly increase, got {cu.tolist()}")
    return cu


def _doc_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True where a document starts: t == 0 or the position does not continue the previous one."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def _starts_to_cu(starts: torch.Tensor) -> torch.Tensor:
    """(B, T) start flags -> cu_seqlens over the flattened B*T tokens (int32, same device)."""
    flat = starts.reshape(-1).clone()
    flat[:: starts.shape[1]] = True  # every row starts a document
    idx = flat.nonzero().squeeze(1).to(torch.int32)
    return torch.cat([idx, idx.new_tensor([flat.numel()])])


def cu_seqlens_from_position_ids(position_ids: torch.Tensor, batch_size: int | None = None) -> torch.Tensor | None:
    """Document offsets from (B, T) or (1, T) position ids, or None when every row holds a single document."""
    pos = position_ids if position_ids.dim() == 2 else position_ids.view(1, -1)
    if batch_size is not None and pos.shape[0] != batch_size:
        pos = pos.expand(batch_size, -1)
    starts = _doc_starts(pos)
    if not bool(starts[:, 1:].any()):
        return None
    return _starts_to_cu(starts)


def _doc_ids(cu: torch.Tensor, batch: int, length: int, device) -> torch.Tensor:
    """(B, T) int document id of every token from cu_seqlens."""
    flags = torch.zeros(batch * length, dtype=torch.int32, device=device)
    flags[cu[1:-1].to(device=device, dtype=torch.long)] = 1
    return flags.cumsum(0).view(batch, length)
