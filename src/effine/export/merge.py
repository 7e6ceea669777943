"""Exact merge of a (Q)LoRA or QAT run into a plain transformers model dir, with a report that proves it.

A LoRA run trains ``y = base(x) + s · B A x`` on top of a *frozen* base. The merged model must compute the same
function, so the base must be rebuilt exactly as training saw it:

* same dtype (``model.dtype`` of the run's ``config.yaml``);
* for QLoRA (``quant.method`` nf4/fp4/int8/int4) the same quantization of the same weights: the adapter learned
  to correct the *quantized* base, so merging it into the original full-precision weights would add back the
  quantization error it compensated. The merged weight is the dequantized one plus the update::

      W' = W_deq + s · B A        (summed in fp32, then cast to the output dtype)

  ``W_deq`` is what the quantized layer's forward used (``QuantLinear.dequantize()`` in its compute dtype).
  Nothing is requantized: the output is dense. (Quantize it again with :mod:`effine.export.ptq` if you want.)
* for QAT (``quant.qat_bits``) the layers trained through fake quantization. With LoRA, training computed
  ``x fq(W + s · B A)^T`` (the update is folded in before the rounding, see
  :meth:`effine.adapters.lora.LoRALinear._qat_forward`); a full fine-tuning run computed ``x fq(W)^T``. With
  ``bake_qat=True`` (the default) the merged weight is ``fq(W + s · B A)`` (``fq(W)`` for a full run): exactly
  what training computed, already on the quantization grid. ``bake_qat=False`` keeps the latent ``W + s · B A``
  (``W``) instead, which does *not* reproduce the trained model's logits (the report says by how much) until
  :mod:`effine.export.ptq` quantizes it with the QAT settings, which gives the baked weight again.

To check the merge, the logits of a few chat prompts are computed with the adapter on the rebuilt base (the
*reference*) and with the merged model; the report gives the max and mean absolute difference and the share of
positions whose argmax agrees. By default it also reloads the saved dir (must match the merged logits exactly)
and, for a quantized base, shows what a *naive* merge would have changed: the adapter applied on the original,
unquantized base.

    report = merge_run("runs/smollm2-135m-instruct-qnf4-lora", dtype="bf16")
    report.max_abs_logit_diff, report.argmax_agreement

Output dir (default ``RUN_DIR/merged``): ``config.json``, ``model.safetensors``, ``generation_config.json``,
tokenizer files (with the chat template the run trained with) and ``merge_report.json``.

Expected differences: an fp32 merge of an fp32 run is exact up to float reassociation (relative ``|Δlogit|``
around 1e-6). A run trained in bf16 has a reference that is itself noisy: bf16 activations move the logits of
SmolLM2-135M by about 2 (max) / 0.3 (mean) against the same model in fp32, and ``train_dtype_floor`` reports that
floor next to the merged difference; a bf16 merge also rounds every merged weight to 8 significant bits. Measured
on SmolLM2-135M-Instruct after 4 QLoRA (nf4, bf16) steps: bf16 merge max 1.9 / mean 0.22 / argmax 99.3%, against
24 / 3.5 / 58% for a naive merge into the original weights.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effine.errors import ConfigError, ModelError
from effine.dtypes import DTYPES as _DTYPE_NAMES
from effine.dtypes import dtype_name as _dtype_name
from effine.module_tree import set_submodule

__all__ = ["MergeReport", "merge_run", "DEFAULT_PROMPTS", "REPORT_NAME"]

REPORT_NAME = "merge_report.json"

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "hey! how was your weekend?",
]



@dataclass
class MergeReport:
    """What :func:`merge_run` did, and how close the merged model is to the trained one (JSON-able)."""

    run_dir: str
    out_dir: str | None
    base_model: str
    train_dtype: str  # the base's compute dtype during training (= the reference's)
    merged_dtype: str
    quant: dict[str, Any]  # {"method": "nf4", "blocksize": 64, "double_quant": true} or {"method": "none"}
    qat: dict[str, Any] | None  # {"bits", "group_size", "baked"} for QAT runs
    adapter: dict[str, Any] | None  # {"r", "alpha", "scale", "rslora", "modules"}; None for a full run
    merged_modules: int  # LoRA layers folded into their base
    dequantized_modules: int  # quantized layers without an adapter, written as their dequantized weight
    requantized: bool  # always False: the merged model is dense
    reference: str  # what the merged logits are compared against
    prompts: list[str]
    tokens: int  # positions compared (summed over prompts)
    ref_max_abs_logit: float  # the scale of the logits, to read the differences against
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    argmax_agreement: float  # share of positions whose top-1 token is the same
    reload_max_abs_logit_diff: float | None = None  # saved dir reloaded vs the in-memory merged model
    original_base: dict[str, Any] | None = None  # adapter on the unquantized base vs the reference (naive merge)
    # bf16/fp16 runs: reference in fp32 vs in the training dtype, and the merged model vs that fp32 reference
    train_dtype_floor: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Logits and their comparison


def _prompt_ids(tokenizer, prompts: list[str], chat: bool, system_prompt: str | None) -> list[list[int]]:
    from effine.data.prompts import prompt_ids_for

    out = [prompt_ids_for(tokenizer, p, chat, system_prompt) for p in prompts]
    if any(len(ids) == 0 for ids in out):
        raise ConfigError("merge: a sample prompt tokenizes to nothing; pass non-empty prompts.")
    return out


@torch.no_grad()
def _logits(model: nn.Module, prompt_ids: list[list[int]]) -> list[torch.Tensor]:
    """Full-sequence logits (T, V) in fp32 for each prompt, one prompt at a time (no padding involved)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for ids in prompt_ids:
        x = torch.tensor([ids], device=device)
        out.append(model(input_ids=x, use_cache=False).logits[0].float().cpu())
    model.train(was_training)
    return out


def _compare(ref: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, float]:
    diffs = [(a - b).abs() for a, b in zip(ref, other)]
    n = sum(d.numel() for d in diffs)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, other))
    positions = sum(a.shape[0] for a in ref)
    return {
        "max_abs_logit_diff": max(float(d.max()) for d in diffs),
        "mean_abs_logit_diff": sum(float(d.sum()) for d in diffs) / n,
        "argmax_agreement": agree / positions,
    }


# ---------------------------------------------------------------------------------------------------------------
# Rebuilding the trained model and merging it


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")  # no random init; real tensors next
    lin.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return lin


def _lora_weight(name: str, m: nn.Module, bake_qat: bool) -> torch.Tensor:
    """The fp32 merged weight of a LoRA layer: ``W (or W_deq) + s·B A``; on a QAT base ``fq(W + s·B A)`` when baked
    (what :meth:`LoRALinear._qat_forward` computed with, bit for bit, before its cast to the activation dtype)."""
    from effine.quant import FakeQuantLinear

    qat = isinstance(m.base, FakeQuantLinear)
    w = m.base.weight if qat else _trained_weight(m.base, bake_qat)
    if tuple(w.shape) != (m.out_features, m.in_features):
        raise ModelError(f"merge: {name} has a base weight of shape {tuple(w.shape)}, expected "
                         f"{(m.out_features, m.in_features)}.")
    w = w.detach().float() + m.delta_weight().to(w.device)  # W (or W_deq) + s·B A, in fp32
    return m.base.fake_quantize(w).detach() if qat and bake_qat else w


def _trained_weight(base: nn.Module, bake_qat: bool) -> torch.Tensor:
    """The dense weight a frozen base layer computed with during training."""
    from effine.adapters.lora import base_weight
    from effine.quant import FakeQuantLinear

    if isinstance(base, FakeQuantLinear):
        return (base.quantized_weight() if bake_qat else base.weight).detach()
    return base_weight(base).detach()  # QuantLinear: dequantize(); nn.Linear: .weight


@torch.no_grad()
def _merge_into_dense(model: nn.Module, dtype: torch.dtype, bake_qat: bool) -> tuple[int, int]:
    """Fold every LoRA layer into a dense nn.Linear (fp32 sum, cast to ``dtype``); densify leftover quantized layers.

    Returns (LoRA layers merged, quantized layers without an adapter that were dequantized).
    """
    from effine.adapters import lora_modules
    from effine.quant import FakeQuantLinear, QuantLinear

    merged = 0
    for name, m in lora_modules(model).items():
        w = _lora_weight(name, m, bake_qat)
        bias = getattr(m.base, "bias", None)
        set_submodule(model, name, _dense_linear(w, bias if isinstance(bias, torch.Tensor) else None, dtype))
        merged += 1
    dequantized = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, (QuantLinear, FakeQuantLinear)):
            w = _trained_weight(mod, bake_qat)
            set_submodule(model, name, _dense_linear(w.float(), mod.bias, dtype))
            dequantized += isinstance(mod, QuantLinear)
    return merged, dequantized


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters only: ``model.to(dtype)`` would also cast buffers such as the rotary ``inv_freq``,
    which transformers keeps in fp32 when it loads a bf16 checkpoint, so the saved model would reload different."""
    for p in model.parameters():
        p.requires_grad_(False)
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    model.config.dtype = dtype


def _fp32_logits(model: nn.Module, ids: list[list[int]], train_dtype: torch.dtype) -> list[torch.Tensor]:
    """Logits of ``model`` with every floating parameter and quantized layer computing in fp32, then restored.

    (Casting bf16/fp16 to fp32 and back is exact, so the model is left bit for bit as it was.)
    """
    from effine.quant import QuantLinear

    saved = [(p, p.data) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32]
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    try:
        for p, data in saved:
            p.data = data.float()
        for m in quant:
            m.compute_dtype = torch.float32
        return _logits(model, ids)
    finally:
        for p, data in saved:
            p.data = data
        for m in quant:
            m.compute_dtype = train_dtype


def _quant_info(cfg) -> dict[str, Any]:
    q = cfg.quant
    if q.method == "none":
        return {"method": "none"}
    skip = {"skip_modules": list(q.skip_modules)} if q.skip_modules else {}
    if q.method in ("nf4", "fp4"):
        return {"method": q.method, "blocksize": q.blocksize, "double_quant": q.double_quant, **skip}
    return {"method": q.method, "group_size": q.group_size, "symmetric": True, **skip}


def _load_base(cfg, model_dir: Path, quantize: bool, adapter_dir: Path | None = None) -> nn.Module:
    """The model as training built it (:func:`effine.recipe.build_model` from the run's recipe), with the saved
    adapter when ``adapter_dir`` is given; ``quantize=False`` leaves the base unquantized (QAT still applies)."""
    from effine.recipe import ModelRecipe, build_model

    recipe = ModelRecipe.from_config(cfg)
    if not quantize:
        recipe = recipe.replace(quant={"method": "none", "skip_modules": ()})
    return build_model(recipe, train=False, model_dir=model_dir, adapter_dir=adapter_dir)


def _resolve_base(cfg, adapter_dir: Path | None) -> Path:
    from effine.model.loader import resolve_model_dir

    try:
        return resolve_model_dir(cfg.model.name, cfg.model.cache_dir, cfg.model.revision)
    except ModelError:
        # A run started from a relative model path in another working directory: the adapter records the
        # resolved base dir.
        if adapter_dir is not None and (adapter_dir / "adapter_config.json").is_file():
            base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if base and Path(base).is_dir():
                return Path(base)
        raise


def _load_tokenizer(run_dir: Path, adapter_dir: Path | None, model_dir: Path):
    from effine.model.loader import load_tokenizer

    # The run saved the tokenizer with the chat template it trained with next to the adapter (or in model/).
    for d in (adapter_dir, run_dir / "model"):
        if d is not None and (d / "tokenizer_config.json").is_file():
            return load_tokenizer(d)
    return load_tokenizer(model_dir)


def merge_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    dtype: str = "bf16",
    prompts: list[str] | None = None,
    *,
    bake_qat: bool = True,
    verify_reload: bool = True,
    compare_original_base: bool = True,
    fp32_floor: bool = True,
    save: bool = True,
) -> MergeReport:
    """Merge a run's adapter into the base it trained on, save a transformers model dir, and report the drift.

    ``run_dir`` is a directory written by :func:`effine.train.run.run_training` (``config.yaml`` + ``adapter/``;
    or ``model/`` for a full fine-tuning QAT run). ``dtype`` (bf16, fp32, fp16) is the merged model's dtype.
    ``prompts`` are user messages rendered through the run's chat template (default :data:`DEFAULT_PROMPTS`).
    ``bake_qat``: for QAT runs, merge the fake-quantized weight (what training computed with) instead of the
    latent one. ``verify_reload`` reloads the saved dir and compares; ``compare_original_base`` (quantized runs
    only) measures a naive merge into the unquantized base. ``fp32_floor`` (runs trained in bf16/fp16) also
    computes the reference in fp32, to show how much of the difference is the training dtype's own noise
    (costs an fp32 copy of the weights for a moment). ``save=False`` only measures.
    """
    from effine.config import load_config

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    if dtype not in _DTYPE_NAMES:
        raise ConfigError(f"merge: dtype={dtype!r} is not supported; use one of {', '.join(_DTYPE_NAMES)}.")
    out_dtype = _DTYPE_NAMES[dtype]
    if not (run_dir / "config.yaml").is_file():
        hint = (" It looks like an adapter dir: pass the run dir that holds it (its config.yaml says how the base "
                "was loaded and quantized)." if (run_dir / "adapter_config.json").is_file() else "")
        raise ConfigError(f"merge: {run_dir} has no config.yaml, so it is not an effine run dir.{hint}")
    cfg = load_config(run_dir / "config.yaml")
    adapter_dir = run_dir / "adapter"
    full_run = cfg.adapter.method == "full"
    if full_run:
        if not cfg.quant.qat_bits:
            raise ConfigError(f"merge: {run_dir} is a full fine-tuning run without QAT; there is nothing to merge "
                              f"(its model/ dir is already the trained model).")
        if not (run_dir / "model" / "config.json").is_file():
            raise ModelError(f"merge: {run_dir}/model is missing; the run did not finish saving its model.")
    elif not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"merge: {adapter_dir} holds no adapter_config.json; the run did not finish (or was "
                         "trained with another tool).")
    out = Path(out_dir) if out_dir is not None else run_dir / "merged"
    if save and out.resolve() in {run_dir.resolve(), adapter_dir.resolve(), (run_dir / "model").resolve()}:
        raise ConfigError(f"merge: out_dir {out} would overwrite the run's own files; choose another directory.")

    base_dir = (run_dir / "model") if full_run else _resolve_base(cfg, adapter_dir)
    tokenizer = _load_tokenizer(run_dir, None if full_run else adapter_dir, base_dir)
    chat = cfg.data.format not in ("prompt_completion", "text")
    prompts = list(prompts) if prompts else list(DEFAULT_PROMPTS)
    ids = _prompt_ids(tokenizer, prompts, chat, cfg.data.system_prompt)
    notes: list[str] = []

    # 1. The trained model: the base rebuilt as in training, plus the adapter (fp32, as training made it).
    model = _load_base(cfg, base_dir, quantize=not full_run, adapter_dir=None if full_run else adapter_dir)
    train_dtype = _DTYPE_NAMES[cfg.model.dtype]
    adapter_info = None
    if not full_run:
        from effine.adapters import lora_modules

        mods = lora_modules(model)
        any_mod = next(iter(mods.values()))
        adapter_info = {"r": any_mod.r, "alpha": any_mod.alpha, "scale": any_mod.scale, "rslora": any_mod.rslora,
                        "modules": len(mods)}
    quantized = cfg.quant.method != "none" and not full_run
    from effine.quant import FakeQuantLinear

    # QAT wraps nn.Linear only: with a quantized base (quant.method != none) qat_bits has nothing to act on.
    qat = bool(cfg.quant.qat_bits) and any(isinstance(m, FakeQuantLinear) for m in model.modules())
    if full_run:
        reference = "the trained weights"
    else:
        reference = f"adapter on the {cfg.quant.method}-quantized base" if quantized else "adapter on the base"
    if qat:
        reference += f" with {cfg.quant.qat_bits}-bit fake quantization (QAT forward)"
    reference += f", {_dtype_name(train_dtype)} compute"
    ref_logits = _logits(model, ids)
    floor = ref32_logits = None
    if train_dtype != torch.float32 and fp32_floor:
        ref32_logits = _fp32_logits(model, ids, train_dtype)
        floor = _compare(ref_logits, ref32_logits)
        floor["what"] = (f"the reference computed in fp32 instead of {_dtype_name(train_dtype)}: the logit noise of "
                         "the training dtype itself, a floor for the merged model's difference")

    # 2. Merge (never requantize), cast to the output dtype, compare.
    merged_n, dequant_n = _merge_into_dense(model, out_dtype, bake_qat)
    _cast_parameters(model, out_dtype)
    merged_logits = _logits(model, ids)
    cmp = _compare(ref_logits, merged_logits)
    if floor is not None:
        floor["merged_vs_fp32_reference"] = _compare(ref32_logits, merged_logits)
        del ref32_logits
    qat_info = None
    if qat:
        qat_info = {"bits": cfg.quant.qat_bits, "group_size": cfg.quant.group_size, "symmetric": True,
                    "baked": bake_qat}
        notes.append(
            f"QAT: the merged weights are {'fq(W + s·BA)' if not full_run else 'fq(W)'}" if bake_qat else
            "QAT: bake_qat=False keeps the latent (not fake-quantized) weights, so the merged model does not "
            "compute what training did; see the logit difference.")
        ptq = f"effine ptq with bits={cfg.quant.qat_bits}, group_size={cfg.quant.group_size}, symmetric"
        if bake_qat:
            notes.append(f"the baked weights lie on the {cfg.quant.qat_bits}-bit grid: {ptq} reproduces them up to "
                         "float rounding (and the rounding of the merged dtype).")
        else:
            notes.append(f"{ptq} of these latent weights gives the fake-quantized weights training computed with.")
    if quantized:
        notes.append(f"merged into the dequantized {cfg.quant.method} weights (W_deq + s·BA in fp32, cast to "
                     f"{dtype}); nothing was requantized.")

    # 3. Save and, optionally, check the saved dir reloads to the same logits.
    reload_diff = None
    if save:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("*.safetensors"):
            stale.unlink()  # a previous merge's shards must not mix with this one
        model.config.use_cache = True
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        if verify_reload:
            from effine.model.loader import load_model

            reloaded = load_model(out, dtype, attn="sdpa", trust_remote_code=cfg.model.trust_remote_code)
            reload_diff = _compare(merged_logits, _logits(reloaded, ids))["max_abs_logit_diff"]
            del reloaded
    del model
    gc.collect()

    # 4. What a naive merge (adapter on the original, unquantized base) would have changed.
    original = None
    if compare_original_base and quantized:
        naive = _load_base(cfg, base_dir, quantize=False, adapter_dir=adapter_dir)
        original = _compare(ref_logits, _logits(naive, ids))
        original["what"] = ("adapter on the original unquantized base vs the reference: the error a merge into "
                            "the original weights would make")
        del naive
        gc.collect()

    report = MergeReport(
        run_dir=str(run_dir), out_dir=str(out) if save else None, base_model=str(base_dir),
        train_dtype=_dtype_name(train_dtype), merged_dtype=dtype, quant=_quant_info(cfg), qat=qat_info,
        adapter=adapter_info, merged_modules=merged_n, dequantized_modules=dequant_n, requantized=False,
        reference=reference, prompts=prompts, tokens=sum(len(i) for i in ids),
        ref_max_abs_logit=max(float(r.abs().max()) for r in ref_logits), **cmp,
        reload_max_abs_logit_diff=reload_diff, original_base=original, train_dtype_floor=floor, notes=notes,
        seconds=time.perf_counter() - t0,
    )  # fmt: skip
    if save:
        (out / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
