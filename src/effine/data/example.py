"""The unit the trainer consumes: one tokenised sample with its label mask.

Kept in its own module so that the trainer, the collator and the packer can import :class:`Example` without
pulling in chat-template rendering (Jinja, transformers).
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100
"""Label value of a token that carries no loss (the value ``torch.nn.functional.cross_entropy`` ignores)."""


@dataclass
class Example:
    """One tokenised sample.

    ``labels`` has the same length as ``input_ids`` and is NOT shifted: ``labels[t]`` is the target for the token
    at position ``t`` (the loss shifts, predicting ``labels[t]`` from positions ``< t``). Untrained positions hold
    :data:`IGNORE`. ``labels[0]`` is always :data:`IGNORE` (nothing precedes the first token to predict it from).
    ``where`` is the source location (``file:line`` or ``file:row N``), for error messages and inspection.
    """

    input_ids: list[int]
    labels: list[int]
    where: str

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        """How many positions carry a label (the supervised tokens)."""
        return sum(1 for x in self.labels if x != IGNORE)
