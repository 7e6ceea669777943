"""effine.export.merge on real (short) runs of a tiny Llama: QLoRA (nf4), plain LoRA, and QAT + LoRA.

Tolerances, on max |Δlogit| between the adapter on the rebuilt base (the reference, fp32 compute) and the merged
model, relative to the largest reference logit (so they hold for any logit scale):

* fp32 merge: ``TOL_FP32 = 1e-5`` (only float reassociation: W x + s B (A x) vs (W + s B A) x);
* bf16 merge: ``TOL_BF16 = 2e-2`` (every weight rounded to 8 significant bits, relative error <= 2^-9, and bf16
  activations; the errors add up over the layers).

For a run trained in bf16 the reference itself computes in bf16; the report's ``train_dtype_floor`` holds the
same model computed in fp32, and an fp32 merge of a plain-LoRA bf16 run matches that within ``TOL_FP32``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from effine.config import load_config
from effine.errors import ConfigError
from effine.export.merge import REPORT_NAME, merge_run
from tests.conftest import chat_rows, write_jsonl

TOL_FP32 = 1e-5
TOL_BF16 = 2e-2


def _train(root, model_dir, name: str, *extra: str):
    from effine.train.run import run_training

    data = root / "chats.jsonl"
    if not data.exists():
        write_jsonl(data, chat_rows(24))
    overrides = [f"model.name={model_dir}", "model.dtype=fp32", f"data.path={data}", "data.max_length=48",
                 "data.eval_fraction=0.2", f"output.dir={root}/{name}", "adapter.r=4", "adapter.alpha=8",
                 "train.lr=2e-2", "train.batch_size=4", "train.max_steps=3", "train.warmup_steps=0",
                 "eval.max_new_tokens=2", "eval.prompts_from_eval=0", "eval.max_batches=1", "train.threads=1", *extra]
    run_training(load_config(None, overrides))
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("merge-runs")
    return {
        "nf4": _train(root, tiny_llama_dir, "nf4", "quant.method=nf4"),
        "none-bf16": _train(root, tiny_llama_dir, "none-bf16", "model.dtype=bf16"),
        "qat": _train(root, tiny_llama_dir, "qat", "quant.qat_bits=4", "quant.group_size=32"),
        "qat-full": _train(root, tiny_llama_dir, "qat-full", "adapter.method=full", "train.lr=1e-3",
                           "quant.qat_bits=4", "quant.group_size=32"),
    }


def _rel(report) -> float:
    return report.max_abs_logit_diff / max(report.ref_max_abs_logit, 1e-6)


def test_qlora_merge_uses_dequantized_base(runs, tmp_path):
    from effine.adapters import load_adapter, lora_modules
    from effine.model.loader import load_model
    from effine.quant import QuantLinear, quantize_model

    out = tmp_path / "merged"
    rep = merge_run(runs["nf4"], out, dtype="fp32")
    assert rep.quant["method"] == "nf4" and rep.requantized is False
    assert rep.merged_modules == 14 and rep.dequantized_modules == 0  # 2 layers x 7 projections
    assert rep.tokens > 20 and rep.ref_max_abs_logit > 0
    assert _rel(rep) <= TOL_FP32, rep
    assert rep.argmax_agreement == 1.0
    assert rep.reload_max_abs_logit_diff == 0.0
    # A merge into the original (unquantized) weights would be far worse: the adapter corrects the nf4 base.
    assert rep.original_base["max_abs_logit_diff"] > 100 * max(rep.max_abs_logit_diff, 1e-7)

    # The saved file is dense, and each merged weight is exactly W_deq + s·B A.
    cfg = load_config(runs["nf4"] / "config.yaml")
    ref = load_model(Path(rep.base_model), "fp32")
    quantize_model(ref, "nf4", blocksize=cfg.quant.blocksize, double_quant=cfg.quant.double_quant)
    load_adapter(ref, runs["nf4"] / "adapter", dtype=torch.float32)
    m = lora_modules(ref)["model.layers.1.mlp.down_proj"]
    assert isinstance(m.base, QuantLinear)
    expected = m.base.dequantize().float() + m.scale * (m.lora_B.weight.float() @ m.lora_A.weight.float())
    saved = load_file(str(out / "model.safetensors"))
    assert not any(k.endswith((".qweight", ".absmax", ".lora_A.weight")) for k in saved)
    assert torch.equal(saved["model.layers.1.mlp.down_proj.weight"], expected)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (out / "tokenizer_config.json").exists() and (out / "chat_template.jinja").exists()
    on_disk = json.loads((out / REPORT_NAME).read_text())
    for k in ("max_abs_logit_diff", "mean_abs_logit_diff", "argmax_agreement"):
        assert on_disk[k] == getattr(rep, k)


def test_qlora_merge_bf16_is_looser(runs, tmp_path):
    rep = merge_run(runs["nf4"], tmp_path / "bf16", dtype="bf16", compare_original_base=False)
    assert rep.merged_dtype == "bf16" and rep.original_base is None
    assert TOL_FP32 < _rel(rep) <= TOL_BF16, rep
    assert rep.reload_max_abs_logit_diff == 0.0
    assert load_file(str(tmp_path / "bf16" / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"].dtype \
        == torch.bfloat16


def test_plain_lora_bf16_run_and_custom_prompts(runs):
    """A LoRA run trained in bf16: the reference itself is bf16-noisy; the report measures that floor."""
    run = runs["none-bf16"]
    rep = merge_run(run, dtype="bf16", prompts=["apple river", "say green"], verify_reload=False)
    assert rep.out_dir == str(run / "merged") and rep.prompts == ["apple river", "say green"]
    assert rep.quant == {"method": "none"} and rep.original_base is None and rep.dequantized_modules == 0
    assert rep.train_dtype == "bf16" and rep.reload_max_abs_logit_diff is None
    floor = rep.train_dtype_floor
    assert floor is not None and floor["max_abs_logit_diff"] > 0
    assert _rel(rep) <= TOL_BF16, rep
    # merged in fp32, the model IS the reference computed in fp32 (bf16 base weights upcast exactly, fp32 adapter)
    rep32 = merge_run(run, dtype="fp32", prompts=["apple river", "say green"], save=False)
    vs32 = rep32.train_dtype_floor["merged_vs_fp32_reference"]
    assert vs32["max_abs_logit_diff"] <= TOL_FP32 * rep32.ref_max_abs_logit, rep32


def test_qat_lora_merge_bakes_fake_quant(runs, tmp_path):
    """QAT + LoRA trains x·fq(W + s·BA)^T: the baked merge is fq(W + s·BA), and PTQ of the latent merge gives it too."""
    from effine.quant import fake_quantize

    baked = merge_run(runs["qat"], tmp_path / "baked", dtype="fp32", verify_reload=False)
    assert baked.qat == {"bits": 4, "group_size": 32, "symmetric": True, "baked": True}
    assert _rel(baked) <= TOL_FP32 and baked.argmax_agreement == 1.0
    assert any("fq(W + s·BA)" in n for n in baked.notes)
    latent = merge_run(runs["qat"], tmp_path / "latent", dtype="fp32", verify_reload=False, bake_qat=False)
    assert latent.max_abs_logit_diff > 100 * max(baked.max_abs_logit_diff, 1e-7)  # not what training computed
    assert any("bake_qat=False" in n for n in latent.notes)
    w_baked = load_file(str(tmp_path / "baked" / "model.safetensors"))
    w_latent = load_file(str(tmp_path / "latent" / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert not torch.equal(w_latent[name], w_baked[name])
        assert torch.equal(fake_quantize(w_latent[name], bits=4, group_size=32), w_baked[name]), name


def test_full_qat_run_bakes_onto_the_int4_grid(runs, tmp_path):
    """A full fine-tuning QAT run: the baked model computes what training did, and int4 PTQ of it is lossless."""
    from effine.export.ptq import load_ptq_model, ptq_export

    rep = merge_run(runs["qat-full"], tmp_path / "baked", dtype="fp32")
    assert rep.adapter is None and rep.merged_modules == 0 and rep.qat["baked"] is True
    assert _rel(rep) <= TOL_FP32 and rep.argmax_agreement == 1.0
    ptq_export(tmp_path / "baked", tmp_path / "int4", bits=4, group_size=32)
    q = load_ptq_model(tmp_path / "int4", "fp32")
    baked = load_file(str(tmp_path / "baked" / "model.safetensors"))
    for i in range(2):
        name = f"model.layers.{i}.mlp.gate_proj.weight"
        torch.testing.assert_close(q.state_dict()[name], baked[name], rtol=1e-6, atol=0)


def test_refuses_what_it_cannot_merge(runs, tmp_path):
    with pytest.raises(ConfigError, match="no config.yaml.*adapter dir"):
        merge_run(runs["none-bf16"] / "adapter")
    with pytest.raises(ConfigError, match="dtype"):
        merge_run(runs["none-bf16"], dtype="int4")
    with pytest.raises(ConfigError, match="overwrite"):
        merge_run(runs["none-bf16"], runs["none-bf16"] / "adapter")
    plain_full = tmp_path / "full-run"  # a full fine-tuning run without QAT (only its config matters here)
    plain_full.mkdir()
    text = (runs["qat-full"] / "config.yaml").read_text()
    assert "qat_bits: 4" in text
    (plain_full / "config.yaml").write_text(text.replace("qat_bits: 4", "qat_bits: null"))
    with pytest.raises(ConfigError, match="nothing to merge"):
        merge_run(plain_full)
