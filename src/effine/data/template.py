"""From a :class:`Sample` to token ids and a label mask (an :class:`Example`).

Conversations are rendered with the chat template (the tokenizer's own, or ``data.chat_template``) through
``tokenizer.apply_chat_template(..., tokenize=False)``, so the text is exactly what the model sees at inference.
Labels are decided on *characters*, then mapped to tokens through the tokenizer's offsets:

* for assistant turn ``i``, ``prefix = render(messages[:i], add_generation_prompt=True)`` and
  ``upto = render(messages[:i + 1])``; the characters ``[len(prefix), len(upto))`` are the assistant's content
  AND its end-of-turn marker (``<|im_end|>``, ``<end_of_turn>``, ``</s>``). Training the marker is how the model
  learns to stop. Whitespace after the marker (a trailing newline) is left untrained — unless the template has
  no marker, in which case that whitespace is what ends the turn and is trained.
* the full conversation is tokenised once (``return_offsets_mapping=True, add_special_tokens=False``) and every
  token whose character span overlaps an assistant span is labelled.

Rendering two prefixes per turn is quadratic in the conversation length, so for templates with a regular turn
shape (learned from a probe conversation, see :class:`TurnShape`) the same spans are found in the full render in
one pass; the first conversations of every run are computed both ways, and any disagreement switches the fast
path off for the rest of the run.

Templates that render history differently from the last turn (so that a prefix render is not a prefix of the full
render) are handled by locating each assistant turn's text in order in the full render; when even that fails the
row is rejected with an error naming the template. A label is never guessed.

BOS: if the tokenizer adds a BOS by default (``tokenizer("x")`` starts with it), every sequence starts with
exactly one BOS — templates that write ``{{ bos_token }}`` themselves are not doubled. If it never adds one (ChatML
models such as SmolLM2), none is added.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from effine.data.example import IGNORE, Example
from effine.data.formats import RowDropped, Sample
from effine.data.literals import ControlTokens
from effine.errors import DataError, EffineError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved chat template: its Jinja source and a description for logs and errors."""

    source: str
    description: str
    fallback: bool = False  # True when the tokenizer had none and the built-in ChatML stands in


def resolve_chat_template(tokenizer: Any, override: str | None) -> ChatTemplate:
    """The template to render with: ``override`` (a built-in name, a ``.jinja`` path or a Jinja string), else the
    tokenizer's own, else the built-in ChatML (``fallback=True``)."""
    if override is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # named templates: the unnamed/default one is the chat template
            own = own.get("default") or next(iter(own.values()), None)
        if own:
            return ChatTemplate(own, "the tokenizer's chat template")
        return ChatTemplate(CHATML, "chatml (built-in; the tokenizer has no chat template)", fallback=True)
    name = override.strip()
    if name.lower() in BUILTIN_TEMPLATES:
        return ChatTemplate(BUILTIN_TEMPLATES[name.lower()], f"data.chat_template={name.lower()} (built-in)")
    if "{{" in override or "{%" in override:
        return ChatTemplate(override, "data.chat_template (Jinja string)")
    path = Path(name).expanduser()
    if path.is_file():
        return ChatTemplate(path.read_text(encoding="utf-8"), f"data.chat_template={name}")
    if path.suffix == ".jinja":
        raise DataError(f"data.chat_template: {name}: file not found — check the path")
    raise DataError(f"data.chat_template: {name!r} is neither a built-in name ({', '.join(BUILTIN_TEMPLATES)}), an "
                    "existing .jinja file, nor a Jinja string — fix the value or leave it unset")


def unsafe_template(description: str, e: Exception) -> DataError:
    """A template that reached for Python internals (``__class__``, ``__globals__``): the sandbox stopped it."""
    return DataError(f"{description}: the template tried something Jinja's sandbox forbids ({e}) — chat templates "
                     "may only format messages; remove that expression or use data.chat_template: chatml")


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS in front of plain text by default (Llama, Gemma: yes; SmolLM2: no)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    return tokenizer("x").input_ids[:1] == [bos]


def _overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token's character span, whether it overlaps any of the (sorted, disjoint) spans."""
    out, j = [], 0
    for s, e in offsets:
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        out.append(j < len(spans) and e > s and spans[j][0] < e)
    return out


def trained_length(turn: str, content: str) -> int:
    """How much of an assistant turn's text is trained: all of it but trailing whitespace after the end marker.

    When nothing but whitespace follows the content (a template without an end marker), that whitespace IS the
    end of the turn and stays trained: otherwise the model would never learn to stop.
    """
    k = turn.rfind(content)
    if k >= 0 and not turn[k + len(content):].strip():
        return len(turn)
    return len(turn.rstrip())


def _find_closed_turn(full: str, cursor: int, prefix: str, turn: str, content: str) -> tuple[int, str]:
    """(start, turn text) of an assistant turn whose lone render carries text that only closes a conversation.

    Phi-3's template appends ``eos_token`` after the last message: rendered alone, a turn reads ``content<|end|>
    \n<|endoftext|>``, in the middle of the full render only ``content<|end|>\n``. The turn is then content plus
    its end marker (up to the first whitespace after the content), found in order right after the text that
    precedes it in ``prefix`` (its last 32 characters: the generation prompt and the end of the previous turn).
    (-1, turn) when that fails too.
    """
    k = turn.rfind(content)
    if k < 0:
        return -1, turn
    after = turn[k + len(content):]
    marker = after[: len(after) - len(after.lstrip())] + after.lstrip().split(maxsplit=1)[0] if after.strip() else ""
    short = turn[: k + len(content)] + marker
    anchor = prefix[-32:]
    pos = full.find(anchor + short, max(0, cursor - len(anchor)))
    return (pos + len(anchor), short) if pos >= 0 else (-1, turn)


_UNSET = object()
VERIFY_ROWS = 16  # conversations whose fast spans are checked against the exact method


@dataclass(frozen=True)
class TurnShape:
    """How a template renders an assistant turn: ``gen`` (the generation prompt, e.g. ``<|im_start|>assistant\\n``)
    then ``lead + content + trail`` (``trail`` holds the end-of-turn marker, e.g. ``<|im_end|>\\n``).

    Learned from a probe conversation with the exact method; only templates that render the content verbatim,
    with a non-empty generation prompt and the same shape for every turn, get one.
    """

    gen: str
    lead: str
    trail: str

    @classmethod
    def learn(cls, encoder: Encoder, system_prompt: str | None) -> TurnShape | None:
        probe = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello! How can I help?"},
                 {"role": "user", "content": "Tell me a joke."},
                 {"role": "assistant", "content": "Why did the chicken cross the road?"}]
        if system_prompt:
            probe.insert(0, {"role": "system", "content": system_prompt})
        shapes = set()
        try:
            for i in (i for i, m in enumerate(probe) if m["role"] == "assistant"):
                before = encoder.render(probe[:i])
                prefix = encoder.render(probe[:i], add_generation_prompt=True)
                upto = encoder.render(probe[: i + 1])
                content = probe[i]["content"]
                turn = upto[len(prefix):]
                if not (prefix.startswith(before) and upto.startswith(prefix) and content in turn):
                    return None
                k = turn.index(content)
                shapes.add(cls(prefix[len(before):], turn[:k], turn[k + len(content):]))
        except EffineError:
            return None
        shape = shapes.pop() if len(shapes) == 1 else None
        return shape if shape is not None and shape.gen else None

    def spans(self, messages: list[dict[str, str]], full: str, targets: list[int]) -> list[tuple[int, int]] | None:
        """The trained spans, found in order in ``full``; None when some assistant turn is not where expected."""
        wanted, spans, cursor = set(targets), [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            turn = self.lead + m["content"] + self.trail
            pos = full.find(self.gen + turn, cursor)
            if pos < 0:
                return None
            start = pos + len(self.gen)
            if i in wanted:
                spans.append((start, start + trained_length(turn, m["content"])))
            cursor = start + len(turn)
        return spans


class Encoder:
    """Turns samples into :class:`Example` s for one tokenizer and one data config."""

    def __init__(self, tokenizer: Any, *, chat_template: str | None = None, system_prompt: str | None = None,
                 train_on: str = "assistant", log: Callable[[str], Any] = print) -> None:
        self.tokenizer = tokenizer
        self.template = resolve_chat_template(tokenizer, chat_template)
        self.system_prompt = system_prompt
        self.train_on = train_on
        self.log = log
        self.bos_id = tokenizer.bos_token_id if adds_bos(tokenizer) else None
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        self.controls = ControlTokens(tokenizer)
        self._announced_fallback = False
        self._announced_search = False
        self._shape: TurnShape | None | object = _UNSET  # learned on first use (after the system prompt is known)
        self._verify_left = VERIFY_ROWS

    # -- rendering ---------------------------------------------------------------------------------------------

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False, where: str = "") -> str:
        """Render messages as text with the resolved template (in transformers' Jinja sandbox)."""
        import jinja2  # transformers renders with Jinja; its errors are what a bad template raises
        import jinja2.sandbox

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.template.source,
                                                      add_generation_prompt=add_generation_prompt)
        except jinja2.sandbox.SecurityError as e:  # transformers renders in Jinja's ImmutableSandboxedEnvironment
            raise unsafe_template(self.template.description, e) from None
        except jinja2.TemplateSyntaxError as e:
            raise DataError(f"{self.template.description}: invalid Jinja ({e.message}, template line {e.lineno}) "
                            "— fix the template or set data.chat_template: chatml") from None
        except jinja2.TemplateError as e:
            msg = str(e).strip()[:100]  # e.g. "Conversation roles must alternate user/assistant/..."
            raise RowDropped(f"{where}: {self.template.description} rejected the conversation: {msg}",
                             f"rejected by chat template: {msg}") from None

    def announce(self) -> None:
        """Log, once, that the built-in ChatML stands in for a missing chat template."""
        if self.template.fallback and not self._announced_fallback:
            self._announced_fallback = True
            self.log("NOTE: the tokenizer has no chat template; conversations are rendered with the built-in "
                     "ChatML template (<|im_start|>role ... <|im_end|>). Set data.chat_template to choose another.")

    def assistant_spans(self, messages: list[dict[str, str]], full: str, where: str) -> list[tuple[int, int]]:
        """Character spans of the trained assistant turns (content + end-of-turn marker) within ``full``.

        The exact method renders two prefixes per assistant turn, which is quadratic in the conversation length
        (a 40-turn chat renders 40 growing prefixes). When the template's turn shape could be learned (see
        :class:`TurnShape`), the spans are instead found in ``full`` in one pass; the first conversations are
        computed both ways and the fast path is switched off for good if they ever disagree.
        """
        shape = self._turn_shape()
        if shape is not None:
            fast = shape.spans(messages, full, self._targets(messages))
            if fast is not None and self._verify_left <= 0:
                return fast
            exact = self.exact_spans(messages, full, where)
            if fast is not None:
                self._verify_left -= 1
                if fast != exact:
                    self._shape = None
                    self.log(f"note: {self.template.description}: the fast label-span search disagreed with the "
                             "exact method; using the exact (slower) method for all rows")
            return exact
        return self.exact_spans(messages, full, where)

    def _targets(self, messages: list[dict[str, str]]) -> list[int]:
        targets = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        return targets[-1:] if self.train_on == "last_assistant" else targets

    def _turn_shape(self) -> TurnShape | None:
        if self._shape is _UNSET:
            self._shape = TurnShape.learn(self, self.system_prompt)
        return self._shape  # type: ignore[return-value]

    def exact_spans(self, messages: list[dict[str, str]], full: str, where: str) -> list[tuple[int, int]]:
        """Spans by rendering ``messages[:i]`` (with generation prompt) and ``messages[:i+1]`` per turn ``i``."""
        spans, cursor = [], 0
        for i in self._targets(messages):
            prefix = self.render(messages[:i], add_generation_prompt=True, where=where)
            upto = self.render(messages[: i + 1], where=where)
            if not upto.startswith(prefix):
                raise self._unlocatable(where, i, "its generation prompt is not how it renders an assistant turn")
            turn = upto[len(prefix):]
            if full.startswith(upto) and len(prefix) >= cursor:
                start = len(prefix)
            else:
                # History renders differently from the last turn (e.g. reasoning stripped from old turns):
                # find this turn's exact text, in order, in the full render.
                start = full.find(turn, cursor)
                if start < 0:
                    start, turn = _find_closed_turn(full, cursor, prefix, turn, messages[i]["content"])
                if start < 0:
                    raise self._unlocatable(where, i, "the full render does not contain the turn as rendered alone")
                if not self._announced_search:
                    self._announced_search = True
                    self.log(f"note: {self.template.description} renders earlier turns differently from the last "
                             "one; assistant turns are located by their text instead")
            spans.append((start, start + trained_length(turn, messages[i]["content"])))
            cursor = start + len(turn)
        return spans

    def _unlocatable(self, where: str, i: int, why: str) -> DataError:
        return DataError(f"{where}: messages[{i}]: cannot locate the assistant turn for label masking with "
                         f"{self.template.description} ({why}) — set data.chat_template to a template whose "
                         "renders of the first messages are prefixes of the full render (e.g. chatml)")

    # -- encoding ----------------------------------------------------------------------------------------------

    def encode(self, sample: Sample) -> Example:
        """Tokenise a sample and build its label mask."""
        if sample.messages is not None:
            return self._encode_messages(sample)
        if sample.completion is not None:
            prompt = sample.prompt or ""
            return self._encode_text(prompt + sample.completion, len(prompt), sample.where)
        return self._encode_text(sample.text or "", 0, sample.where)

    def _encode_messages(self, sample: Sample) -> Example:
        self.announce()
        messages = sample.messages or []
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        if messages[0]["role"] == "assistant" and self.train_on != "all":
            # Templates often render an empty history differently (SmolLM2 adds its default system prompt only
            # when there are messages), so a turn at position 0 cannot be located reliably: drop, don't guess.
            raise RowDropped(f"{sample.where}: messages[0]: the conversation starts with an assistant turn — put a "
                             "user (or system) message first", "starts with an assistant turn")
        full = self.render(messages, where=sample.where)
        # Special-token text typed in a message stays text: only the template's own tokens are control tokens.
        forged = self.controls.forged_ranges(messages, full, lambda ms: self.render(ms, where=sample.where),
                                             sample.where)
        ids, offsets = self.controls.tokenize(full, forged)
        if self.train_on == "all":
            trained = [True] * len(ids)
        else:
            trained = _overlapping(offsets, self.assistant_spans(messages, full, sample.where))
        labels = [t if keep else IGNORE for t, keep in zip(ids, trained)]
        return self._finish(ids, labels, sample.where)

    def _encode_text(self, text: str, train_from: int, where: str) -> Example:
        """Raw text + EOS; characters from ``train_from`` on (and the EOS) are trained."""
        ids, offsets = self._tokenize(text)
        trained = _overlapping(offsets, [(train_from, len(text))])
        labels = [t if keep else IGNORE for t, keep in zip(ids, trained)]
        if self.eos_id is not None:
            ids, labels = ids + [self.eos_id], labels + [self.eos_id]
        return self._finish(ids, labels, where)

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        return self.controls.tokenize(text)

    def _finish(self, ids: list[int], labels: list[int], where: str) -> Example:
        """Exactly one leading BOS when the tokenizer uses one; the first position is never a target."""
        if self.bos_id is not None:
            n = 0
            while n < len(ids) and ids[n] == self.bos_id:
                n += 1
            ids, labels = [self.bos_id, *ids[n:]], [IGNORE, *labels[n:]]
        if labels:
            labels[0] = IGNORE  # nothing precedes the first token, so it cannot be predicted
        return Example(ids, labels, where)
