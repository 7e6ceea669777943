"""Each family's real chat template: the assistant's end-of-turn token is labelled, nothing else of the prompt is,
and exactly one BOS starts every sample (none for tokenizers without one).

Templates: tests/data/chat_templates/<org>--<name>/tokenizer_config.json holds the chat template, the BOS / EOS
tokens and ``add_bos_token`` (whether the model's tokenizer prepends BOS: Llama 3's does it in its post-processor)
of that hub model. The real vocabularies are 0.5-4 MB each, so the tokenizer is SmolLM2's real byte-level BPE
(real offsets, which the label masks are built from) with the family's special tokens added as atomic tokens and
a BOS post-processor where the family's tokenizer has one: the token ids differ from the real model's, the token
boundaries of every special token and the template's text are what the real tokenizer produces.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from effine.data.example import IGNORE
from effine.data.formats import Sample
from effine.data.template import Encoder, adds_bos

DATA = Path(__file__).parent.parent / "data" / "chat_templates"
# hub id -> (end-of-turn token the assistant turn must end with, family)
EOT = {
    "HuggingFaceH4/zephyr-7b-beta": "</s>",  # user turns end with </s> too: only the assistant's are trained
    "mistralai/Mistral-7B-Instruct-v0.1": "</s>",
    "meta-llama/Meta-Llama-3-8B-Instruct": "<|eot_id|>",  # not the eos <|end_of_text|>
    "google/gemma-2b-it": "<end_of_turn>",
    "Qwen/Qwen2-1.5B-Instruct": "<|im_end|>",
    "microsoft/Phi-3-mini-4k-instruct": "<|end|>",
    "smollm2 (packaged, real tokenizer)": "<|im_end|>",
}
SPECIAL = re.compile(r"<\|[a-z_]+\|>|<(?:start|end)_of_turn>|\[/?INST\]|</?s>|<(?:bos|eos)>")
MESSAGES = [{"role": "user", "content": "Which river is longest?"}, {"role": "assistant", "content": "The Nile."},
            {"role": "user", "content": "And the second?"}, {"role": "assistant", "content": "The Amazon."}]


def family_tokenizer(smol, hub_id: str):
    """SmolLM2's BPE with ``hub_id``'s template, special tokens and BOS behaviour (see the module docstring)."""
    if hub_id.startswith("smollm2"):
        return smol
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((DATA / hub_id.replace("/", "--") / "tokenizer_config.json").read_text())
    backend = Tokenizer.from_str(smol.backend_tokenizer.to_str())
    specials = sorted({*SPECIAL.findall(spec["chat_template"]), *(t for t in (spec["bos_token"],
                                                                               spec["eos_token"]) if t)})
    backend.add_special_tokens(specials)
    bos = spec["bos_token"]
    if spec["add_bos_token"]:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    else:
        backend.post_processor = None
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=spec["eos_token"],
                                  pad_token=spec["eos_token"])
    tok.chat_template = spec["chat_template"]
    return tok


@pytest.mark.parametrize("hub_id", list(EOT))
def test_end_of_turn_is_labelled_and_one_bos_starts_the_sample(hub_id: str, smol_tokenizer) -> None:
    tok = family_tokenizer(smol_tokenizer, hub_id)
    ex = Encoder(tok, log=lambda _: None).encode(Sample("chat.jsonl:1", messages=MESSAGES))
    eot = tok.convert_tokens_to_ids(EOT[hub_id])
    labelled = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    assert labelled.count(eot) == 2, tok.decode(labelled)  # one per assistant turn
    # every assistant turn's last trained token is the end-of-turn token (whitespace after it is not trained)
    runs, run = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE:
            run.append(t)
        elif run:
            runs, run = [*runs, run], []
    runs += [run] if run else []
    assert len(runs) == 2 and all(r.count(eot) == 1 for r in runs)
    # nothing after the end-of-turn token but whitespace and, at the very end (Phi-3's template), the eos
    assert all(t == tok.eos_token_id or not tok.decode([t]).strip() for r in runs for t in r[r.index(eot) + 1:])
    trained = tok.decode(labelled, skip_special_tokens=True)
    assert "Nile" in trained and "Amazon" in trained and "river" not in trained and "second" not in trained
    if hub_id.startswith("HuggingFaceH4"):
        assert ex.input_ids.count(eot) == 4  # the user turns' </s> are there, untrained
    bos = tok.bos_token_id
    if adds_bos(tok):
        assert ex.input_ids[0] == bos and ex.input_ids.count(bos) == 1  # templates writing bos_token included
        assert ex.labels[0] == IGNORE
    else:  # no BOS added: the ids are the render's tokens as they are
        enc = Encoder(tok, log=lambda _: None)
        assert ex.input_ids == tok(enc.render(MESSAGES), add_special_tokens=False).input_ids
