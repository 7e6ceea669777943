"""A whole fine-tuning run: config -> model -> data -> before -> train -> after -> adapter + report.

    run_dir/
      config.yaml          the resolved config (after --set overrides and defaults)
      train.log            everything printed
      data_report.txt      rows kept/dropped (with file:line), token stats
      metrics.jsonl        one JSON object per log/eval event (and a "start" row with the planned total steps)
      checkpoints/         resumable checkpoints (trainable weights, optimizer, RNG, loop position, fingerprint,
                           manifest; see effine.train.checkpoint; several processes: torch.distributed.checkpoint
                           shards, see train/dist_checkpoint.py)
      samples.jsonl        the rows (file:line) of every training window, in order
      adapter/             PEFT-format adapter (adapter_config.json + adapter_model.safetensors) + tokenizer
                           + effine_run.json (how the base was built: dtype, quantization)
      model/               full fine-tuning (or output.save_merged): a transformers model dir
      report.md            before/after eval loss and sample generations
      report.html          the run report page (effine.report): curves, data, memory, samples, environment
      data_example.json    token-length histogram and one sample with its trained tokens, for report.html
      loss.png             the loss curves
      summary.json         the numbers of report.md, machine-readable (+ memory, environment, samples)
      tensorboard/ wandb/ mlruns/   when train.report_to names those trackers
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
from effine.eval.generate import generate, prompt_from_example, prompt_ids_for
from effine.eval.task_run import report_lines as task_report_lines
from effine.eval.task_run import task_eval_phase, task_eval_summary
from effine.model.loader import cache_root, load_tokenizer, resolve_device, resolve_model_dir
from effine.recipe import ModelRecipe, build_model, write_recipe
from effine.report import write_report_safely
from effine.report.facts import run_facts, write_data_example
from effine.train.batching import check_batching, training_batches
from effine.train.checkpoint import LoopState, check_disk_space, committed, find_resumable, read_fingerprint
from effine.train.dist_checkpoint import load_any_checkpoint
from effine.train.faults import fault
from effine.train.metrics import MetricsLog, plot_losses
from effine.train.optim import build_optimizer
from effine.train.resume import check_resume
from effine.train.resume import fingerprint as run_fingerprint
from effine.train.signals import StopSignals
from effine.train.trackers import open_trackers


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


def sample_prompts(cfg: Config, tokenizer, eval_set: list) -> list[tuple[str, list[int]]]:
    # Prompts go through the same template as the training data (raw text for completion/text data).
    chat = cfg.data.format not in ("prompt_completion", "text")
    prompts = [(p, prompt_ids_for(tokenizer, p, chat, cfg.data.system_prompt)) for p in cfg.eval.prompts]
    for ex in eval_set[: cfg.eval.prompts_from_eval]:
        ids = prompt_from_example(ex)
        prompts.append((tokenizer.decode(ids, skip_special_tokens=False)[-300:], ids))
    return prompts


NO_EVAL_SET = ("No eval set (data.eval_fraction is 0 and data.eval_path is unset): eval loss was not measured. "
               "Hold out rows with data.eval_fraction or give data.eval_path.")


def _eval_line(res: dict | None) -> str:
    return "no eval set" if res is None else f"eval_loss {res['eval_loss']:.4f} (ppl {res['eval_ppl']:.2f})"


def _write_report(run_dir: Path, cfg: Config, summary: dict, samples: list[dict]) -> None:
    before, after = summary["eval_before"], summary["eval_after"]
    lines = [f"# effine run: {cfg.model.name} ({cfg.adapter.method})", ""]
    if before is None or after is None:
        lines += [NO_EVAL_SET]
    else:
        lines += ["| | before | after |", "|---|---|---|",
                  f"| eval loss | {before['eval_loss']:.4f} | {after['eval_loss']:.4f} |",
                  f"| eval perplexity | {before['eval_ppl']:.2f} | {after['eval_ppl']:.2f} |"]
    if task_rows := task_report_lines(summary.get("task_eval")):  # task score before/after (eval.data)
        lines += (["", "| | before | after |", "|---|---|---|"] if before is None or after is None else []) + task_rows
    lines += ["", f"Trained {summary['steps']} steps in {summary['train_seconds']:.0f} s: "
             f"{summary['tokens_per_s']:.0f} tokens/s ({summary['supervised_per_s']:.0f} supervised tokens/s).", "",
             "## Samples (greedy)", ""]
    for s in samples:
        lines += [f"**Prompt** (last 300 chars): `{s['prompt'][-300:]!r}`", "",
                  f"- before: {s['before']!r}", f"- after: {s['after']!r}", ""]
    (run_dir / "report.md").write_text("\n".join(lines))


def resume_mode(cfg: Config, resume: bool | str | None) -> str:
    """``--resume`` (True) means "always"; otherwise the config's ``train.resume`` (never / auto / always)."""
    if resume is True:
        return "always"
    return resume if isinstance(resume, str) else cfg.train.resume


def run_training(cfg: Config, resume: bool | str | None = None, force: bool = False) -> dict:
    """Train as ``cfg`` says. ``resume``: True (``--resume``), "auto", "never", or None to use ``train.resume``;
    ``force`` (``--resume-force``): resume even when the checkpoint's fingerprint differs (logged)."""
    mode = resume_mode(cfg, resume)
    run_dir = resolve_run_dir(cfg)
    finished = (run_dir / "summary.json").exists()
    if finished and mode == "never" and not cfg.output.overwrite:
        raise ConfigError(f"output.dir: {run_dir} already holds a finished run; choose another output.dir or "
                          "set output.overwrite=true.")
    # [distributed hook] under torchrun: join the process group; rank 0 alone writes the run dir and logs.
    from effine.train.distributed import init_distributed, quiet

    dist = init_distributed(cfg.train, resolve_device(cfg.model.device))
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir / "train.log") if dist.is_main else quiet
    if finished and mode == "auto" and not cfg.output.overwrite:
        log(f"train.resume=auto: {run_dir} already holds a finished run (summary.json); nothing to do. "
            "Use another output.dir (or output.overwrite=true) to train again.")
        return json.loads((run_dir / "summary.json").read_text())
    ckpt = find_resumable(run_dir, warn=log) if mode != "never" else None
    if mode == "always" and ckpt is None:
        raise ConfigError(f"--resume: {run_dir} has no valid checkpoint to resume from.")
    if mode == "never" and committed(run_dir / "checkpoints"):
        if not cfg.output.overwrite:  # a fresh run among old checkpoints would later resume from the wrong one
            raise ConfigError(f"output.dir: {run_dir} holds checkpoints of an earlier run; continue it with --resume "
                              "(or train.resume=auto), or set output.overwrite=true to start over (deletes them).")
        if dist.is_main:
            shutil.rmtree(run_dir / "checkpoints")
            (run_dir / "samples.jsonl").unlink(missing_ok=True)
        dist.barrier()
    with StopSignals(log) as stop:
        return _run(cfg, run_dir, log, ckpt, force, stop, dist)


def _run(cfg: Config, run_dir: Path, log: RunLog, ckpt: Path | None, force: bool, stop: StopSignals, dist) -> dict:
    from effine.data import build_datasets
    from effine.train.distributed import quiet, unshard_on_main, wrap_model

    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // dist.local_world))
    torch.manual_seed(cfg.train.seed)
    log(f"effine: run dir {run_dir} | torch {torch.__version__} | {platform.machine()} | "
        f"{torch.get_num_threads()} threads")
    from effine.system.allocator import describe as allocator_line

    log(allocator_line())

    check_batching(cfg)  # config-only: before anything loads
    t0 = time.perf_counter()
    stop.phase = "loading the data (no training step has run in this process: nothing to save)"
    fault("load:data")
    model_dir = resolve_model_dir(cfg.model.name, cfg.model.cache_dir, cfg.model.revision)
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    with dist.main_first():  # rank 0 fills the tokenisation cache, the others read it
        train_set, eval_set, report = build_datasets(cfg.data, tokenizer,
                                                     cache_dir=cache_root(cfg.model.cache_dir), log=log)
    if dist.is_main:
        write_data_example(run_dir, train_set, tokenizer)  # for report.html (before packing mixes the samples)
    template = None
    if cfg.data.format not in ("prompt_completion", "text"):
        from effine.data.template import resolve_chat_template

        # The template the data was rendered with travels with the tokenizer: generation and the saved adapter's
        # tokenizer then use it too (matters when it is an override or the ChatML fallback).
        template = tokenizer.chat_template = resolve_chat_template(tokenizer, cfg.data.chat_template).source
    fingerprint = run_fingerprint(cfg, template, cache_root(cfg.model.cache_dir))
    if ckpt is not None:  # before the model loads: a refused resume costs seconds, not minutes
        check_resume(read_fingerprint(ckpt), fingerprint, ckpt, force, log)
    if dist.is_main:
        save_config(cfg, run_dir / "config.yaml")
    if dist.is_main:
        (run_dir / "data_report.txt").write_text(report.full())
    log(report.format())
    if not train_set:
        raise ConfigError(f"data.path: no usable training rows in {cfg.data.path} (see {run_dir}/data_report.txt).")
    t_data = time.perf_counter()
    stop.phase = "loading the model (no training step has run in this process: nothing to save)"
    fault("load:model")
    recipe = ModelRecipe.from_config(cfg)
    if dist.is_main:
        write_recipe(run_dir, recipe, model_dir)
    model = build_model(recipe, model_dir=model_dir, log=log)
    # data.packing / train.tokens_per_step: the rows to train on and how many a micro-batch takes (train/batching)
    train_set, train_cfg = training_batches(cfg, train_set, model, log)
    t_model = time.perf_counter()
    outputs = sum(p.numel() * p.element_size() for p in model.parameters()
                  if p.requires_grad or cfg.adapter.method == "full" or cfg.output.save_merged)
    if dist.is_main:
        check_disk_space(run_dir, model, cfg.train.keep_checkpoints, cfg.train.keep_best, outputs)
    pad_id = tokenizer.pad_token_id
    eval_bs = cfg.eval.batch_size or cfg.train.batch_size

    def run_eval(step: int) -> dict | None:
        if not eval_set:  # data.eval_fraction: 0 and no eval_path: nothing to measure (never a loss of nan)
            return None
        t_eval = time.perf_counter()
        res = evaluate(model, eval_set, eval_bs, pad_id, cfg.eval.max_batches, impl=cfg.train.loss_impl,
                       chunk_bytes=cfg.train.loss_chunk_mb * 2**20)
        metrics.write("eval", step=step, **res, seconds=round(time.perf_counter() - t_eval, 3))
        return res

    metrics = MetricsLog(run_dir / "metrics.jsonl", trackers=open_trackers(cfg, run_dir)) if dist.is_main else quiet
    state, samples = LoopState(), []
    prompts = sample_prompts(cfg, tokenizer, eval_set)
    eval_before, gens_before = None, [""] * len(prompts)
    if ckpt is not None:
        before = json.loads((run_dir / "before.json").read_text()) if (run_dir / "before.json").exists() else {}
        eval_before = before.get("eval")
        gens_before = before.get("samples", gens_before)
    elif dist.is_main:  # before wrapping: an FSDP-sharded model runs only through its wrapper
        stop.phase = "evaluating the base model (no training step has run in this process: nothing to save)"
        log("evaluating the base model ...")
        eval_before = run_eval(0)
        gens_before = [generate(model, tokenizer, ids, cfg.eval.max_new_tokens) for _, ids in prompts]
        (run_dir / "before.json").write_text(json.dumps({"eval": eval_before, "samples": gens_before}))
        log(f"before: {_eval_line(eval_before)}" + ("" if eval_set else f" — {NO_EVAL_SET}"))
    # task eval (eval.data) of the base model: rank 0, before wrapping (a resumed run reads its rows back)
    task_before = (task_eval_phase(cfg, model, tokenizer, run_dir, "before", log, reuse=ckpt is not None)
                   if dist.is_main else None)
    wrap_model(model, dist, cfg.train, log)  # [distributed hook] DDP / FSDP2, before the optimizer sees the params
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, cfg.train)
    if ckpt is not None:
        state = load_any_checkpoint(ckpt, model, optimizer, dist, train_cfg.batch_size * dist.world)
        metrics.write("resume", step=state.step, checkpoint=str(ckpt))
        log(f"resumed from {ckpt} at step {state.step} (epoch {state.epoch}, micro-batch {state.batch_index})")
    log(f"time to first step: data {t_data - t0:.1f}s, model {t_model - t_data:.1f}s, "
        f"eval+samples {time.perf_counter() - t_model:.1f}s")

    from effine.train.loop import train_loop

    if dist.active:
        what = "packed rows" if train_cfg is not cfg.train else "samples"
        log(f"global batch: {train_cfg.batch_size} x {cfg.train.grad_accum} accum x {dist.world} processes = "
            f"{train_cfg.batch_size * cfg.train.grad_accum * dist.world} {what} per optimizer step"
            + ("; train.eval_every is not used with several processes (eval runs before and after)"
               if cfg.train.eval_every else ""))
    result = train_loop(model, optimizer, train_set, train_cfg, pad_id, run_dir, metrics, state,
                        None if dist.active or not eval_set else run_eval, log, stop=stop, fingerprint=fingerprint,
                        dist=dist)
    # [distributed hook] the trained weights, whole, on rank 0 (which evaluates and saves); the others are done.
    del optimizer
    model = unshard_on_main(model, dist, lambda: build_model(recipe, model_dir=model_dir))
    if not dist.is_main:
        return {}
    stop.phase = (f"writing the outputs (training finished and checkpointed at step {result.state.step}: "
                  "`--resume` writes them)")
    fault("outputs:start")
    eval_after = run_eval(result.state.step)
    gens_after = [generate(model, tokenizer, ids, cfg.eval.max_new_tokens) for _, ids in prompts]
    task_after = task_eval_phase(cfg, model, tokenizer, run_dir, "after", log)
    log(f"after:  {_eval_line(eval_after)}"
        + (f" [before {eval_before['eval_loss']:.4f}]" if eval_before and eval_after else ""))
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
    summary.update(run_facts(cfg), samples=samples)  # memory, environment, generations: for report.html
    _write_report(run_dir, cfg, summary, samples)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.output.export:  # output.export: GGUF / merged exports of the finished run (effine.export.after_training)
        from effine.export.after_training import run_exports

        summary["exports"] = run_exports(cfg, run_dir, log)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))  # now with what was exported
    write_report_safely(run_dir, log)
    log(f"done: {run_dir}/report.md")
    if cfg.output.push.repo:  # last, after the run is complete: a failed push is logged with its retry command
        from effine.export.push import push_after_training

        push_after_training(cfg, run_dir, log)
    return summary


def save_outputs(cfg: Config, model, tokenizer, model_dir: Path, run_dir: Path, log) -> None:
    if cfg.adapter.method == "lora":
        from effine.adapters import merge_lora, save_adapter

        save_adapter(model, run_dir / "adapter", cfg.adapter, base_model_name_or_path=str(model_dir))
        tokenizer.save_pretrained(run_dir / "adapter")
        # How the base was built (quantized?), next to adapter_config.json: generation rebuilds the same base.
        write_recipe(run_dir / "adapter", ModelRecipe.from_config(cfg), model_dir)
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
        write_recipe(run_dir / "model", ModelRecipe.from_config(cfg), model_dir)
        log(f"model saved: {run_dir / 'model'}")
