"""Signals and crashes end a run cleanly: the step in progress finishes, a checkpoint is written, the exit code says
why (143 SIGTERM, 130 Ctrl-C); a second Ctrl-C aborts at once; a signal while loading has nothing to save; a crash
saves only a consistent, finite state. Real processes, real signals (sent from outside, or by the process to itself
at a chosen point through the EFFINE_FAULT test hook)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from effine.train.checkpoint import committed, find_resumable, read_state, verify
from tests import forked
from tests.conftest import chat_rows, write_jsonl
from tests.reliability import check_rows


def _config(tmp: Path, model_dir: Path, steps: int = 6, **train) -> Path:
    data = write_jsonl(tmp / "chats.jsonl", chat_rows(24))
    extra = "".join(f", {k}: {v}" for k, v in train.items())
    cfg = tmp / "cfg.yaml"
    cfg.write_text(f"""
model: {{name: "{model_dir}", dtype: fp32}}
data: {{path: "{data}", max_length: 64, eval_fraction: 0.2}}
adapter: {{r: 4, alpha: 8}}
train: {{max_steps: {steps}, batch_size: 2, grad_accum: 2, log_every: 1, threads: 1, warmup_steps: 0{extra}}}
eval: {{max_new_tokens: 2, prompts_from_eval: 0, max_batches: 1}}
output: {{dir: "{tmp / 'run'}"}}
""")
    return cfg


def _train_steps(run: Path) -> list[int]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["kind"] == "train"]


def test_sigterm_from_outside_finishes_the_step_checkpoints_and_exits_143(tmp_path, tiny_llama_dir):
    """`python -m effine.cli train` as a scheduler runs it; SIGTERM arrives from outside in the middle of training."""
    cfg = _config(tmp_path, tiny_llama_dir, steps=100000)
    env = {**os.environ, "EFFINE_ALLOCATOR": "system", "PYTHONPATH": os.pathsep.join(sys.path)}
    log = (tmp_path / "cli.log").open("w")  # a file, not a pipe: nothing can block on a full pipe buffer
    proc = subprocess.Popen([sys.executable, "-m", "effine.cli", "train", str(cfg)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 600  # a loaded CI machine can take minutes to import and load; wait for training
    while proc.poll() is None and time.time() < deadline and not (
            metrics.exists() and len(_train_steps(tmp_path / "run")) >= 3):
        time.sleep(0.05)
    assert proc.poll() is None and len(_train_steps(tmp_path / "run")) >= 3, "training never got going"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    out = (tmp_path / "cli.log").read_text()
    assert proc.returncode == 143, out[-3000:]
    ckpt = find_resumable(tmp_path / "run")
    steps = _train_steps(tmp_path / "run")
    assert ckpt is not None and read_state(ckpt).step == steps[-1] >= 3  # the step in progress was finished
    assert f"saved checkpoint {ckpt}" in out and "Traceback" not in out
    check_rows("signal", [("SIGTERM from outside during training (`python -m effine.cli train`)", 1,
                           "step in progress finished, checkpointed, exit 143")])


def test_first_ctrl_c_checkpoints_second_aborts_at_once(tmp_path, tiny_llama_dir):
    cfg = _config(tmp_path, tiny_llama_dir)
    res = forked.run(["train", str(cfg)], tmp_path / "a.log", {"EFFINE_FAULT": "step:start:3:int"})
    assert res.rc == 130, res.output[-3000:]
    ckpt = find_resumable(tmp_path / "run")
    assert read_state(ckpt).step == 3 and _train_steps(tmp_path / "run") == [1, 2, 3]  # step 3 ran to its end
    assert "finishing the current optimizer step" in res.output

    # Ctrl-C twice: the second one, in the middle of step 5, aborts without finishing or saving anything.
    res = forked.run(["train", str(cfg), "--resume"], tmp_path / "b.log",
                     {"EFFINE_FAULT": "step:start:2:int,step:backward:2:int"})
    assert res.rc == 130, res.output[-3000:]
    assert "aborted at step 4 without saving" in res.output
    assert [p.name for p in committed(tmp_path / "run" / "checkpoints")] == ["step-000003"]
    check_rows("signal-ctrl-c", [
        ("SIGINT (Ctrl-C) at the start of a step", 1, "step finished, checkpointed, exit 130"),
        ("SIGINT twice: at a step's start, again after its backward", 1,
         "aborted at once, nothing written, exit 130; previous checkpoint kept")])


def test_signal_while_loading_has_nothing_to_save(tmp_path, tiny_llama_dir):
    cfg = _config(tmp_path, tiny_llama_dir)
    for point, sig, code in (("load:data", "term", 143), ("load:model", "int", 130)):
        res = forked.run(["train", str(cfg)], tmp_path / f"{point}.log", {"EFFINE_FAULT": f"{point}:1:{sig}"})
        assert res.rc == code, res.output[-3000:]
        assert "nothing to save" in res.output and "Traceback" not in res.output
        assert not (tmp_path / "run" / "checkpoints").exists()
    check_rows("signal-loading", [("SIGTERM while loading the data, SIGINT while loading the model", 2,
                                   "exit 143 / 130 saying there is nothing to save")])


def test_crash_mid_step_saves_the_last_complete_step(tmp_path, tiny_llama_dir):
    """An out-of-memory error in the middle of step 3 (after backward): step 2's state is consistent and finite."""
    cfg = _config(tmp_path, tiny_llama_dir)
    res = forked.run(["train", str(cfg)], tmp_path / "oom.log", {"EFFINE_FAULT": "step:backward:3:oom"})
    assert res.rc == 1 and "MemoryError" in res.output, res.output[-3000:]
    ckpt = find_resumable(tmp_path / "run")
    assert read_state(ckpt).step == 2 and verify(ckpt) is None
    assert "MemoryError at step 2: saved checkpoint" in res.output
    res = forked.run(["train", str(cfg), "--resume"], tmp_path / "resume.log")
    assert res.rc == 0 and "resumed from" in res.output, res.output[-3000:]
    check_rows("crash", [("MemoryError raised mid-step (after backward, before the update)", 1,
                          "last complete step checkpointed, exit 1; `--resume` finishes the run")])
