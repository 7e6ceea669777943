"""Packaged models are cached in fp32 (converted from GGUF); a bf16 run reads a bf16 copy written beside it once,
so the load never holds the fp32 file and the bf16 model at the same time. The copy must hold exactly what loading
the fp32 cache as bf16 gives."""

from __future__ import annotations

import json

import torch

from effine.model.loader import load_model
from effine.model.tiny import tiny_model


def test_bf16_copy_of_a_converted_cache_is_written_once_and_exact(tmp_path):
    src = tmp_path / "models" / "tiny-packaged"
    tiny_model("llama", seed=3).save_pretrained(src, safe_serialization=True)  # fp32, like convert_gguf's output
    (src / "effine_source.json").write_text(json.dumps({"gguf": "x.gguf"}))
    want = {k: v.to(torch.bfloat16) for k, v in load_model(src, "fp32").state_dict().items()}
    assert not (tmp_path / "models" / "tiny-packaged@bf16").exists()  # fp32 reads the cache itself

    got = load_model(src, "bf16")
    copy = tmp_path / "models" / "tiny-packaged@bf16" / "model.safetensors"
    assert copy.is_file()
    assert all(torch.equal(v, want[k]) for k, v in got.state_dict().items())
    mtime = copy.stat().st_mtime_ns
    again = load_model(src, "bf16")  # the copy is read, not rewritten
    assert copy.stat().st_mtime_ns == mtime
    assert all(torch.equal(v, want[k]) for k, v in again.state_dict().items())


def test_other_model_dirs_are_read_as_they_are(tmp_path):
    d = tmp_path / "plain"
    tiny_model("llama", seed=3).save_pretrained(d, safe_serialization=True)  # no effine_source.json: a user's dir
    load_model(d, "bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]
