"""Packed rows for attention: the document boundaries of rows that hold several documents.

A boundary is where the position does not continue (``pos[t] != pos[t-1] + 1``, the rule transformers uses for its
own packed-sequence masks), or where the caller states it with ``with packed_sequences(cu_seqlens): model(...)``.
:mod:`effine.ops.attention` turns either into ``cu_seqlens`` (flash-attn's varlen layout) or per-row document
segments, so that attention never crosses a document on any backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterator

import torch

def _check_cu_seqlens(cu: torch.Tensor) -> torch.Tensor:
    if cu.dim() != 1 or cu.numel() < 2 or cu.dtype not in (torch.int32, torch.int64):
        raise ValueError("cu_seqlens must be a 1-D int tensor [0, end_1, ..., total] with at least two entries")
    if int(cu[0]) != 0 or bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0 and strictly increase, got {cu.tolist()}")
    return cu


class _PackedSpec:
    """Document boundaries given by the caller, resolved to cu_seqlens once the batch shape (B, T) is known."""

    def __init__(self, spec):
        if isinstance(spec, torch.Tensor) or (len(spec) and not isinstance(spec[0], (list, tuple))):
            self.cu = _check_cu_seqlens(torch.as_tensor(spec))
            self.lengths = None
        else:
            self.cu = None
            self.lengths = [[int(n) for n in row] for row in spec]
            if any(n <= 0 for row in self.lengths for n in row):
                raise ValueError("packed_sequences: document lengths must be positive")
        self._resolved: dict = {}

    def resolve(self, batch: int, length: int) -> torch.Tensor:
        """cu_seqlens (int32) over the flattened B*T tokens; a row's unlisted tail (padding) is one more segment."""
        if (batch, length) in self._resolved:
            return self._resolved[(batch, length)]
        if self.cu is not None:
            cu = self.cu
            if int(cu[-1]) != batch * length:
                raise ValueError(f"packed_sequences: cu_seqlens ends at {int(cu[-1])}, expected B*T = {batch * length}")
            if not set(range(0, batch * length, length)) <= set(cu.tolist()):
                raise ValueError("packed_sequences: every row start b*T must be a document boundary")
        else:
            if len(self.lengths) != batch:
                raise ValueError(f"packed_sequences: {len(self.lengths)} rows of doc lengths for a batch of {batch}")
            bounds = [0]
            for b, row in enumerate(self.lengths):
                if sum(row) > length:
                    raise ValueError(f"packed_sequences: row {b} documents sum to {sum(row)} > T = {length}")
                for n in row:
                    bounds.append(bounds[-1] + n)
                if bounds[-1] < (b + 1) * length:
                    bounds.append((b + 1) * length)  # padding after the last document
            cu = torch.tensor(bounds)
        cu = cu.to(torch.int32)
        self._resolved[(batch, length)] = cu
        return cu


_PACKED: contextvars.ContextVar[_PackedSpec | None] = contextvars.ContextVar("effine_packed", default=None)


@contextlib.contextmanager
def packed_sequences(spec: torch.Tensor | list[int] | list[list[int]]) -> Iterator[None]:
    """Declare document boundaries for the forward passes inside the block. Two accepted forms:

    * per-row document lengths, ``[[len_0, len_1, ...], ...]`` (one list per row, as a collator produces them);
      a row whose documents sum to less than T is right-padded and the padding becomes a segment of its own;
    * ``cu_seqlens`` (n_docs + 1,), cumulative offsets over the *flattened* batch of B rows of T tokens
      (flash-attn's varlen convention) ``[0, len_0, len_0 + len_1, ..., B * T]``; every row start ``b * T`` must
      be one of them.

    Takes precedence over boundaries derived from ``position_ids``. Gradient checkpointing is safe: layers
    recomputed in backward (outside this block) reuse the boundaries that were in force for the same
    ``position_ids`` tensor.
    """
    token = _PACKED.set(_PackedSpec(spec))
    try:
        yield
    finally:
        _PACKED.reset(token)


# Gradient checkpointing recomputes layers during backward, i.e. after the ``with packed_sequences(...)`` block has
# exited (and, on CUDA, in an autograd worker thread that does not see this context). A recomputed layer receives
# the very same position_ids tensor object as the original forward, so we remember which spec was active for it.
_SPEC_MEMORY: list[tuple[weakref.ref, _PackedSpec]] = []


def _active_spec(position_ids: torch.Tensor | None) -> _PackedSpec | None:
    """The packed_sequences spec in force, or the one that was in force for this position_ids tensor."""
    spec = _PACKED.get()
    if position_ids is None:
        return spec
    if spec is not None:
        if not any(r() is position_ids and sp is spec for r, sp in _SPEC_MEMORY):
            _SPEC_MEMORY[:] = [(r, sp) for r, sp in _SPEC_MEMORY[-7:] if r() is not None]
            _SPEC_MEMORY.append((weakref.ref(position_ids), spec))
        return spec
    for r, sp in reversed(_SPEC_MEMORY):
        if r() is position_ids:
            return sp
    return None


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
