"""Shared fixtures: the small real model (SmolLM2-135M-Instruct, packaged offline) and tiny model dirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import settings

torch.set_num_threads(2)
# Property tests draw the same examples on every run: CI must be deterministic, not a lottery of new inputs.
settings.register_profile("effine", derandomize=True, deadline=None)
settings.load_profile("effine")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from effine.model.loader import resolve_model_dir

    return resolve_model_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_dir):
    from effine.model.loader import load_tokenizer

    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer and chat template, saved as a model dir."""
    from effine.model.tiny import tiny_model

    out = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", seed=0, vocab_size=len(smol_tokenizer))
    model.save_pretrained(out, safe_serialization=True)
    smol_tokenizer.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Deterministic little conversations of varied length (so batches need padding)."""
    g = torch.Generator().manual_seed(seed)
    words = "apple river stone cloud music green yellow seven garden window".split()
    rows = []
    for i in range(n):
        k = int(torch.randint(1, 3, (1,), generator=g))
        msgs = []
        for t in range(k):
            n = int(torch.randint(2, 8, (1,), generator=g))
            q = " ".join(words[int(j)] for j in torch.randint(0, 10, (n,), generator=g))
            msgs += [{"role": "user", "content": f"say {q}"}, {"role": "assistant", "content": q}]
        rows.append({"messages": msgs})
    return rows


def token_examples(n: int, seed: int = 0):
    """Deterministic tokenised examples of 5-23 tokens with a varying share of labelled tokens (ids 3-249)."""
    from effine.data import Example

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(5, 24, (1,), generator=g))
        ids = torch.randint(3, 250, (length,), generator=g).tolist()
        start = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append(Example(ids, [-100] * start + ids[start:], f"ex:{i}"))
    return out
