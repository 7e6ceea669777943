"""Hostile and broken data files (tools/reliability.py's catalogue): each gives a clear error naming file:line and
the field, or is skipped, counted and listed in data_report.txt; docs/reliability.md is what these cases produce."""

from __future__ import annotations

import importlib.util
import json
import sys
import tracemalloc
from pathlib import Path

import pytest

from effine.config import DataConfig
from effine.data.example import IGNORE
from effine.data.pipeline import build_datasets

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rel():
    spec = importlib.util.spec_from_file_location("effine_reliability", ROOT / "tools" / "reliability.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def outcomes(rel, smol_tokenizer):
    return rel.run_all(smol_tokenizer)


def test_every_bad_input_gets_its_documented_behaviour_and_message(outcomes):
    wrong = [(c.name, c.expect, c.fragment, o.kind, o.message) for c, o in outcomes
             if o.kind != c.expect or c.fragment not in o.message]
    assert not wrong
    assert len(outcomes) >= 20


def test_reliability_doc_is_up_to_date(rel, outcomes):
    doc = rel.DOC.read_text()
    assert rel.render_doc(doc, rel.table(outcomes)) == doc, "run `python tools/reliability.py` to refresh it"


def build(path: Path, tok, tmp_path: Path, **kw):
    cfg = DataConfig(path=str(path), eval_fraction=0.0, **kw)
    return build_datasets(cfg, tok, cache_dir=tmp_path / "cache", log=lambda _: None)


def test_a_50mb_line_is_read_past_in_bounded_memory(rel, smol_tokenizer, tmp_path):
    path = tmp_path / "huge.jsonl"
    rel._huge_line(path)
    assert path.stat().st_size > 50_000_000
    tracemalloc.start()
    try:
        train, _, report = build(path, smol_tokenizer, tmp_path, max_bad_fraction=0.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(train) == 3 and report.dropped == {"line longer than 16 MiB": 1}
    assert peak < 40_000_000, peak  # one 16 MiB read buffer and its copy at most, never the 50 MB line


def test_dropped_rows_are_listed_with_location_in_the_full_report(smol_tokenizer, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(8)]
    rows[2] = {"messages": [{"role": "user", "content": "only a question"}]}
    rows[5]["messages"][1]["content"] = [{"type": "image_url", "image_url": {"url": "x.png"}}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, _, report = build(path, smol_tokenizer, tmp_path, max_bad_fraction=0.25)
    text = report.full()
    assert f"{path}:3: no assistant turn" in text and f"{path}:6: non-text content part (image_url)" in text
    assert report.bad_rows == 2


def test_kept_edge_cases_are_labelled_exactly(smol_tokenizer, tmp_path):
    """Consecutive assistant turns are both trained; a trailing user turn is context only."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "first"},
        {"role": "assistant", "content": "second"}, {"role": "user", "content": "trailing"}]}) + "\n")
    (ex,), _, _ = build(path, smol_tokenizer, tmp_path)
    trained = smol_tokenizer.decode([t for t, y in zip(ex.input_ids, ex.labels) if y != IGNORE])
    assert trained == "first<|im_end|>second<|im_end|>"
    assert "trailing" in smol_tokenizer.decode(ex.input_ids)
