"""The typed config: one YAML file with sections, ``--set key.path=value`` overrides, validation with key paths.

A config is a tree of dataclasses. Each field's ``help`` metadata is its documentation (``effine config --help``
prints it). Loading never guesses: an unknown key is an error that names its key path and suggests the nearest
valid key; a value of the wrong type or outside its allowed set names the key path and what is allowed.

    cfg = load_config("configs/smollm2-135m-lora.yaml", overrides=["train.lr=1e-4"])
    cfg.train.lr  # 1e-4

The resolved config (after overrides and defaults) is written to every run directory as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from effine.errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field whose ``help`` is the user-facing documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    name: str = _f("smollm2-135m-instruct", "Base model: a short name (smollm2-135m-instruct, gemma3-270m), a local "
                   "transformers model dir, a .gguf file, or a Hugging Face Hub id (org/name).")
    dtype: Literal["bf16", "fp32", "fp16"] = _f("bf16", "Compute dtype of the base weights and activations.")
    attn: Literal["auto", "sdpa", "eager", "flash_attn", "tiled"] = _f(
        "auto", "Attention backend (auto picks the fastest available for the device).")
    device: str = _f("auto", "Where to train: auto (the first CUDA GPU when one is visible, else cpu), cpu, cuda "
                     "or cuda:N.")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) when `name` is a hub id.")
    trust_remote_code: bool = _f(False, "Run model code shipped with a hub repo. Off by default: it executes "
                                 "untrusted Python.")
    cache_dir: str | None = _f(None, "Where converted models are cached (default: $EFFINE_CACHE or ~/.cache/effine).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward: less memory, ~30% slower.")
    fused_ops: bool = _f(True, "Swap RMSNorm and gated-MLP modules for fused ones that keep less for backward "
                         "(same math and state dict; EFFINE_FUSED=0 forces the reference path).")
    recompute_norm_outputs: bool = _f(True, "With fused_ops: recompute each norm's output in backward for the "
                                      "projections that read it (q/k/v, gate/up) instead of keeping it: ~10-16% "
                                      "less activation memory on CPU for ~2-4% tokens/s (bench/results/README.md).")


@dataclass
class DataConfig:
    path: str = _f("builtin:chitchat", "Training data: a .jsonl/.json/.csv/.parquet file, or builtin:NAME "
                   "(builtin:chitchat: 4k human conversations; builtin:chitchat-completion: the same as "
                   "prompt/completion text; builtin:evals: chat tasks with ideal answers; builtin:evals-tomi / "
                   "builtin:evals-tomi-test: one such task split by story for training and task eval).")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] = _f(
        "auto", "Row format; auto detects it from the first row's keys.")
    eval_path: str | None = _f(None, "Held-out data file; when unset, `eval_fraction` of the rows are held out.")
    eval_fraction: float = _f(0.05, "Share of rows held out for eval when `eval_path` is unset (0 disables eval).",
                              min=0.0, max=1.0)
    max_eval_rows: int | None = _f(200, "Cap on held-out rows (keeps periodic eval cheap).", min=0)
    limit: int | None = _f(None, "Use only the first N rows of the training file (after shuffling: no).", min=1)
    max_length: int = _f(512, "Maximum tokens per sample (and per packed row).", min=1)
    overlength: Literal["truncate", "drop", "error"] = _f(
        "truncate", "What to do with samples longer than max_length.")
    train_on: Literal["assistant", "last_assistant", "all"] = _f(
        "assistant", "Which tokens carry labels: every assistant turn (and its end-of-turn token), only the last "
        "assistant turn, or all tokens. Prompt/completion rows train the completion; text rows train all.")
    chat_template: str | None = _f(None, "Override the chat template: a Jinja string, a path to a .jinja file, or "
                                   "a built-in name (chatml). Unset: the tokenizer's own; models without one use "
                                   "chatml (announced in the log).")
    system_prompt: str | None = _f(None, "System message prepended to every conversation that has none.")
    packing: bool | Literal["auto"] = _f(
        "auto", "Pack several samples into each row of up to max_length tokens (best-fit decreasing; attention and "
        "positions stay within each sample, no padding to compute). auto: on when the model's attention keeps "
        "packed samples apart (every family effine's attention serves), off otherwise (said in the log); true: on, "
        "an error where it cannot be exact; false: off. train.batch_size still counts samples: a packed "
        "micro-batch takes as many rows as hold batch_size samples on average (short samples: one row only as "
        "long as batch_size samples), so packing changes the work per sample, not the number of steps or the "
        "samples per step (train.tokens_per_step sets rows by tokens).")
    seed: int = _f(1234, "Seed for the train/eval split and the shuffling order.")
    max_bad_fraction: float = _f(0.1, "Stop when more than this share of the rows read are dropped as unusable (no "
                                 "assistant turn, empty or non-text content, tool calls, overlong lines; listed in "
                                 "data_report.txt). Rows dropped by data.overlength: drop do not count. 1 disables.",
                                 min=0.0, max=1.0)


@dataclass
class AdapterConfig:
    method: Literal["lora", "full"] = _f("lora", "lora trains low-rank adapters; full trains every weight.")
    r: int = _f(16, "LoRA rank.", min=1)
    alpha: float = _f(32.0, "LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with rslora).")
    dropout: float = _f(0.0, "Dropout on the LoRA input.", min=0.0, max=1.0)
    rslora: bool = _f(False, "Rank-stabilised LoRA scaling alpha / sqrt(r).")
    target_modules: list[str] | None = _f(None, "Module name suffixes to adapt; unset: every linear projection of "
                                          "the family's attention and MLP.")


@dataclass
class QuantConfig:
    method: Literal["none", "nf4", "fp4", "int8", "int4"] = _f("none", "Store frozen base weights quantized (QLoRA).")
    group_size: int = _f(64, "Group size for int4/int8 affine quantization.", min=1)
    blocksize: int = _f(64, "Block size for nf4/fp4.", min=1)
    double_quant: bool = _f(True, "Quantize the nf4/fp4 block scales too (QLoRA double quantization).")
    skip_modules: list[str] | None = _f(None, "Linear layers that quant.method leaves in model.dtype: module name "
                                        "suffixes or qualified names, matched like adapter.target_modules (e.g. "
                                        "[v_proj], the projection whose quantization costs most eval loss per weight "
                                        "on the models in bench/results/quant_sensitivity.md). Unset: quantize every "
                                        "linear but the output head and embeddings.")
    qat_bits: int | None = _f(None, "Quantization-aware training: fake-quantize trained weights to this many bits. "
                              "With LoRA the merged weight W + s·BA is fake-quantized (the adapters learn the "
                              "rounding PTQ will apply); adapter.dropout must then be 0.")


@dataclass
class TrainConfig:
    epochs: float = _f(1.0, "Passes over the training data (ignored when max_steps is set).", min=0.0)
    max_steps: int | None = _f(None, "Optimizer steps to run (overrides epochs).", min=1)
    batch_size: int = _f(4, "Samples per micro-batch (with packing: the packed rows that hold this many samples "
                         "on average).", min=1)
    tokens_per_step: int | None = _f(None, "Tokens per optimizer step instead of train.batch_size: each micro-batch "
                                     "takes tokens_per_step / (grad_accum x data.max_length) packed rows (at least "
                                     "1), so every step carries the same work whatever the sample lengths. Needs "
                                     "packing (data.packing auto or true).", min=1)
    grad_accum: int = _f(1, "Micro-batches per optimizer step. The loss is normalised by the supervised tokens "
                         "of the whole window, so batch 8 x accum 1 == batch 1 x accum 8.", min=1)
    lr: float = _f(2e-4, "Peak learning rate.", min=0.0)
    weight_decay: float = _f(0.0, "AdamW weight decay, applied to weight matrices only (not to norms and biases).")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas.")
    warmup_steps: int | None = _f(None, "Linear warmup steps; unset uses warmup_ratio.", min=0)
    warmup_ratio: float = _f(0.05, "Warmup as a share of total steps.", min=0.0, max=1.0)
    schedule: Literal["cosine", "linear", "constant"] = _f("cosine", "Learning-rate decay after warmup.")
    min_lr_ratio: float = _f(0.1, "Final learning rate as a share of the peak (cosine/linear).", min=0.0, max=1.0)
    max_grad_norm: float | None = _f(1.0, "Clip gradients to this global norm (unset: no clipping).")
    seed: int = _f(42, "Seed for initialisation, dropout and data order.")
    log_every: int = _f(10, "Log metrics every N optimizer steps.", min=1)
    eval_every: int | None = _f(None, "Evaluate every N optimizer steps (unset: only at the start and end).", min=1)
    save_every: int | None = _f(None, "Checkpoint every N optimizer steps (unset: only at the end).", min=1)
    threads: int | None = _f(None, "CPU threads for torch (unset: all cores).", min=1)
    loss_impl: Literal["chunked", "reference"] = _f("chunked", "Loss kernel: chunked never builds full logits.")
    loss_chunk_mb: int = _f(128, "Chunked loss: MiB of logits computed at a time (rows per chunk = this / (vocab "
                            "x dtype bytes)); smaller saves memory on large vocabularies, larger has fewer chunks.",
                            min=1)
    # Several processes (torchrun; see effine/train/distributed.py). The global batch is batch_size x grad_accum x
    # the number of processes: each process reads a disjoint slice of every global micro-batch.
    parallel: Literal["auto", "none", "ddp", "fsdp"] = _f(
        "auto", "Multi-process training under torchrun (`effine train CONFIG --nproc N`): ddp replicates the model "
        "and all-reduces trainable gradients; fsdp (FSDP2) shards weights, gradients and optimizer state per decoder "
        "layer (QLoRA's quantized base included); auto: none for 1 process, ddp otherwise. The global batch is "
        "batch_size x grad_accum x processes.")
    dist_timeout_s: int = _f(1800, "Seconds a collective may wait for the other processes before failing (a dead "
                             "rank then ends the job instead of hanging it).", min=1)
    fsdp_cpu_offload: bool = _f(False, "With parallel=fsdp: keep parameter shards, gradients and optimizer state in "
                                "CPU memory (CUDA training of models that do not fit otherwise; slower).")
    # Reliability: resume, checkpoint rotation, the numerics guard (README "Crashes, resume and bad numbers").
    resume: Literal["never", "auto", "always"] = _f(
        "never", "auto: resume from the newest valid checkpoint when there is one, else start fresh (for schedulers "
        "that restart the same command); always: like --resume (error without a checkpoint); never: start fresh.")
    keep_checkpoints: int = _f(2, "Checkpoints kept (the newest K); older ones are deleted only after a new one is "
                               "written and verified.", min=1)
    keep_best: bool = _f(False, "Also keep the checkpoint with the lowest eval loss (saved at a step where an eval "
                         "ran: make save_every a multiple of eval_every).")
    nonfinite: Literal["skip", "stop"] = _f(
        "skip", "A window with a non-finite loss or gradient norm: skip its update (the schedule does not advance) "
        "or stop the run (exit code 3). Either way it is logged with its rows (file:line).")
    max_nonfinite: int = _f(3, "With nonfinite=skip: stop (exit code 3) after this many skipped windows in a row.",
                            min=1)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = _f(
        [], "Experiment trackers that get the metrics.jsonl series and the config (secrets redacted): tensorboard "
        "(RUN_DIR/tensorboard), wandb ($WANDB_PROJECT; WANDB_MODE=offline stays local), mlflow ($MLFLOW_TRACKING_URI, "
        "else RUN_DIR/mlruns). Needs pip install 'effine[tracking]'.")


@dataclass
class EvalConfig:
    max_batches: int | None = _f(None, "Cap on eval batches per evaluation.")
    batch_size: int | None = _f(None, "Eval micro-batch size (default: train.batch_size).")
    prompts: list[str] = _f([], "Prompts to generate from before and after training (shown side by side).")
    prompts_from_eval: int = _f(2, "Also take the first N held-out conversations' prompts as sample prompts.")
    max_new_tokens: int = _f(48, "Tokens to generate per sample prompt (and per task-eval row).", min=1)
    # Task eval (effine/eval/task.py): generated answers scored against references, before and after training.
    data: str | None = _f(None, "Held-out rows with references for a task eval before and after training (a file "
                          "or builtin:NAME, e.g. builtin:evals-tomi-test; the reference is the 'answer', the "
                          "'ideal', the last assistant turn or the completion). Greedy answers are scored with "
                          "eval.metric (95% bootstrap CI) into summary.json, report.md and "
                          "task_eval_before/after.jsonl. Unset: no task eval.")
    metric: Literal["exact_match", "contains", "chrf", "rouge_l", "loss"] = _f(
        "exact_match", "Task-eval metric: exact_match / contains (after lower-casing, removing punctuation and "
        "collapsing whitespace), chrf (sacrebleu), rouge_l (rouge-score), loss (per reference token).")
    task_limit: int | None = _f(200, "Task eval on the first N rows of eval.data only (unset: all).", min=1)


def check_repo_id(repo_id: str, where: str = "--repo") -> str:
    """``namespace/name`` with the Hub's allowed characters; a ConfigError naming ``where`` otherwise."""
    import re

    if not isinstance(repo_id, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo_id) \
            or ".." in repo_id or len(repo_id) > 96:
        raise ConfigError(f"{where}: {repo_id!r} is not a Hub repo id; write it as user/name (e.g. "
                          "alice/smollm2-chat): letters, digits, '-', '_', '.'.")
    return repo_id


@dataclass
class PushConfig:
    repo: str | None = _f(None, "Hub repo (user/name) to push to at the end of `effine train` (the same as "
                          "`effine push RUN_DIR --repo ...`); unset: no push. A failed push keeps the run and logs "
                          "the command to retry.")
    what: Literal["adapter", "merged", "gguf"] | None = _f(
        None, "What to push: adapter (PEFT), merged (merges first when needed) or gguf (needs RUN_DIR/gguf/*.gguf); "
        "unset: adapter for LoRA runs, merged for full fine-tuning.")
    private: bool = _f(False, "Create the repo as private (an existing repo keeps its visibility).")
    revision: str | None = _f(None, "Branch to push to (created when missing); unset: main.")

    def __post_init__(self) -> None:
        if self.repo is not None:
            check_repo_id(self.repo, "output.push.repo")


@dataclass
class OutputConfig:
    dir: str = _f("runs/{model}-{method}", "Run directory ({model} and {method} are filled in).")
    overwrite: bool = _f(False, "Allow writing into a run directory that already holds a finished run.")
    save_merged: bool = _f(False, "Also save the merged model (base + adapter) as a transformers model dir.")
    push: PushConfig = field(default_factory=PushConfig)
    export: list[Literal["gguf-f32", "gguf-f16", "gguf-bf16", "gguf-q8_0", "gguf-q4_0", "merged"]] = _f(
        [], "Exports run at the end of training: gguf-<type> (`effine export gguf`, checked in llama.cpp when "
        "installed) and merged (`effine merge`, bf16). A failed export keeps the run and prints how to retry.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Loading and validation


def _suggest(key: str, valid: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f" Did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"
    return f" Valid keys{' of ' + prefix if prefix else ''}: {', '.join(sorted(valid))}."


def _check_value(path: str, value: Any, tp: Any, meta: dict[str, Any]) -> Any:
    """Coerce and check one value against its annotated type; raise ConfigError naming the key path."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alt in inner[1:]:  # e.g. bool | Literal["auto"]: the value of whichever alternative takes it
            try:
                return _check_value(path, value, alt, meta)
            except ConfigError:
                pass
        try:
            return _check_value(path, value, inner[0], meta)
        except ConfigError as e:
            if len(inner) == 1:
                raise
            lits = [str(a) for alt in inner if typing.get_origin(alt) is Literal for a in typing.get_args(alt)]
            raise ConfigError(f"{e} Or one of: {', '.join(lits)}.") from None
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.4)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {', '.join(map(str, args))}.{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}. Write it as a YAML "
                              f"list, e.g. {path.rsplit('.', 1)[-1]}: [{value!r}].")
        return [_check_value(f"{path}[{i}]", v, args[0], {}) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {type(value).__name__} {value!r}. Write "
                              f"{path.rsplit('.', 1)[-1]}: true (or false), without quotes.")
        return value
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            one = " a single value, not a list;" if isinstance(value, (list, dict)) else ""
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}. Write{one} "
                              f"e.g. {path.rsplit('.', 1)[-1]}: {1 if tp is int else 0.0002} (no quotes).")
        if tp is int and float(value) != int(value):
            raise ConfigError(f"{path}: expected a whole number, got {value!r}. Round it, e.g. {round(value)}.")
        value = tp(value)
        if "min" in meta and value < meta["min"]:
            raise ConfigError(f"{path}: {value} is below the minimum {meta['min']}. Set it to {meta['min']} or more"
                              f"{' (or leave it unset)' if _optional(path) else ''}.")
        if "max" in meta and value > meta["max"]:
            raise ConfigError(f"{path}: {value} is above the maximum {meta['max']}. Set it to {meta['max']} or less.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}. Quote it, e.g. "
                              f"{path.rsplit('.', 1)[-1]}: \"{value}\".")
        return value
    return value


def _optional(path: str) -> bool:
    """Whether the field at ``path`` may be left unset (None)."""
    cls: Any = Config
    *sections, name = path.split(".")
    for s in sections:
        cls = typing.get_type_hints(cls).get(s)
    tp = typing.get_type_hints(cls).get(name) if dataclasses.is_dataclass(cls) else None
    return type(None) in typing.get_args(tp)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {type(data).__name__} {data!r}. "
                          f"Write {prefix or 'each section'}: on its own line, then indented key: value lines "
                          "(`effine config keys` lists them).")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}'.{_suggest(str(key), list(fields), prefix)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, path)
        else:
            kwargs[key] = _check_value(path, value, tp, dict(fields[key].metadata))
    return cls(**kwargs)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2's reading of exponent numbers without a dot (``1e-4``, ``5E3``) as floats:
    YAML 1.1, which PyYAML implements, makes them strings, which is never what a learning rate means."""


_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 — a SafeLoader subclass: no Python objects


def _parse_scalar(text: str) -> Any:
    """`--set` values are YAML scalars: 1e-4 -> float, true -> bool, null -> None, [a, b] -> list."""
    try:
        value = _yaml(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string; accept the float people mean.
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides onto a raw config mapping (validated later with everything else)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. --set train.lr=1e-4.")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{p}' is not a section.")
        node[parts[-1]] = _parse_scalar(text)
    return raw


def config_from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw, "")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults when `path` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found. See configs/ for examples.")
        try:
            raw = _yaml(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8.") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, train: ...).")
    raw = apply_overrides(raw, overrides or [])
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key path, default, help) for every field: the source of `effine config --help`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], path)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
            rows.append((path, repr(default), f.metadata.get("help", "")))
    return rows
