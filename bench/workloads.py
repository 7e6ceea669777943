"""Benchmark workloads, and their one-time pre-tokenisation into a file that both workers read.

A workload fixes the model, the data, the sequence length, the batch size and the LoRA/optimizer settings. Its
data is tokenised ONCE with effine's own pipeline (``effine.data.build_datasets``: chat template, assistant-only
or completion-only labels, truncation to max_length) and written to

    bench/cache/<workload>-<key>.json   {"examples": [{"input_ids": [...], "labels": [...]}, ...],
                                         "batches": [[i, j, k, l], ...], "pad_id": ..., "meta": {...},
                                         "heldout": [m, ...]}

Both sides read that file, so both see exactly the same tokens, the same labels and the same batches in the same
order. The batch order is effine's ``batch_order(lengths, batch_size, seed, epoch=0)`` (length-grouped inside
windows of 64 batches, then shuffled), keeping only full batches; the file holds just the examples those batches
use, plus ``heldout``: HELDOUT examples no batch uses, spread over the data, on which both workers measure the
eval loss after training (``common.heldout_loss``). ``labels`` are unshifted (labels[t] is the target of position
t, -100 = no loss): the convention of both effine and transformers, so the same column is handed to TRL as its
``labels``.

Workloads:

    smollm2-chat-512    SmolLM2-135M-Instruct, builtin:chitchat (messages, assistant-only labels), T<=512,  B=4
    smollm2-chat-2048   same, T<=2048
    gemma3-completion   Gemma-3-270M, prompt/completion rows derived from chitchat (prompt share ~half), T<=512, B=4
    short-chat          SmolLM2-135M-Instruct, one user turn + reply per row (<= ~64 tokens), B=8
    short-completion    Gemma-3-270M, the same pairs as prompt/completion text (<= ~40 tokens), B=8
    demo                the batch shape of `make demo`: SmolLM2-135M-Instruct, chitchat, T<=384, B=8
    llama-0.5b-random   random-init Llama (random_large_config("llama-0.5b"), 0.49B), SmolLM2-tokenised chitchat
                        with ids folded into its 32000-token vocab (id % 32000), T<=512, B=2

Common: LoRA r=16, alpha=32, dropout 0 on q/k/v/o/gate/up/down; AdamW lr 2e-4, constant, no warmup, grad clip 1.0,
weight decay 0; bf16 base weights; no packing (``--packing`` turns it on for effine only; see run.py); no gradient
checkpointing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.common import CACHE_DIR  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HELDOUT = 16  # held-out examples per workload file (never in a batch)
FILE_VERSION = 4  # bump when the file layout or the derivation of the data changes


@dataclass(frozen=True)
class Workload:
    name: str
    model: str  # effine model spec (packaged short name) or "random:<large config name>"
    tokenizer: str  # packaged model whose tokenizer (and chat template) tokenises the data
    data: str  # builtin:NAME, or "derived:chitchat-completion" (built by this module)
    max_length: int
    batch_size: int
    data_format: str = "auto"
    train_on: str = "assistant"
    fold_vocab: int | None = None  # fold token ids into a smaller vocab (id % V) for the random model
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(LORA_TARGETS)
    lr: float = 2e-4
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 1234  # data order (effine batch_order) and LoRA A init
    packing: bool = False
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("smollm2-chat-512", "smollm2-135m-instruct", "smollm2-135m-instruct", "builtin:chitchat", 512, 4,
             notes="SmolLM2-135M-Instruct, chitchat conversations, assistant-only labels"),
    Workload("smollm2-chat-2048", "smollm2-135m-instruct", "smollm2-135m-instruct", "builtin:chitchat", 2048, 4,
             notes="SmolLM2-135M-Instruct, chitchat conversations, assistant-only labels, long context"),
    Workload("gemma3-completion", "gemma3-270m", "gemma3-270m", "derived:chitchat-completion", 512, 4,
             data_format="prompt_completion",
             notes="Gemma-3-270M, prompt/completion text (prompt = chat so far, completion = the rest from an "
                   "assistant reply), completion-only labels, prompt share ~1/2"),
    Workload("short-chat", "smollm2-135m-instruct", "smollm2-135m-instruct", "derived:short-chat", 512, 8,
             notes="SmolLM2-135M-Instruct, one user turn + its reply per row (<= ~64 tokens), assistant-only labels"),
    Workload("short-completion", "gemma3-270m", "gemma3-270m", "derived:short-completion", 512, 8,
             data_format="prompt_completion",
             notes="Gemma-3-270M, one user turn as prompt and its reply as completion (<= ~40 tokens), "
                   "completion-only labels"),
    Workload("demo", "smollm2-135m-instruct", "smollm2-135m-instruct", "builtin:chitchat", 384, 8,
             notes="the `make demo` batch shape (configs/smollm2-135m-lora.yaml): SmolLM2-135M-Instruct, chitchat, "
                   "T<=384, B=8"),
    Workload("llama-0.5b-random", "random:llama-0.5b", "smollm2-135m-instruct", "builtin:chitchat", 512, 2,
             fold_vocab=32000,
             notes="random-init Llama 0.49B (28 x 1024, GQA 16/4, MLP 4096, V=32000), chitchat with SmolLM2 "
                   "token ids folded into V (id % 32000)"),
)}


def cache_root() -> Path:
    """effine's cache (models, builtin data): $EFFINE_CACHE, as effine itself resolves it."""
    from effine.model.loader import cache_root as effine_cache_root

    return effine_cache_root()


# -- derived data -----------------------------------------------------------------------------------------------


COMPLETION_CHAR_BUDGET = 1400  # ~350-450 tokens: the whole row fits max_length 512, so the prompt share survives


def _completion_row(messages: list[dict[str, str]]) -> dict[str, str] | None:
    """A chat as plain prompt/completion text: prompt = turns before an assistant reply, completion = that reply and
    everything after it. The chat is first cut to its leading turns within COMPLETION_CHAR_BUDGET characters (so
    truncation at max_length does not eat the completion); the cut is the assistant turn that brings the prompt's
    character share closest to 1/2."""
    kept, used = [], 0
    for m in messages:
        n = len(m["content"]) + 12
        if kept and used + n > COMPLETION_CHAR_BUDGET:
            break
        kept.append(m)
        used += n
    messages = kept
    lines = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n" for m in messages]
    total = sum(len(x) for x in lines)
    best, best_gap = None, None
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or k == 0:
            continue
        share = sum(len(x) for x in lines[:k]) / total
        gap = abs(share - 0.5)
        if best_gap is None or gap < best_gap:
            best, best_gap = k, gap
    if best is None:
        return None
    prompt = "".join(lines[:best]) + "Assistant:"
    completion = " " + "".join(lines[best:])[len("Assistant: "):]
    return {"prompt": prompt, "completion": completion}


SHORT_CHARS = 110  # user + reply characters of a short-sample row: <= ~64 tokens with SmolLM2's chat template
SHORT_ROWS = 6000  # short-sample training rows (the held-out rows come from other conversations)
SHORT_EVAL_ROWS = 64


def _short_pairs(conversations: list[list[dict[str, str]]]) -> list[tuple[str, str]]:
    """Every (user turn, the assistant reply after it) of the conversations whose two texts together are at most
    SHORT_CHARS characters: the short instruction/answer rows most user data sets are made of."""
    pairs = []
    for messages in conversations:
        for a, b in zip(messages, messages[1:]):
            if a["role"] == "user" and b["role"] == "assistant" \
                    and len(a["content"]) + len(b["content"]) <= SHORT_CHARS and a["content"].strip() \
                    and b["content"].strip():
                pairs.append((a["content"], b["content"]))
    return pairs


def _short_rows(name: str, pairs: list[tuple[str, str]]) -> list[dict]:
    if name.startswith("short-chat"):
        return [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": r}]} for u, r in pairs]
    return [{"prompt": f"User: {u}\nAssistant:", "completion": f" {r}"} for u, r in pairs]


def derived_data_file(name: str) -> Path:
    """Build (once, deterministically) and return a derived JSONL under bench/cache/data.

    chitchat-completion: see :func:`_completion_row`. short-chat / short-completion (and their -eval held-out
    files): one user turn and its reply per row (:func:`_short_pairs`), as chat messages or as prompt/completion
    text; training rows from the first 95% of the conversations, held-out rows from the last 5%."""
    names = ("chitchat-completion", "short-chat", "short-completion", "short-chat-eval", "short-completion-eval")
    if name not in names:
        raise ValueError(f"unknown derived data {name!r}; one of {names}")
    from effine.data import resolve_builtin

    out = CACHE_DIR / "data" / f"{name}-v{FILE_VERSION}.jsonl"
    if out.is_file():
        return out
    src = resolve_builtin("builtin:chitchat", cache_root())
    with src.open(encoding="utf-8") as f:
        conversations = [json.loads(line)["messages"] for line in f if line.strip()]
    if name.startswith("short"):
        cut = len(conversations) * 95 // 100
        if name.endswith("-eval"):
            pairs = _short_pairs(conversations[cut:])
            pairs = pairs[:: max(1, len(pairs) // SHORT_EVAL_ROWS)][:SHORT_EVAL_ROWS]
        else:
            pairs = _short_pairs(conversations[:cut])[:SHORT_ROWS]
        rows = _short_rows(name, pairs)
    else:
        rows = [r for r in (_completion_row(m) for m in conversations) if r]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out)
    return out


# -- model dirs -------------------------------------------------------------------------------------------------


def model_dir(w: Workload) -> Path:
    """A local transformers model dir for the workload (the random model is built once, bf16, seed 0)."""
    from effine.model.loader import resolve_model_dir

    if not w.model.startswith("random:"):
        return resolve_model_dir(w.model)
    name = w.model.split(":", 1)[1]
    out = CACHE_DIR / "models" / f"{name}-random-seed0"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    from effine.model.tiny import random_large_config

    print(f"[bench] building random {name} model once at {out} ...", file=sys.stderr, flush=True)
    cfg = random_large_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    os.replace(tmp, out)
    return out


def tokenizer_dir(w: Workload) -> Path:
    from effine.model.loader import resolve_model_dir

    return resolve_model_dir(w.tokenizer)


# -- pre-tokenisation -------------------------------------------------------------------------------------------


def _key(w: Workload, n_batches: int) -> str:
    d = {k: v for k, v in w.to_dict().items() if k in ("model", "tokenizer", "data", "max_length", "batch_size",
                                                       "data_format", "train_on", "fold_vocab", "seed", "packing")}
    return hashlib.sha256(json.dumps([FILE_VERSION, d, n_batches], sort_keys=True).encode()).hexdigest()[:12]


def prepare(w: Workload, n_batches: int, log=print) -> Path:
    """Write (once) the pre-tokenised file holding the first ``n_batches`` full batches of the workload."""
    out = CACHE_DIR / f"{w.name}-{_key(w, n_batches)}.json"
    if out.is_file():
        return out
    from effine.config import DataConfig
    from effine.data import batch_order, build_datasets, pack_examples
    from effine.model.loader import load_tokenizer

    tok = load_tokenizer(tokenizer_dir(w))
    path = w.data if w.data.startswith("builtin:") else str(derived_data_file(w.data.split(":", 1)[1]))
    cfg = DataConfig(path=path, format=w.data_format, eval_fraction=0.0, max_eval_rows=0, max_length=w.max_length,
                     overlength="truncate", train_on=w.train_on, seed=w.seed, packing=w.packing)
    train, _, report = build_datasets(cfg, tok, cache_dir=cache_root(), log=log)
    log(report.format())
    items = pack_examples(train, w.max_length) if w.packing else train
    order = batch_order([len(e) for e in items], w.batch_size, w.seed, 0)
    order = [b for b in order if len(b) == w.batch_size]
    if len(order) < n_batches:
        raise SystemExit(f"{w.name}: the data has only {len(order)} full batches, {n_batches} needed")
    order = order[:n_batches]
    used = sorted({i for b in order for i in b})
    # Held-out examples for the eval loss after training: spread over the examples no batch uses (none for packed
    # rows: TRL does not run on those).
    rest = [] if w.packing else sorted(set(range(len(items))) - set(used))
    heldout = rest[:: max(1, len(rest) // HELDOUT)][:HELDOUT]
    used = used + heldout
    remap = {old: new for new, old in enumerate(used)}
    pad_id = tok.pad_token_id

    def fold(ids: list[int]) -> list[int]:
        return [i % w.fold_vocab if i >= 0 else i for i in ids] if w.fold_vocab else list(ids)

    examples = []
    for i in used:
        e = items[i]
        row = {"input_ids": fold(e.input_ids), "labels": fold(e.labels)}
        if w.packing:
            row["position_ids"] = list(e.position_ids)
            row["doc_lengths"] = list(e.doc_lengths)
        examples.append(row)
    if w.fold_vocab:
        pad_id = pad_id % w.fold_vocab
    batches = [[remap[i] for i in b] for b in order]
    lengths = [len(examples[i]["input_ids"]) for b in batches for i in b]
    sup = [sum(1 for y in examples[i]["labels"][1:] if y != -100) for b in batches for i in b]
    meta = {"workload": w.to_dict(), "model_dir": str(model_dir(w)), "tokenizer_dir": str(tokenizer_dir(w)),
            "data_path": path, "data_report": report.to_dict(), "n_batches": n_batches,
            "tokens": sum(lengths), "supervised": sum(sup),
            "supervised_share": sum(sup) / max(1, sum(lengths)),
            "padded": sum(max(len(examples[i]["input_ids"]) for i in b) * len(b) for b in batches)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pad_id": pad_id, "batches": batches, "examples": examples, "meta": meta,
                               "heldout": [remap[i] for i in heldout]}))
    os.replace(tmp, out)
    log(f"[bench] {w.name}: wrote {out} ({n_batches} batches, {sum(lengths):,} tokens, {sum(sup):,} supervised "
        f"({meta['supervised_share']:.0%}), padding {1 - sum(lengths) / meta['padded']:.0%})")
    return out


def get(name: str, packing: bool = False) -> Workload:
    if name not in WORKLOADS:
        raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    w = WORKLOADS[name]
    return replace(w, packing=True) if packing else w


if __name__ == "__main__":  # python -m bench.workloads NAME [N_BATCHES]: build the file and print its path
    w = get(sys.argv[1])
    print(prepare(w, int(sys.argv[2]) if len(sys.argv) > 2 else 16))
