"""Checkpoint mechanics on real files: fsync order, manifest verification, rotation with keep_best, skipping bad
checkpoints with the reason, the fault hook's parser, the size estimate."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from effine.train.checkpoint import (LoopState, committed, estimate_checkpoint_bytes, find_resumable,
                                     load_checkpoint, save_checkpoint, verify)
from effine.train.faults import parse


def _model_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return model, opt


def test_files_then_manifest_then_dir_then_rename_then_parent_are_fsynced(tmp_path, monkeypatch):
    model, opt = _model_opt()
    events = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    real_path_rename = Path.rename
    monkeypatch.setattr(Path, "rename",
                        lambda self, t: events.append(("rename", self.name)) or real_path_rename(self, t))
    save_checkpoint(tmp_path, model, opt, LoopState(step=3), fingerprint={"x": 1})
    names = [e[1].split("/")[-1] if e[0] == "fsync" else f"rename {e[1]}" for e in events]
    assert names[0] == tmp_path.name  # the new checkpoints/ entry of the first save
    staged = ["trainable.safetensors", "optimizer.pt", "rng.safetensors", "state.json", "fingerprint.json"]
    i = names.index("trainable.safetensors")
    assert names[i:i + 8] == staged + ["manifest.json", "step-000003.tmp", "rename step-000003.tmp"]
    assert names[i + 8] == "checkpoints"  # the parent, after the rename


def test_rotation_keeps_last_k_and_the_best(tmp_path):
    model, opt = _model_opt()
    losses = {1: 5.0, 2: 3.0, 3: None, 4: 4.0, 5: 6.0, 6: None}
    for step, loss in losses.items():
        save_checkpoint(tmp_path, model, opt, LoopState(step=step, eval_loss=loss), keep=2, keep_best=True)
    assert [p.name for p in committed(tmp_path / "checkpoints")] == ["step-000006", "step-000005", "step-000002"]
    save_checkpoint(tmp_path, model, opt, LoopState(step=7), keep=2, keep_best=False)
    assert [p.name for p in committed(tmp_path / "checkpoints")] == ["step-000007", "step-000006"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if "." in p.name]  # no .tmp/.trash/.old left


def test_find_resumable_skips_bad_checkpoints_and_says_why(tmp_path):
    model, opt = _model_opt()
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, model, opt, LoopState(step=step), keep=5)
    root = tmp_path / "checkpoints"
    f = root / "step-000005" / "optimizer.pt"
    f.write_bytes(f.read_bytes()[:100])  # truncated
    f = root / "step-000004" / "trainable.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 1
    f.write_bytes(bytes(data))  # one bit flipped
    (root / "step-000003" / "manifest.json").unlink()  # a save killed before its manifest (or an old effine)
    (root / "step-000006.tmp").mkdir()  # a staging dir never committed
    warnings = []
    assert find_resumable(tmp_path, warn=warnings.append) == root / "step-000002"
    text = "\n".join(warnings)
    assert "ignoring " + str(root / "step-000006.tmp") in text
    assert f"skipping checkpoint {root / 'step-000005'}: optimizer.pt is 100 bytes, the manifest says" in text
    assert f"skipping checkpoint {root / 'step-000004'}: trainable.safetensors does not match its sha256" in text
    assert f"skipping checkpoint {root / 'step-000003'}: no manifest.json" in text
    from effine.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="does not match its sha256"):
        load_checkpoint(root / "step-000004", model, opt)


def test_same_step_new_position_replaces_and_same_state_is_reused(tmp_path):
    model, opt = _model_opt()
    a = save_checkpoint(tmp_path, model, opt, LoopState(step=2, windows=2))
    mtime = (a / "manifest.json").stat().st_mtime_ns
    assert save_checkpoint(tmp_path, model, opt, LoopState(step=2, windows=2)) == a
    assert (a / "manifest.json").stat().st_mtime_ns == mtime  # nothing rewritten
    save_checkpoint(tmp_path, model, opt, LoopState(step=2, windows=3))  # a skipped window moved the data on
    model2, opt2 = _model_opt(seed=1)
    assert load_checkpoint(a, model2, opt2).windows == 3 and verify(a) is None
    assert torch.equal(model2[0].weight, model[0].weight)


def test_estimate_covers_the_real_size(tmp_path):
    model, opt = _model_opt()
    path = save_checkpoint(tmp_path, model, opt, LoopState(step=1))
    real = sum(p.stat().st_size for p in path.iterdir())
    assert real <= estimate_checkpoint_bytes(model) <= 2 * real + 128 * 1024


def test_fault_spec_parsing():
    assert parse("save:file:3,step:start:2:term") == {"save:file": [(3, "kill")], "step:start": [(2, "term")]}
    with pytest.raises(ValueError, match="POINT:N"):
        parse("save:file")
