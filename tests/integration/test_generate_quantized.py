"""`effine generate` on QLoRA runs: the adapter goes on the base quantized as in training, not the bf16/fp32 one.

Short runs of a tiny Llama (nf4 in fp32; int4 group-wise in bf16; QAT + LoRA in fp32). The in-process trained model (captured when the
run saves its outputs) is the reference: the model :func:`load_for_generation` rebuilds from the run dir must hold
the same quantized codes and scales and compute the same logits; the adapter on the unquantized base (the old
behaviour, now ``--no-quant``) must not.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from effine.config import load_config
from effine.eval.generate import generate, load_for_generation, prompt_ids_for
from effine.recipe import RECIPE_NAME as RUN_META_NAME
from tests.conftest import chat_rows, write_jsonl

TOL_FP32 = 1e-5  # relative to the largest reference logit: float reassociation only
PROMPT = "say apple river stone"


def _train(root, model_dir, name: str, *extra: str):
    """Train a few steps; returns (run dir, the trained model as it was in memory when the run saved it)."""
    import effine.train.run as run_mod

    data = root / "chats.jsonl"
    if not data.exists():
        write_jsonl(data, chat_rows(24))
    overrides = [f"model.name={model_dir}", f"data.path={data}", "data.max_length=48", "data.eval_fraction=0.2",
                 f"output.dir={root}/{name}", "adapter.r=4", "adapter.alpha=8", "train.lr=2e-2",
                 "train.batch_size=4", "train.max_steps=3", "train.warmup_steps=0", "eval.max_new_tokens=2",
                 "eval.prompts_from_eval=0", "eval.max_batches=1", "train.threads=1", "model.device=cpu",
                 *extra]
    captured = {}
    original = run_mod.save_outputs

    def save_and_capture(cfg, model, *args, **kw):
        captured["model"] = model
        return original(cfg, model, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "save_outputs", save_and_capture)
        run_mod.run_training(load_config(None, overrides))
    model = captured["model"].eval()
    return root / name, model


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("generate-runs")
    return {
        "nf4": _train(root, tiny_llama_dir, "nf4", "quant.method=nf4", "model.dtype=fp32"),
        "int4-bf16": _train(root, tiny_llama_dir, "int4-bf16", "quant.method=int4", "quant.group_size=32",
                            "model.dtype=bf16"),
        "nf4-skip": _train(root, tiny_llama_dir, "nf4-skip", "quant.method=nf4", "model.dtype=fp32",
                           "quant.skip_modules=[v_proj, layers.1.mlp.down_proj]"),
    }


@pytest.fixture(scope="module")
def prompt_ids(tiny_llama_dir):
    from effine.model.loader import load_tokenizer

    return prompt_ids_for(load_tokenizer(tiny_llama_dir), PROMPT)


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def _quant_buffers(model) -> dict[str, torch.Tensor]:
    from effine.quant import QuantLinear

    return {f"{n}.{b}": t for n, m in model.named_modules() if isinstance(m, QuantLinear)
            for b, t in m.named_buffers(recurse=False)}


def _quantized_targets(model) -> list[str]:
    """Names of the LoRA layers whose base is a QuantLinear; asserts every LoRA layer has one."""
    from effine.adapters import lora_modules
    from effine.quant import QuantLinear

    mods = lora_modules(model)
    assert mods, "no adapter loaded"
    plain = [n for n, m in mods.items() if not isinstance(m.base, QuantLinear)]
    assert not plain, f"adapted layers on an unquantized base: {plain[:3]}"
    return list(mods)


def test_qlora_run_generates_on_the_quantized_base(runs, prompt_ids):
    from effine.quant import QuantLinear

    run, trained = runs["nf4"]
    meta = json.loads((run / "adapter" / RUN_META_NAME).read_text())
    assert meta["model_dtype"] == "fp32"
    assert meta["quant"] == {"method": "nf4", "group_size": 64, "blocksize": 64, "double_quant": True,
                             "qat_bits": None, "skip_modules": None}

    logs: list[str] = []
    loaded = load_for_generation(run, "fp32", log=logs.append)
    assert loaded.base_as_trained and loaded.recipe.quant.method == "nf4"
    assert loaded.recipe_source == str(run / "adapter" / RUN_META_NAME)
    assert any(m.startswith("base quantized to nf4 (blocksize 64, double quant) as in training") for m in logs), logs
    assert len(_quantized_targets(loaded.model)) == 14  # 2 layers x 7 projections
    assert all(m.method == "nf4" for m in loaded.model.modules() if isinstance(m, QuantLinear))
    # Bit for bit the quantized weights training used.
    got, want = _quant_buffers(loaded.model), _quant_buffers(trained)
    assert got.keys() == want.keys() and len(got) == 14 * 4  # qweight, absmax, absmax_scale, absmax_offset
    assert all(torch.equal(got[k], want[k]) for k in want)

    ref = _logits(trained, prompt_ids)
    diff = (_logits(loaded.model, prompt_ids) - ref).abs().max().item()
    assert diff <= TOL_FP32 * ref.abs().max().item(), diff

    # The old behaviour (and --no-quant): the adapter on the original weights is a different model.
    naive_logs: list[str] = []
    naive = load_for_generation(run, "fp32", as_trained=False, log=naive_logs.append)
    assert not naive.base_as_trained
    assert not any(isinstance(m, QuantLinear) for m in naive.model.modules())
    assert any("NOT quantized to nf4" in m for m in naive_logs), naive_logs
    naive_diff = (_logits(naive.model, prompt_ids) - ref).abs().max().item()
    assert naive_diff > 100 * max(diff, 1e-7), (naive_diff, diff)


def test_bf16_int4_run_same_codes_in_any_compute_dtype(runs, prompt_ids):
    """Quantized from the bf16 weights training quantized, whatever dtype generation computes in."""
    from effine.quant import QuantLinear

    run, trained = runs["int4-bf16"]
    want = _quant_buffers(trained)
    ref = _logits(trained, prompt_ids)
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        loaded = load_for_generation(run, dtype, log=lambda _: None)
        _quantized_targets(loaded.model)
        q = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
        assert q and all(m.method == "int4" and m.group_size == 32 and m.compute_dtype == torch_dtype for m in q)
        got = _quant_buffers(loaded.model)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        logits = _logits(loaded.model, prompt_ids)
        if dtype == "bf16":  # the same computation as in training
            assert torch.equal(logits.argmax(-1), ref.argmax(-1))
            assert (logits - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


def test_skip_modules_stay_unquantized_in_training_and_generation(runs, prompt_ids, tmp_path):
    """quant.skip_modules: the named linears keep their dense weights in training, and generation rebuilds the
    same mix (from the adapter's record, and from config.yaml for a run without one)."""
    from effine.adapters import lora_modules
    from effine.quant import QuantLinear

    run, trained = runs["nf4-skip"]
    meta = json.loads((run / "adapter" / RUN_META_NAME).read_text())
    assert meta["quant"]["skip_modules"] == ["v_proj", "layers.1.mlp.down_proj"]

    def dense_targets(model):
        return sorted(n for n, m in lora_modules(model).items() if not isinstance(m.base, QuantLinear))

    want = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
    assert dense_targets(trained) == want
    ref = _logits(trained, prompt_ids)
    old = tmp_path / "old-run"  # no effine_run.json: the recipe comes from config.yaml
    shutil.copytree(run / "adapter", old / "adapter")
    shutil.copy(run / "config.yaml", old / "config.yaml")
    (old / "adapter" / RUN_META_NAME).unlink()
    for target in (run, old):
        logs: list[str] = []
        loaded = load_for_generation(target, "fp32", log=logs.append)
        assert any("except v_proj, layers.1.mlp.down_proj" in m for m in logs), logs
        assert dense_targets(loaded.model) == want
        assert sum(isinstance(m, QuantLinear) for m in loaded.model.modules()) == 14 - 3
        diff = (_logits(loaded.model, prompt_ids) - ref).abs().max().item()
        assert diff <= TOL_FP32 * ref.abs().max().item(), diff


def test_adapter_dir_alone_and_older_runs(runs, prompt_ids, tmp_path):
    """The record travels with a copied adapter dir; a run saved before it existed falls back to config.yaml."""
    run, trained = runs["nf4"]
    ref = _logits(trained, prompt_ids)
    tol = TOL_FP32 * ref.abs().max().item()

    copied = shutil.copytree(run / "adapter", tmp_path / "somewhere" / "my-adapter")
    loaded = load_for_generation(copied, "fp32", log=lambda _: None)
    assert loaded.base_as_trained and loaded.recipe_source.endswith(RUN_META_NAME)
    assert (_logits(loaded.model, prompt_ids) - ref).abs().max().item() <= tol

    old = tmp_path / "old-run"
    shutil.copytree(run / "adapter", old / "adapter")
    shutil.copy(run / "config.yaml", old / "config.yaml")
    (old / "adapter" / RUN_META_NAME).unlink()
    for target in (old, old / "adapter"):
        loaded = load_for_generation(target, "fp32", log=lambda _: None)
        assert loaded.base_as_trained and loaded.recipe_source == str(old / "config.yaml")
        _quantized_targets(loaded.model)
        assert (_logits(loaded.model, prompt_ids) - ref).abs().max().item() <= tol

    # No record at all (e.g. an adapter from another tool): the base as it loads, as before.
    (copied / RUN_META_NAME).unlink()
    loaded = load_for_generation(copied, "fp32", log=lambda _: None)
    assert loaded.recipe is None and not loaded.base_as_trained


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, tiny_llama_dir):
    return _train(tmp_path_factory.mktemp("generate-qat"), tiny_llama_dir, "qat", "quant.qat_bits=4",
                  "quant.group_size=32", "model.dtype=fp32")


def test_qat_lora_run_generates_through_fake_quantization(qat_run, prompt_ids):
    """The same holds for QAT + LoRA: the adapter trained through the base's fake quantization."""
    from effine.quant import FakeQuantLinear

    run, trained = qat_run
    logs: list[str] = []
    loaded = load_for_generation(run, "fp32", log=logs.append)
    assert loaded.base_as_trained and any("fake-quantized to 4 bits" in m for m in logs), logs
    assert sum(isinstance(m, FakeQuantLinear) for m in loaded.model.modules()) == 14
    ref = _logits(trained, prompt_ids)
    diff = (_logits(loaded.model, prompt_ids) - ref).abs().max().item()
    assert diff <= TOL_FP32 * ref.abs().max().item(), diff
    naive = load_for_generation(run, "fp32", as_trained=False, log=lambda _: None)
    assert not any(isinstance(m, FakeQuantLinear) for m in naive.model.modules())
    assert (_logits(naive.model, prompt_ids) - ref).abs().max().item() > 100 * max(diff, 1e-7)


def test_peft_still_reads_the_adapter_dir(runs, prompt_ids):
    from peft import PeftModel

    from effine.model.loader import load_model

    run, _ = runs["nf4"]
    base = load_model(load_for_generation(run, "fp32", as_trained=False, log=lambda _: None).model_dir, "fp32")
    peft_model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    naive = load_for_generation(run, "fp32", as_trained=False, log=lambda _: None)
    torch.testing.assert_close(_logits(peft_model, prompt_ids), _logits(naive.model, prompt_ids),
                               rtol=0, atol=1e-4)


def test_cli_generate_uses_the_quantized_base(runs, prompt_ids, capsys, monkeypatch):
    import effine.eval.generate as gen_mod
    from effine.cli import main
    from effine.quant import QuantLinear

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "--no-quant" in capsys.readouterr().out
    run, trained = runs["nf4"]
    ref = _logits(trained, prompt_ids)
    used = []

    def generate_and_capture(model, tokenizer, ids, max_new_tokens=48):
        used.append((model, ids))
        return generate(model, tokenizer, ids, max_new_tokens)

    monkeypatch.setattr(gen_mod, "generate", generate_and_capture)
    assert main(["generate", str(run), "--prompt", PROMPT, "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "[effine] base quantized to nf4 (blocksize 64, double quant) as in training" in err
    assert out.startswith(f">>> {PROMPT}\n")
    (model, ids), = used
    assert ids == prompt_ids  # the run's tokenizer and chat template
    _quantized_targets(model)
    assert (_logits(model, ids) - ref).abs().max().item() <= TOL_FP32 * ref.abs().max().item()

    used.clear()
    assert main(["generate", str(run / "adapter"), "--prompt", PROMPT, "--max-new-tokens", "4", "--no-quant"]) == 0
    _, err = capsys.readouterr()
    assert "NOT quantized to nf4" in err and "as in training" not in err
    (model, _), = used
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
