"""Greedy generation for before/after samples and `effine generate`, and loading a run for it.

A LoRA adapter learned to correct the base *as training computed it*: for QLoRA (``quant.method`` nf4, fp4, int8,
int4) that is the quantized base, for QAT (``quant.qat_bits``) the fake-quantized one. :func:`load_for_generation`
rebuilds that base before it adds the adapter (``as_trained=False`` puts the adapter on the original weights
instead). It learns how the base was built from the run's record of it:

* ``ADAPTER_DIR/effine_run.json`` (:data:`effine.recipe.RECIPE_NAME`, the run's :class:`effine.recipe.ModelRecipe`), which a run writes next to ``adapter_config.json``
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

from effine.data.prompts import prompt_from_example, prompt_ids_for  # noqa: F401  (re-exported)
from effine.recipe import ModelRecipe, build_model, read_recipe


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


@dataclass
class GenerationModel:
    """What :func:`load_for_generation` loaded."""

    model: torch.nn.Module
    tokenizer: Any
    model_dir: Path  # the base (or full fine-tuned) model dir
    adapter_dir: Path | None
    recipe: ModelRecipe | None  # the run's record of how its model was built (None: no record)
    recipe_source: str | None  # the file the recipe was read from
    base_as_trained: bool  # the base was rebuilt from the recipe (quantized / fake-quantized)


def load_for_generation(spec: str | Path, dtype: str = "fp32", *, as_trained: bool = True,
                        log: Callable[[str], None] | None = None) -> GenerationModel:
    """Load a model spec, a run dir or an adapter dir for :func:`generate`; what `effine generate` does.

    ``dtype`` is the compute dtype. For a run whose base was quantized (QLoRA) or fake-quantized (QAT), the base is
    built from the run's recipe (:func:`effine.recipe.build_model`: loaded in the run's ``model.dtype``, quantized
    exactly as in training, same codes and scales), then computes in ``dtype``; ``as_trained=False`` skips that and
    uses the original weights. ``log`` gets one line per thing done (default: stderr).
    """
    from effine.errors import ModelError
    from effine.model.loader import load_tokenizer, resolve_model_dir

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
    found = read_recipe(adapter_dir, run_dir) if run_dir is not None or adapter_dir is not None else None
    recipe, source = found if found is not None else (None, None)
    rebuild = as_trained and recipe is not None and recipe.changes_base

    # The run saved the tokenizer with the chat template it trained with next to the adapter.
    tok_dir = adapter_dir if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file() \
        else model_dir
    tokenizer = load_tokenizer(tok_dir)
    if rebuild:
        # Quantize the weights training quantized: built in the training dtype, so the codes and scales match.
        build = recipe
        log(f"base {recipe.describe()} as in training (from {source}; --no-quant to skip), {dtype} compute")
    else:
        build = ModelRecipe(base=str(model_dir), dtype=dtype)
        if recipe is not None and recipe.changes_base:
            log(f"base NOT {recipe.describe()} although training used that (--no-quant): generating with the "
                "original weights")
    model = build_model(build, train=False, model_dir=model_dir, adapter_dir=adapter_dir,
                        compute_dtype=dtype, log=log)
    return GenerationModel(model=model, tokenizer=tokenizer, model_dir=model_dir, adapter_dir=adapter_dir,
                           recipe=recipe, recipe_source=source, base_as_trained=rebuild)
