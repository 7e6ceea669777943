"""effine.export.ptq: export a model dir to group-wise int4/int8, load it back (dense or QuantLinear)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from effine.errors import ConfigError, ModelError
from effine.export.ptq import PTQ_CONFIG_KEY, PTQ_WEIGHTS_NAME, is_ptq_dir, load_ptq_model, ptq_export
from effine.model.tiny import tiny_model
from effine.quant import QuantLinear, fake_quantize

LINEARS = [f"model.layers.{i}.{p}" for i in range(2) for p in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def _save_tiny(path, dtype=torch.float32, **kw):
    model = tiny_model("llama", seed=0, dtype=dtype, **kw)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-src")
    _save_tiny(path)
    return path


def _ids(n=24, seed=0):
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _expand_scales(scales: torch.Tensor, group: int, cols: int) -> torch.Tensor:
    """(O, n_groups) -> (O, I): the scale S that applies to each weight."""
    return scales.repeat_interleave(group or cols, dim=1)[:, :cols]


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (8, 32, True), (4, 48, False), (4, None, True)])
def test_round_trip_is_the_fake_quantized_weight(tiny_dir, tmp_path, bits, group, symmetric):
    src = tiny_model("llama", seed=0)
    rep = ptq_export(tiny_dir, tmp_path, bits=bits, group_size=group, symmetric=symmetric)
    assert rep.quantized_modules == len(LINEARS)
    q = load_ptq_model(tmp_path, "fp32")
    qsd = load_file(str(tmp_path / PTQ_WEIGHTS_NAME))
    for name in LINEARS:
        w = src.get_submodule(name).weight.detach()
        got = q.get_submodule(name).weight.detach()
        assert isinstance(q.get_submodule(name), nn.Linear)
        # exactly what QAT's forward computes with the same settings ...
        assert torch.equal(got, fake_quantize(w, bits, symmetric, group, per_channel=group is None))
        # ... and never more than half a quantization step away from the original (round to nearest)
        s = _expand_scales(qsd[f"{name}.scales"], group, w.shape[1])
        assert bool(((got - w).abs() <= s / 2 * (1 + 1e-5)).all())
    # everything else is copied bit for bit
    for k, t in src.state_dict().items():
        if not any(k.startswith(n + ".") for n in LINEARS):
            assert torch.equal(q.state_dict()[k], t), k


def test_on_disk_format_and_files(tiny_llama_dir, tmp_path):
    rep = ptq_export(tiny_llama_dir, tmp_path, bits=4, group_size=32)
    assert is_ptq_dir(tmp_path) and not is_ptq_dir(tiny_llama_dir)
    with safe_open(str(tmp_path / PTQ_WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()[PTQ_CONFIG_KEY])
        q = f.get_tensor("model.layers.0.mlp.down_proj.qweight")  # (64, 128) -> (64, 64) packed
        s = f.get_tensor("model.layers.0.mlp.down_proj.scales")
        z = f.get_tensor("model.layers.0.mlp.down_proj.zeros")
        m = f.get_tensor("model.layers.0.mlp.down_proj.qmeta")
    assert (q.dtype, tuple(q.shape)) == (torch.uint8, (64, 64))
    assert (s.dtype, tuple(s.shape)) == (torch.float32, (64, 4))
    assert (z.dtype, tuple(z.shape), bool(z.any())) == (torch.int8, (64, 4), False)
    assert m.tolist() == [4, 32, 128, 0]
    assert "model.layers.0.mlp.down_proj.weight" not in keys and "model.embed_tokens.weight" in keys
    assert "lm_head.weight" in keys  # untied in this model: stays dense
    config = json.loads((tmp_path / "config.json").read_text())
    assert {k: config[PTQ_CONFIG_KEY][k] for k in ("bits", "group_size", "symmetric")} == \
        {"bits": 4, "group_size": 32, "symmetric": True} == {k: meta[k] for k in ("bits", "group_size", "symmetric")}
    assert "quantization_config" not in config
    for f in ("tokenizer.json", "tokenizer_config.json", "ptq_report.json"):
        assert (tmp_path / f).is_file(), f
    side = [f.name for f in tiny_llama_dir.iterdir() if f.suffix in (".json", ".jinja", ".txt") and
            f.name not in ("config.json", "model.safetensors.index.json")]
    assert side and all((tmp_path / f).is_file() for f in side), side  # every side file is copied
    assert not (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "ptq_report.json").read_text()) == rep.to_dict()
    # transformers must not quietly build a random model from this dir
    from transformers import AutoModelForCausalLM

    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))


def test_size_int4_under_0_3_of_fp32(tiny_dir, tmp_path):
    rep = ptq_export(tiny_dir, tmp_path / "q4", bits=4, group_size=128)
    qsd = load_file(str(tmp_path / "q4" / PTQ_WEIGHTS_NAME))
    on_disk = sum(qsd[f"{n}.{s}"].numel() * qsd[f"{n}.{s}"].element_size()
                  for n in LINEARS for s in ("qweight", "scales", "zeros", "qmeta"))
    assert rep.linear_bytes_after == on_disk
    assert rep.linear_bytes_fp32 == 4 * rep.quantized_params == rep.linear_bytes_before
    assert rep.ratio_vs_fp32 <= 0.3, rep  # 0.5 byte per weight + one fp32 scale and int8 zero per row here
    assert rep.total_bytes_after < rep.total_bytes_before
    rep8 = ptq_export(tiny_dir, tmp_path / "q8", bits=8, group_size=128)
    assert rep.linear_bytes_after < rep8.linear_bytes_after < rep8.linear_bytes_fp32


def test_keep_quantized_matches_dense(tiny_dir, tmp_path):
    ptq_export(tiny_dir, tmp_path, bits=4, group_size=32, symmetric=False)
    dense = load_ptq_model(tmp_path, "fp32")
    packed = load_ptq_model(tmp_path, "fp32", keep_quantized=True)
    for name in LINEARS:
        mod = packed.get_submodule(name)
        assert isinstance(mod, QuantLinear) and mod.method == "int4" and mod.group_size == 32
        assert torch.equal(mod.dequantize(), dense.get_submodule(name).weight)
    with torch.no_grad():
        torch.testing.assert_close(packed(_ids()).logits, dense(_ids()).logits, rtol=0, atol=1e-5)


def test_tied_embeddings_stored_once(tmp_path):
    _save_tiny(tmp_path / "src", tie_word_embeddings=True)
    ptq_export(tmp_path / "src", tmp_path / "q", bits=8, group_size=32)
    keys = set(load_file(str(tmp_path / "q" / PTQ_WEIGHTS_NAME)))
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    for keep in (False, True):
        m = load_ptq_model(tmp_path / "q", "fp32", keep_quantized=keep)
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_bf16_model_keeps_its_dtype(tmp_path):
    src = _save_tiny(tmp_path / "src", dtype=torch.bfloat16)
    ptq_export(tmp_path / "src", tmp_path / "q", bits=8, group_size=32)
    assert load_file(str(tmp_path / "q" / PTQ_WEIGHTS_NAME))["model.layers.0.mlp.up_proj.qmeta"][3] == 2
    m = load_ptq_model(tmp_path / "q", dtype=None)
    assert m.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(m.model.norm.weight, src.model.norm.weight)


def test_logit_error_within_first_order_bound_from_half_a_step(tiny_dir, tmp_path):
    """|f(W_q) - f(W)| <= sum |df/dW| * S/2 (+ second order), for scalar outputs f of the model.

    Each weight moves by at most S/2 (S its group's scale), so to first order no output can move by more than
    the gradient-weighted sum of the half steps. Checked for a few logits and the sequence log-likelihood, at
    4 and 8 bits; the bound is loose (every error taken with the worst sign) but derived, not tuned.
    """
    src = tiny_model("llama", seed=0)
    ids = _ids(32, seed=1)
    seen = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only waits on a busy machine
    try:
        _check_bounds(tiny_dir, tmp_path, src, ids, seen)
    finally:
        torch.set_num_threads(threads)
    assert all(seen[(8, w)] < seen[(4, w)] for (_, w) in seen)  # more bits, smaller error


def _check_bounds(tiny_dir, tmp_path, src, ids, seen):
    for bits in (4, 8):
        out = tmp_path / f"q{bits}"
        ptq_export(tiny_dir, out, bits=bits, group_size=32)
        qsd = load_file(str(out / PTQ_WEIGHTS_NAME))
        q = load_ptq_model(out, "fp32")
        with torch.no_grad():
            q_logits = q(ids).logits[0]
        src.zero_grad()
        logits = src(ids).logits[0]
        top = logits[-1].topk(3).indices.tolist()
        logp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None]).sum()
        scalars = [("logit", logits[-1, k], q_logits[-1, k]) for k in top]
        scalars.append(("loglik", logp, torch.log_softmax(q_logits[:-1], -1).gather(1, ids[0, 1:, None]).sum()))
        weights = {n: src.get_submodule(n).weight for n in LINEARS}
        half_steps = {n: _expand_scales(qsd[f"{n}.scales"], 32, w.shape[1]) / 2 for n, w in weights.items()}
        for what, f, f_q in scalars:
            grads = torch.autograd.grad(f, list(weights.values()), retain_graph=True)
            bound = sum(float((g.abs() * half_steps[n]).sum()) for n, g in zip(weights, grads))
            actual = abs(float(f_q) - float(f.detach()))
            assert actual <= bound, (bits, what, actual, bound)
            seen[(bits, what)] = actual


def test_refusals(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="bits"):
        ptq_export(tiny_dir, tmp_path / "x", bits=3)
    ptq_export(tiny_dir, tmp_path / "q", bits=4, group_size=32)
    with pytest.raises(ConfigError, match="already"):
        ptq_export(tmp_path / "q", tmp_path / "qq")
    with pytest.raises(ModelError, match="not an effine PTQ export"):
        load_ptq_model(tiny_dir)
