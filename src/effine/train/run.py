"""A whole fine-tuning run: config -> model -> data -> before -> train -> after -> adapter + report.

    run_dir/
      config.yaml          the resolved config (after --set overrides and defaults)
      train.log            everything printed
      data_report.txt      rows kept/dropped (with file:line), token stats
      metrics.jsonl        one JSON object per log/eval event
      checkpoints/         resumable checkpoints (trainable weights, optimizer, RNG, loop position)
      adapter/             PEFT-format adapter (adapter_config.json + adapter_model.safetensors) + tokenizer
                           + effine_run.json (how the base was built: dtype, quantization)
      model/               full fine-tuning (or output.save_merged): a transformers model dir
      report.md            before/after eval loss and sample generations
      loss.png             the loss curves
      summary.json         the numbers of report.md, machine-readable
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from effine.config import Config, save_config
from effine.errors import ConfigError
from effine.eval.evaluate import evaluate
from effine.eval.generate import generate, prompt_from_example, prompt_ids_for, write_run_meta
from effine.eval.task_run import report_lines as task_report_lines
from effine.eval.task_run import task_eval_phase, task_eval_summary
from effine.model.loader import cache_root, load_model, load_tokenizer, resolve_device, resolve_model_dir
from effine.train.checkpoint import LoopState, latest_checkpoint, load_checkpoint
from effine.train.metrics import MetricsLog, plot_losses
from effine.train.optim import build_optimizer


class RunLog:
    """Print and append to run_dir/train.log."""

    def __init__(self, path: Path):
        self.f = path.open("a")

    def __call__(self, msg: str) -> None:
        print(msg, flush=True)
        self.f.write(msg + "\n")
        self.f.flush()


def resolve_run_dir(cfg: Config) -> Path:
    name = Path(cfg.model.name).stem if cfg.model.name.endswith(".gguf") else cfg.model.name.rstrip("/")
    name = name.replace("/", "--").split("--")[-1] if "/" in name else name
    return Path(cfg.output.dir.format(model=name, method=cfg.adapter.method if cfg.quant.method == "none"
                                      else f"q{cfg.quant.method}-{cfg.adapter.method}"))


def prepare_model(cfg: Config, model_dir: Path, log) -> torch.nn.Module:
    """Load the base, quantize frozen weights if asked, and make only the trained parameters require grad."""
    from effine.ops.attention import enable as enable_attention
    from effine.ops.attention import select_backend

    from effine.quant import check_quant_settings

    check_quant_settings(cfg.quant, cfg.adapter.method)
    device = resolve_device(cfg.model.device)
    model = load_model(model_dir, cfg.model.dtype, attn="sdpa", trust_remote_code=cfg.model.trust_remote_code,
                       device=device)
    enable_attention(model, None if cfg.model.attn == "auto" else cfg.model.attn)
    log(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    log(f"attention: effine backend '{select_backend(device, dtype=model.dtype)}' "
        f"(model.attn={cfg.model.attn}; packed rows keep attention within each document)")
    if cfg.quant.method != "none":
        from effine.quant import quantize_model

        n = quantize_model(model, cfg.quant.method, group_size=cfg.quant.group_size, blocksize=cfg.quant.blocksize,
                           double_quant=cfg.quant.double_quant, skip_modules=cfg.quant.skip_modules)
        kept = f" (kept in {cfg.model.dtype}: {', '.join(cfg.quant.skip_modules)})" if cfg.quant.skip_modules else ""
        log(f"quantized {n} linear layers to {cfg.quant.method}{kept}")
        from effine.train.measure import release_free_heap

        release_free_heap()  # the freed bf16 weights' pages go back to the OS, not just to the heap
    if cfg.quant.qat_bits:
        from effine.quant import apply_qat

        n = apply_qat(model, bits=cfg.quant.qat_bits, group_size=cfg.quant.group_size)
        log(f"QAT: fake-quantizing {n} linear layers to {cfg.quant.qat_bits} bits")
    if cfg.adapter.method == "lora":
        from effine.adapters import count_parameters, inject_lora

        # Adapters train in fp32 even on a bf16 base: AdamW updates of bf16 weights lose most small steps.
        names = inject_lora(model, cfg.adapter, dtype=torch.float32)
        trainable, total = count_parameters(model)
        log(f"LoRA r={cfg.adapter.r} alpha={cfg.adapter.alpha} on {len(names)} modules: "
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        log(f"full fine-tuning: {sum(p.numel() for p in model.parameters()):,} parameters")
    if cfg.model.fused_ops:
        from effine.ops.swap import fuse_model

        counts = fuse_model(model, recompute_norms=cfg.model.recompute_norm_outputs)
        log(f"fused ops: {counts['rms_norm']} RMSNorm, {counts['gated_mlp']} gated MLP modules"
            + (f" ({counts['unsupported_act']} MLPs with an unsupported activation left as they are)"
               if counts["unsupported_act"] else ""))
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def sample_prompts(cfg: Config, tokenizer, eval_set: list) -> list[tuple[str, list[int]]]:
    # Prompts go through the same template as the training data (raw text for completion/text data).
    chat = cfg.data.format not in ("prompt_completion", "text")
    prompts = [(p, prompt_ids_for(tokenizer, p, chat, cfg.data.system_prompt)) for p in cfg.eval.prompts]
    for ex in eval_set[: cfg.eval.prompts_from_eval]:
        ids = prompt_from_example(ex)
        prompts.append((tokenizer.decode(ids, skip_special_tokens=False)[-300:], ids))
    return prompts


def _write_report(run_dir: Path, cfg: Config, summary: dict, samples: list[dict]) -> None:
    lines = [f"# effine run: {cfg.model.name} ({cfg.adapter.method})", "",
             "| | before | after |", "|---|---|---|",
             f"| eval loss | {summary['eval_before']['eval_loss']:.4f} | {summary['eval_after']['eval_loss']:.4f} |",
             f"| eval perplexity | {summary['eval_before']['eval_ppl']:.2f} | {summary['eval_after']['eval_ppl']:.2f} |",
             *task_report_lines(summary.get("task_eval")),
             "", f"Trained {summary['steps']} steps in {summary['train_seconds']:.0f} s: "
             f"{summary['tokens_per_s']:.0f} tokens/s ({summary['supervised_per_s']:.0f} supervised tokens/s).", "",
             "## Samples (greedy)", ""]
    for s in samples:
        lines += [f"**Prompt** (last 300 chars): `{s['prompt'][-300:]!r}`", "",
                  f"- before: {s['before']!r}", f"- after: {s['after']!r}", ""]
    (run_dir / "report.md").write_text("\n".join(lines))


def run_training(cfg: Config, resume: bool = False) -> dict:
    from effine.data import build_datasets

    run_dir = resolve_run_dir(cfg)
    if (run_dir / "summary.json").exists() and not (cfg.output.overwrite or resume):
        raise ConfigError(f"output.dir: {run_dir} already holds a finished run; choose another output.dir or "
                          "set output.overwrite=true.")
    if resume and latest_checkpoint(run_dir) is None:
        raise ConfigError(f"--resume: {run_dir} has no checkpoint to resume from.")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    log = RunLog(run_dir / "train.log")
    torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.train.seed)
    log(f"effine: run dir {run_dir} | torch {torch.__version__} | {platform.machine()} | "
        f"{torch.get_num_threads()} threads")
    from effine.train.allocator import describe as allocator_line

    log(allocator_line())

    t0 = time.perf_counter()
    model_dir = resolve_model_dir(cfg.model.name, cfg.model.cache_dir, cfg.model.revision)
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    train_set, eval_set, report = build_datasets(cfg.data, tokenizer, cache_dir=cache_root(cfg.model.cache_dir), log=log)
    if cfg.data.format not in ("prompt_completion", "text"):
        from effine.data.template import resolve_chat_template

        # The template the data was rendered with travels with the tokenizer: generation and the saved adapter's
        # tokenizer then use it too (matters when it is an override or the ChatML fallback).
        tokenizer.chat_template = resolve_chat_template(tokenizer, cfg.data.chat_template).source
    if cfg.data.packing:
        from effine.data import pack_examples, packing_efficiency

        train_set = pack_examples(train_set, cfg.data.max_length)
        log(f"packed into {len(train_set):,} rows of <= {cfg.data.max_length} tokens "
            f"({100 * packing_efficiency(train_set, cfg.data.max_length):.1f}% filled)")
    (run_dir / "data_report.txt").write_text(report.format())
    log(report.format())
    if not train_set:
        raise ConfigError(f"data.path: no usable training rows in {cfg.data.path} (see {run_dir}/data_report.txt).")
    t_data = time.perf_counter()
    model = prepare_model(cfg, model_dir, log)
    t_model = time.perf_counter()
    pad_id = tokenizer.pad_token_id
    eval_bs = cfg.eval.batch_size or cfg.train.batch_size

    def run_eval(step: int) -> dict:
        res = evaluate(model, eval_set, eval_bs, pad_id, cfg.eval.max_batches, impl=cfg.train.loss_impl)
        metrics.write("eval", step=step, **res)
        return res

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, cfg.train)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    state, samples = LoopState(), []
    prompts = sample_prompts(cfg, tokenizer, eval_set)
    if resume:
        ckpt = latest_checkpoint(run_dir)
        state = load_checkpoint(ckpt, model, optimizer)
        log(f"resumed from {ckpt} at step {state.step} (epoch {state.epoch}, micro-batch {state.batch_index})")
        before = json.loads((run_dir / "before.json").read_text()) if (run_dir / "before.json").exists() else {}
        eval_before = before.get("eval", {"eval_loss": float("nan"), "eval_ppl": float("nan")})
        gens_before = before.get("samples", [""] * len(prompts))
    else:
        log("evaluating the base model ...")
        eval_before = run_eval(0)
        gens_before = [generate(model, tokenizer, ids, cfg.eval.max_new_tokens) for _, ids in prompts]
        (run_dir / "before.json").write_text(json.dumps({"eval": eval_before, "samples": gens_before}))
        log(f"before: eval_loss {eval_before['eval_loss']:.4f} (ppl {eval_before['eval_ppl']:.2f})")
    task_before = task_eval_phase(cfg, model, tokenizer, run_dir, "before", log, reuse=resume)
    log(f"time to first step: data {t_data - t0:.1f}s, model {t_model - t_data:.1f}s, "
        f"eval+samples {time.perf_counter() - t_model:.1f}s")

    from effine.train.loop import train_loop

    result = train_loop(model, optimizer, train_set, cfg.train, pad_id, run_dir, metrics, state, run_eval, log)
    eval_after = run_eval(result.state.step)
    gens_after = [generate(model, tokenizer, ids, cfg.eval.max_new_tokens) for _, ids in prompts]
    task_after = task_eval_phase(cfg, model, tokenizer, run_dir, "after", log)
    log(f"after:  eval_loss {eval_after['eval_loss']:.4f} (ppl {eval_after['eval_ppl']:.2f}) "
        f"[before {eval_before['eval_loss']:.4f}]")
    for (p, _), b, a in zip(prompts, gens_before, gens_after):
        samples.append({"prompt": p, "before": b, "after": a})
        log(f"\n--- prompt: ...{p[-160:]!r}\n    before: {b!r}\n    after:  {a!r}")

    save_outputs(cfg, model, tokenizer, model_dir, run_dir, log)
    metrics.close()
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    summary = {"run_dir": str(run_dir), "steps": result.state.step, "train_seconds": result.seconds,
               "tokens_per_s": result.tokens_per_s, "supervised_per_s": result.supervised_per_s,
               "final_train_loss": result.last_loss, "eval_before": eval_before, "eval_after": eval_after,
               "data": report.to_dict() if hasattr(report, "to_dict") else None}
    if (task := task_eval_summary(cfg, task_before, task_after)) is not None:
        summary["task_eval"] = task
    _write_report(run_dir, cfg, summary, samples)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"done: {run_dir}/report.md")
    return summary


def save_outputs(cfg: Config, model, tokenizer, model_dir: Path, run_dir: Path, log) -> None:
    if cfg.adapter.method == "lora":
        from effine.adapters import merge_lora, save_adapter

        save_adapter(model, run_dir / "adapter", cfg.adapter, base_model_name_or_path=str(model_dir))
        tokenizer.save_pretrained(run_dir / "adapter")
        # How the base was built (quantized?), next to adapter_config.json: generation rebuilds the same base.
        write_run_meta(run_dir / "adapter", cfg, model_dir)
        log(f"adapter saved: {run_dir / 'adapter'} (PEFT format)")
        if cfg.output.save_merged:
            merged = merge_lora(model)
            merged.save_pretrained(run_dir / "model", safe_serialization=True)
            tokenizer.save_pretrained(run_dir / "model")
            log(f"merged model saved: {run_dir / 'model'}")
    else:
        shutil.rmtree(run_dir / "model", ignore_errors=True)
        model.save_pretrained(run_dir / "model", safe_serialization=True)
        tokenizer.save_pretrained(run_dir / "model")
        log(f"model saved: {run_dir / 'model'}")
