"""QuantLinear, FakeQuantLinear (QAT, also under LoRA), model swaps and the PTQ state-dict format."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from effine.adapters import LoRALinear, inject_lora, lora_modules, merge_lora
from effine.config import AdapterConfig
from effine.errors import ConfigError
from effine.quant import (
    FakeQuantLinear,
    QuantLinear,
    apply_qat,
    fake_quantize,
    load_ptq_state_dict,
    ptq_quantize_state_dict,
    quantize_model,
    unwrap_qat,
)

METHODS = ["nf4", "fp4", "int8", "int4"]


def _linear(i=96, o=48, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(i, o, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(3.0)
        if bias:
            lin.bias.uniform_(-0.5, 0.5)
    return lin


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dequantized_linear(method, bias):
    lin = _linear(bias=bias)
    ql = QuantLinear.from_linear(lin, method=method, group_size=32)
    assert (ql.in_features, ql.out_features, ql.compute_dtype) == (96, 48, torch.float32)
    w = ql.dequantize()
    assert w.shape == (48, 96) and w.dtype == torch.float32
    x = torch.randn(2, 5, 96)
    torch.testing.assert_close(ql(x), F.linear(x, w, ql.bias), rtol=0, atol=0)
    # and the quantized weight is close to the original
    rel = (w - lin.weight).norm() / lin.weight.norm()
    assert rel < (0.01 if method == "int8" else 0.15)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_input_grad_and_lora_grads_match_dense_reference(method, device):
    torch.backends.cuda.matmul.allow_tf32 = False
    lin = _linear(bias=True, seed=1).to(device)
    ql = QuantLinear.from_linear(lin, method=method, group_size=32)
    w = ql.dequantize().detach()
    torch.manual_seed(2)
    up = nn.Linear(16, 96).to(device)  # a trainable layer below, so the gradient has to flow through ql
    a = (torch.randn(4, 96) * 0.1).to(device).requires_grad_()  # LoRA A (r=4) and B on top of the frozen layer
    b = (torch.randn(48, 4) * 0.1).to(device).requires_grad_()
    x0 = torch.randn(3, 7, 16).to(device)
    g = torch.randn(3, 7, 48).to(device)

    def run(base):
        for t in (a, b, *up.parameters()):
            t.grad = None
        h = up(x0)
        y = base(h) + (h @ a.t()) @ b.t() * 2.0
        (y * g).sum().backward()
        return [t.grad.clone() for t in (a, b, up.weight, up.bias)]

    got = run(ql)
    ref = run(lambda h: F.linear(h, w, ql.bias))
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert ql.bias.grad is None


def test_no_weight_parameter_and_frozen():
    ql = QuantLinear.from_linear(_linear(), method="nf4")
    names = [n for n, _ in ql.named_parameters()]
    assert names == ["bias"] and not ql.bias.requires_grad
    assert "qweight" in dict(ql.named_buffers())
    assert not any(p.requires_grad for p in ql.parameters())
    x = torch.randn(2, 96, requires_grad=True)
    ql(x).sum().backward()
    assert x.grad is not None


def test_backward_does_not_save_dense_weight():
    ql = QuantLinear.from_linear(_linear(i=256, o=256), method="nf4")
    x = torch.randn(4, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ql(x)
    assert not any(t.numel() >= 256 * 256 for t in saved)  # no (O, I) tensor kept for backward
    y.sum().backward()


def test_nf4_storage_is_under_30_percent_of_bf16():
    lin = nn.Linear(1024, 1024, bias=False)
    ql = QuantLinear.from_linear(lin, method="nf4", double_quant=True)
    bf16_bytes = 1024 * 1024 * 2
    assert ql.nbytes() <= 0.3 * bf16_bytes
    assert QuantLinear.from_linear(lin, method="nf4", double_quant=False).nbytes() > ql.nbytes()
    assert QuantLinear.from_linear(lin, method="int4", group_size=128).nbytes() <= 0.3 * bf16_bytes
    assert QuantLinear.from_linear(lin, method="int8", group_size=128).nbytes() <= 0.55 * bf16_bytes


@pytest.mark.parametrize(
    "method,symmetric", [("nf4", True), ("fp4", True), ("int8", True), ("int8", False), ("int4", True), ("int4", False)]
)
def test_state_dict_round_trip(method, symmetric):
    kw = dict(method=method, group_size=32, symmetric=symmetric, double_quant=True)
    ql = QuantLinear.from_linear(_linear(i=100, o=30), **kw)  # 100 columns: ragged last group
    buf = io.BytesIO()
    torch.save(ql.state_dict(), buf)
    buf.seek(0)
    fresh = QuantLinear(100, 30, bias=True, **kw)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh.dequantize(), ql.dequantize())
    x = torch.randn(3, 100)
    assert torch.equal(fresh(x), ql(x))


def test_bf16_compute_and_dtype_handling():
    ql = QuantLinear.from_linear(_linear(), method="nf4", compute_dtype=torch.bfloat16)
    assert ql.dequantize().dtype == torch.bfloat16 and ql.bias.dtype == torch.bfloat16
    x = torch.randn(2, 96)
    y = ql(x)
    assert y.dtype == torch.float32  # returned in the input's dtype
    torch.testing.assert_close(y, F.linear(x.bfloat16(), ql.dequantize(), ql.bias).float())


def test_config_errors():
    with pytest.raises(ConfigError, match="method"):
        QuantLinear(8, 8, method="int3")
    with pytest.raises(ConfigError, match="blocksize"):
        QuantLinear(8, 8, method="nf4", blocksize=100)
    with pytest.raises(ConfigError, match="group_size"):
        QuantLinear(8, 8, method="int4", group_size=-1)
    with pytest.raises(ConfigError, match="bits"):
        FakeQuantLinear(nn.Linear(4, 4), bits=3)


# ------------------------------------------------------------------------------------------------- QAT


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (4, 64)])
def test_fake_quant_linear_ste(bits, group_size):
    lin = _linear(i=64, o=16)
    fq = FakeQuantLinear.from_linear(lin, bits=bits, group_size=group_size)
    assert fq.weight is lin.weight and fq.bias is lin.bias  # shared, still trainable
    x = torch.randn(5, 64, requires_grad=True)
    g = torch.randn(5, 16)
    (fq(x) * g).sum().backward()
    wq = fake_quantize(lin.weight, bits=bits, group_size=group_size, per_channel=group_size is None)
    wq.requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y = F.linear(x2, wq, lin.bias)
    torch.testing.assert_close(y, fq(x.detach()))
    (y * g).sum().backward()
    # straight-through: dL/dW equals dL/dW_q (identity through the rounding; nothing is clamped)
    torch.testing.assert_close(lin.weight.grad, wq.grad)
    torch.testing.assert_close(x.grad, x2.grad)


def test_fake_quant_training_step_and_unwrap():
    lin = _linear(i=64, o=16)
    fq = FakeQuantLinear(lin, bits=4, group_size=32)
    opt = torch.optim.SGD(fq.parameters(), lr=0.1)
    before = lin.weight.detach().clone()
    fq(torch.randn(4, 64)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(before, lin.weight)
    plain = fq.to_linear()
    assert isinstance(plain, nn.Linear) and plain.weight is lin.weight
    baked = FakeQuantLinear(plain, bits=4, group_size=32).to_linear(bake=True)
    torch.testing.assert_close(baked.weight, fake_quantize(baked.weight, bits=4, group_size=32))


# ------------------------------------------------------------------------------------------ QAT + LoRA


def _lora_on_qat(bits=4, group_size=32, symmetric=True, bias=True, dropout=0.0, seed=0):
    """LoRALinear(FakeQuantLinear(W)) with a frozen W (as inject_lora leaves it) and a nonzero B (s = 8 / 4 = 2)."""
    lin = _linear(i=64, o=16, bias=bias, seed=seed)
    for p in lin.parameters():
        p.requires_grad_(False)
    fq = FakeQuantLinear(lin, bits=bits, group_size=group_size, symmetric=symmetric)
    torch.manual_seed(seed + 1)
    lora = LoRALinear(fq, r=4, alpha=8.0, dropout=dropout)
    with torch.no_grad():
        lora.lora_B.weight.normal_(0.0, 0.5)  # s·B A is then about a quantization step or more of W
    return lora


def _fq_settings(lora):
    b = lora.base
    return dict(bits=b.bits, symmetric=b.symmetric, group_size=b.group_size, per_channel=b.group_size is None)


QAT_SETTINGS = [(4, 32, True), (8, None, True), (4, 24, False)]  # 24: a ragged last group (64 = 2·24 + 16)


@pytest.mark.parametrize("bits,group_size,symmetric", QAT_SETTINGS)
@pytest.mark.parametrize("bias", [True, False])
def test_lora_on_qat_forward_fake_quantizes_the_merged_weight(bits, group_size, symmetric, bias):
    lora = _lora_on_qat(bits, group_size, symmetric, bias)
    W, A, B, s = lora.base.weight, lora.lora_A.weight, lora.lora_B.weight, lora.scale
    assert s == 2.0 and B.abs().min() > 0
    x = torch.randn(5, 64)
    wq = fake_quantize(W + s * (B @ A), **_fq_settings(lora))  # by hand, with the affine module's quantizer
    torch.testing.assert_close(lora(x), F.linear(x, wq, lora.base.bias), rtol=1e-6, atol=1e-6)
    # The layer's effective weight (read back through identity inputs) lies on the quantization grid: PTQ of it
    # with the same settings changes nothing, i.e. the adapters saw exactly the rounding PTQ will apply.
    w_eff = lora(torch.eye(64)).detach().T - (0 if lora.base.bias is None else lora.base.bias[:, None])
    torch.testing.assert_close(w_eff, wq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fake_quantize(w_eff, **_fq_settings(lora)), w_eff, rtol=1e-6, atol=1e-6)


def test_lora_on_qat_differs_from_quantizing_w_only():
    """The old behaviour, base_fq(x) + s·B A x, is not what the layer computes once B != 0 (it would pass at B = 0)."""
    lora = _lora_on_qat()
    x = torch.randn(5, 64)
    old = lora.base(x) + lora.scale * F.linear(F.linear(x, lora.lora_A.weight), lora.lora_B.weight)
    assert (lora(x) - old).abs().max() > 1e-2
    with torch.no_grad():
        lora.lora_B.weight.zero_()
    torch.testing.assert_close(lora(x), lora.base(x), rtol=0, atol=0)  # B = 0: fq(W + 0) = fq(W)


@pytest.mark.parametrize("bits,group_size,symmetric", QAT_SETTINGS)
def test_lora_on_qat_gradients_match_a_hand_built_ste(bits, group_size, symmetric):
    lora = _lora_on_qat(bits, group_size, symmetric)
    x = torch.randn(5, 64, requires_grad=True)
    g = torch.randn(5, 16)
    (lora(x) * g).sum().backward()
    assert lora.base.weight.grad is None  # the frozen W gets nothing; A and B get everything
    # Reference: autograd through wm + (fq(wm) - wm).detach(), the straight-through estimator written out (nothing
    # is clamped, since the scales come from the merged weight's own range, so the STE is the identity).
    A = lora.lora_A.weight.detach().clone().requires_grad_()
    B = lora.lora_B.weight.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    wm = lora.base.weight + lora.scale * (B @ A)
    wq = wm + (fake_quantize(wm, **_fq_settings(lora)) - wm).detach()
    (F.linear(x2, wq, lora.base.bias) * g).sum().backward()
    torch.testing.assert_close(lora.lora_A.weight.grad, A.grad)
    torch.testing.assert_close(lora.lora_B.weight.grad, B.grad)
    torch.testing.assert_close(x.grad, x2.grad)
    assert A.grad.abs().sum() > 0 and B.grad.abs().sum() > 0


def test_lora_on_qat_bf16_activations_fp32_adapters():
    lin = _linear(i=64, o=16).to(torch.bfloat16).requires_grad_(False)
    lora = LoRALinear(FakeQuantLinear(lin, bits=4, group_size=32), r=4, alpha=8.0, dtype=torch.float32)
    with torch.no_grad():
        lora.lora_B.weight.normal_(0.0, 0.5)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    y = lora(x)
    assert y.dtype == torch.bfloat16
    # merged in fp32 from the master weights, fake-quantized in fp32, cast to bf16 last
    wm = lin.weight.float() + lora.scale * (lora.lora_B.weight @ lora.lora_A.weight)
    wq = fake_quantize(wm, bits=4, group_size=32).to(torch.bfloat16)
    torch.testing.assert_close(y, F.linear(x, wq, lin.bias), rtol=0, atol=0)
    y.float().sum().backward()
    assert lora.lora_A.weight.grad.dtype == torch.float32 and lora.lora_B.weight.grad.abs().sum() > 0


def test_lora_on_qat_refuses_dropout_while_training():
    model = nn.Sequential(nn.ModuleList([_linear(i=64, o=16)]))
    apply_qat(model, bits=4, group_size=32)
    with pytest.raises(ConfigError, match=r"adapter\.dropout=0\.1 .*quant\.qat_bits.*Set adapter\.dropout=0"):
        inject_lora(model, AdapterConfig(r=4, alpha=8, dropout=0.1))
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())  # left untouched
    assert inject_lora(model, AdapterConfig(r=4, alpha=8, dropout=0.0)) == ["0.0"]

    # Built directly (as load_adapter does from a saved lora_dropout): fine for inference, refused in training.
    lora = _lora_on_qat(dropout=0.1)
    x = torch.randn(3, 64)
    with pytest.raises(ConfigError, match=r"adapter\.dropout.*quant\.qat_bits"):
        lora(x)
    lora.eval()
    ref = _lora_on_qat(dropout=0.0)
    torch.testing.assert_close(lora(x), ref(x), rtol=0, atol=0)


def test_lora_on_qat_merge_gives_latent_weight_and_ptq_gives_training_forward():
    lora = _lora_on_qat()
    W, A, B, s = lora.base.weight, lora.lora_A.weight, lora.lora_B.weight, lora.scale
    merged = lora.merged()
    assert isinstance(merged, nn.Linear)
    assert torch.equal(merged.weight, W + s * (B @ A))  # unquantized: PTQ happens at export
    qsd = ptq_quantize_state_dict({"l.weight": merged.weight, "l.bias": merged.bias}, bits=4, group_size=32)
    deployed = load_ptq_state_dict(qsd)["l.weight"]
    x = torch.randn(5, 64)
    torch.testing.assert_close(F.linear(x, deployed, merged.bias), lora(x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------- model swaps


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_quantize_model_tiny_llama():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    old = model.model.layers[0].mlp.up_proj
    n = quantize_model(model, "nf4")
    assert n == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head and embeddings are kept
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.layers[1].self_attn.o_proj, QuantLinear)
    assert old.weight is None  # the dense weight was released
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    out = model(ids, labels=ids)
    assert (out.logits - ref).abs().max() < 0.5 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None  # gradient flowed through every QuantLinear

    with pytest.raises(ConfigError, match="bits"):
        quantize_model(_tiny_llama(), "int4", bits=4)

    model2 = _tiny_llama()
    n2 = quantize_model(model2, "int4", filter_fn=lambda name, m: name.endswith("q_proj"), group_size=32)
    assert n2 == 2 and isinstance(model2.model.layers[0].self_attn.k_proj, nn.Linear)


def test_quantize_model_skip_modules_tiny_llama():
    model = _tiny_llama()
    n = quantize_model(model, "nf4", skip_modules=["v_proj", "model.layers.0.mlp.down_proj"])
    assert n == 14 - 3
    layers = model.model.layers
    assert all(isinstance(layers[i].self_attn.v_proj, nn.Linear) for i in (0, 1))
    assert isinstance(layers[0].mlp.down_proj, nn.Linear) and isinstance(layers[1].mlp.down_proj, QuantLinear)
    assert layers[0].self_attn.v_proj.weight is not None  # kept dense, not released
    # A typo must not silently quantize the layer the user meant to keep; the head is not quantizable anyway.
    for bad in (["v_prj"], ["lm_head"], ["layers.0.mlp"]):
        with pytest.raises(ConfigError, match=r"quant.skip_modules: '.*' names no quantizable linear layer.*"
                                              r"end in: .*v_proj"):
            quantize_model(_tiny_llama(), "nf4", skip_modules=bad)


def test_check_quant_settings():
    from effine.config import load_config
    from effine.quant import check_quant_settings

    ok = load_config(None, ["quant.method=nf4", "quant.skip_modules=[v_proj]"])
    check_quant_settings(ok.quant, ok.adapter.method)
    for sets, match in ((["quant.skip_modules=[v_proj]"], "quant.skip_modules: only applies"),
                        (["quant.skip_modules=[v_proj]", "quant.qat_bits=4"], "QAT fake-quantizes every linear"),
                        (["quant.method=nf4", "adapter.method=full"], "quant.method: a quantized base is frozen")):
        cfg = load_config(None, sets)
        with pytest.raises(ConfigError, match=match):
            check_quant_settings(cfg.quant, cfg.adapter.method)


def test_apply_and_unwrap_qat_tiny_llama():
    model = _tiny_llama()
    params_before = {n: p for n, p in model.named_parameters()}
    assert apply_qat(model, bits=4, group_size=32) == 14
    ids = torch.randint(0, 128, (2, 12))
    model(ids, labels=ids).loss.backward()
    fq = model.model.layers[0].self_attn.q_proj
    assert isinstance(fq, FakeQuantLinear) and fq.weight.grad is not None
    assert unwrap_qat(model) == 14
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    params_after = {n: p for n, p in model.named_parameters()}
    assert params_after.keys() == params_before.keys()
    assert all(params_after[n] is params_before[n] for n in params_before)  # same trained tensors


def test_qat_lora_tiny_llama_merge_then_ptq_matches_training_logits():
    """build_model's order (QAT, then LoRA): merge_lora + int4 PTQ with the QAT settings gives the same logits."""
    model = _tiny_llama()
    assert apply_qat(model, bits=4, group_size=32) == 14
    assert len(inject_lora(model, AdapterConfig(r=4, alpha=8))) == 14
    assert all(isinstance(m.base, FakeQuantLinear) for m in lora_modules(model).values())
    torch.manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0.0, 0.5)
    ids = torch.randint(0, 128, (2, 12))
    model(ids, labels=ids).loss.backward()
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.lora_A.weight.grad.abs().sum() > 0 and q_proj.base.weight.grad is None
    with torch.no_grad():
        trained = model(ids).logits
    merge_lora(model)
    assert not any(isinstance(m, (LoRALinear, FakeQuantLinear)) for m in model.modules())
    sd = model.state_dict()
    qsd = ptq_quantize_state_dict(sd, bits=4, group_size=32)
    assert sum(k.endswith(".qmeta") for k in qsd) == 14
    model.load_state_dict(load_ptq_state_dict(qsd))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, None)])
def test_ptq_state_dict_round_trip(bits, group_size, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = _tiny_llama()
    sd = model.state_dict()
    qsd = ptq_quantize_state_dict(sd, bits=bits, group_size=group_size)
    name = "model.layers.0.mlp.down_proj"  # (64, 128)
    assert f"{name}.weight" not in qsd
    assert qsd[f"{name}.qweight"].shape == ((64, 64) if bits == 4 else (64, 128))
    assert qsd[f"{name}.qweight"].dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert qsd[f"{name}.scales"].shape == (64, 4 if group_size else 1)
    assert qsd[f"{name}.qmeta"].tolist() == [bits, group_size or 0, 128, 0]
    assert "lm_head.weight" in qsd and "model.embed_tokens.weight" in qsd  # kept dense
    path = tmp_path / "q.safetensors"
    safetensors_torch.save_file(qsd, str(path))
    loaded = load_ptq_state_dict(safetensors_torch.load_file(str(path)))
    assert loaded.keys() == sd.keys()
    for k, w in sd.items():
        if k.endswith(f"{name}.weight") or ("proj" in k and k.endswith(".weight")):
            s = qsd[k[: -len(".weight")] + ".scales"]
            s_el = s.repeat_interleave(group_size, dim=1)[:, : w.shape[1]] if group_size else s
            assert ((loaded[k] - w).abs() <= s_el * (0.5 + 1e-4)).all(), k
        else:
            assert torch.equal(loaded[k], w), k
    model.load_state_dict(loaded)
    ids = torch.randint(0, 128, (1, 8))
    assert torch.isfinite(model(ids).logits).all()
