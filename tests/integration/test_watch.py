"""`effine watch` on a finished run and, from another process, on a live `effine train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from effine.cli import main
from tests.conftest import chat_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def test_watch_finished_run_prints_final_state_and_exits(reported_run, capsys):
    run, summary = reported_run
    t0 = time.perf_counter()
    assert main(["watch", str(run), "--interval", "30"]) == 0  # finished: no waiting for a refresh
    assert time.perf_counter() - t0 < 10
    out = capsys.readouterr().out
    assert "finished" in out and "step 12 / 12" in out and "(100%)" in out
    assert f"{summary['eval_before']['eval_loss']:.4f} → {summary['eval_after']['eval_loss']:.4f}" in out
    last = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in l][-1]
    assert f"{last['loss']:.4f}" in out and any(c in out for c in "▁▂▃▄▅▆▇█")
    assert f"report: {run / 'report.html'}" in out


def test_watch_live_training_from_another_process(tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chats.jsonl", chat_rows(40))
    run = tmp_path / "live"
    cmd = [sys.executable, "-m", "effine.cli", "train", str(ROOT / "configs/smollm2-135m-lora.yaml"),
           "--set", f"model.name={tiny_llama_dir}", "--set", "model.dtype=fp32", "--set", f"data.path={data}",
           "--set", "data.max_length=64", "--set", "data.max_eval_rows=4", "--set", "train.max_steps=5000",
           "--set", "train.log_every=1", "--set", "train.batch_size=2", "--set", f"output.dir={run}",
           "--set", "train.threads=1", "--set", "eval.prompts_from_eval=0", "--set", "eval.max_new_tokens=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "EFFINE_ALLOCATOR": "system"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            rows = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
            if sum('"kind": "train"' in r for r in rows) >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert main(["watch", str(run), "--once"]) == 0
        out = capsys.readouterr().out
        assert "running" in out and "/ 5,000" in out and "ETA" in out and "tokens/s" in out
        assert "finished" not in out
    finally:
        proc.terminate()  # SIGTERM: the loop checkpoints and exits
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
