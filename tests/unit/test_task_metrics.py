"""Task metrics on hand-made cases, the bootstrap interval, and reading references from every row shape."""

from __future__ import annotations

import pytest

from effine.errors import ConfigError, DataError
from effine.eval.metrics import bootstrap_ci, check_metric, chrf, contains, exact_match, normalise, rouge_l
from effine.eval.task import task_row


def test_normalise_case_punctuation_whitespace():
    assert normalise("  The  Pantry!\n") == "the pantry"
    assert normalise("«Élan», vital…") == "élan vital"
    assert normalise("dining_room") == "dining room"  # "_" is Unicode punctuation (Pc)


@pytest.mark.parametrize("pred,refs,em,cont", [
    ("Pantry.", ["pantry"], 1.0, 1.0),
    ("the pantry", ["pantry"], 0.0, 1.0),  # articles are not removed
    ("pantryx", ["pantry"], 0.0, 0.0),  # contains matches whole words only
    ("It is in the blue box", ["box", "blue box"], 0.0, 1.0),
    ("four", ["4", "Four"], 1.0, 1.0),  # any acceptable reference
    ("", ["pantry"], 0.0, 0.0),
])
def test_exact_match_and_contains(pred, refs, em, cont):
    assert exact_match(pred, refs) == em
    assert contains(pred, refs) == cont


def test_chrf_and_rouge_l_known_values():
    assert chrf("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert chrf("xyz", ["the cat"]) == pytest.approx(0.0)
    partial = chrf("the cat sat", ["the cat sat on the mat"])
    assert 0.3 < partial < 0.9
    assert chrf("the cat sat", ["dog", "the cat sat on the mat"]) == pytest.approx(partial)  # best reference
    # LCS "the cat sat" = 3 words: precision 3/3, recall 3/6 -> F = 2/3
    assert rouge_l("the cat sat", ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    assert rouge_l("mat the on", ["the cat sat on the mat"]) == pytest.approx(2 * (2 / 3 * 2 / 6) / (2 / 3 + 2 / 6))


def test_bootstrap_interval():
    scores = [1.0] * 30 + [0.0] * 70
    point, (lo, hi) = bootstrap_ci(scores, seed=0)
    assert point == pytest.approx(0.3)
    assert lo < 0.3 < hi and 0.2 < lo and hi < 0.4  # binomial: 0.3 +- 1.96 * 0.046
    assert bootstrap_ci(scores, seed=0) == (point, [lo, hi])  # seeded
    assert bootstrap_ci([0.5] * 5)[1] == [0.5, 0.5]
    # weighted (loss per token): sum(w * s) / sum(w)
    assert bootstrap_ci([1.0, 3.0], [3, 1])[0] == pytest.approx(1.5)


def test_unknown_metric_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown metric 'bleu'; choose one of exact_match"):
        check_metric("bleu")


def test_references_from_every_row_shape():
    r = task_row("f:1", {"input": [{"role": "system", "content": "Answer 1 or 0"},
                                   {"role": "user", "content": "sarcastic?"}], "ideal": ["1", "yes"]})
    assert r.references == ["1", "yes"] and r.messages[-1] == {"role": "user", "content": "sarcastic?"}
    r = task_row("f:2", {"input": [{"role": "system", "content": "Q: 2+2"}], "ideal": "4"})
    assert r.messages == [{"role": "user", "content": "Q: 2+2"}]  # system-only prompt -> user turn
    r = task_row("f:3", {"question": "2+2?", "answer": "4"})
    assert (r.messages, r.references) == ([{"role": "user", "content": "2+2?"}], ["4"])
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "name?"}, {"role": "assistant", "content": "Bob"}]
    r = task_row("f:4", {"messages": msgs})
    assert r.references == ["Bob"] and r.messages == msgs[:3]
    r = task_row("f:5", {"prompt": "A: hi\nB:", "completion": " hello"})
    assert (r.text, r.messages, r.references) == ("A: hi\nB:", None, [" hello"])
    r = task_row("f:6", {"instruction": "Capital of France?", "output": "Paris"})
    assert r.references == ["Paris"]
    with pytest.raises(DataError, match="f:7: no reference to score against"):
        task_row("f:7", {"text": "just text"})
    with pytest.raises(DataError, match="f:8: 'ideal' must be a string or a non-empty list"):
        task_row("f:8", {"input": "q", "ideal": []})
    with pytest.raises(DataError, match=r"f:9: input\[0\] must be"):
        task_row("f:9", {"input": [{"role": "bot", "content": "x"}], "ideal": "y"})


def test_resumed_run_reads_its_before_score_back(tmp_path):
    """A resumed run does not re-score the half-trained model as "before": it reads the rows file back."""
    from effine.config import load_config
    from effine.eval.task import TaskResult
    from effine.eval.task_run import report_lines, task_eval_phase, task_eval_summary

    cfg = load_config(None, ["eval.data=test.jsonl", "eval.metric=exact_match"])
    records = [{"prompt": "q", "reference": "a", "prediction": "a" if i % 4 == 0 else "b", "score": float(i % 4 == 0)}
               for i in range(20)]
    score, ci = bootstrap_ci([r["score"] for r in records])
    TaskResult("exact_match", score, ci, records).write_rows(tmp_path / "task_eval_before.jsonl")
    logged = []
    back = task_eval_phase(cfg, None, None, tmp_path, "before", logged.append, reuse=True)
    assert (back.score, back.ci, back.records) == (score, ci, records) and "from task_eval_before.jsonl" in logged[0]
    assert task_eval_phase(cfg, None, None, tmp_path, "after", logged.append, reuse=True) is None
    entry = task_eval_summary(cfg, back, None)
    assert entry == {"metric": "exact_match", "data": "test.jsonl", "n": 20, "before": {"score": 0.25, "ci": ci},
                     "after": None, "rows_before": "task_eval_before.jsonl", "rows_after": None}
    line = report_lines(entry)[0]
    assert line.startswith("| task exact_match on test.jsonl (n=20, 95% CI; higher is better) | 0.250")
    unset = load_config(None, [])
    assert task_eval_phase(unset, None, None, tmp_path, "before", logged.append) is None
    assert task_eval_summary(unset, None, None) is None and report_lines(None) == []
