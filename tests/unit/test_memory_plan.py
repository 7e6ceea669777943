"""`effine plan` (effine.plan.memory): component arithmetic against the real objects, and one real measurement."""

from __future__ import annotations

import pytest
import torch

from effine.adapters import count_parameters, inject_lora
from effine.config import Config
from effine.errors import ConfigError
from effine.model.tiny import random_large_config, tiny_config, tiny_model
from effine.ops.attention import enable
from effine.quant import QuantLinear, quantize_model
from effine.ops.model_loss import loss_sum
from effine.plan.memory import GiB, MemoryPlan, parse_gpu, plan_memory


def _cfg(B: int = 2, T: int = 64, **kw) -> Config:
    cfg = Config()
    cfg.train.batch_size, cfg.data.max_length = B, T
    for key, value in kw.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def test_lora_parameter_count_matches_inject_lora():
    cfg = _cfg(adapter__r=8)
    plan = plan_memory(cfg, model_config=tiny_config("llama"))
    model = tiny_model("llama")
    inject_lora(model, cfg.adapter, dtype=torch.float32)
    trainable, total = count_parameters(model)
    assert plan.n_trainable == trainable
    assert plan.n_params == total
    assert plan.adapters == 4 * trainable  # fp32
    assert plan.optimizer == 8 * trainable  # AdamW exp_avg + exp_avg_sq, fp32


def test_lora_target_modules_subset():
    cfg = _cfg(adapter__target_modules=["q_proj", "v_proj"])
    plan = plan_memory(cfg, model_config=tiny_config("qwen2"))
    model = tiny_model("qwen2")
    inject_lora(model, cfg.adapter, dtype=torch.float32)
    assert plan.n_trainable == count_parameters(model)[0]


@pytest.mark.parametrize("method,double_quant,skip", [("nf4", True, None), ("nf4", False, None),
                                                       ("int8", True, None), ("int4", True, None),
                                                       ("nf4", True, ["v_proj", "layers.0.mlp.up_proj"])])
def test_quantized_weight_bytes_match_quantlinear(method, double_quant, skip):
    cfg = _cfg(quant__method=method, quant__double_quant=double_quant, quant__skip_modules=skip, model__dtype="bf16")
    plan = plan_memory(cfg, model_config=tiny_config("llama", hidden_size=128, intermediate_size=320))
    model = tiny_model("llama", dtype=torch.bfloat16, hidden_size=128, intermediate_size=320)
    quantize_model(model, method, group_size=cfg.quant.group_size, blocksize=cfg.quant.blocksize,
                   double_quant=double_quant, skip_modules=skip)
    real_q = sum(m.nbytes() for m in model.modules() if isinstance(m, QuantLinear))
    real_dense = sum(p.numel() * p.element_size() for p in model.parameters())  # QuantLinear holds buffers only
    real_dense += sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                      if not isinstance(model.get_submodule(n.rsplit(".", 1)[0]), QuantLinear))
    assert abs(plan.weights_quantized - real_q) <= 0.02 * real_q
    assert plan.weights_dense == real_dense
    n_quant = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    assert plan.n_quantized == n_quant


def test_full_finetuning_weights_gradients_and_states_in_model_dtype():
    cfg = _cfg(adapter__method="full", model__dtype="bf16")
    plan = plan_memory(cfg, model_config=tiny_config("llama"))
    n = sum(p.numel() for p in tiny_model("llama").parameters())
    assert plan.n_trainable == n
    assert plan.optimizer == 2 * 2 * n  # torch AdamW keeps its states in the parameter dtype
    assert plan.adapters == 0


def test_activations_scale_linearly_with_tokens():
    """activations = per-token bytes x B*T + a per-layer constant (the adapters cast to the activation dtype)."""
    conf = tiny_config("llama")
    one = plan_memory(_cfg(1, 64), model_config=conf)
    a = plan_memory(_cfg(2, 64), model_config=conf)
    b = plan_memory(_cfg(4, 64), model_config=conf)
    c = plan_memory(_cfg(2, 128), model_config=conf)
    step = a.activations - one.activations  # 64 tokens' worth
    assert step > 0
    assert b.activations - a.activations == 2 * step
    assert c.activations - a.activations == 2 * step
    assert a.activation_bytes_per_token_layer == b.activation_bytes_per_token_layer == c.activation_bytes_per_token_layer


def test_gradient_checkpointing_reduces_activations():
    conf = random_large_config("llama-1b")
    off = plan_memory(_cfg(4, 1024), model_config=conf)
    on = plan_memory(_cfg(4, 1024, model__gradient_checkpointing=True), model_config=conf)
    assert on.activations < off.activations / 5
    assert on.total < off.total


def test_eager_attention_adds_a_quadratic_term():
    conf = tiny_config("llama")
    short = plan_memory(_cfg(1, 128, model__attn="eager"), model_config=conf)
    long = plan_memory(_cfg(1, 512, model__attn="eager"), model_config=conf)
    sdpa = plan_memory(_cfg(1, 512), model_config=conf)
    assert long.activation_bytes_per_token_layer > 2 * short.activation_bytes_per_token_layer
    assert sdpa.activation_bytes_per_token_layer < long.activation_bytes_per_token_layer


def _saved_bytes(model, batch) -> int:
    """Unique storage bytes autograd keeps for backward (parameters and buffers excluded)."""
    from effine.plan.measure import saved_for_backward_bytes

    return saved_for_backward_bytes(model, lambda: loss_sum(model, batch))


@pytest.mark.parametrize("arch,fused,tol", [("llama", False, 0.02), ("llama", True, 0.02), ("gemma3", False, 0.02),
                                            ("gemma3", True, 0.02), ("gemma2", False, 0.02), ("phi", False, 0.05),
                                            ("falcon", False, 0.05), ("llama", "no-norm-recompute", 0.02),
                                            ("gemma3", "no-norm-recompute", 0.02)])
def test_activation_formula_matches_saved_tensors(arch, fused, tol):
    """The per-layer formula against what autograd really keeps (LoRA, bf16 base, fp32 adapters)."""
    from effine.ops.swap import fuse_model

    B, T = 2, 64
    kw = dict(hidden_size=256, num_attention_heads=4, vocab_size=512)
    if arch.startswith("gemma"):
        kw["head_dim"] = 64
    kw["ffn_hidden_size" if arch == "falcon" else "intermediate_size"] = 512
    norms = fused != "no-norm-recompute"
    cfg = _cfg(B, T, model__dtype="bf16", model__recompute_norm_outputs=norms)
    fused = bool(fused)
    model = tiny_model(arch, dtype=torch.bfloat16, attn="eager", **kw)
    if arch != "falcon":
        enable(model, None)
    inject_lora(model, cfg.adapter, dtype=torch.float32)
    if fused:
        fuse_model(model, recompute_norms=norms)
    model.train()
    ids = torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(0))
    real = _saved_bytes(model, {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(T).expand(B, T)})
    plan = plan_memory(cfg, model_config=model.config, fused=fused)
    # plan.activations is the loss-forward phase: everything saved by the layers and the final norm; the loss adds
    # what it keeps (dL/dh, or Phi's unchunked log-probabilities of its biased head)
    predicted = plan.activations + plan.loss_saved
    assert predicted == pytest.approx(real, rel=tol)


def test_fused_ops_keep_less():
    conf = tiny_config("llama", hidden_size=256, intermediate_size=512)
    plain = plan_memory(_cfg(2, 64), model_config=conf, fused=False)
    fused = plan_memory(_cfg(2, 64), model_config=conf, fused=True)
    assert fused.activation_bytes_per_token_layer < 0.8 * plain.activation_bytes_per_token_layer
    cfg = _cfg(2, 64, model__fused_ops=False)
    assert plan_memory(cfg, model_config=conf).activation_bytes_per_token_layer == \
        plain.activation_bytes_per_token_layer


def test_large_config_parameter_counts():
    plan = plan_memory(_cfg(1, 512), model_config=random_large_config("llama-1b"))
    assert plan.n_params - plan.n_trainable == pytest.approx(1.236e9, rel=0.01)
    q = plan_memory(_cfg(1, 512, quant__method="nf4"), model_config=random_large_config("mistral-7b"))
    # QLoRA weights: ~0.52 byte per quantized weight + bf16 embeddings and lm_head
    assert q.weights_quantized / q.n_quantized == pytest.approx(0.516, abs=0.01)
    assert q.weights_dense == pytest.approx(2 * 2 * 32000 * 4096, rel=0.01)


def test_gpu_fit_and_suggestions():
    conf = random_large_config("mistral-7b")
    full = plan_memory(_cfg(4, 2048, adapter__method="full"), gpu_memory_gb="a100-40", model_config=conf)
    assert full.device == "cuda" and full.fits is False
    text = full.format()
    assert "does NOT fit" in text and "try:" in text
    assert any("lora" in s for s in full.suggestions())
    qlora = plan_memory(_cfg(1, 1024, quant__method="nf4", model__gradient_checkpointing=True), gpu_memory_gb=80,
                        model_config=conf)
    assert qlora.fits is True
    assert qlora.total < 12 * GiB
    assert "fits on" in qlora.format()


def test_parse_gpu():
    assert parse_gpu(80) == (80.0, None)
    assert parse_gpu("24GB") == (24.0, None)
    assert parse_gpu("h100")[1] == "h100"
    assert parse_gpu("A100-40")[0] == pytest.approx(39.4)
    with pytest.raises(ConfigError, match="h100"):
        parse_gpu("h10O")


def test_format_lists_every_component():
    plan = plan_memory(_cfg(2, 64), model_config=tiny_config("gemma3"))
    assert isinstance(plan, MemoryPlan)
    text = plan.format()
    for label in ("weights, dense", "activations", "loss (chunked)", "AdamW states", "predicted peak"):
        assert label in text
    assert plan.total == max(plan.train_total, plan.runtime + plan.load_peak)
    assert plan.to_dict()["total"] == plan.total


@pytest.mark.slow
@pytest.mark.parametrize("allocator", ["system", "auto"])  # glibc; jemalloc where one is found (as effine train)
def test_prediction_within_20_percent_of_measured_smollm2(allocator, monkeypatch):
    from effine.plan.measure import measure_peak

    monkeypatch.setenv("EFFINE_ALLOCATOR", allocator)
    cfg = _cfg(2, 256, model__name="smollm2-135m-instruct", model__dtype="bf16")
    plan = plan_memory(cfg)
    measured = measure_peak(cfg, steps=2)
    err = (plan.above_baseline - measured["peak"]) / measured["peak"]
    assert abs(err) < 0.20, f"predicted {plan.above_baseline / GiB:.3f} GiB, measured {measured['peak'] / GiB:.3f} GiB"


def test_release_free_heap_returns_freed_pages():
    """After freeing many heap-sized tensors (below glibc's mmap threshold, so they stay in the heap), the trim
    gives their pages back: RSS falls by most of what was freed. Linux + glibc only (what effine's CPU target is)."""
    import platform

    from effine.system.heap import release_free_heap

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:"))

    # 8192 x 64 KiB = 512 MiB of filled heap chunks (below glibc's 128 KiB initial mmap threshold), each followed
    # by a small live chunk so that freeing them leaves holes that only malloc_trim gives back (not the heap-top trim)
    keep, pins = [], []
    for _ in range(8192):
        keep.append(torch.ones(16 * 1024))
        pins.append(torch.ones(16))
    del keep
    before = rss()
    assert release_free_heap() is True
    after = rss()
    assert before - after > 256 * 2**20, (before, after)
    del pins
