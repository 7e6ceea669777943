"""data.packing (auto / true / false) and train.tokens_per_step: what a micro-batch holds (effine.train.batching)."""

from __future__ import annotations

import pytest

from effine.config import load_config
from effine.data.example import IGNORE, Example
from effine.data.packing import PackedRow
from effine.errors import ConfigError
from effine.model.tiny import tiny_model
from effine.ops.attention import enable, keeps_documents_apart
from effine.train.batching import packed_batch_rows, row_capacity, training_batches


def _examples(n: int, length: int) -> list[Example]:
    return [Example(list(range(1, length + 1)), [IGNORE] + list(range(2, length + 1)), f"d.jsonl:{i + 1}")
            for i in range(n)]


def test_packing_defaults_to_auto_and_takes_booleans():
    assert load_config(None).data.packing == "auto"
    assert load_config(None, ["data.packing=true"]).data.packing is True
    assert load_config(None, ["data.packing=false"]).data.packing is False
    with pytest.raises(ConfigError, match=r"data\.packing: expected true or false.*Or one of: auto"):
        load_config(None, ["data.packing=sometimes"])


def test_rows_per_micro_batch_hold_batch_size_samples_or_the_token_budget():
    cfg = load_config(None, ["train.batch_size=8", "data.max_length=512"])
    assert packed_batch_rows(6000, 600, cfg) == 1  # 10 samples per row: 8 samples -> 1 row
    assert packed_batch_rows(6000, 3000, cfg) == 4  # 2 per row: 4 rows
    assert packed_batch_rows(100, 100, cfg) == 8  # nothing packed together: 8 rows, as unpacked
    cfg = load_config(None, ["train.tokens_per_step=4096", "train.grad_accum=2", "data.max_length=512"])
    assert packed_batch_rows(6000, 600, cfg) == 4  # 4096 / (2 x 512)
    cfg = load_config(None, ["train.tokens_per_step=100", "data.max_length=512"])
    assert packed_batch_rows(6000, 600, cfg) == 1  # at least one row
    assert row_capacity([50] * 10, cfg) == 512  # tokens_per_step: rows of max_length


def test_short_samples_get_rows_of_batch_size_samples():
    cfg = load_config(None, ["train.batch_size=8", "data.max_length=512"])
    assert row_capacity([50] * 10, cfg) == 400 and row_capacity([50, 450], cfg) == 512
    assert row_capacity([10, 10, 10, 130], cfg) == 320  # 8 x the mean 40
    cfg = load_config(None, ["train.batch_size=2", "data.max_length=512"])
    assert row_capacity([10, 10, 10, 130], cfg) == 130  # 2 x 40 = 80, but the longest sample must fit


def test_auto_packs_for_effine_attention_and_keeps_the_step_in_samples():
    cfg = load_config(None, ["train.batch_size=6", "data.max_length=64"])
    model = tiny_model("llama")
    enable(model)
    assert keeps_documents_apart(model)
    rows, train_cfg = training_batches(cfg, _examples(60, 10), model, log=lambda _: None)
    assert all(isinstance(r, PackedRow) for r in rows) and len(rows) == 10  # 6 samples of 10 tokens per row
    assert train_cfg.batch_size == 1 and cfg.train.batch_size == 6  # 1 row ~ 6 samples; the config is untouched
    assert sorted(w for r in rows for w in r.wheres) == sorted(f"d.jsonl:{i + 1}" for i in range(60))
    # short samples: rows as long as batch_size samples (3 x 10 tokens), not max_length: still 3 samples a step
    cfg = load_config(None, ["train.batch_size=3", "data.max_length=64"])
    rows, train_cfg = training_batches(cfg, _examples(60, 10), model, log=lambda _: None)
    assert len(rows) == 20 and all(len(r) == 30 for r in rows) and train_cfg.batch_size == 1
    # long samples: rows of max_length, several per micro-batch
    cfg = load_config(None, ["train.batch_size=8", "data.max_length=64"])
    rows, train_cfg = training_batches(cfg, _examples(60, 30), model, log=lambda _: None)
    assert len(rows) == 30 and train_cfg.batch_size == 4  # 2 samples per row: 8 samples = 4 rows


def test_packing_off_keeps_examples_and_batch_size():
    cfg = load_config(None, ["data.packing=false", "train.batch_size=6"])
    model = tiny_model("llama")
    enable(model)
    ex = _examples(12, 10)
    rows, train_cfg = training_batches(cfg, ex, model, log=lambda _: None)
    assert rows is ex and train_cfg is cfg.train


def test_a_model_with_its_own_attention_is_not_packed():
    """Falcon does not dispatch through transformers' AttentionInterface: packed rows would attend across samples.
    auto leaves it unpacked (and says so); true and tokens_per_step are errors naming the key."""
    model = tiny_model("falcon")
    enable(model)
    assert not keeps_documents_apart(model)
    said = []
    ex = _examples(12, 10)
    rows, train_cfg = training_batches(load_config(None), ex, model, log=said.append)
    assert rows is ex and "packing: off" in said[0] and "FalconForCausalLM" in said[0]
    with pytest.raises(ConfigError, match=r"data\.packing: true: FalconForCausalLM keeps its own attention"):
        training_batches(load_config(None, ["data.packing=true"]), ex, model, log=said.append)
    with pytest.raises(ConfigError, match=r"train\.tokens_per_step"):
        training_batches(load_config(None, ["train.tokens_per_step=512"]), ex, model, log=said.append)


def test_tokens_per_step_without_packing_is_a_config_error():
    from effine.train.batching import check_batching

    with pytest.raises(ConfigError, match=r"train\.tokens_per_step needs packed rows.*data\.packing"):
        check_batching(load_config(None, ["train.tokens_per_step=4096", "data.packing=false"]))
