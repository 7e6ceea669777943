"""LoRALinear math and the pure helpers over the module tree (inject, merge, parameters, errors)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from effine.adapters import (LoRALinear, count_parameters, inject_lora, lora_parameters, lora_state_dict, merge_lora,
                             target_modules_for)
from effine.config import AdapterConfig
from effine.errors import ConfigError


class Block(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.up_proj = nn.Linear(d, 2 * d, bias=True)
        self.down_proj = nn.Linear(2 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.q_proj(x)
        return x + self.down_proj(torch.relu(self.up_proj(x)))


class TinyLM(nn.Module):
    """Embedding, a ModuleList of blocks, lm_head: the shape default discovery relies on."""

    def __init__(self, vocab: int = 32, d: int = 16, n: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


def _model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def _randomise_b(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


IDS = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(0))


def test_output_equals_base_at_init() -> None:
    model = _model()
    ref = model(IDS)
    names = inject_lora(model, AdapterConfig(r=4, alpha=8))
    assert names == [f"layers.{i}.{s}" for i in range(2) for s in ("q_proj", "up_proj", "down_proj")]
    assert "lm_head" not in target_modules_for(model)
    torch.testing.assert_close(model(IDS), ref, rtol=0, atol=0)


def test_only_lora_params_require_grad() -> None:
    model = _model()
    inject_lora(model, AdapterConfig(r=4, alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    n_lora = sum(4 * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LoRALinear))
    trainable_count, total = count_parameters(model)
    assert trainable_count == n_lora and total == sum(p.numel() for p in model.parameters())
    keys = set(lora_state_dict(model))
    assert "base_model.model.layers.0.q_proj.lora_A.weight" in keys and len(keys) == 12


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling(rslora: bool) -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    lora = LoRALinear(base, r=4, alpha=6.0, rslora=rslora)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x = torch.randn(3, 8)
    s = 6.0 / (math.sqrt(4) if rslora else 4)
    assert lora.scale == pytest.approx(s)
    expected = base(x) + s * x @ lora.lora_A.weight.T @ lora.lora_B.weight.T
    torch.testing.assert_close(lora(x), expected, rtol=1e-6, atol=1e-6)


def test_merge_equals_unmerged() -> None:
    model = _model()
    inject_lora(model, AdapterConfig(r=4, alpha=8, rslora=True))
    _randomise_b(model)
    unmerged = model(IDS)
    merged_model = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged_model.modules())
    assert type(merged_model.layers[0].up_proj) is nn.Linear and merged_model.layers[0].up_proj.bias is not None
    torch.testing.assert_close(merged_model(IDS), unmerged, rtol=0, atol=1e-5)


def test_dropout_only_in_train_mode() -> None:
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(32, 32), r=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x = torch.randn(4, 32)
    lora.eval()
    torch.testing.assert_close(lora(x), lora(x))
    lora.train()
    assert not torch.allclose(lora(x), lora(x))
    # injected modules follow the model's mode
    model = _model().eval()
    inject_lora(model, AdapterConfig(r=2, alpha=2, dropout=0.5))
    assert not any(m.training for m in model.modules())


def test_bad_target_modules_suggests() -> None:
    with pytest.raises(ConfigError, match=r"adapter\.target_modules: no module matches 'q_prj'.*did you mean 'q_proj'"):
        inject_lora(_model(), AdapterConfig(target_modules=["q_prj"]))
    with pytest.raises(ConfigError, match=r"adapter\.target_modules: 'layers' .*not a linear layer"):
        inject_lora(_model(), AdapterConfig(target_modules=["layers"]))
    with pytest.raises(ConfigError, match=r"adapter\.target_modules"):
        inject_lora(_model(), AdapterConfig(target_modules=[]))


def test_explicit_targets_are_suffixes() -> None:
    model = _model()
    names = inject_lora(model, AdapterConfig(target_modules=["q_proj", "layers.1.down_proj"]))
    assert names == ["layers.0.q_proj", "layers.1.q_proj", "layers.1.down_proj"]


class FakeQuantLinear(nn.Module):
    """A duck-typed quantized linear: int8 weight + per-row scale, dequantize() gives the (out, in) weight."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w = lin.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127  # (out, 1)
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))  # (out, in)
        self.register_buffer("scale", scale)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone())

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantize(), self.bias)


def test_dequantize_base_merges() -> None:
    model = _model()
    for block in model.layers:
        block.up_proj = FakeQuantLinear(block.up_proj)
    names = inject_lora(model, AdapterConfig(r=4, alpha=8))
    assert "layers.0.up_proj" in names  # duck-typed linears are found by default discovery
    lora = model.layers[0].up_proj
    assert isinstance(lora.base, FakeQuantLinear) and lora.lora_A.weight.dtype == torch.float32
    _randomise_b(model)
    unmerged = model(IDS)
    merge_lora(model)
    up = model.layers[0].up_proj
    assert type(up) is nn.Linear and up.weight.dtype == torch.float32 and up.bias is not None
    torch.testing.assert_close(model(IDS), unmerged, rtol=0, atol=1e-5)


def test_fp32_adapter_on_bf16_base() -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    lora = LoRALinear(base, r=4, alpha=8, dtype=torch.float32)
    assert lora.lora_A.weight.dtype == torch.float32
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    y = lora(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lora.lora_B.weight.grad is not None and lora.lora_B.weight.grad.dtype == torch.float32
    assert lora.merged().weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_fused_path_matches_fp64_math(dtype, tol, bias, device) -> None:
    """The one-node fast path (frozen dense base, no active dropout): output and the gradients of x, A and B equal
    y = x W^T + b + s (x A^T) B^T differentiated in fp64 (fp32: 1e-5 relative; bf16: bf16 rounding). The unfused
    path (forced by a module that is not a plain nn.Linear) gives the same result."""
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    base = nn.Linear(24, 40, bias=bias).to(dtype).requires_grad_(False).to(device)
    m = LoRALinear(base, r=4, alpha=8, dtype=torch.float32)
    with torch.no_grad():
        m.lora_B.weight.normal_()
    x = torch.randn(3, 5, 24).to(dtype).to(device)

    def run(mod):
        xx = x.clone().requires_grad_()
        y = mod(xx)
        g = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype).to(y.device)
        ga, gb, gx = torch.autograd.grad(y, (mod.lora_A.weight, mod.lora_B.weight, xx), g)
        return y, ga, gb, gx

    def ref():
        W, A, B = (t.detach().cpu().double().requires_grad_()
                   for t in (base.weight, m.lora_A.weight, m.lora_B.weight))
        xx = x.cpu().double().requires_grad_()
        y = xx @ W.T + m.scale * (xx @ A.T) @ B.T
        if bias:
            y = y + base.bias.cpu().double()
        g = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(dtype).double()
        ga, gb, gx = torch.autograd.grad(y, (A, B, xx), g)
        return y, ga, gb, gx

    rel = lambda a, b: ((a.cpu().double() - b.cpu()).norm() / b.norm()).item()  # noqa: E731
    fused = run(m)
    assert fused[1].dtype == fused[2].dtype == torch.float32  # fp32 gradients for the fp32 master weights
    for got, want in zip(fused, ref()):
        assert rel(got, want) < tol

    class NotPlain(nn.Linear):  # same math, but not the fused path's exact type
        pass

    other = NotPlain(24, 40, bias=bias).to(dtype).requires_grad_(False).to(device)
    other.load_state_dict(base.state_dict())
    m2 = LoRALinear(other, r=4, alpha=8, dtype=torch.float32)
    m2.load_state_dict(m.state_dict())
    for got, want in zip(fused, run(m2)):
        assert rel(got, want.double()) < tol


def test_count_parameters_counts_quantized_weights_logically() -> None:
    """A QLoRA model reports the same total as the dense model with the same adapters (the packed 4-bit buffer is
    not a parameter, so it used to drop out of the total), and the same trainable count."""
    from effine.quant import quantize_model

    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 32, bias=False), nn.Linear(32, 64, bias=False)).requires_grad_(False)
        return m

    dense, quant = build(), build()
    quantize_model(quant, "nf4", filter_fn=lambda n, m: True)
    assert sum(isinstance(getattr(m, "qweight", None), torch.Tensor) for m in quant.modules()) == 2
    for m in (dense, quant):
        inject_lora(m, AdapterConfig(r=4, alpha=8, target_modules=["0", "1"]), dtype=torch.float32)
    assert count_parameters(quant) == count_parameters(dense) == (4 * (64 + 32) * 2, 64 * 32 * 2 + 4 * (64 + 32) * 2)


@pytest.mark.parametrize("method", ["nf4", "int4", "int8"])
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_fused_path_on_quantized_base_equals_dense_dequantized(method, device) -> None:
    """QLoRA takes the same one-node path: on a QuantLinear base the output and the x/A/B gradients equal LoRA on
    an nn.Linear holding the dequantized weight (fp32, float reassociation only), and W is never saved."""
    from effine.quant import QuantLinear

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    dense = nn.Linear(64, 48, bias=True).to(device)
    q = QuantLinear.from_linear(dense, method=method, group_size=32)
    ref_base = nn.Linear(64, 48, bias=True).to(device).requires_grad_(False)
    with torch.no_grad():
        ref_base.weight.copy_(q.dequantize())
        ref_base.bias.copy_(q.bias)
    m, ref = LoRALinear(q, r=4, alpha=8), LoRALinear(ref_base, r=4, alpha=8)
    with torch.no_grad():
        m.lora_B.weight.normal_()
    ref.load_state_dict(m.state_dict(), strict=False)
    x = torch.randn(2, 5, 64, device=device)

    def run(mod):
        xx = x.clone().requires_grad_()
        y = mod(xx)
        node = y.grad_fn.next_functions[0][0]  # under the reshape back to (..., d)
        saved = [tuple(t.shape) for t in node.saved_tensors if t is not None]
        grads = torch.autograd.grad(y, (mod.lora_A.weight, mod.lora_B.weight, xx), torch.ones_like(y))
        return (y, *grads), type(node).__name__, saved

    (got, name, saved), (want, ref_name, ref_saved) = run(m), run(ref)
    assert name == ref_name == "_LoRALinearFnBackward"
    assert (48, 64) in ref_saved and (48, 64) not in saved  # the dense W is kept by reference; the quantized not
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
