"""Greedy generation for before/after samples and `effine generate`, and loading a run for it.

A LoRA adapter learned to correct the base *as training computed it*: for QLoRA (``quant.method`` nf4, fp4, int8,
int4) that is the quantized base, for QAT (``quant.qat_bits``) the fake-quantized one. :func:`load_for_generation`
rebuilds that base before it adds the adapter (``as_trained=False`` puts the adapter on the original weights
instead). It learns how the base was built from the run's record of it:

* ``ADAPTER_DIR/effine_run.json`` (:data:`RUN_META_NAME`), which a run writes next to ``adapter_config.json``
  (PEFT reads only ``adapter_config.json`` and the weights, so the adapter dir stays a plain PEFT adapter), so an
  adapter dir copied away from its run still carries it;
* else the ``config.yaml`` of the run dir that holds the adapter (runs saved before ``effine_run.json`` existed).

An adapter with neither (e.g. one trained with PEFT) goes on the base as it loads.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


def prompt_ids_for(tokenizer, prompt: str, chat: bool = True, system_prompt: str | None = None,
                   chat_template: str | None = None) -> list[int]:
    """Token ids of a user prompt: through the chat template (the tokenizer's, or `chat_template`) when `chat`.

    Special-token text typed in the prompt (``<|im_end|>``) stays text, as in training (effine.data.literals).
    """
    from effine.data.literals import ControlTokens

    template = chat_template or getattr(tokenizer, "chat_template", None)
    if chat and template:
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        msgs.append({"role": "user", "content": prompt})
        render = lambda ms: tokenizer.apply_chat_template(ms, tokenize=False, add_generation_prompt=True,  # noqa: E731
                                                          chat_template=template)
        import jinja2.sandbox

        try:
            text = render(msgs)
        except jinja2.sandbox.SecurityError as e:
            from effine.data.template import unsafe_template

            raise unsafe_template("the chat template", e) from None
        controls = ControlTokens(tokenizer)
        ids, _ = controls.tokenize(text, controls.forged_ranges(msgs, text, render, "prompt"))
        bos = tokenizer.bos_token_id
        # Exactly one BOS, as in training: add it only when the tokenizer would and the template did not.
        adds_bos = bos is not None and tokenizer("x").input_ids[:1] == [bos]
        if adds_bos and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids
    return tokenizer(prompt).input_ids


def prompt_from_example(example) -> list[int]:
    """The tokens before the last trained span of a held-out example: the conversation up to its last reply."""
    labels = example.labels
    last = max(i for i, y in enumerate(labels) if y != -100)
    start = last
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    return list(example.input_ids[:start])


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int = 48) -> str:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    # Stop at the tokenizer's EOS and whatever the model's generation config names (e.g. an end-of-turn token).
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop = {tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=sorted(stop) or None, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------------------------------
# Loading a model, run dir or adapter dir for generation, with the base rebuilt as training saw it

RUN_META_NAME = "effine_run.json"


@dataclass(frozen=True)
class BaseRecipe:
    """How a run built the frozen base its adapter (or full fine-tuning) trained on."""

    dtype: str  # model.dtype: the dtype the base was loaded (and quantized) in
    method: str  # quant.method: none, nf4, fp4, int8, int4
    group_size: int | None  # int8/int4 (and QAT) group size
    blocksize: int  # nf4/fp4 block size
    double_quant: bool  # nf4/fp4 double quantization
    qat_bits: int | None  # quant.qat_bits
    source: str  # the file it was read from
    skip_modules: tuple[str, ...] = ()  # quant.skip_modules: linears left unquantized

    @classmethod
    def from_quant(cls, dtype: str, quant: dict[str, Any], source: str) -> "BaseRecipe":
        from effine.errors import ConfigError
        from effine.model.loader import DTYPES
        from effine.quant import QUANT_METHODS

        method = quant.get("method", "none")
        if method not in ("none", *QUANT_METHODS) or dtype not in DTYPES:
            raise ConfigError(f"{source}: quant.method={method!r}, dtype={dtype!r}: this effine cannot rebuild "
                              "that base; pass --no-quant to use the unquantized base.")
        return cls(dtype=dtype, method=method, group_size=quant.get("group_size"),
                   blocksize=int(quant.get("blocksize", 64)), double_quant=bool(quant.get("double_quant", True)),
                   qat_bits=quant.get("qat_bits"), source=source,
                   skip_modules=tuple(quant.get("skip_modules") or ()))

    @property
    def changes_base(self) -> bool:
        return self.method != "none" or bool(self.qat_bits)

    def describe(self) -> str:
        parts = []
        if self.method in ("nf4", "fp4"):
            parts.append(f"quantized to {self.method} (blocksize {self.blocksize}"
                         f"{', double quant' if self.double_quant else ''})")
        elif self.method != "none":
            parts.append(f"quantized to {self.method} (group size {self.group_size})")
        if self.method != "none" and self.skip_modules:
            parts[-1] += f" except {', '.join(self.skip_modules)}"
        if self.qat_bits:
            parts.append(f"fake-quantized to {self.qat_bits} bits (QAT, group size {self.group_size})")
        return " and ".join(parts) or "unquantized"


def _quant_record(q) -> dict[str, Any]:
    """The ``quant`` record of a run (from its ``QuantConfig``): what rebuilding its base needs."""
    return {"method": q.method, "group_size": q.group_size, "blocksize": q.blocksize,
            "double_quant": q.double_quant, "qat_bits": q.qat_bits, "skip_modules": q.skip_modules}


def run_meta(cfg, base_model: str | Path) -> dict[str, Any]:
    """The content of :data:`RUN_META_NAME` for a run with config ``cfg`` on the base model dir ``base_model``."""
    from effine import __version__

    return {
        "what": "how effine built the base this adapter was trained on; `effine generate` rebuilds it from this",
        "effine_version": __version__,
        "base_model": str(base_model),
        "adapter_method": cfg.adapter.method,
        "model_dtype": cfg.model.dtype,
        "quant": _quant_record(cfg.quant),
    }


def write_run_meta(out_dir: str | Path, cfg, base_model: str | Path) -> Path:
    path = Path(out_dir) / RUN_META_NAME
    path.write_text(json.dumps(run_meta(cfg, base_model), indent=2) + "\n")
    return path


def read_base_recipe(adapter_dir: Path | None, run_dir: Path | None) -> BaseRecipe | None:
    """The recipe from ``adapter_dir/effine_run.json``, else ``run_dir/config.yaml``; None when neither exists."""
    from effine.errors import ConfigError

    if adapter_dir is not None and (adapter_dir / RUN_META_NAME).is_file():
        path = adapter_dir / RUN_META_NAME
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("quant"), dict):
            raise ConfigError(f"{path}: has no 'quant' record; pass --no-quant to use the unquantized base.")
        return BaseRecipe.from_quant(meta.get("model_dtype", "bf16"), meta["quant"], str(path))
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        from effine.config import load_config

        cfg = load_config(run_dir / "config.yaml")
        return BaseRecipe.from_quant(cfg.model.dtype, _quant_record(cfg.quant), str(run_dir / "config.yaml"))
    return None


@dataclass
class GenerationModel:
    """What :func:`load_for_generation` loaded."""

    model: torch.nn.Module
    tokenizer: Any
    model_dir: Path  # the base (or full fine-tuned) model dir
    adapter_dir: Path | None
    recipe: BaseRecipe | None  # the run's record of its base (None: no record)
    base_as_trained: bool  # the base was rebuilt from the recipe (quantized / fake-quantized)


def _cast_floats(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Compute in ``dtype``: cast floating parameters and set quantized layers' compute dtype. The quantized
    buffers (codes, fp32 scales) stay as they are: they are what training quantized."""
    from effine.quant import QuantLinear

    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.compute_dtype = dtype
    model.config.dtype = dtype


def load_for_generation(spec: str | Path, dtype: str = "fp32", *, as_trained: bool = True,
                        log: Callable[[str], None] | None = None) -> GenerationModel:
    """Load a model spec, a run dir or an adapter dir for :func:`generate`; what `effine generate` does.

    ``dtype`` is the compute dtype. For a run whose base was quantized (QLoRA) or fake-quantized (QAT), the base is
    loaded in the run's ``model.dtype``, quantized exactly as in training (same codes and scales), then computes in
    ``dtype``; ``as_trained=False`` skips that and uses the original weights. ``log`` gets one line per thing done
    (default: stderr).
    """
    from effine.errors import ModelError
    from effine.model.loader import DTYPES, load_model, load_tokenizer, resolve_model_dir

    log = log or (lambda msg: print(f"[effine] {msg}", file=sys.stderr, flush=True))
    target = Path(spec)
    adapter_dir = run_dir = None
    if (target / "adapter" / "adapter_config.json").is_file():  # a run dir
        run_dir, adapter_dir = target, target / "adapter"
    elif (target / "adapter_config.json").is_file():  # an adapter dir, maybe a run's adapter/
        adapter_dir = target
        if target.name == "adapter" and (target.parent / "config.yaml").is_file():
            run_dir = target.parent
    elif (target / "model" / "config.json").is_file():  # a full fine-tuning run dir
        run_dir, target = target, target / "model"
    if adapter_dir is not None:
        base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ModelError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path.")
        model_dir = resolve_model_dir(base)
    else:
        model_dir = resolve_model_dir(str(target))
    recipe = read_base_recipe(adapter_dir, run_dir) if run_dir is not None or adapter_dir is not None else None
    rebuild = as_trained and recipe is not None and recipe.changes_base

    # The run saved the tokenizer with the chat template it trained with next to the adapter.
    tok_dir = adapter_dir if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file() \
        else model_dir
    tokenizer = load_tokenizer(tok_dir)
    if not rebuild:
        model = load_model(model_dir, dtype)
        if recipe is not None and recipe.changes_base:
            log(f"base NOT {recipe.describe()} although training used that (--no-quant): generating with the "
                "original weights")
    else:
        # Quantize the weights training quantized: loaded in the training dtype, so the codes and scales match.
        model = load_model(model_dir, recipe.dtype)
        for p in model.parameters():
            p.requires_grad_(False)
        if recipe.method != "none":
            from effine.quant import quantize_model

            quantize_model(model, recipe.method, group_size=recipe.group_size, blocksize=recipe.blocksize,
                           double_quant=recipe.double_quant, skip_modules=list(recipe.skip_modules))
        if recipe.qat_bits:
            from effine.quant import apply_qat

            apply_qat(model, bits=recipe.qat_bits, group_size=recipe.group_size)
        if DTYPES[dtype] != DTYPES[recipe.dtype]:
            _cast_floats(model, DTYPES[dtype])
        log(f"base {recipe.describe()} as in training (from {recipe.source}; --no-quant to skip), "
            f"{dtype} compute")
    if adapter_dir is not None:
        from effine.adapters import load_adapter

        load_adapter(model, adapter_dir)
        log(f"adapter: {adapter_dir}")
    model.eval()
    return GenerationModel(model=model, tokenizer=tokenizer, model_dir=model_dir, adapter_dir=adapter_dir,
                           recipe=recipe, base_as_trained=rebuild)
