"""The `effine` command line.

    effine train CONFIG [--set key.path=value ...] [--resume] [--nproc N]
    effine data check CONFIG [--set ...] [--show N]
    effine generate MODEL_OR_RUN_DIR [--prompt TEXT ...] [--max-new-tokens N] [--no-quant]
    effine eval MODEL_OR_RUN_DIR --data FILE [--metric exact_match|contains|chrf|rouge_l|loss] [--limit N] [--out F]
    effine chat MODEL_OR_RUN_DIR [--system TEXT] [--max-new-tokens N]
    effine merge RUN_DIR [--out DIR] [--dtype bf16]
    effine ptq MODEL_DIR --out DIR [--bits 4] [--group-size 128]
    effine push RUN_DIR --repo user/name [--what adapter|merged|gguf] [--private] [--revision BRANCH] [--dry-run]
    effine plan CONFIG [--set ...] [--gpu 80]
    effine config keys | effine config show CONFIG [--set ...] | effine config list [DIR]
    effine report RUN_DIR [RUN_DIR ...] [--out FILE]
    effine watch RUN_DIR [--interval S] [--once]

Every user error (bad config key, malformed data row, missing model) prints one clear message and exits 2.
`effine train` also exits 3 (stopped on non-finite losses), 4 (disk full), 130 (Ctrl-C) and 143 (SIGTERM);
see the README's exit-code table.
"""

from __future__ import annotations

import argparse
import json
import sys

from effine import __version__
from effine.errors import EffineError
from effine.train.signals import Interrupted


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/; `effine config keys` lists every key)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """What a command that loads a trained model for inference takes (eval, chat): the model and how to build it."""
    p.add_argument("model", help="model spec, run dir (adapter is applied) or adapter dir")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype (default fp32)")
    p.add_argument("--no-quant", action="store_true", help="QLoRA/QAT runs: use the original base weights")


def cmd_train(args: argparse.Namespace) -> int:
    from effine.config import load_config
    from effine.train.run import run_training

    cfg = load_config(args.config, args.overrides)
    if args.nproc and args.nproc > 1:  # the shortcut: become torchrun, which runs this command once per process
        from effine.train.distributed import exec_torchrun

        exec_torchrun(args.nproc, ["train", args.config, *[f"--set={o}" for o in args.overrides]]
                      + (["--resume"] if args.resume else []) + (["--resume-force"] if args.resume_force else []))
    summary = run_training(cfg, resume=True if args.resume else None, force=args.resume_force)
    if not summary:  # ranks other than 0 of a multi-process run: rank 0 reports
        return 0
    print(json.dumps({k: summary[k] for k in ("run_dir", "steps", "tokens_per_s")} |
                     {"eval_loss_before": (summary["eval_before"] or {}).get("eval_loss"),
                      "eval_loss_after": (summary["eval_after"] or {}).get("eval_loss")}))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from effine.config import load_config
    from effine.data import build_datasets
    from effine.data.inspect import render_labels
    from effine.model.loader import cache_root, load_tokenizer, resolve_model_dir

    cfg = load_config(args.config, args.overrides)
    model_dir = resolve_model_dir(cfg.model.name, cfg.model.cache_dir, cfg.model.revision)
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    train, evals, report = build_datasets(cfg.data, tokenizer, cache_dir=cache_root(cfg.model.cache_dir))
    print(report.format())
    color = sys.stdout.isatty()
    legend = "\x1b[32mgreen\x1b[0m" if color else "[[double brackets]]"
    for ex in train[: args.show]:
        print(f"\n=== {ex.where} ({len(ex.input_ids)} tokens; trained text in {legend})")
        print(render_labels(ex, tokenizer, color=color))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from effine.eval.generate import generate, load_for_generation, prompt_ids_for

    # A run dir or adapter dir of a QLoRA/QAT run gets the base rebuilt as training quantized it.
    loaded = load_for_generation(args.model, args.dtype, as_trained=not args.no_quant)
    prompts = args.prompt or ["What is the capital of France?"]
    for p in prompts:
        ids = prompt_ids_for(loaded.tokenizer, p, chat=not args.no_chat)
        print(f">>> {p}\n{generate(loaded.model, loaded.tokenizer, ids, args.max_new_tokens)}\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from effine.eval.task_run import evaluate_target

    result, path = evaluate_target(args.model, args.data, args.metric, limit=args.limit, batch_size=args.batch_size,
                                   max_new_tokens=args.max_new_tokens, out=args.out, dtype=args.dtype,
                                   as_trained=not args.no_quant, seed=args.seed)
    print(f"{args.model}: {result.line()}; rows: {path}", file=sys.stderr)
    print(json.dumps({"metric": result.metric, "data": args.data, "n": result.n, "score": result.score,
                      "ci": result.ci, "rows": str(path)}))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from effine.eval.chat import chat_loop
    from effine.eval.generate import load_for_generation
    from effine.eval.task_run import run_config_for

    loaded = load_for_generation(args.model, args.dtype, as_trained=not args.no_quant)
    cfg = run_config_for(args.model, loaded.adapter_dir)
    system = args.system if args.system is not None else (cfg.data.system_prompt if cfg else None)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    return chat_loop(loaded.model, loaded.tokenizer, system_prompt=system, max_new_tokens=args.max_new_tokens)


def cmd_merge(args: argparse.Namespace) -> int:
    from effine.export.merge import merge_run

    rep = merge_run(args.run_dir, args.out, dtype=args.dtype, prompts=args.prompt or None,
                    bake_qat=not args.no_bake_qat, verify_reload=not args.no_verify)
    print(f"merged model written to {rep.out_dir} (report: merge_report.json)")
    print(json.dumps({k: getattr(rep, k) for k in ("max_abs_logit_diff", "mean_abs_logit_diff",
                                                   "argmax_agreement", "reload_max_abs_logit_diff")}
                     | {"naive_merge_into_unquantized_base": rep.original_base}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from effine.export.gguf import export_gguf

    rep = export_gguf(args.source, args.out, args.type, verify=not args.no_verify, prompts=args.prompt or None)
    v = rep["verification"]
    if "skipped" not in v and not v["passed"]:
        print(f"effine: error: the GGUF does not match the source model within the {args.type} tolerance; "
              f"see {rep['report']}", file=sys.stderr)
        return 1
    return 0


def cmd_ptq(args: argparse.Namespace) -> int:
    from effine.export.ptq import ptq_export
    from effine.model.loader import resolve_model_dir

    rep = ptq_export(resolve_model_dir(args.model_dir), args.out, bits=args.bits,
                     group_size=args.group_size or None, symmetric=not args.asymmetric)
    print(f"int{rep.bits} export in {rep.out_dir}: decoder linears {rep.linear_bytes_before / 2**20:.1f} -> "
          f"{rep.linear_bytes_after / 2**20:.1f} MiB; whole model {rep.total_bytes_before / 2**20:.0f} -> "
          f"{rep.total_bytes_after / 2**20:.0f} MiB")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from effine.export.push import push_run

    push_run(args.run_dir, args.repo, args.what, private=args.private, revision=args.revision,
             dry_run=args.dry_run, message=args.message)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from effine.config import load_config
    from effine.plan.memory import plan_memory

    cfg = load_config(args.config, args.overrides)
    device = "cuda" if args.gpu else "cpu"
    print(plan_memory(cfg, device=device, gpu_memory_gb=args.gpu, world=args.world, parallel=args.parallel).format())
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from effine.config import describe, load_config

    if args.action == "keys":
        for path, default, help_ in describe():
            print(f"{path:28s} {default:24s} {help_}")
        return 0
    if args.action == "list":
        return _config_list(args.config)
    if not args.config:
        raise EffineError("effine config show: give a CONFIG file.")
    import yaml

    print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from effine.report import build_report

    print(f"report written: {build_report(args.run_dirs, args.out)}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from effine.report.watch import watch

    watch(args.run_dir, interval=args.interval, once=args.once)
    return 0


def _config_list(directory: str | None) -> int:
    """Every shipped config: model, method, the hardware it is sized for, and effine plan's GPU peak."""
    from pathlib import Path

    from effine.plan.config_headers import GPUS, entry, shipped_configs

    paths = shipped_configs(Path(directory) if directory else None)
    if not paths:
        raise EffineError(f"effine config list: no *.yaml configs in {directory or 'configs/'}.")
    print(f"{'config':28s} {'model':34s} {'method':13s} {'sized for':10s} {'peak GiB':>8s}  "
          + " ".join(f"{g} GB" for g in GPUS))
    for p in paths:
        try:
            e = entry(p)
        except EffineError as err:  # one unplannable config does not hide the others
            print(f"{p.name:28s} cannot plan: {str(err).splitlines()[0]}")
            continue
        print(f"{p.name:28s} {e.model:34s} {e.method:13s} {e.sized_for:10s} {e.peak_gib:8.2f}  "
              + " ".join(f"{'yes' if e.fits(g) else 'no':>5s}" for g in GPUS))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effine", description="Efficient fine-tuning of open LLMs "
                                     "(LoRA, QLoRA, QAT, full) on CPU and CUDA.")
    parser.add_argument("--version", action="version", version=f"effine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model as a config says",
                       description="Fine-tune a base model on a data file. Writes a run directory with the "
                       "resolved config, metrics, checkpoints, the adapter (PEFT format) and a before/after report.")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from the run dir's newest valid checkpoint (see also train.resume=auto)")
    p.add_argument("--resume-force", action="store_true",
                   help="resume even if data, model, batch shape, packing, template, adapter or quant settings "
                   "differ from the checkpoint's (the differences are logged)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N processes of this machine: runs `torchrun --standalone --nproc-per-node N "
                   "-m effine train ...` (train.parallel picks ddp or fsdp; the global batch is batch_size x "
                   "grad_accum x N). Several machines: see README, 'Several processes and machines'")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("data", help="inspect and validate training data")
    dsub = p.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("check", help="validate every row, print counts and token stats, show trained tokens",
                        description="Validate every row of the config's data, print kept/dropped counts (with "
                        "file:line), token-length stats, and render the first samples with trained text marked.")
    _add_config_args(c)
    c.add_argument("--show", type=int, default=2, help="render this many samples (default 2)")
    c.set_defaults(func=cmd_data_check)

    p = sub.add_parser("generate", help="generate text from a base model, run dir or adapter dir",
                       description="Greedy generation through the chat template (if any) from a model spec "
                       "(short name, model dir, .gguf, hub id), a run dir, or an adapter dir.")
    p.add_argument("model", help="model spec, run dir (adapter is applied) or adapter dir")
    p.add_argument("--prompt", action="append", help="user prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, without the chat template")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype (default fp32)")
    p.add_argument("--no-quant", action="store_true",
                   help="apply the adapter to the original base weights even if the run trained on a quantized "
                   "(QLoRA) or fake-quantized (QAT) base; by default the base is rebuilt as training saw it")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="score a model, run dir or adapter dir on held-out rows with references",
                       description="Greedy answers (batched, through the chat template, stopping at end-of-turn) "
                       "to held-out rows that carry a reference ('answer', 'ideal' (OpenAI evals), the last "
                       "assistant turn, or 'completion'), scored with a metric and a seeded 95%% bootstrap "
                       "interval. Writes one JSON line per row (prompt, reference, prediction, score).")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="rows to score: .jsonl/.json/.csv/.parquet or builtin:NAME")
    p.add_argument("--metric", default="exact_match", choices=["exact_match", "contains", "chrf", "rouge_l", "loss"],
                   help="exact_match / contains (normalised: case, punctuation, whitespace), chrf (sacrebleu), "
                   "rouge_l (rouge-score), loss (nats per reference token, no generation); default exact_match")
    p.add_argument("--limit", type=int, help="score only the first N rows")
    p.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate per row (default 48)")
    p.add_argument("--out", help="rows file (default RUN_DIR/eval-METRIC.jsonl, or ./eval-METRIC.jsonl)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("chat", help="chat with a model, run dir or adapter dir in the terminal",
                       description="Multi-turn chat through the chat template, replies streamed as they are "
                       "generated (greedy). /reset clears the conversation, /system TEXT sets the system prompt, "
                       "/quit or Ctrl-D exits.")
    _add_model_args(p)
    p.add_argument("--system", help="system prompt (default: the run's data.system_prompt, if any)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply at most (default 256)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("merge", help="merge a run's (Q)LoRA adapter (or bake a QAT run) into a transformers model dir",
                       description="Rebuild the base exactly as training saw it (same dtype, same quantization), "
                       "merge W_deq + (alpha/r) B A in fp32 (never requantizing), save a transformers model dir and "
                       "report the logit difference between adapter-on-base and the merged model.")
    p.add_argument("run_dir", help="run dir (config.yaml + adapter/, or model/ of a full QAT run)")
    p.add_argument("--out", help="output dir (default RUN_DIR/merged)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"], help="dtype of the merged weights")
    p.add_argument("--prompt", action="append", help="prompt for the logit check (repeatable)")
    p.add_argument("--no-bake-qat", action="store_true",
                   help="QAT runs: keep the latent weights (W + s·BA, or W), not fq(W + s·BA) (or fq(W))")
    p.add_argument("--no-verify", action="store_true", help="skip reloading the saved dir")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="export a run dir or model dir for other runtimes (GGUF: llama.cpp, Ollama)",
                       description="effine export gguf SOURCE: merge a run dir (QLoRA base dequantized), write one "
                       "GGUF file with the tokenizer and chat template, an Ollama Modelfile beside it, and (when "
                       "llama.cpp is importable: pip install llama-cpp-py-sync) compare llama.cpp with transformers "
                       "on a few prompts; the report is written beside the file as NAME.verify.json.")
    p.add_argument("format", choices=["gguf"], help="output format")
    p.add_argument("source", help="run dir (config.yaml + adapter/ or model/) or transformers model dir")
    p.add_argument("--out", help="output .gguf file (default SOURCE/gguf/<name>-<type>.gguf)")
    p.add_argument("--type", default="q8_0", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="weight type (default q8_0); norms and biases stay f32")
    p.add_argument("--prompt", action="append", help="prompt for the llama.cpp check (repeatable)")
    p.add_argument("--no-verify", action="store_true", help="skip the llama.cpp check")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("ptq", help="post-training int4/int8 quantization of a model dir (loadable by effine)",
                       description="Quantize every decoder linear group-wise (r = (q - Z) * S) and save "
                       "safetensors with qweight/scales/zeros; `effine generate DIR` and effine's loader read it.")
    p.add_argument("model_dir", help="model spec: a merged run's dir, a model dir, a short name ...")
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4, help="bits per weight (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="weights per scale (0: one scale per output row)")
    p.add_argument("--asymmetric", action="store_true", help="asymmetric (zero point) instead of symmetric")
    p.set_defaults(func=cmd_ptq)

    p = sub.add_parser("push", help="upload a run's adapter, merged model or GGUF to the Hugging Face Hub with a "
                       "model card", description="Upload RUN_DIR's adapter (default for LoRA runs), merged model "
                       "(merged first when RUN_DIR/merged is missing) or GGUF file(s) plus a generated model card "
                       "(README.md). Token: HF_TOKEN or `hf auth login`; never printed. Re-running uploads only "
                       "files that are missing or changed on the Hub.")
    p.add_argument("run_dir", help="run dir written by `effine train`")
    p.add_argument("--repo", required=True, help="Hub repo id, user/name (created when missing)")
    p.add_argument("--what", choices=["adapter", "merged", "gguf"],
                   help="what to upload (default: adapter for LoRA runs, merged for full fine-tuning)")
    p.add_argument("--private", action="store_true",
                   help="create the repo as private (an existing repo keeps its visibility)")
    p.add_argument("--revision", help="branch to push to (created when missing; default main)")
    p.add_argument("--message", help="commit message (default: 'effine push: WHAT of RUN_NAME')")
    p.add_argument("--dry-run", action="store_true",
                   help="print every file with its size and the model card; upload nothing (needs no token; "
                   "--what merged still merges locally when RUN_DIR/merged is missing)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("plan", help="predict peak training memory for a config, before loading anything",
                       description="Predict peak memory (weights by precision, adapters, gradients, optimizer "
                       "state, activations for the batch shape, loss) for CPU or a GPU size.")
    _add_config_args(p)
    p.add_argument("--gpu", help="GPU memory in GB (e.g. 80) or a name (h100, a100-40, rtx4090); default: CPU")
    p.add_argument("--world", type=int, default=1, metavar="N", help="plan one process of an N-process run")
    p.add_argument("--parallel", choices=["auto", "ddp", "fsdp"], default="auto",
                   help="with --world: ddp (full replica per process) or fsdp (weights, gradients, AdamW states / N)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("config", help="list config keys or shipped configs, or show a resolved config",
                       description="`effine config keys` lists every key with its default and help; "
                       "`effine config show CONFIG [--set ...]` prints the resolved config; `effine config list "
                       "[DIR]` shows every shipped config (configs/) with model, method, the hardware it is sized "
                       "for and effine plan's predicted peak GPU memory.")
    p.add_argument("action", choices=["keys", "show", "list"])
    p.add_argument("config", nargs="?", help="config file (for show); configs directory (for list)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("report", help="(re)build a run's report.html, or one page comparing several runs",
                       description="One self-contained HTML page (no network): curves, data report, memory, task "
                       "metrics, generations before/after, environment. With several run dirs: one comparison page "
                       "(curves overlaid, a table of the key numbers).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory (output.dir of effine train)")
    p.add_argument("--out", help="output file (default RUN_DIR/report.html; several runs: effine-compare.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("watch", help="follow a run in the terminal (live or finished)",
                       description="Step / total, ETA, loss sparkline, throughput and last eval loss, read from the "
                       "run dir's metrics.jsonl; works from another shell while `effine train` runs. Exits when the "
                       "run has finished (at once for a finished run).")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--once", action="store_true", help="print the current state once and exit")
    p.set_defaults(func=cmd_watch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if argv is None and args.func is cmd_train:  # a real `effine train` process (not an in-process call)
            from effine.system.allocator import ensure

            ensure()  # may re-execute this process under jemalloc (see effine.system.allocator)
        return args.func(args)
    except EffineError as e:
        print(f"effine: error: {e}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:  # SIGTERM / first Ctrl-C: the step in progress finished and was checkpointed
        print(f"effine: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C: aborted at once
        print("effine: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
