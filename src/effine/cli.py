"""The `effine` command line.

    effine train CONFIG [--set key.path=value ...] [--resume]
    effine data check CONFIG [--set ...] [--show N]
    effine generate MODEL_OR_RUN_DIR [--prompt TEXT ...] [--max-new-tokens N]
    effine merge RUN_DIR [--out DIR]
    effine config keys | effine config show CONFIG [--set ...]

Every user error (bad config key, malformed data row, missing model) prints one clear message and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from effine import __version__
from effine.errors import EffineError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/; `effine config keys` lists every key)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")


def cmd_train(args: argparse.Namespace) -> int:
    from effine.config import load_config
    from effine.train.run import run_training

    cfg = load_config(args.config, args.overrides)
    summary = run_training(cfg, resume=args.resume)
    print(json.dumps({k: summary[k] for k in ("run_dir", "steps", "tokens_per_s")} |
                     {"eval_loss_before": summary["eval_before"]["eval_loss"],
                      "eval_loss_after": summary["eval_after"]["eval_loss"]}))
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
    from effine.eval.generate import generate, prompt_ids_for
    from effine.model.loader import load_model, load_tokenizer, resolve_model_dir

    target = Path(args.model)
    adapter_dir = None
    if (target / "adapter" / "adapter_config.json").exists():  # a run dir
        adapter_dir = target / "adapter"
    elif (target / "adapter_config.json").exists():  # an adapter dir
        adapter_dir = target
    elif (target / "model" / "config.json").exists():  # a full fine-tuning run dir
        target = target / "model"
    if adapter_dir is not None:
        base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        model_dir = resolve_model_dir(base)
    else:
        model_dir = resolve_model_dir(str(target))
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, args.dtype)
    if adapter_dir is not None:
        from effine.adapters import load_adapter

        load_adapter(model, adapter_dir)
        print(f"[effine] adapter: {adapter_dir}", file=sys.stderr)
    prompts = args.prompt or ["What is the capital of France?"]
    for p in prompts:
        ids = prompt_ids_for(tokenizer, p, chat=not args.no_chat)
        print(f">>> {p}\n{generate(model, tokenizer, ids, args.max_new_tokens)}\n")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from effine.adapters import load_adapter, merge_lora
    from effine.model.loader import load_model, load_tokenizer, resolve_model_dir

    run = Path(args.run_dir)
    adapter_dir = run / "adapter" if (run / "adapter").is_dir() else run
    if not (adapter_dir / "adapter_config.json").exists():
        raise EffineError(f"{run}: no adapter_config.json here or in {run}/adapter; pass a run or adapter dir.")
    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    model_dir = resolve_model_dir(base)
    model = load_model(model_dir, args.dtype)
    load_adapter(model, adapter_dir)
    merged = merge_lora(model)
    out = Path(args.out or run / "merged")
    merged.save_pretrained(out, safe_serialization=True)
    load_tokenizer(model_dir).save_pretrained(out)
    print(f"merged model written to {out}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from effine.config import describe, load_config

    if args.action == "keys":
        for path, default, help_ in describe():
            print(f"{path:28s} {default:24s} {help_}")
        return 0
    if not args.config:
        raise EffineError("effine config show: give a CONFIG file.")
    import yaml

    print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")
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
    p.add_argument("--resume", action="store_true", help="continue from the run dir's latest checkpoint")
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
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base and save a transformers model dir",
                       description="Merge W + (alpha/r) B A into the base weights (computed in fp32) and save a "
                       "transformers model dir (safetensors).")
    p.add_argument("run_dir", help="run dir or adapter dir")
    p.add_argument("--out", help="output dir (default RUN_DIR/merged)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the merged model")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("config", help="list config keys, or show a resolved config",
                       description="`effine config keys` lists every key with its default and help; "
                       "`effine config show CONFIG [--set ...]` prints the resolved config.")
    p.add_argument("action", choices=["keys", "show"])
    p.add_argument("config", nargs="?", help="config file (for show)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EffineError as e:
        print(f"effine: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("effine: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
