"""`effine train` on a CUDA GPU (model.device): the same run as on the CPU, to fp32 tolerance; QLoRA on the GPU.

These need a CUDA build of torch and a GPU; on a CPU-only machine they are skipped (CI has no GPU). They ran on an
H200 (see bench/results/gpu-h200.md). The device *resolution* (errors, auto) is tested on the CPU below.
"""

from __future__ import annotations

import json

import pytest
import torch

from effine.config import load_config
from effine.errors import ConfigError
from effine.model.loader import resolve_device
from tests.conftest import chat_rows, write_jsonl

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_resolve_device_on_this_machine():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(ConfigError, match="model.device: 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="model.device: 'gpu0' is not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU; use model.device=cpu"):
            resolve_device("cuda")
    else:
        with pytest.raises(ConfigError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def _train(root, model_dir, name, *extra):
    from effine.train.run import run_training

    data = root / "chats.jsonl"
    if not data.exists():
        write_jsonl(data, chat_rows(32))
    cfg = load_config(None, [f"model.name={model_dir}", f"data.path={data}", "data.max_length=64",
                             "data.eval_fraction=0.2", f"output.dir={root}/{name}", "adapter.r=4", "adapter.alpha=8",
                             "train.lr=1e-2", "train.batch_size=4", "train.max_steps=4", "train.warmup_steps=0",
                             "train.log_every=1", "eval.max_new_tokens=4", "eval.prompts_from_eval=1",
                             "train.threads=2", *extra])
    summary = run_training(cfg)
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    return summary, [r["loss"] for r in rows if r["kind"] == "train"]


@cuda
def test_cuda_run_matches_cpu_run(tmp_path, tiny_llama_dir):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    common = ("model.dtype=fp32", "train.lr=1e-3")
    s_cpu, l_cpu = _train(tmp_path, tiny_llama_dir, "cpu", "model.device=cpu", *common)
    s_gpu, l_gpu = _train(tmp_path, tiny_llama_dir, "gpu", "model.device=cuda", *common)
    assert len(l_cpu) == len(l_gpu) == 4
    # Step 1 (before any update) and the eval before training: the same forward, fp32 kernel differences only.
    assert abs(l_cpu[0] - l_gpu[0]) <= 1e-5 * l_cpu[0], (l_cpu, l_gpu)
    before = s_cpu["eval_before"]["eval_loss"], s_gpu["eval_before"]["eval_loss"]
    assert abs(before[0] - before[1]) <= 1e-5 * before[0], before
    # Later steps: AdamW's first update is nearly sign(g) * lr, so gradient entries within rounding of 0 can step
    # either way on the two devices; with lr 1e-3 that moves the loss by well under 0.2%.
    for a, b in zip(l_cpu[1:], l_gpu[1:]):
        assert abs(a - b) <= 2e-3 * a, (l_cpu, l_gpu)
    after = s_cpu["eval_after"]["eval_loss"], s_gpu["eval_after"]["eval_loss"]
    assert abs(after[0] - after[1]) <= 2e-3 * after[0], after
    assert l_gpu[-1] < l_gpu[0]
    assert "device: cuda" in (tmp_path / "gpu" / "train.log").read_text()
    assert (tmp_path / "gpu" / "adapter" / "adapter_model.safetensors").is_file()


@cuda
def test_cuda_qlora_bf16_run_and_resume(tmp_path, tiny_llama_dir, monkeypatch):
    """QLoRA (nf4, bf16 compute) trains on the GPU; a crash after a checkpoint written there resumes to the same
    final adapter as the uninterrupted run."""
    import effine.train.loop as loop_mod
    from safetensors.torch import load_file

    from effine.train.run import run_training

    s, losses = _train(tmp_path, tiny_llama_dir, "q", "model.device=cuda", "model.dtype=bf16", "quant.method=nf4")
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert s["eval_after"]["eval_loss"] < s["eval_before"]["eval_loss"]
    assert "quantized 14 linear layers to nf4" in (tmp_path / "q" / "train.log").read_text()

    real = loop_mod.save_checkpoint

    def crash_after_save(*a, **k):
        real(*a, **k)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(loop_mod, "save_checkpoint", crash_after_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(tmp_path, tiny_llama_dir, "q2", "model.device=cuda", "model.dtype=bf16", "quant.method=nf4",
               "train.save_every=2")
    monkeypatch.setattr(loop_mod, "save_checkpoint", real)
    assert (tmp_path / "q2" / "checkpoints" / "step-000002").is_dir()
    run_training(load_config(tmp_path / "q2" / "config.yaml"), resume=True)
    a = load_file(str(tmp_path / "q" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "q2" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # the same kernels in the same order: equal up to GPU non-determinism of bf16 reductions
        torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=1e-4)
