"""Resume refuses silent changes; ``--resume-force`` overrides and logs; ``train.resume: auto``; disk space."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from effine.config import load_config
from effine.train.checkpoint import DiskFullError, committed, verify
from effine.train.resume import differences, fingerprint
from tests import forked
from tests.conftest import chat_rows, write_jsonl
from tests.reliability import check_rows


def _cfg(tmp: Path, model_dir: Path, steps: int = 4, **train) -> Path:
    data = tmp / "chats.jsonl"
    if not data.exists():
        write_jsonl(data, chat_rows(24))
    extra = "".join(f", {k}: {v}" for k, v in train.items())
    cfg = tmp / "cfg.yaml"
    cfg.write_text(f"""
model: {{name: "{model_dir}", dtype: fp32}}
data: {{path: "{data}", max_length: 64, eval_fraction: 0.2}}
adapter: {{r: 4, alpha: 8}}
train: {{max_steps: {steps}, batch_size: 2, grad_accum: 2, log_every: 1, threads: 1, warmup_steps: 0,
        save_every: 2{extra}}}
eval: {{max_new_tokens: 2, prompts_from_eval: 0, max_batches: 1}}
output: {{dir: "{tmp / 'run'}"}}
""")
    return cfg


@pytest.mark.parametrize("override, key", [
    ("model.name=OTHER", "model.name"), ("data.max_length=48", "data.max_length"),
    ("train.batch_size=3", "train.batch_size"), ("train.grad_accum=2", "train.grad_accum"),
    ("data.packing=true", "data.packing"), ("data.chat_template=chatml", "data.chat_template"),
    ("adapter.r=8", "adapter.r"), ("quant.method=int8", "quant.method"), ("model.dtype=fp16", "model.dtype"),
])
def test_fingerprint_names_each_setting_that_changed(override, key, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(2))
    base = load_config(None, ["model.name=m", f"data.path={data}"])
    changed = load_config(None, ["model.name=m", f"data.path={data}", override])
    assert [d.split(":")[0] for d in differences(fingerprint(base, "T", tmp_path),
                                                 fingerprint(changed, "T", tmp_path))] == [key]


def test_fingerprint_hashes_data_and_template_not_paths(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", chat_rows(3))
    b = tmp_path / "b.jsonl"
    shutil.copy(a, b)
    fa, fb = (fingerprint(load_config(None, [f"data.path={p}"]), "T", tmp_path) for p in (a, b))
    assert differences(fa, fb) == []  # the same bytes moved elsewhere: fine
    b.write_text(b.read_text() + b.read_text().splitlines()[0] + "\n")
    fb = fingerprint(load_config(None, [f"data.path={b}"]), "T2", tmp_path)
    assert [d.split(":")[0] for d in differences(fa, fb)] == ["data.sha256", "data.template_sha256"]


def test_resume_refuses_changed_data_and_batch_force_logs(tmp_path, tiny_llama_dir):
    cfg = _cfg(tmp_path, tiny_llama_dir, steps=6)
    res = forked.run(["train", str(cfg)], tmp_path / "a.log", {"EFFINE_FAULT": "step:start:4"})
    assert res.rc == -9
    data = tmp_path / "chats.jsonl"
    data.write_text(data.read_text() + data.read_text().splitlines()[0] + "\n")  # one more row
    res = forked.run(["train", str(cfg), "--resume", "--set", "train.grad_accum=1"], tmp_path / "b.log")
    assert res.rc == 2 and "was trained with different settings" in res.output, res.output[-3000:]
    assert "data.sha256: '" in res.output and "train.grad_accum: 2 -> 1" in res.output
    assert "--resume-force" in res.output
    assert "Traceback" not in res.output and "Loading weights" not in res.output  # refused before the model loads
    res = forked.run(["train", str(cfg), "--resume", "--resume-force"], tmp_path / "c.log")
    assert res.rc == 0 and "--resume-force: resuming from" in res.output and "data.sha256" in res.output
    assert "data.sha256" in (tmp_path / "run" / "train.log").read_text()  # logged in the run dir too


def test_auto_resume_starts_fresh_then_resumes_then_says_done(tmp_path, tiny_llama_dir):
    cfg = _cfg(tmp_path, tiny_llama_dir, resume="auto")
    res = forked.run(["train", str(cfg)], tmp_path / "a.log", {"EFFINE_FAULT": "step:start:4"})
    assert res.rc == -9 and "resumed from" not in res.output
    res = forked.run(["train", str(cfg)], tmp_path / "b.log")
    assert res.rc == 0 and "resumed from" in res.output and "at step 2" in res.output, res.output[-3000:]
    res = forked.run(["train", str(cfg)], tmp_path / "c.log")
    assert res.rc == 0 and "already holds a finished run (summary.json); nothing to do" in res.output
    # a fresh run (resume: never) must not mix with an earlier run's checkpoints
    res = forked.run(["train", str(cfg), "--set", "train.resume=never", "--set", "output.overwrite=false"],
                     tmp_path / "d.log")
    assert res.rc == 2 and "already holds a finished run" in res.output


def test_enospc_mid_save_keeps_the_previous_checkpoint(tmp_path, tiny_llama_dir):
    cfg = _cfg(tmp_path, tiny_llama_dir, steps=6)
    # the 7th file written is the second save's optimizer.pt (5 files a save)
    res = forked.run(["train", str(cfg)], tmp_path / "a.log", {"EFFINE_FAULT": "save:file:7:enospc"})
    assert res.rc == 4, res.output[-3000:]
    ckpts = committed(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts] == ["step-000002"] and verify(ckpts[0]) is None
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))  # staging removed
    assert f"writing checkpoint {tmp_path / 'run' / 'checkpoints' / 'step-000004.tmp'}" in res.output
    assert "bytes are free there" in res.output and "needs about" in res.output and "Traceback" not in res.output
    res = forked.run(["train", str(cfg), "--resume"], tmp_path / "b.log")
    assert res.rc == 0, res.output[-3000:]
    check_rows("disk", [("OSError(ENOSPC) while writing a checkpoint file", 1,
                         "exit 4 naming the path and bytes needed/free; previous checkpoint intact, staging "
                         "removed; `--resume` finishes")])


def test_free_space_is_checked_before_training(tmp_path, tiny_llama_dir, monkeypatch):
    from effine.train import checkpoint
    from effine.train.run import run_training

    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 1000)
    cfg = load_config(_cfg(tmp_path, tiny_llama_dir))
    with pytest.raises(DiskFullError, match=r"not enough free disk space in .*run: needs about [\d,]+ bytes .* "
                                            r"1,000 bytes are free"):
        run_training(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
