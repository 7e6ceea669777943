"""Packed rows for attention: the document boundaries of rows that hold several documents.

A boundary is where the position does not continue (``pos[t] != pos[t-1] + 1``, the rule transformers uses for its
own packed-sequence masks): the data pipeline restarts positions at every document of a packed row.
:mod:`effine.ops.attention` turns that into ``cu_seqlens`` (flash-attn's varlen layout) or buckets of similar-length
documents (:class:`DocBuckets`), so that attention never crosses a document on any backend.
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


def _width_class(n: int) -> int:
    """The bucket class of a document of ``n`` tokens: the smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of
    two and 3/4 of them) that is >= n. A bucket is padded to its longest member, so it wastes < 1/3 of its rows."""
    p = 1 << (n - 1).bit_length()
    return p * 3 // 4 if p >= 4 and p * 3 // 4 >= n else p


class DocBuckets:
    """Documents of packed rows grouped by length, for attention as a few batched calls instead of one per document.

    For each bucket of ``n`` documents padded to width ``W``: ``gather`` (n * W,) flat token indices into the
    B*T tokens (position p of document d is token ``start_d + min(p, L_d - 1)``: a document's padding repeats its
    last token, so every gathered row is finite). With causal attention a real query never sees the padding after
    it, so attention over the (n, W) batch is exact for the real tokens; padding outputs are dropped.
    ``scatter`` (B*T,): for every token, its row in the concatenation of the buckets' (n * W) outputs, so that
    ``cat(outputs).index_select(0, scatter)`` puts every token back in place (a gather, whose backward is an
    index_add: no per-document slices whose gradients would each allocate the whole tensor).
    """

    def __init__(self, bounds: list[int], device, row_length: int | None = None) -> None:
        starts, ends = bounds[:-1], bounds[1:]
        by_class: dict[int, list[int]] = {}
        for d, (s, e) in enumerate(zip(starts, ends)):
            if row_length is not None and (e - 1) // row_length != s // row_length:
                raise ValueError(f"cu_seqlens segment [{s}, {e}) crosses the end of row {s // row_length} "
                                 f"(T={row_length})")
            by_class.setdefault(_width_class(e - s), []).append(d)
        self.buckets: list[tuple[int, int, torch.Tensor]] = []  # (n docs, width, gather indices (n * W,))
        scatter = torch.empty(bounds[-1], dtype=torch.long)
        row0 = 0
        for c in sorted(by_class):
            docs = by_class[c]
            lengths = torch.tensor([ends[d] - starts[d] for d in docs])
            first = torch.tensor([starts[d] for d in docs])
            W = int(lengths.max())
            p = torch.arange(W)
            gather = first[:, None] + torch.minimum(p[None, :], lengths[:, None] - 1)  # (n, W)
            real = p[None, :] < lengths[:, None]
            rows = row0 + torch.arange(len(docs) * W).view(len(docs), W)
            scatter[gather[real]] = rows[real]
            self.buckets.append((len(docs), W, gather.reshape(-1).to(device)))
            row0 += len(docs) * W
        self.scatter = scatter.to(device)


_BUCKETS_ATTR = "_effine_doc_buckets"


def doc_buckets(cu_seqlens: torch.Tensor, row_length: int | None = None) -> DocBuckets:
    """The :class:`DocBuckets` of these offsets, computed once per tensor (every layer of a forward passes the
    same cu_seqlens tensor) and kept on it."""
    hit = getattr(cu_seqlens, _BUCKETS_ATTR, None)
    if hit is None:
        hit = DocBuckets(cu_seqlens.tolist(), cu_seqlens.device, row_length)
        try:
            setattr(cu_seqlens, _BUCKETS_ATTR, hit)
        except (AttributeError, RuntimeError):
            pass
    return hit
