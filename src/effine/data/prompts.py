"""Prompts for generation, built the way training rendered the data: through the chat template, one BOS."""

from __future__ import annotations


def prompt_ids_for(tokenizer, prompt: str, chat: bool = True, system_prompt: str | None = None,
                   chat_template: str | None = None) -> list[int]:
    """Token ids of a user prompt: through the chat template (the tokenizer's, or `chat_template`) when `chat`."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if chat and template:
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        msgs.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                             chat_template=template)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        bos = tokenizer.bos_token_id
        # Exactly one BOS, as in training: add it only when the tokenizer would and the template did not.
        adds_bos = bos is not None and tokenizer("x").input_ids[:1] == [bos]
        if adds_bos and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids
    return tokenizer(prompt).input_ids


def prompt_from_example(example) -> list[int]:
    """The tokens before the last trained span of a held-out example: the conversation up to its last reply."""
    labels = example.labels
    last = max(i for i, y in enumerate(labels) if y != -100)
    start = last
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    return list(example.input_ids[:start])
