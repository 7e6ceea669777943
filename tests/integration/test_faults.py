"""Crash safety proven by fault injection: a tiny run is SIGKILLed at seeded points and resumed until done.

Each segment is a real process (``effine train ... --set train.resume=auto``, forked from a pre-imported server:
see tests/forked.py) that the ``EFFINE_FAULT`` hook kills at a named point: mid-step, after a step was logged but
not checkpointed, at every stage of a save (staging, each file, manifest, before/after the commit rename, during
rotation) and after training while the outputs are written. Between segments some newest checkpoints are corrupted
or truncated on purpose. The finished run must equal an uninterrupted one bit for bit: every logged per-step loss
(replayed steps included), the rows of every window (so the multiset of consumed samples), the final adapter.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from effine.train.checkpoint import committed, find_resumable, read_state
from tests import forked
from tests.conftest import chat_rows, write_jsonl
from tests.reliability import check_rows

STEP_POINTS = ["step:start", "step:backward", "step:logged"]
SAVE_POINTS = ["save:start", "save:file", "save:manifest", "save:rename", "save:renamed", "save:rotate"]
FILES_PER_SAVE = 5  # trainable, optimizer, rng, state, fingerprint
KEEP = 2

SCENARIOS = {  # name: (config overrides, kills in the default lane)
    "plain-accum2": (dict(packing=False, batch_size=2, grad_accum=2, max_steps=10, save_every=2, dropout=0.0), 11),
    "packed-accum3-dropout": (dict(packing=True, batch_size=2, grad_accum=3, max_steps=8, save_every=2,
                                   dropout=0.1), 10),
}


def write_config(path: Path, model_dir: Path, data: Path, out: Path, sc: dict) -> Path:
    path.write_text(f"""
model: {{name: "{model_dir}", dtype: fp32}}
data: {{path: "{data}", max_length: 64, eval_fraction: 0.2, packing: {str(sc['packing']).lower()}}}
adapter: {{r: 4, alpha: 8, dropout: {sc['dropout']}}}
train: {{max_steps: {sc['max_steps']}, batch_size: {sc['batch_size']}, grad_accum: {sc['grad_accum']}, lr: 5.0e-3,
        warmup_steps: 2, log_every: 1, save_every: {sc['save_every']}, keep_checkpoints: {KEEP}, threads: 1,
        resume: auto}}
eval: {{max_new_tokens: 2, prompts_from_eval: 1, max_batches: 1}}
output: {{dir: "{out}"}}
""")
    return path


def plan_fault(rng: random.Random, cycle: list[str], run: Path, sc: dict) -> tuple[str, int]:
    """The next point of ``cycle`` (a seeded shuffle of every point) that this segment is sure to reach, and a
    hit count it reaches, given where it will resume."""
    ckpt = find_resumable(run, warn=lambda _: None)
    done = read_state(ckpt).step if ckpt else 0
    total, every = sc["max_steps"], sc["save_every"]
    saves = len([s for s in range(done + 1, total) if s % every == 0]) + int(done < total)
    reach = {p: total - done for p in STEP_POINTS} | {p: saves for p in SAVE_POINTS} | {"outputs:start": 1}
    reach["save:file"] = saves * FILES_PER_SAVE
    kept = [c for c in committed(run / "checkpoints") if int(c.name[5:11]) <= done]  # newer (corrupt) ones get replaced
    reach["save:rotate"] = max(0, len(kept) + saves - KEEP)
    for _ in range(len(cycle)):
        point = cycle.pop(0)
        cycle.append(point)
        if reach[point] > 0:
            return point, rng.randint(1, min(reach[point], 2))
    raise AssertionError("no reachable fault point")


def corrupt_newest(rng: random.Random, run: Path) -> str | None:
    """Flip a byte of, or truncate, a file of the newest valid checkpoint; return what was done."""
    ckpt = find_resumable(run, warn=lambda _: None)
    if ckpt is None:
        return None
    victim = ckpt / rng.choice(["trainable.safetensors", "optimizer.pt", "state.json"])
    data = bytearray(victim.read_bytes())
    if rng.random() < 0.5:
        victim.write_bytes(data[: len(data) // 2])
        return "truncate a file of the newest checkpoint"
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    return "flip a byte in a file of the newest checkpoint"


def per_step_losses(run: Path) -> dict[int, float]:
    """Every logged loss of every step; a step logged twice (replayed after a kill) must log the same bits."""
    seen: dict[int, set] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "train":
            seen.setdefault(row["step"], set()).add(row["loss"])
    assert all(len(v) == 1 for v in seen.values()), {k: v for k, v in seen.items() if len(v) > 1}
    return {k: v.pop() for k, v in seen.items()}


def windows(run: Path) -> dict[int, tuple]:
    seen: dict[int, set] = {}
    for line in (run / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        seen.setdefault(row["window"], set()).add((row["step"], row["applied"], tuple(row["rows"])))
    assert all(len(v) == 1 for v in seen.values()), "a replayed window consumed different rows"
    return {k: v.pop() for k, v in seen.items()}


def run_killed_until_done(name: str, tmp: Path, model_dir: Path, kills: int, timer_kills: int = 0) -> Counter:
    sc, _ = SCENARIOS[name]
    data = write_jsonl(tmp / "chats.jsonl", chat_rows(40))
    ref_cfg = write_config(tmp / "ref.yaml", model_dir, data, tmp / "ref", sc)
    ref = forked.run(["train", str(ref_cfg)], tmp / "ref.log")
    assert ref.rc == 0, ref.output[-3000:]

    run = tmp / "run"
    cfg = write_config(tmp / "run.yaml", model_dir, data, run, sc)
    rng = random.Random(f"effine-faults:{name}")
    corrupt_rng = random.Random(f"effine-corrupt:{name}")
    cycle = STEP_POINTS + SAVE_POINTS + ["outputs:start"]
    rng.shuffle(cycle)
    injected: Counter = Counter()
    for seg in range(timer_kills):  # the slow lane: kills from outside, by the clock, at random moments
        p = forked.start(["train", str(cfg)], tmp / f"timer{seg}.log")
        time.sleep(rng.uniform(0.3, 2.0))
        p.kill()
        p.join()
        assert p.exitcode in (0, -9), (tmp / f"timer{seg}.log").read_text()[-3000:]
        injected["SIGKILL from outside after a random 0.3-2 s (attempts)"] += 1
        if p.exitcode == 0 or (run / "summary.json").exists():
            # a fast machine finished the run (or its outputs) before the clock: start over for the planned kills
            shutil.rmtree(run)
    for seg in range(kills):
        point, n = plan_fault(rng, cycle, run, sc)
        res = forked.run(["train", str(cfg)], tmp / f"seg{seg}.log", {"EFFINE_FAULT": f"{point}:{n}"})
        assert res.rc == -9 and f"kill at {point} (hit {n})" in res.output, res.output[-3000:]
        injected[f"SIGKILL at `{point}`"] += 1
        if corrupt_rng.random() < 0.2 and (what := corrupt_newest(corrupt_rng, run)):
            injected[what] += 1
            res = forked.run(["train", str(cfg)], tmp / f"seg{seg}-resume.log", {"EFFINE_FAULT": "step:start:1"})
            assert res.rc == -9 and "skipping checkpoint" in res.output, res.output[-3000:]  # named, with why
            injected["SIGKILL at `step:start`"] += 1
    final = forked.run(["train", str(cfg)], tmp / "final.log")
    assert final.rc == 0, final.output[-3000:]

    assert per_step_losses(run) == per_step_losses(tmp / "ref")
    assert windows(run) == windows(tmp / "ref")
    consumed = Counter(r for _, _, rows in windows(run).values() for r in rows)
    assert consumed == Counter(r for _, _, rows in windows(tmp / "ref").values() for r in rows)
    a = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp / "ref" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((run / "checkpoints").glob("*.tmp")) and not list((run / "checkpoints").glob("*.trash"))
    return injected


def _rows(injected: Counter, name: str) -> list[tuple[str, int, str]]:
    sc, _ = SCENARIOS[name]
    result = f"bit-identical to an uninterrupted run ({sc['max_steps']} step losses, window rows, adapter)"
    return [(fault, n, result) for fault, n in sorted(injected.items())]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_killed_anywhere_resumes_bit_identical(name, tmp_path, tiny_llama_dir):
    injected = run_killed_until_done(name, tmp_path, tiny_llama_dir, SCENARIOS[name][1])
    assert sum(v for k, v in injected.items() if k.startswith("SIGKILL")) >= SCENARIOS[name][1]
    check_rows(f"kill-{name}", _rows(injected, name))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_killed_many_times_resumes_bit_identical(name, tmp_path, tiny_llama_dir):
    """The slow lane: 5 kills from outside at random moments, then 25 planned kills, per scenario."""
    injected = run_killed_until_done(name, tmp_path, tiny_llama_dir, 25, timer_kills=5)
    planned = sum(v for k, v in injected.items() if k.startswith("SIGKILL at"))
    assert planned >= 25
    # Where the clock's kills land varies, and with it the rest of the plan: the table shows the totals.
    sc, _ = SCENARIOS[name]
    result = f"bit-identical to an uninterrupted run ({sc['max_steps']} step losses, window rows, adapter)"
    check_rows(f"kill-many-{name}", [
        ("SIGKILL from outside after a random 0.3-2 s (attempts)", 5, result),
        ("SIGKILL at seeded named points, all points in turn; ~1 in 5 followed by a corrupted/truncated checkpoint",
         25, result)])
