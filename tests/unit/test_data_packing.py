"""Packing, collation and the resumable length-grouped batch order."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effine.data.collate import batch_order, collate
from effine.data.example import IGNORE, Example
from effine.data.packing import PackedRow, pack_examples, packing_efficiency


def make(n: int, tag: int = 0, where: str | None = None) -> Example:
    """An example of n tokens whose ids identify it (tag * 1000 + position); all but the first trained."""
    ids = [tag * 1000 + i for i in range(n)]
    return Example(ids, [IGNORE] + ids[1:], where or f"d.jsonl:{tag}")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=60), st.integers(64, 100))
def test_every_document_is_placed_exactly_once_within_max_length(lengths, max_length):
    examples = [make(n, tag) for tag, n in enumerate(lengths)]
    rows = pack_examples(examples, max_length)
    assert all(len(r) <= max_length for r in rows)
    assert sorted(w for r in rows for w in r.wheres) == sorted(e.where for e in examples)
    for r in rows:
        assert sum(r.doc_lengths) == len(r.input_ids) == len(r.labels) == len(r.position_ids)
    # Best fit never leaves two rows that could have been one.
    fills = sorted(len(r) for r in rows)
    assert len(fills) < 2 or fills[0] + fills[1] > max_length


def test_position_ids_restart_and_first_token_labels_are_masked():
    rows = pack_examples([make(5, 1), make(3, 2), make(4, 3)], max_length=12)
    assert len(rows) == 1
    row = rows[0]
    assert row.doc_lengths == [5, 4, 3]  # placed longest first
    assert row.position_ids == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]
    starts = [0, 5, 9]
    for k, label in enumerate(row.labels):
        if k in starts:
            assert label == IGNORE
        else:
            assert label == row.input_ids[k]  # everything else keeps its label


def test_first_token_is_masked_even_when_the_example_trained_it():
    ex = Example([7, 8, 9], [7, 8, 9], "x:1")
    row = pack_examples([ex, ex], max_length=6)[0]
    assert row.labels == [IGNORE, 8, 9, IGNORE, 8, 9]


def test_packing_is_deterministic_and_efficient():
    lengths = [(i * 37) % 50 + 1 for i in range(200)]
    examples = [make(n, i) for i, n in enumerate(lengths)]
    a, b = pack_examples(examples, 128), pack_examples(examples, 128)
    assert [r.wheres for r in a] == [r.wheres for r in b]
    eff = packing_efficiency(a, 128)
    assert eff == sum(lengths) / (len(a) * 128)
    assert eff > 0.95


def test_too_long_example_is_refused():
    import pytest

    with pytest.raises(ValueError, match="exceeds max_length"):
        pack_examples([make(10)], max_length=8)


def test_collate_pads_examples_right():
    batch = collate([make(3, 1), make(5, 2)], pad_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 8)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert batch["input_ids"][0].tolist() == [1000, 1001, 1002, 0, 0, 0, 0, 0]
    assert batch["labels"][0].tolist() == [IGNORE, 1001, 1002] + [IGNORE] * 5
    # padding continues the row's positions, so it forms no one-token documents (one dense causal call)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert "doc_lengths" not in batch  # documents come from position_ids alone
    assert batch["input_ids"].dtype == torch.long


def test_collate_packed_rows_keep_document_positions():
    rows = pack_examples([make(3, 1), make(2, 2), make(4, 3)], max_length=5)
    batch = collate(rows, pad_id=-1)
    assert isinstance(rows[0], PackedRow)
    assert batch["input_ids"].shape == (2, 5)
    last = rows[0].position_ids[-1]
    tail = list(range(last + 1, last + 1 + 5 - len(rows[0])))
    assert batch["position_ids"][0].tolist() == rows[0].position_ids + tail


def test_batch_order_is_deterministic_complete_and_epoch_dependent():
    lengths = [(i * 7919) % 300 + 1 for i in range(1000)]
    a = batch_order(lengths, 8, seed=1, epoch=0)
    assert a == batch_order(lengths, 8, seed=1, epoch=0)
    assert a != batch_order(lengths, 8, seed=1, epoch=1)
    assert a != batch_order(lengths, 8, seed=2, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(1000))
    assert sum(len(b) < 8 for b in a) == 0 and len(a) == 125


def test_batch_order_groups_similar_lengths():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 512) for _ in range(2048)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    shuffled = list(range(len(lengths)))
    random.Random(1).shuffle(shuffled)
    naive = [shuffled[k:k + 8] for k in range(0, len(shuffled), 8)]
    assert padding(batch_order(lengths, 8, seed=0, epoch=0)) < padding(naive) / 5


def test_batch_order_last_batch_may_be_short():
    batches = batch_order([3] * 10, 4, seed=0, epoch=0)
    assert sorted(len(b) for b in batches) == [2, 4, 4]
