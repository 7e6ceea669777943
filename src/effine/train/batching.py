"""How the training set becomes micro-batches: whether samples are packed, and how many rows a micro-batch takes.

``data.packing`` (auto / true / false) packs samples into rows of up to ``data.max_length`` tokens
(:func:`effine.data.pack_examples`) when the model's attention keeps the samples of a row apart
(:func:`effine.ops.attention.keeps_documents_apart`); a model that keeps its own attention (Falcon) would attend
across them, so ``auto`` leaves it unpacked and ``true`` is an error there.

Rows per micro-batch: ``train.batch_size`` counts samples whether or not they are packed. A packed micro-batch takes
``round(batch_size * rows / samples)`` rows (at least 1): the rows that hold ``batch_size`` samples on average. When
``batch_size`` samples fill less than one row of ``max_length`` (short samples), rows are made only as long as
``batch_size`` samples (``batch_size`` x the mean sample length, at least the longest sample) and a micro-batch is
one of them. So packing removes the padding without changing what a step is (about the same samples, so the same
number of steps per epoch and the same learning-rate schedule). ``train.tokens_per_step`` instead fixes the work of
a step: ``tokens_per_step // (grad_accum * max_length)`` rows of ``max_length`` (at least 1), whatever the sample
lengths.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from effine.config import Config, TrainConfig
from effine.errors import ConfigError


def check_batching(cfg: Config) -> None:
    """Config-only checks, before anything is loaded."""
    if cfg.train.tokens_per_step is not None and cfg.data.packing is False:
        raise ConfigError("train.tokens_per_step needs packed rows, but data.packing is false: set data.packing: "
                          "auto (or true), or give the micro-batch size in samples with train.batch_size.")


def row_capacity(lengths: list[int], cfg: Config) -> int:
    """Tokens per packed row: ``max_length``, or for short samples (``batch_size`` of them fill less than a row)
    the length of ``batch_size`` samples, so that one row is one micro-batch of about ``batch_size`` samples."""
    T = cfg.data.max_length
    if cfg.train.tokens_per_step is not None or not lengths:
        return T
    want = -(-cfg.train.batch_size * sum(lengths) // len(lengths))  # batch_size x the mean length, rounded up
    return min(T, max(want, max(lengths)))


def packed_batch_rows(samples: int, rows: int, cfg: Config) -> int:
    """Packed rows per micro-batch (see the module docstring)."""
    t = cfg.train
    if t.tokens_per_step is not None:
        return max(1, t.tokens_per_step // (t.grad_accum * cfg.data.max_length))
    return max(1, round(t.batch_size * rows / max(samples, 1)))


def training_batches(cfg: Config, examples: list, model, log: Callable[[str], None]) -> tuple[list, TrainConfig]:
    """(the examples or packed rows to train on, the train config whose batch_size is their count per micro-batch).

    ``model``: the built model, asked whether its attention keeps packed samples apart."""
    from effine.data import pack_examples, packing_efficiency
    from effine.ops.attention import keeps_documents_apart

    check_batching(cfg)
    packing = cfg.data.packing
    if packing is not False and not keeps_documents_apart(model):
        why = (f"{type(model).__name__} keeps its own attention, which would attend across the samples packed "
               "into a row")
        if packing is True or cfg.train.tokens_per_step is not None:
            key = "data.packing: true" if packing is True else "train.tokens_per_step (which packs)"
            raise ConfigError(f"{key}: {why}. Set data.packing: false (train.batch_size samples per micro-batch).")
        log(f"packing: off ({why}; data.packing=auto)")
        packing = False
    if packing is False or not examples:
        return examples, cfg.train
    capacity = row_capacity([len(e) for e in examples], cfg)
    rows = pack_examples(examples, capacity)
    per_batch = packed_batch_rows(len(examples), len(rows), cfg)
    filled = packing_efficiency(rows, capacity)
    basis = (f"train.tokens_per_step {cfg.train.tokens_per_step:,}" if cfg.train.tokens_per_step is not None
             else f"train.batch_size {cfg.train.batch_size} samples")
    log(f"packing: {len(examples):,} samples into {len(rows):,} rows of <= {capacity} tokens "
        f"({100 * filled:.1f}% filled, {len(examples) / len(rows):.1f} samples per row); micro-batch: {per_batch} "
        f"row{'s' if per_batch != 1 else ''} ({basis}; data.packing={cfg.data.packing})")
    return rows, replace(cfg.train, batch_size=per_batch)
