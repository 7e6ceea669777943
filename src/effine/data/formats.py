"""Row formats and their normalisation to one canonical :class:`Sample`.

Supported row shapes (detected from the first row's keys unless ``data.format`` names one):

==================  ==============================================================  ===============
format              row                                                             becomes
==================  ==============================================================  ===============
messages            ``{"messages": [{"role": "user", "content": "..."}, ...]}``     messages
sharegpt            ``{"conversations": [{"from": "human", "value": "..."}, ...]}`` messages
alpaca              ``{"instruction": ..., "input": ..., "output": ...}``           messages
prompt_completion   ``{"prompt": ..., "completion": ...}``                          prompt/completion
text                ``{"text": ...}``                                               text
==================  ==============================================================  ===============

Two kinds of problems are told apart. A row whose *structure* is wrong (an unknown role, a non-string content, a
missing or null key) raises :class:`DataError`: it usually means the whole file is not what the config says, so
stopping at the first one is right. A row that is well-formed but cannot be trained on as text (an empty message,
no assistant turn, image/audio parts, tool calls, NUL characters) raises :class:`RowDropped`, which the pipeline
counts and skips; ``data.max_bad_fraction`` stops the run when too many are. The full policy, case by case, is in
the :mod:`effine.data.pipeline` docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from effine.errors import DataError

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")

ROLES = ("system", "user", "assistant")
# Role spellings seen in the wild (ShareGPT's from/value, Gemma's "model"), mapped to the canonical ones.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant"}
TOOL_ROLES = ("tool", "function", "ipython")  # tool results: rows holding them are dropped, not errors
_ROLE_HELP = f"expected {', '.join(ROLES)}; aliases {', '.join(ROLE_ALIASES)}"


class RowDropped(DataError):
    """A row whose content cannot be trained on; the pipeline drops it and counts it under ``reason``.

    ``bad`` rows count towards ``data.max_bad_fraction``; rows dropped by a policy the user chose (e.g.
    ``data.overlength: drop``) are not bad.
    """

    def __init__(self, message: str, reason: str, bad: bool = True) -> None:
        super().__init__(message)
        self.reason = reason
        self.bad = bad


@dataclass
class Sample:
    """A normalised row: exactly one of ``messages``, ``prompt``/``completion`` or ``text`` is set."""

    where: str
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None

    @property
    def kind(self) -> str:
        """``messages``, ``prompt_completion`` or ``text``."""
        if self.messages is not None:
            return "messages"
        return "prompt_completion" if self.completion is not None else "text"


def detect_format(data: dict[str, Any]) -> str | None:
    """The format a row's keys indicate, or None when they match none."""
    if "messages" in data:
        return "messages"
    conv = data.get("conversations")
    if isinstance(conv, list) and (not conv or (isinstance(conv[0], dict) and "from" in conv[0])):
        return "sharegpt"
    if "instruction" in data and "output" in data:
        return "alpaca"
    if "prompt" in data and "completion" in data:
        return "prompt_completion"
    if "text" in data:
        return "text"
    return None


def detect_or_fail(where: str, data: dict[str, Any]) -> str:
    """:func:`detect_format`, raising a DataError that lists the row's keys when nothing matches."""
    fmt = detect_format(data)
    if fmt is None:
        raise DataError(f"{where}: cannot tell the row format from its keys ({_keys(data)}) — expected "
                        "'messages', 'conversations' (sharegpt), 'instruction'+'output' (alpaca), "
                        "'prompt'+'completion', or 'text'; rename the fields or set data.format")
    return fmt


_REQUIRED = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
             "prompt_completion": ("prompt", "completion"), "text": ("text",)}


def normalise(where: str, data: dict[str, Any], fmt: str, train_on: str = "assistant") -> Sample:
    """Turn one row of format ``fmt`` into a :class:`Sample`, validating it with field paths."""
    missing = [k for k in _REQUIRED[fmt] if k not in data]
    if missing:
        raise DataError(f"{where}: format '{fmt}' needs {' and '.join(repr(k) for k in _REQUIRED[fmt])} but this "
                        f"row has keys ({_keys(data)}) — set data.format to match the file, or auto")
    if fmt == "messages":
        messages = _conversation(where, data["messages"], "messages", "role", "content")
    elif fmt == "sharegpt":
        messages = _conversation(where, data["conversations"], "conversations", "from", "value")
    elif fmt == "alpaca":
        messages = _alpaca(where, data)
    elif fmt == "prompt_completion":
        prompt = _string(where, data, "prompt", allow_empty=True)
        return Sample(where, prompt=prompt, completion=_string(where, data, "completion"))
    else:
        return Sample(where, text=_string(where, data, "text"))
    if train_on != "all" and not any(m["role"] == "assistant" for m in messages):
        raise RowDropped(f"{where}: no assistant turn — nothing to train on with data.train_on={train_on}",
                         "no assistant turn")
    return Sample(where, messages=messages)


def _keys(data: dict[str, Any]) -> str:
    return ", ".join(map(str, data)) or "no keys"


def _string(where: str, data: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key}: expected a string, got {type(value).__name__} — store the text as a "
                        "JSON string")
    if not allow_empty and not value.strip():
        raise RowDropped(f"{where}: {key}: empty — nothing to train on", f"empty {key}")
    _no_nul(where, key, value)
    return value


def _no_nul(where: str, path: str, text: str) -> None:
    """NUL characters are binary debris (a corrupt export), never text a model should learn."""
    if "\x00" in text:
        raise RowDropped(f"{where}: {path}: NUL character at position {text.index(chr(0))} — clean the text",
                         "NUL character in text")


def _alpaca(where: str, data: dict[str, Any]) -> list[dict[str, str]]:
    """Alpaca: the user turn is the instruction (plus the input, when there is one); the assistant's is the output."""
    instruction = _string(where, data, "instruction")
    extra = data.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"{where}: input: expected a string, got {type(extra).__name__} — store the text as a "
                        "JSON string (or leave it empty)")
    user = instruction + ("\n\n" + extra if extra and extra.strip() else "")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _string(where, data, "output")}]
    system = data.get("system")  # some Alpaca variants carry a per-row system prompt
    if isinstance(system, str) and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _conversation(where: str, turns: Any, key: str, role_key: str, content_key: str) -> list[dict[str, str]]:
    """Validate a list of turns and return them as canonical ``{"role", "content"}`` messages."""
    if not isinstance(turns, list):
        raise DataError(f"{where}: {key}: expected a list of {{{role_key}, {content_key}}} objects, got "
                        f"{type(turns).__name__}")
    if not turns:
        raise RowDropped(f"{where}: {key}: empty conversation", "empty conversation")
    out = []
    for i, turn in enumerate(turns):
        path = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {path}: expected an object with {role_key!r} and {content_key!r}, got "
                            f"{type(turn).__name__}")
        # ShareGPT dumps sometimes use role/content inside "conversations"; accept either spelling.
        rk = role_key if role_key in turn or "role" not in turn else "role"
        ck = content_key if content_key in turn or "content" not in turn else "content"
        if turn.get("tool_calls") or turn.get("function_call") or str(turn.get(rk)).strip().lower() in TOOL_ROLES:
            raise RowDropped(f"{where}: {path}: a tool call or tool result — effine trains on text conversations "
                             "only; remove tool turns", "tool calls / tool results")
        out.append({"role": _role(where, f"{path}.{rk}", turn.get(rk)),
                    "content": _content(where, f"{path}.{ck}", turn.get(ck))})
    return out


def _role(where: str, path: str, role: Any) -> str:
    if role is None:
        raise DataError(f"{where}: {path}: missing — every turn needs a role ({_ROLE_HELP})")
    if not isinstance(role, str):
        raise DataError(f"{where}: {path}: expected a string role, got {type(role).__name__} ({_ROLE_HELP})")
    canonical = role.strip().lower()
    canonical = ROLE_ALIASES.get(canonical, canonical)
    if canonical not in ROLES:
        raise DataError(f"{where}: {path}: unknown role {role!r} ({_ROLE_HELP})")
    return canonical


def _content(where: str, path: str, content: Any) -> str:
    """A message's text. OpenAI-style content lists are accepted when every part is a text part; a row with an
    image/audio part is dropped (counted), a list of anything else is an error."""
    if content is None:
        raise DataError(f"{where}: {path}: missing — every turn needs its text")
    if isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(kind, str):
                raise DataError(f"{where}: {path}[{j}]: expected a content part {{\"type\": \"text\", \"text\": ...}}, "
                                f"got {type(part).__name__} — store the text as a string or as text parts")
            if kind != "text":
                raise RowDropped(f"{where}: {path}[{j}]: a {kind!r} part — effine trains on text only; remove "
                                 "non-text parts", f"non-text content part ({kind})")
            if not isinstance(part.get("text"), str):
                raise DataError(f"{where}: {path}[{j}].text: expected a string, got "
                                f"{type(part.get('text')).__name__}")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise DataError(f"{where}: {path}: expected a string, got {type(content).__name__} — store the text as a "
                        "JSON string")
    if not content.strip():
        raise RowDropped(f"{where}: {path}: empty content — remove the turn or the row", "empty message content")
    _no_nul(where, path, content)
    return content
