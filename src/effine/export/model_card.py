"""The model card (README.md) that `effine push` uploads: Hub metadata plus what was trained and how to load it.

The YAML header is built with ``huggingface_hub.ModelCardData`` (so the Hub reads it as it reads any card):

    base_model     the upstream Hub id: the run's model.name when it is a hub id; for effine's packaged short
                   names the repo the packaged GGUF came from (effine.model.registry); omitted for a local dir
    library_name   peft (adapter), transformers (merged or fully fine-tuned model); none for GGUF (tag gguf)
    license        inherited from the base (registry for packaged models, the base's own card for hub ids)
    tags           effine, the method (lora / qlora / qat / full-fine-tune), peft / gguf, text-generation
    model-index    the held-out eval loss and perplexity after training

The body holds the before/after eval table from ``summary.json``, the training recipe, how to load the upload
(PEFT / transformers / llama.cpp and Ollama) and the resolved training config (``config.yaml``). The card is a
pure function of the run dir and the push options (no dates, no paths of this machine beyond what the config
holds), so pushing the same run twice gives the same bytes and the resumable push skips it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from effine.config import Config

__all__ = ["base_model_of", "build_model_card", "method_tags"]


def base_model_of(cfg: Config) -> tuple[str | None, str | None]:
    """(upstream hub id, license id known without asking the Hub) of the run's base model; (None, None) if local."""
    from effine.model.registry import PACKAGED_MODELS

    name = cfg.model.name
    if name in PACKAGED_MODELS:
        return PACKAGED_MODELS[name].hub_id, PACKAGED_MODELS[name].hub_license
    if is_hub_id(name) and not Path(name).expanduser().exists():
        return name, None  # the license is the base card's: effine.export.push asks the Hub for it
    return None, None


def is_hub_id(name: str) -> bool:
    """``org/name`` with no path syntax (how effine.model.loader tells a hub id from a path)."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith(".gguf") \
        and all(part.strip() for part in name.split("/"))


def method_tags(cfg: Config) -> list[str]:
    if cfg.adapter.method == "full":
        tags = ["full-fine-tune"]
    else:
        tags = ["qlora" if cfg.quant.method != "none" else "lora"]
    if cfg.quant.qat_bits:
        tags.append("qat")
    return tags


def _method_line(cfg: Config) -> str:
    a, q = cfg.adapter, cfg.quant
    if a.method == "full":
        line = f"full fine-tuning of every weight ({cfg.model.dtype})"
    else:
        targets = ", ".join(a.target_modules) if a.target_modules else "every attention and MLP projection"
        scale = "alpha/sqrt(r), rsLoRA" if a.rslora else "alpha/r"
        line = f"LoRA r={a.r}, alpha={a.alpha:g} (scale {scale}) on {targets}"
        if q.method != "none":
            line = (f"QLoRA: {line}, on a base stored in {q.method}"
                    + (f" (block size {q.blocksize}{', double-quantized scales' if q.double_quant else ''})"
                       if q.method in ("nf4", "fp4") else f" (group size {q.group_size})"))
    if q.qat_bits:
        line += f"; quantization-aware training to {q.qat_bits} bits (group size {q.group_size})"
    return line


def _data_line(cfg: Config, summary: dict[str, Any]) -> str:
    d = cfg.data
    source = {"builtin:chitchat": "the Chit Chat Challenge conversations (PyPI `chitchat-dataset`, MIT)",
              "builtin:chitchat-completion": "the Chit Chat Challenge conversations as prompt/completion text",
              "builtin:evals": "chat tasks with ideal answers from OpenAI Evals (PyPI `evals`, MIT)"}
    what = source.get(d.path, f"`{Path(d.path).name}`")
    rows = summary["data"].get("train_examples") if isinstance(summary.get("data"), dict) else None
    return f"{what}{f', {rows:,} training examples' if isinstance(rows, int) else ''}, max length {d.max_length} " \
           f"tokens{', packed' if d.packing else ''}, trained on {d.train_on.replace('_', ' ')} tokens"


def _packaged_note(cfg: Config) -> list[str]:
    """effine's packaged bases are the upstream weights after a GGUF round trip: say so, it changes the numbers."""
    from effine.model.registry import PACKAGED_MODELS

    m = PACKAGED_MODELS.get(cfg.model.name)
    if m is None:
        return []
    return [f"The base effine trained on is its packaged copy `{m.name}`: {m.note} Those are the upstream weights "
            "after GGUF quantization, so the same adapter or fine-tune on the upstream safetensors gives a close, "
            "not identical, model.", ""]


def _eval_table(summary: dict[str, Any]) -> list[str]:
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    if not before or not after:
        return ["(no held-out evaluation in this run)"]

    def cell(d: dict, key: str, fmt: str) -> str:
        v = d.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) else "n/a"

    return ["| held-out eval | before | after |", "|---|---|---|",
            f"| loss | {cell(before, 'eval_loss', '.4f')} | {cell(after, 'eval_loss', '.4f')} |",
            f"| perplexity | {cell(before, 'eval_ppl', '.2f')} | {cell(after, 'eval_ppl', '.2f')} |"]


def _usage(what: str, repo_id: str, base: str | None, cfg: Config, gguf_files: list[str]) -> list[str]:
    base_ref = base or "BASE_MODEL"
    if what == "adapter":
        lines = ["This repo holds a LoRA adapter in PEFT format. With PEFT and transformers:", "", "```python",
                 "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                 f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")',
                 f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```", "",
                 "or on an explicitly loaded base:", "", "```python",
                 "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                 f'base = AutoModelForCausalLM.from_pretrained("{base_ref}")',
                 f'model = PeftModel.from_pretrained(base, "{repo_id}")',
                 "model = model.merge_and_unload()  # optional: a plain transformers model", "```", ""]
        if cfg.quant.method != "none" or cfg.quant.qat_bits:
            lines += [f"The adapter was trained on a {'quantized' if cfg.quant.method != 'none' else 'fake-quantized'}"
                      " base (see the recipe above): `effine merge` rebuilds that base exactly before merging, which "
                      "a plain `merge_and_unload()` on the full-precision base does not.", ""]
        lines += ["For llama.cpp / Ollama, merge and convert it with effine (`effine merge RUN_DIR`, then "
                  "`effine export gguf RUN_DIR ...`), or push the GGUF with `effine push RUN_DIR --what gguf`."]
        return lines
    if what == "merged":
        return ["This repo holds a full transformers model (the adapter merged into the base, or a fully "
                "fine-tuned model):", "", "```python",
                "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```", "",
                "For llama.cpp / Ollama, convert it with `effine export gguf` (or push the GGUF with "
                "`effine push RUN_DIR --what gguf`)."]
    first = next((f for f in gguf_files if f.endswith(".gguf")), "MODEL.gguf")
    quant = first.rsplit("-", 1)[-1].removesuffix(".gguf") if "-" in first else None
    lines = ["This repo holds GGUF file(s) for llama.cpp, Ollama and LM Studio:", "", "```bash",
             f"llama-cli -hf {repo_id}{':' + quant if quant else ''} -cnv",
             f"# or, with the file downloaded:  llama-cli -m {first} -cnv",
             f"ollama run hf.co/{repo_id}{':' + quant if quant else ''}", "```"]
    if "Modelfile" in gguf_files:
        lines += ["", "The `Modelfile` next to it sets the chat template and stop tokens for Ollama:", "", "```bash",
                  "ollama create my-model -f Modelfile && ollama run my-model", "```"]
    return lines


def build_model_card(run_dir: Path, repo_id: str, what: str, files: list[str], *,
                     base_license: str | None = None, merge_report: dict[str, Any] | None = None):
    """The ``huggingface_hub.ModelCard`` for pushing ``what`` (adapter | merged | gguf) of ``run_dir`` to ``repo_id``.

    ``files`` are the uploaded paths (the card's usage section names the GGUF file); ``base_license`` overrides
    the license known offline (a hub-id base's license is looked up by the caller).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from effine.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    base, license_id = base_model_of(cfg)
    license_id = base_license or license_id
    tags = ["effine", *method_tags(cfg)] + {"adapter": ["peft"], "gguf": ["gguf"]}.get(what, []) \
        + ["text-generation"]
    after = summary.get("eval_after") or {}
    data_name = cfg.data.path if cfg.data.path.startswith("builtin:") else Path(cfg.data.path).name
    evals = [EvalResult(task_type="text-generation", dataset_type=data_name, dataset_name=f"{data_name} (held out)",
                        dataset_split="eval", metric_type=key, metric_name=label, metric_value=round(after[k], 6))
             for k, key, label in (("eval_loss", "loss", "eval loss"), ("eval_ppl", "perplexity", "eval perplexity"))
             if isinstance(after.get(k), (int, float))]
    data = ModelCardData(
        base_model=base, library_name={"adapter": "peft", "merged": "transformers"}.get(what),
        license=license_id, tags=tags, pipeline_tag="text-generation", model_name=repo_id.split("/")[-1],
        eval_results=evals or None,
    )
    base_text = f"[{base}](https://huggingface.co/{base})" if base else f"`{cfg.model.name}` (a local model)"
    kind = {"adapter": "A LoRA adapter for", "merged": "A fine-tuned", "gguf": "GGUF export of a fine-tuned"}[what]
    body = [f"# {repo_id.split('/')[-1]}", "",
            f"{kind} {base_text}{'' if what == 'adapter' else ' model'}, trained with effine.", "",
            *_packaged_note(cfg),
            "## Results", "", *_eval_table(summary), ""]
    if summary.get("steps") is not None:
        tps = summary.get("tokens_per_s")
        body += [f"{summary['steps']} optimizer steps" + (f", {tps:,.0f} tokens/s" if isinstance(tps, float) else "")
                 + ".", ""]
    if merge_report:
        body += [f"Merge check (`merge_report.json`): max |Δlogit| {merge_report.get('max_abs_logit_diff', 0):.3g} "
                 f"against {merge_report.get('reference', 'the trained model')}; greedy-token agreement "
                 f"{100 * merge_report.get('argmax_agreement', 0):.1f}%.", ""]
    body += ["## Training", "", f"- method: {_method_line(cfg)}", f"- data: {_data_line(cfg, summary)}",
             f"- optimizer: AdamW, lr {cfg.train.lr:g} ({cfg.train.schedule}), batch {cfg.train.batch_size} x "
             f"{cfg.train.grad_accum} accumulation, compute dtype {cfg.model.dtype}", "",
             "## How to use", "", *_usage(what, repo_id, base, cfg, files), "",
             "## Training config", "", "The resolved effine config of this run (`effine train` with it reproduces "
             "the run):", "", "```yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
