"""The Ollama Modelfile written beside a GGUF: FROM, the chat format translated to a Go template, stops, params."""

from __future__ import annotations

import json

import pytest

from effine.export.ollama import chat_format, modelfile_text, write_modelfile
from effine.export.gguf_vocab import _pre_tokenizer_name

GEMMA_JINJA = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
LLAMA3_JINJA = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
ZEPHYR_JINJA = "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}</s>{% endif %}"


@pytest.mark.parametrize("jinja, name, stop", [
    ("{{'<|im_start|>' + message['role']}}", "chatml", "<|im_end|>"),
    (GEMMA_JINJA, "gemma", "<end_of_turn>"),
    (LLAMA3_JINJA, "llama3", "<|eot_id|>"),
    (ZEPHYR_JINJA, "zephyr", "</s>"),
    ("{{ '[INST] ' + m['content'] + ' [/INST]' }}", "inst", "[INST]"),
])
def test_known_chat_formats(jinja, name, stop):
    got, template, stops = chat_format(jinja)
    assert got == name and stop in stops
    assert "{{ .Prompt }}" in template and "{{ .Response }}" in template and "{{ if .System }}" in template


def test_base_model_and_unknown_template():
    assert chat_format(None) == ("completion", "{{ .Prompt }}", [])
    text = modelfile_text("m.gguf", "{{ '### Human: ' + m }}", "</s>", 8192)
    assert "TEMPLATE" not in text and "embedded in the GGUF" in text and 'PARAMETER stop "</s>"' in text


def test_smollm2_modelfile(tiny_llama_dir, tmp_path):
    (tiny_llama_dir / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}))
    try:
        path = write_modelfile(tmp_path / "smol-q8_0.gguf", tiny_llama_dir)
    finally:
        (tiny_llama_dir / "generation_config.json").unlink()
    text = path.read_text()
    assert path.name == "smol-q8_0.Modelfile"
    lines = text.splitlines()
    assert "FROM ./smol-q8_0.gguf" in lines
    assert ('TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
            '{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n'
            '{{ .Response }}<|im_end|>\n"""') in text
    assert lines.count('PARAMETER stop "<|im_end|>"') == 1  # the EOS is also a ChatML stop: listed once
    assert 'PARAMETER stop "<|im_start|>"' in lines and "PARAMETER num_ctx 256" in lines
    assert {"PARAMETER temperature 0.2", "PARAMETER top_p 0.9", "PARAMETER repeat_penalty 1.1"} <= set(lines)


def test_pre_tokenizer_names():
    assert _pre_tokenizer_name({"type": "ByteLevel", "use_regex": True}) == "gpt-2"
    assert _pre_tokenizer_name({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel"}]}) == "smollm"
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
    assert _pre_tokenizer_name({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": llama3}}, {"type": "ByteLevel", "use_regex": False}]}) == "llama-bpe"
    assert _pre_tokenizer_name({"type": "Metaspace"}) == "default"
