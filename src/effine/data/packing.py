"""Packing several examples into one row of at most ``max_length`` tokens.

Best-fit decreasing: examples are placed longest first, each into the open row with the least room that still
fits it (a new row when none does). It wastes little capacity (typically a few percent) and is deterministic:
ties are broken by the example's index and the row's creation order, never by chance.

Documents stay separate inside a row: ``position_ids`` restart at 0 at each document and ``doc_lengths`` tells
attention where the boundaries are. The first token of every document is unlabelled, so no document is trained
to predict its first token from the end of the previous one.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from effine.data.example import IGNORE, Example


@dataclass
class PackedRow:
    """Several documents concatenated; ``sum(doc_lengths) == len(input_ids)``."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    doc_lengths: list[int]
    wheres: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


def _assign(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: the example indices in each bin, in placement order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # (room left, bin index), kept sorted: the first entry with room >= n is the best fit.
    open_bins: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(open_bins, (n, -1))
        if k < len(open_bins):
            room, b = open_bins.pop(k)
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(open_bins, (room - n, b))
    return bins


def _concat(docs: list[Example]) -> PackedRow:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for doc in docs:
        ids += doc.input_ids
        labels += [IGNORE] + doc.labels[1:]  # never predict a document's first token across the boundary
        positions += range(len(doc))
    return PackedRow(ids, labels, positions, [len(d) for d in docs], [d.where for d in docs])


def pack_examples(examples: list[Example], max_length: int) -> list[PackedRow]:
    """Pack examples (each at most ``max_length`` tokens) into as few rows of at most ``max_length`` as BFD finds."""
    too_long = [e for e in examples if len(e) > max_length]
    if too_long:
        raise ValueError(f"{too_long[0].where}: example of {len(too_long[0])} tokens exceeds max_length="
                         f"{max_length}; apply the overlength policy before packing")
    bins = _assign([len(e) for e in examples if len(e) > 0], max_length)
    nonempty = [e for e in examples if len(e) > 0]
    return [_concat([nonempty[i] for i in b]) for b in bins]


def packing_efficiency(rows: list[PackedRow], max_length: int) -> float:
    """Filled tokens / capacity (rows x max_length); 1.0 means no padding at all."""
    if not rows:
        return 0.0
    return sum(len(r) for r in rows) / (len(rows) * max_length)
