"""`effine chat`: a multi-turn conversation in the terminal with a model, a run dir or an adapter dir.

Each turn renders the whole conversation through the chat template the run trained with (a run's tokenizer
carries it; a model without one gets ChatML, as in training) and generates greedily, printing tokens as they are
decoded. Commands: ``/reset`` forgets the conversation, ``/system TEXT`` sets the system prompt (``/system``
alone clears it), ``/quit`` or end of input (Ctrl-D) exits. When the conversation outgrows the model's context,
the oldest turns are dropped (and the user is told).
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

import torch

from effine.eval.task import chat_prompt_ids, stop_ids

HELP = "commands: /reset clears the conversation, /system TEXT sets the system prompt, /quit (or Ctrl-D) exits"


def _streamer(tokenizer, on_text: Callable[[str], None]):
    from transformers import TextStreamer

    class _Stream(TextStreamer):
        """transformers' TextStreamer (which holds text back until a word is complete), printing via on_text."""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return _Stream(tokenizer, skip_prompt=True, skip_special_tokens=True)


@torch.no_grad()
def reply(model, tokenizer, messages: list[dict[str, str]], *, system_prompt: str | None = None,
          max_new_tokens: int = 256, on_text: Callable[[str], None] | None = None,
          max_context: int | None = None) -> tuple[str, int]:
    """The greedy reply to ``messages`` (streamed to ``on_text`` piece by piece) and how many of the oldest
    messages had to be left out to fit ``max_context`` tokens (prompt + reply)."""
    dropped = 0
    ids = chat_prompt_ids(tokenizer, messages, system_prompt)
    while max_context and len(ids) + max_new_tokens > max_context and len(messages) - dropped > 1:
        dropped += 2 if messages[dropped]["role"] == "user" and len(messages) - dropped > 2 else 1
        ids = chat_prompt_ids(tokenizer, messages[dropped:], system_prompt)
    model.eval()
    device = next(model.parameters()).device
    stop = stop_ids(model, tokenizer)
    x = torch.tensor([ids], device=device)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=stop or None, pad_token_id=tokenizer.pad_token_id,
                         streamer=_streamer(tokenizer, on_text) if on_text else None)
    new = out[0, len(ids):].tolist()
    new = new[:next((k for k, t in enumerate(new) if t in stop), len(new))]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), dropped


def chat_loop(model, tokenizer, *, system_prompt: str | None = None, max_new_tokens: int = 256,
              read: Callable[[str], str] = input, out: TextIO | None = None) -> int:
    """Read a line, answer it (streamed to ``out``), repeat; returns the exit status (0)."""
    out = out or sys.stdout
    max_context = getattr(model.config, "max_position_embeddings", None)
    print(f"effine chat ({HELP})", file=out, flush=True)
    messages: list[dict[str, str]] = []
    while True:
        try:
            line = read("you> ")
        except EOFError:
            print(file=out, flush=True)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            messages = []
            print("(conversation cleared)", file=out, flush=True)
            continue
        if text == "/system" or text.startswith("/system "):
            system_prompt = text[len("/system"):].strip() or None
            print(f"(system prompt {'set: ' + system_prompt if system_prompt else 'cleared'})", file=out, flush=True)
            continue
        if text.startswith("/"):
            print(f"(unknown command {text.split()[0]}; {HELP})", file=out, flush=True)
            continue
        messages.append({"role": "user", "content": text})
        print("bot> ", end="", file=out, flush=True)
        started = [False]

        def show(piece: str) -> None:
            if not started[0]:  # the reply as the conversation stores it: without leading whitespace
                piece = piece.lstrip()
                started[0] = bool(piece)
            print(piece, end="", file=out, flush=True)

        answer, dropped = reply(model, tokenizer, messages, system_prompt=system_prompt,
                                max_new_tokens=max_new_tokens, max_context=max_context, on_text=show)
        print(file=out, flush=True)
        if dropped:
            messages = messages[dropped:]
            print(f"(the {dropped} oldest messages no longer fit the context and were left out)", file=out,
                  flush=True)
        messages.append({"role": "assistant", "content": answer})
