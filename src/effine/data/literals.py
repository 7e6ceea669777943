"""Special-token text typed inside a message is plain text, never a control token.

A chat template writes control tokens (``<|im_start|>``, ``<|im_end|>``, ``<start_of_turn>``) around each
message; the rendered string is then tokenised, and a tokenizer turns *every* occurrence of a special token's text
into its id — including one a user typed inside a message. A literal ``<|im_end|>`` in a user message would then
end the turn early: a forged turn boundary, in training data and in generation prompts alike.

:class:`ControlTokens` tokenises a rendered conversation so that only the template's own special tokens are
control tokens:

1. Cheap check first: if no message content contains a special token's text, the ordinary tokenisation is used
   unchanged (the common case: nothing changes for ordinary data).
2. Otherwise the template is rendered once more with each content replaced by a sentinel, which gives the exact
   character ranges the contents occupy in the render. A special token found inside such a range is forged.
3. Tokenizers split text at special tokens and tokenise the pieces between them independently, so the piece that
   holds a forged token (from the previous to the next *structural* special token) is tokenised again with
   ``split_special_tokens=True`` and spliced in, offsets shifted. Every other token, and so every label span, is
   exactly what the ordinary tokenisation gives.

A template that changes a content containing special-token text (so its range cannot be located) makes the row
unusable: it is dropped and counted, never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from effine.data.formats import RowDropped

Messages = list[dict[str, str]]
Offsets = list[tuple[int, int]]


class ControlTokens:
    """The special tokens of one tokenizer, and tokenisation that keeps message contents free of them."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special = {i: t.content for i, t in decoder.items() if getattr(t, "special", False) and t.content}
        self.ids = frozenset(special)
        texts = sorted(set(special.values()), key=len, reverse=True)  # longest first: `<a><b>` before `<a>`
        self.pattern = re.compile("|".join(map(re.escape, texts))) if texts else None

    def forged_ranges(self, messages: Messages, full: str, render: Callable[[Messages], str], where: str
                      ) -> list[tuple[int, int]]:
        """Character ranges in ``full`` (the render of ``messages``) of special-token text inside a content."""
        if self.pattern is None or not any(self.pattern.search(m["content"]) for m in messages):
            return []
        ranges = []
        for start, content in self._content_ranges(messages, full, render, where):
            ranges += [(start + m.start(), start + m.end()) for m in self.pattern.finditer(content)]
        return sorted(ranges)

    def _content_ranges(self, messages: Messages, full: str, render: Callable[[Messages], str], where: str
                        ) -> list[tuple[int, str]]:
        """``(start, content)`` for every place a message's content appears in ``full``."""
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use characters: never in a template
        skeleton = render([{**m, "content": k} for m, k in zip(messages, marks)])
        parts = re.split("\ue000([0-9]+)\ue001", skeleton)
        out, rebuilt = [], []
        for j, part in enumerate(parts):
            if j % 2:  # a sentinel's index
                content = messages[int(part)]["content"]
                out.append((sum(map(len, rebuilt)), content))
                rebuilt.append(content)
            else:
                rebuilt.append(part)
        if "".join(rebuilt) != full:
            raise RowDropped(f"{where}: a message contains special-token text and the chat template rewrites the "
                             "message, so it cannot be kept as plain text — remove the special-token text",
                             "special-token text in a message the chat template rewrites")
        return out

    def tokenize(self, text: str, forged: list[tuple[int, int]] = ()) -> tuple[list[int], Offsets]:
        """Token ids and character offsets of ``text``; special tokens overlapping ``forged`` become plain text."""
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        if not forged:
            return ids, offsets
        is_forged = [t in self.ids and any(s < fe and fs < e for fs, fe in forged) for t, (s, e) in zip(ids, offsets)]
        out_ids: list[int] = []
        out_offsets: Offsets = []
        i = 0
        while i < len(ids):
            if not is_forged[i]:
                out_ids.append(ids[i])
                out_offsets.append(offsets[i])
                i += 1
                continue
            # The piece between the structural special tokens around this one: back to the last one kept...
            a = 0
            while out_ids and out_ids[-1] not in self.ids:
                out_ids.pop()
                out_offsets.pop()
            if out_ids:
                a = out_offsets[-1][1]
            # ...and forward to the next structural special token (or the end).
            j = i
            while j < len(ids) and not (ids[j] in self.ids and not is_forged[j]):
                j += 1
            b = offsets[j][0] if j < len(ids) else len(text)
            plain = self.tokenizer(text[a:b], return_offsets_mapping=True, add_special_tokens=False,
                                   split_special_tokens=True)
            out_ids += plain["input_ids"]
            out_offsets += [(s + a, e + a) for s, e in plain["offset_mapping"]]
            i = j
        return out_ids, out_offsets
