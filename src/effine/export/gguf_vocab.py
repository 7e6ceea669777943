"""The tokenizer of a transformers model dir, written into GGUF as llama.cpp reads it.

Two kinds of tokenizer.json are supported, which cover the families effine trains:

* byte-level BPE without byte fallback (GPT-2 style: SmolLM2, Llama-3, Qwen2, Phi-2, Falcon) -> GGUF model
  ``gpt2``: tokens as the BPE vocabulary spells them, the merges, and a pre-tokenizer name that selects
  llama.cpp's splitting regex (detected from the tokenizer.json pre_tokenizer).
* BPE with byte fallback over "▁"-marked pieces (SentencePiece converted: Llama-2, Mistral, Gemma) -> GGUF model
  ``llama``: tokens, a score per token (llama.cpp's SentencePiece tokenizer merges the best-scoring pair first;
  the score of a merge result is minus its merge rank, so the merge order is the same) and byte tokens.

Token types: special added tokens are CONTROL, other added tokens USER_DEFINED, ``<0xNN>`` BYTE (byte
fallback only), the unknown token UNKNOWN, padding up to the model's vocab_size UNUSED. Special token ids, the
add-BOS/EOS flags (observed by tokenizing a word) and the chat template are embedded too. Whether llama.cpp
then tokenizes like transformers is checked by the verification (effine.export.gguf_verify).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf

from effine.errors import ModelError

# tokenizer.json pre-tokenizer regexes -> llama.cpp pre-tokenizer names
_SPLIT_REGEX_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for a byte-level tokenizer.json pre_tokenizer ("default" when not recognised)."""
    if pre is None:
        return "default"
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    for s in steps:
        if s.get("type") == "Split":
            regex = (s.get("pattern") or {}).get("Regex")
            if regex in _SPLIT_REGEX_PRE:
                return _SPLIT_REGEX_PRE[regex]
    return "default"


def _merges(model: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, tokenizer, vocab_size: int) -> dict[str, Any]:
    """Write the tokenizer keys; return a summary (model, pre, sizes) for the export report."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"GGUF export: {model_dir} has no tokenizer.json (a fast tokenizer); llama.cpp needs the "
                         "vocabulary. Save the tokenizer with transformers (tokenizer.save_pretrained) first.")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ModelError(f"GGUF export: tokenizer model {model.get('type')!r} in {path} is not supported (BPE only).")
    spm = bool(model.get("byte_fallback"))
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        tokens[i] = a["content"]
    n = max(vocab_size, max(tokens) + 1)
    if max(tokens) + 1 > vocab_size:
        raise ModelError(f"GGUF export: the tokenizer has {max(tokens) + 1} tokens but the model's vocab_size is "
                         f"{vocab_size}; resize the embeddings before exporting.")
    T = gguf.TokenType
    unk = model.get("unk_token")
    names, types = [], []
    for i in range(n):
        tok = tokens.get(i)
        if tok is None:
            names.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            names.append(tok)
            types.append(T.CONTROL if added[i].get("special") else T.USER_DEFINED)
        elif spm and tok == unk:
            names.append(tok)
            types.append(T.UNKNOWN)
        elif spm and _BYTE_TOKEN.match(tok):
            names.append(tok)
            types.append(T.BYTE)
        else:
            names.append(tok)
            types.append(T.NORMAL)
    merges = _merges(model)
    if spm:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        # SentencePiece-style merge order: the result of merge rank r scores -r; pieces no merge builds score
        # below every merge, so llama.cpp never prefers them (they are reached only as single symbols).
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
        floor = -float(len(merges) + 1)
        writer.add_token_scores([-float(rank[t]) if t in rank else (0.0 if types[i] != T.NORMAL else floor)
                                 for i, t in enumerate(names)])
        pre = "default"
        # llama.cpp's SentencePiece tokenizer prepends "▁" unless told not to; transformers does only if the
        # normalizer has a Prepend step or the pre-tokenizer is a prefix-adding Metaspace (Llama-2: yes, Gemma: no).
        blob = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")])
        writer.add_add_space_prefix('"type": "Prepend"' in blob or (
            '"type": "Metaspace"' in blob and '"prepend_scheme": "never"' not in blob))
    else:
        pre = _pre_tokenizer_name(tj.get("pre_tokenizer"))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(merges)
    writer.add_token_list(names)
    writer.add_token_types([int(t) for t in types])

    def tid(attr: str) -> int | None:
        v = getattr(tokenizer, attr, None)
        return int(v) if isinstance(v, int) else None

    ids = {"bos": tid("bos_token_id"), "eos": tid("eos_token_id"), "unk": tid("unk_token_id"),
           "pad": tid("pad_token_id")}
    for kind, value in ids.items():
        if value is not None:
            getattr(writer, f"add_{kind}_token_id")(value)
    probe = tokenizer("hello")["input_ids"]
    add_bos = ids["bos"] is not None and len(probe) > 0 and probe[0] == ids["bos"]
    add_eos = ids["eos"] is not None and len(probe) > 0 and probe[-1] == ids["eos"]
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    return {"model": "llama" if spm else "gpt2", "pre": pre, "tokens": n, "merges": 0 if spm else len(merges),
            "add_bos": add_bos, "add_eos": add_eos, "chat_template": bool(template), **{f"{k}_id": v
                                                                                        for k, v in ids.items()}}
