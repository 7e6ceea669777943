"""Task evaluation mechanics on a tiny random model: batched generation, rows files, summary.json, `effine eval`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from effine.config import load_config
from tests.conftest import write_jsonl


def _qa_rows(n: int) -> list[dict]:
    words = "apple river stone cloud music green yellow seven garden window".split()
    return [{"messages": [{"role": "user", "content": f"Which word comes after {words[i % 10]}?"},
                          {"role": "assistant", "content": words[(i + 1) % 10]}]} for i in range(n)]


def test_batched_generation_equals_one_by_one(tiny_llama_dir):
    """Left padding + attention mask: every batched reply is the reply generated for that prompt alone."""
    from effine.eval.generate import generate, load_for_generation
    from effine.eval.task import TaskRow, generate_batch, prompt_ids

    loaded = load_for_generation(str(tiny_llama_dir), log=lambda _m: None)
    tok = loaded.tokenizer
    rows = [TaskRow("t", ["x"], messages=[{"role": "user", "content": "say " + "apple " * k}]) for k in (1, 7, 3, 12)]
    prompts = [prompt_ids(tok, r) for r in rows]
    assert len({len(p) for p in prompts}) == 4  # different lengths: the batch really is padded
    alone = [generate(loaded.model, tok, p, 6) for p in prompts]
    assert len(set(alone)) > 1  # replies that differ, so a mix-up between rows would show
    assert generate_batch(loaded.model, tok, prompts, 6, batch_size=3) == alone


def test_train_writes_task_eval_before_and_after(tmp_path, tiny_llama_dir):
    from effine.train.run import run_training

    data = write_jsonl(tmp_path / "train.jsonl", _qa_rows(40))
    test = write_jsonl(tmp_path / "test.jsonl", [{"input": r["messages"][:1], "ideal": [r["messages"][1]["content"]]}
                                                 for r in _qa_rows(12)])
    cfg = load_config(None, [f"model.name={tiny_llama_dir}", "model.dtype=fp32", f"data.path={data}",
                             "data.eval_fraction=0.1", f"output.dir={tmp_path}/run", "adapter.r=4",
                             "adapter.alpha=8", "train.lr=5e-3", "train.batch_size=8", "train.max_steps=6",
                             "train.warmup_steps=0", "eval.max_new_tokens=4", "eval.prompts_from_eval=0",
                             f"eval.data={test}", "eval.metric=contains", "eval.task_limit=10"])
    summary = run_training(cfg)
    run = tmp_path / "run"
    task = json.loads((run / "summary.json").read_text())["task_eval"]
    assert task == summary["task_eval"]
    assert set(task) == {"metric", "data", "n", "before", "after", "rows_before", "rows_after"}
    assert (task["metric"], task["data"], task["n"]) == ("contains", str(test), 10)
    for phase in ("before", "after"):
        score, (lo, hi) = task[phase]["score"], task[phase]["ci"]
        assert 0.0 <= lo <= score <= hi <= 1.0
        rows = [json.loads(line) for line in (run / task[f"rows_{phase}"]).read_text().splitlines()]
        assert len(rows) == 10
        assert all(set(r) >= {"prompt", "reference", "prediction", "score"} for r in rows)
        assert rows[0]["prompt"] == "Which word comes after apple?" and rows[0]["reference"] == "river"
        assert sum(r["score"] for r in rows) / 10 == pytest.approx(score)
    assert "| task contains on" in (run / "report.md").read_text()
    # `effine eval RUN_DIR` (base + saved adapter, loaded afresh) scores the trained model as training did
    from effine.eval.task_run import evaluate_target

    result, path = evaluate_target(str(run), str(test), "contains", limit=10, max_new_tokens=4, log=lambda _m: None)
    assert path == run / "eval-contains.jsonl" and path.is_file()
    after = [json.loads(line) for line in (run / task["rows_after"]).read_text().splitlines()]
    assert [r["prediction"] for r in result.records] == [r["prediction"] for r in after]
    assert (result.score, result.ci) == (task["after"]["score"], task["after"]["ci"])


def test_eval_cli_on_a_model_dir(tmp_path, tiny_llama_dir):
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "Which word comes after apple?", "answer": "river"},
                                                 {"question": "2+2?", "answer": ["4", "four"]}])
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, "-m", "effine.cli", "eval", str(tiny_llama_dir), "--data", str(test), "--metric", "chrf",
           "--max-new-tokens", "3", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert res["n"] == 2 and len(rows) == 2 and rows[1]["reference"] == ["4", "four"]
    assert res["ci"][0] <= res["score"] <= res["ci"][1]
    assert res["score"] == pytest.approx(sum(r["score"] for r in rows) / 2)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "no reference here"}])
    proc = subprocess.run(cmd[:6] + [str(bad)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and f"{bad}:1: no reference to score against" in proc.stderr


def test_loss_metric_is_the_reference_tokens_nll(tiny_llama_dir):
    """`loss` per row = mean negative log-likelihood of the reply and its end-of-turn, given the prompt, computed
    here independently from the model's logits."""
    import torch

    from effine.eval.generate import load_for_generation
    from effine.eval.task import chat_prompt_ids, evaluate_task, task_row

    loaded = load_for_generation(str(tiny_llama_dir), log=lambda _m: None)
    model, tok = loaded.model, loaded.tokenizer
    rows = [task_row(f"r:{i}", r) for i, r in enumerate(_qa_rows(3))]
    result = evaluate_task(model, tok, rows, "loss")
    expected = []
    for r in rows:
        prompt = chat_prompt_ids(tok, r.messages)
        target = tok(r.references[0] + "<|im_end|>", add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1:-1].float()
        expected.append((float(torch.nn.functional.cross_entropy(logits, torch.tensor(target))), len(target)))
    assert [rec["tokens"] for rec in result.records] == [k for _, k in expected]
    for rec, (nll, _) in zip(result.records, expected):
        assert rec["score"] == pytest.approx(nll, rel=1e-4)
    total = sum(nll * k for nll, k in expected) / sum(k for _, k in expected)
    assert result.score == pytest.approx(total, rel=1e-4) and result.ci[0] <= result.score <= result.ci[1]
