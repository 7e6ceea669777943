"""Task evaluation: generate answers for held-out prompts that carry a reference, and score them.

    rows = read_task_rows("test.jsonl", limit=200)
    result = evaluate_task(model, tokenizer, rows, "exact_match")
    result.score, result.ci  # 0.31, [0.25, 0.38]
    result.write_rows("task_eval.jsonl")

Where the reference comes from, by row shape (the prompt is everything before it):

* ``{"input": [...messages...] or "text", "ideal": "..." or ["...", ...]}``: an OpenAI-evals row; any listed
  ideal is accepted. A prompt made only of system messages becomes user messages (as ``builtin:evals`` does).
* ``{"answer": "...", "messages": [...] | "prompt": "..." | "question": "..." | "input": "..."}``.
* ``messages`` / ``conversations`` (sharegpt) / alpaca rows: the last assistant turn (the conversation before it
  is the prompt; later turns are ignored).
* ``{"prompt": ..., "completion": ...}``: the completion; the prompt is fed as raw text, as training does.

Conversations go through the chat template training used (the tokenizer's own, or ChatML where it has none; a
run's tokenizer carries the template it trained with), with ``system_prompt`` prepended when the conversation
has no system message, and exactly one BOS. Generation is greedy and batched (prompts of similar length together,
left-padded with an attention mask) and stops at EOS / end-of-turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from effine.errors import DataError
from effine.eval.metrics import HIGHER_IS_BETTER, TEXT_METRICS, bootstrap_ci, check_metric


@dataclass
class TaskRow:
    """One held-out row: a prompt (a conversation, or raw text) and its acceptable references."""

    where: str
    references: list[str]
    messages: list[dict[str, str]] | None = None  # the conversation before the reference
    text: str | None = None  # a raw-text prompt (prompt/completion rows)

    def display(self) -> str:
        """The prompt as a person reads it in the rows file."""
        if self.messages is None:
            return self.text or ""
        if len(self.messages) == 1:
            return self.messages[0]["content"]
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages)


# -- reading rows ------------------------------------------------------------------------------------------------


def _messages(where: str, value: Any, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{key}' must be a string or a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {key}[{i}] must be {{\"role\": system|user|assistant, \"content\": str}}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in out):  # evals tasks that put the whole prompt in system messages
        out = [{"role": "user", "content": m["content"]} for m in out]
    return out


def _references(where: str, value: Any, key: str) -> list[str]:
    refs = [value] if isinstance(value, str) else value
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise DataError(f"{where}: '{key}' must be a string or a non-empty list of strings, got {value!r:.80}")
    return refs


def task_row(where: str, data: dict[str, Any]) -> TaskRow:
    """Parse one row (see the module docstring); a row without a reference is a DataError naming ``where``."""
    from effine.data.formats import RowDropped, detect_format, normalise

    if "ideal" in data:
        if "input" not in data:
            raise DataError(f"{where}: an 'ideal' row needs its prompt in 'input' (OpenAI evals format)")
        return TaskRow(where, _references(where, data["ideal"], "ideal"), _messages(where, data["input"], "input"))
    if "answer" in data:
        key = next((k for k in ("messages", "prompt", "question", "input") if k in data), None)
        if key is None:
            raise DataError(f"{where}: an 'answer' row needs its prompt in 'messages', 'prompt', 'question' or "
                            "'input'")
        return TaskRow(where, _references(where, data["answer"], "answer"), _messages(where, data[key], key))
    fmt = detect_format(data)
    if fmt in (None, "text"):
        raise DataError(f"{where}: no reference to score against (keys: {', '.join(map(str, data))}) — give "
                        "'answer', 'ideal', a last assistant turn, or prompt/completion")
    try:
        sample = normalise(where, data, fmt)
    except RowDropped:  # e.g. no assistant turn: nothing to score against
        raise DataError(f"{where}: no reference to score against: the conversation has no assistant turn") from None
    if sample.completion is not None:
        return TaskRow(where, [sample.completion], text=sample.prompt or "")
    msgs = sample.messages or []
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    if last == 0:
        raise DataError(f"{where}: the reference (last assistant turn) has no prompt before it")
    return TaskRow(where, [msgs[last]["content"]], messages=msgs[:last])


def read_task_rows(path: str | Path, limit: int | None = None, cache_dir: str | Path | None = None) -> list[TaskRow]:
    """The first ``limit`` rows (all when None) of a data file or ``builtin:NAME`` data set."""
    from effine.data.builtin import PREFIX, resolve_builtin
    from effine.data.sources import read_rows

    if str(path).startswith(PREFIX):
        from effine.model.loader import cache_root

        path = resolve_builtin(str(path), cache_root(cache_dir))
    rows = []
    for where, data in read_rows(path):
        if limit is not None and len(rows) >= limit:
            break
        rows.append(task_row(where, data))
    if not rows:
        raise DataError(f"{path}: no rows to evaluate")
    return rows


# -- prompts and batched generation ------------------------------------------------------------------------------


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]], system_prompt: str | None = None,
                    chat_template: str | None = None) -> list[int]:
    """Token ids of a conversation rendered as training renders it, ending where the assistant's reply starts:
    the template (the tokenizer's, else ChatML), ``system_prompt`` when the conversation has no system message."""
    from effine.data.template import resolve_chat_template

    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    template = resolve_chat_template(tokenizer, chat_template).source
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         chat_template=template)
    return _one_bos(tokenizer, tokenizer(text, add_special_tokens=False).input_ids)


def _one_bos(tokenizer, ids: list[int]) -> list[int]:
    """Exactly one leading BOS when the tokenizer uses one, as in training."""
    from effine.data.template import adds_bos

    if not adds_bos(tokenizer):
        return ids
    bos = tokenizer.bos_token_id
    while ids[:1] == [bos]:
        ids = ids[1:]
    return [bos, *ids]


def prompt_ids(tokenizer, row: TaskRow, system_prompt: str | None = None, chat_template: str | None = None
               ) -> list[int]:
    """Token ids of a row's prompt: its conversation through the chat template, or its raw text."""
    if row.messages is None:
        return _one_bos(tokenizer, tokenizer(row.text, add_special_tokens=False).input_ids)
    return chat_prompt_ids(tokenizer, row.messages, system_prompt, chat_template)


def stop_ids(model, tokenizer) -> list[int]:
    """EOS and whatever the model's generation config names (e.g. an end-of-turn token)."""
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return sorted({tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None})


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 48, batch_size: int = 16
                   ) -> list[str]:
    """Greedy replies to many prompts, ``batch_size`` at a time (left-padded, masked); in the prompts' order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
    replies: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk],
                            device=device)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop or None, pad_token_id=pad)
        for row, i in zip(out[:, width:].tolist(), chunk):
            cut = next((k for k, t in enumerate(row) if t in stop), len(row))  # finished rows are padded after
            replies[i] = tokenizer.decode(row[:cut], skip_special_tokens=True).strip()
    model.train(was_training)
    return replies


# -- scoring -----------------------------------------------------------------------------------------------------


@dataclass
class TaskResult:
    metric: str
    score: float
    ci: list[float]
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.records)

    def write_rows(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records))
        return path

    def line(self) -> str:
        better = "higher" if HIGHER_IS_BETTER[self.metric] else "lower"
        return (f"{self.metric} {self.score:.4f} (95% CI {self.ci[0]:.4f}-{self.ci[1]:.4f}, n={self.n}, "
                f"{better} is better)")


def _row_losses(model, tokenizer, rows: list[TaskRow], system_prompt, chat_template) -> list[tuple[float, int]]:
    """(loss per reference token, reference tokens) of each row's first reference, as training computes it."""
    from effine.data.formats import Sample
    from effine.data.template import Encoder
    from effine.eval.evaluate import evaluate

    enc = Encoder(tokenizer, chat_template=chat_template, system_prompt=system_prompt, train_on="last_assistant",
                  log=lambda _msg: None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for r in rows:
        sample = (Sample(r.where, prompt=r.text, completion=r.references[0]) if r.messages is None else
                  Sample(r.where, messages=[*r.messages, {"role": "assistant", "content": r.references[0]}]))
        res = evaluate(model, [enc.encode(sample)], 1, pad)
        out.append((res["eval_loss"], res["eval_tokens"]))
    return out


def evaluate_task(model, tokenizer, rows: list[TaskRow], metric: str = "exact_match", *,
                  max_new_tokens: int = 48, batch_size: int = 16, system_prompt: str | None = None,
                  chat_template: str | None = None, seed: int = 0) -> TaskResult:
    """Score ``model`` on ``rows``: per-row records (prompt, reference, prediction, score) and the mean with a
    seeded 95% bootstrap interval. ``loss`` scores the first reference's tokens (no generation)."""
    check_metric(metric)
    refs = [r.references[0] if len(r.references) == 1 else r.references for r in rows]
    if metric == "loss":
        losses = _row_losses(model, tokenizer, rows, system_prompt, chat_template)
        records = [{"where": r.where, "prompt": r.display(), "reference": ref, "prediction": None, "score": loss,
                    "tokens": k} for r, ref, (loss, k) in zip(rows, refs, losses)]
        score, ci = bootstrap_ci([x for x, _ in losses], [k for _, k in losses], seed=seed)
        return TaskResult(metric, score, ci, records)
    prompts = [prompt_ids(tokenizer, r, system_prompt, chat_template) for r in rows]
    preds = generate_batch(model, tokenizer, prompts, max_new_tokens, batch_size)
    fn = TEXT_METRICS[metric]
    scores = [fn(p, r.references) for p, r in zip(preds, rows)]
    records = [{"where": r.where, "prompt": r.display(), "reference": ref, "prediction": p, "score": s}
               for r, ref, p, s in zip(rows, refs, preds, scores)]
    score, ci = bootstrap_ci(scores, seed=seed)
    return TaskResult(metric, score, ci, records)


def result_from_rows(path: str | Path, metric: str, seed: int = 0) -> TaskResult:
    """A result rebuilt from its rows file (the interval is seeded, so it comes out the same)."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    weights = [r["tokens"] for r in records] if metric == "loss" else None
    score, ci = bootstrap_ci([r["score"] for r in records], weights, seed=seed)
    return TaskResult(metric, score, ci, records)
