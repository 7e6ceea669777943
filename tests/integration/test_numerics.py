"""The numerics guard on real runs: rows whose data makes the loss NaN, and a learning rate that diverges.

NaN data: a copy of the tiny model whose embedding of the token " zebra" is NaN, and a data file where only some
rows say "zebra". Every window holding one of them has a NaN loss; the guard must name its step and rows and skip
it (or stop), and never let it reach the weights."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from effine.config import TrainConfig
from effine.data import Example
from effine.train.checkpoint import committed, find_resumable, read_state, verify
from tests import forked
from tests.conftest import chat_rows, write_jsonl
from tests.reliability import check_rows

ZEBRA_ROWS = (5, 17)  # 1-based lines of the training file that mention the poisoned token


def _poisoned(tmp: Path, model_dir: Path) -> Path:
    out = tmp / "nan-model"
    shutil.copytree(model_dir, out)
    from transformers import AutoTokenizer

    (zebra,) = AutoTokenizer.from_pretrained(out).encode(" zebra")
    weights = load_file(str(out / "model.safetensors"))
    weights["model.embed_tokens.weight"][zebra] = float("nan")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _setup(tmp: Path, model_dir: Path, poison: bool = True, **train) -> tuple[Path, Path]:
    rows = chat_rows(24)
    for line in ZEBRA_ROWS:
        rows[line - 1] = {"messages": [{"role": "user", "content": "say zebra"},
                                       {"role": "assistant", "content": "zebra"}]}
    data = write_jsonl(tmp / "chats.jsonl", rows)
    evals = write_jsonl(tmp / "eval.jsonl", chat_rows(4, seed=1))
    extra = "".join(f", {k}: {v}" for k, v in train.items())
    cfg = tmp / "cfg.yaml"
    cfg.write_text(f"""
model: {{name: "{_poisoned(tmp, model_dir) if poison else model_dir}", dtype: fp32}}
data: {{path: "{data}", eval_path: "{evals}", max_length: 64}}
adapter: {{r: 4, alpha: 8}}
train: {{max_steps: 8, batch_size: 2, log_every: 1, threads: 1, warmup_steps: 0, save_every: 2{extra}}}
eval: {{max_new_tokens: 2, prompts_from_eval: 0, max_batches: 1}}
output: {{dir: "{tmp / 'run'}"}}
""")
    return cfg, data


def _events(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_nan_rows_are_skipped_and_named(tmp_path, tiny_llama_dir):
    cfg, data = _setup(tmp_path, tiny_llama_dir, nonfinite="skip", max_nonfinite=2)
    res = forked.run(["train", str(cfg)], tmp_path / "skip.log")
    assert res.rc == 0, res.output[-3000:]
    run = tmp_path / "run"
    bad = _events(run, "nonfinite")
    zebra = {f"{data}:{n}" for n in ZEBRA_ROWS}
    assert bad and all(zebra & set(e["rows"]) for e in bad)  # exactly the windows holding a poisoned row
    assert {r for e in bad for r in e["rows"]} >= zebra  # every poisoned row was met (and skipped)
    for e in bad:
        assert f"step {e['step']}: non-finite loss nan on rows" in res.output and e["rows"][0] in res.output
    train = _events(run, "train")
    assert [r["step"] for r in train] == list(range(1, 9)) and all(math.isfinite(r["loss"]) for r in train)
    # skipped windows do not advance the schedule: the window after one has the same step and lr
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 + len(bad) and [s["applied"] for s in samples].count(False) == len(bad)
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in adapter.values())
    check_rows("numerics-nan-data", [("rows whose token embedding is NaN, train.nonfinite=skip", len(bad),
                                      "each window logged with step and rows (file:line), update skipped, "
                                      "schedule not advanced, run finishes finite")])


def test_nan_rows_stop_with_exit_3_and_a_finite_checkpoint(tmp_path, tiny_llama_dir):
    cfg, data = _setup(tmp_path, tiny_llama_dir, nonfinite="stop")
    res = forked.run(["train", str(cfg)], tmp_path / "stop.log")
    assert res.rc == 3, res.output[-3000:]
    (bad,) = _events(tmp_path / "run", "nonfinite")
    assert f"step {bad['step']}: non-finite loss nan on rows" in res.output and "train.nonfinite=stop" in res.output
    ckpt = find_resumable(tmp_path / "run")
    assert read_state(ckpt).step == bad["step"] - 1  # the last good step, saved because it is finite
    check_rows("numerics-nan-stop", [("rows whose token embedding is NaN, train.nonfinite=stop", 1,
                                      "exit 3 naming step and rows; last good step checkpointed")])


def test_diverging_lr_never_overwrites_a_good_checkpoint(tmp_path, tiny_llama_dir):
    """Killed at step 5, resumed with lr 1e39: the first update makes the weights inf; the next windows are NaN,
    the run stops after max_nonfinite and refuses to save the non-finite state; step 4's checkpoint stays as it was."""
    cfg, _ = _setup(tmp_path, tiny_llama_dir, poison=False, max_nonfinite=2)
    res = forked.run(["train", str(cfg)], tmp_path / "a.log", {"EFFINE_FAULT": "step:start:5"})
    assert res.rc == -9
    good = find_resumable(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    res = forked.run(["train", str(cfg), "--resume", "--set", "train.lr=1e39", "--set", "train.max_grad_norm=null"],
                     tmp_path / "b.log")
    assert res.rc == 3, res.output[-3000:]
    assert "NOT saving a checkpoint (trainable parameter" in res.output and "2 windows in a row" in res.output
    assert [p.name for p in committed(tmp_path / "run" / "checkpoints")] == ["step-000004", "step-000002"]
    assert verify(good) is None and {p.name: p.read_bytes() for p in good.iterdir()} == before
    check_rows("numerics-diverging-lr", [("lr 1e39 after resume: weights become inf", 1,
                                          "stops after train.max_nonfinite windows, exit 3; no checkpoint of the "
                                          "non-finite state, the good one kept byte for byte")])


def test_window_without_labels_is_reported_never_loss_zero(tmp_path):
    """In process: two of six examples have every label masked; with batch 1 their windows carry no label."""
    from effine.adapters import inject_lora
    from effine.config import AdapterConfig
    from effine.model.tiny import tiny_model
    from effine.train.loop import train_loop
    from effine.train.metrics import MetricsLog
    from effine.train.optim import build_optimizer

    model = tiny_model("llama", seed=0)
    inject_lora(model, AdapterConfig(r=2, alpha=4))
    ids = list(range(3, 13))
    examples = [Example(ids, [-100] + ids[1:], f"d.jsonl:{i + 1}") for i in range(4)]
    examples += [Example(ids, [-100] * len(ids), f"d.jsonl:{i}") for i in (5, 6)]
    cfg = TrainConfig(max_steps=4, batch_size=1, log_every=1, warmup_steps=0)
    logs: list[str] = []
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    opt = build_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], cfg)
    result = train_loop(model, opt, examples, cfg, 0, tmp_path, metrics, log=logs.append)
    metrics.close()
    empty = _events(tmp_path, "empty")
    assert result.state.step == 4 and result.state.empty_windows == len(empty) >= 1
    assert all(e["rows"][0] in ("d.jsonl:5", "d.jsonl:6") for e in empty)
    assert any("every label masked" in line and "d.jsonl:" in line for line in logs)
    assert all(r["loss"] > 0 for r in _events(tmp_path, "train"))
