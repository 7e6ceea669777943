"""Showing what a model will be trained on: the decoded text with the labelled spans highlighted.

Used by ``effine data check``. Trained tokens are green (ANSI) or wrapped in ``[[ ]]`` without colour; special
tokens (``<|im_start|>``, ``<s>``) are kept visible (dimmed with colour) so that a missing or doubled BOS, or an
untrained end-of-turn marker, is easy to spot.
"""

from __future__ import annotations

from typing import Any

from effine.data.example import IGNORE, Example

GREEN, DIM, RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"


def _runs(example: Example, special: set[int]) -> list[tuple[bool, bool, list[int]]]:
    """Consecutive tokens grouped by (trained, special), so each group is decoded in one piece."""
    runs: list[tuple[bool, bool, list[int]]] = []
    for tok, label in zip(example.input_ids, example.labels):
        key = (label != IGNORE, tok in special)
        if runs and runs[-1][:2] == key:
            runs[-1][2].append(tok)
        else:
            runs.append((*key, [tok]))
    return runs


def label_segments(example: Example, tokenizer: Any) -> list[tuple[str, bool, bool]]:
    """The example's text as ``(text, trained, special)`` pieces, in order (the report page draws these)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    # Decoding a run at once keeps multi-byte characters split across tokens intact.
    return [(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False), trained, is_sp)
            for trained, is_sp, ids in _runs(example, special)]


def render_labels(example: Example, tokenizer: Any, color: bool) -> str:
    """The example's text with trained spans highlighted and special tokens shown literally."""
    parts = []
    for text, trained, is_special in label_segments(example, tokenizer):
        if color:
            if is_special:
                text = f"{DIM}{text}{RESET}"
            parts.append(f"{GREEN}{text}{RESET}" if trained else text)
        else:
            parts.append(f"[[{text}]]" if trained else text)
    out = "".join(parts)
    return out.replace("]][[", "") if not color else out  # adjacent trained runs read as one span
