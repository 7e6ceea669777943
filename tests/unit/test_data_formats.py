"""Format detection and normalisation to Sample, with field-path errors."""

from __future__ import annotations

import pytest

from effine.data.formats import RowDropped, detect_format, detect_or_fail, normalise
from effine.errors import DataError

W = "train.jsonl:12"


@pytest.mark.parametrize("row, fmt", [
    ({"messages": []}, "messages"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "sharegpt"),
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"text": "a", "meta": 1}, "text"),
    ({"question": "a"}, None),
])
def test_detect_format_from_keys(row, fmt):
    assert detect_format(row) == fmt


def test_undetectable_row_lists_its_keys():
    with pytest.raises(DataError, match=r"train\.jsonl:12: cannot tell the row format from its keys \(q, a\)"):
        detect_or_fail(W, {"q": 1, "a": 2})


def test_messages_pass_through_and_role_aliases():
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "Human", "content": "U"},
                        {"role": "model", "content": "A"}]}
    s = normalise(W, row, "messages")
    assert s.kind == "messages" and s.where == W
    assert s.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                          {"role": "assistant", "content": "A"}]


def test_sharegpt_roles_are_mapped():
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "U"},
                             {"from": "gpt", "value": "A"}, {"from": "user", "value": "U2"},
                             {"from": "assistant", "value": "A2"}]}
    s = normalise(W, row, "sharegpt")
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in s.messages] == ["S", "U", "A", "U2", "A2"]


def test_alpaca_with_and_without_input():
    s = normalise(W, {"instruction": "Translate", "input": "hola", "output": "hello"}, "alpaca")
    assert s.messages == [{"role": "user", "content": "Translate\n\nhola"}, {"role": "assistant", "content": "hello"}]
    s = normalise(W, {"instruction": "Say hi", "input": "  ", "output": "hi"}, "alpaca")
    assert s.messages[0]["content"] == "Say hi"


def test_prompt_completion_and_text():
    s = normalise(W, {"prompt": "2+2=", "completion": "4"}, "prompt_completion")
    assert (s.kind, s.prompt, s.completion) == ("prompt_completion", "2+2=", "4")
    s = normalise(W, {"text": "hello"}, "text")
    assert (s.kind, s.text) == ("text", "hello")


def test_unknown_role_names_the_field_path():
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}, {"role": "bot", "content": "d"}]}
    with pytest.raises(DataError) as e:
        normalise(W, row, "messages")
    assert str(e.value).startswith("train.jsonl:12: messages[3].role: unknown role 'bot' "
                                   "(expected system, user, assistant; aliases human, gpt")
    assert not isinstance(e.value, RowDropped)  # a structural problem stops the run


def test_sharegpt_unknown_role_uses_its_own_key_names():
    with pytest.raises(DataError, match=r"conversations\[0\]\.from: unknown role 'narrator'"):
        normalise(W, {"conversations": [{"from": "narrator", "value": "x"}]}, "sharegpt")


def test_missing_and_non_string_content():
    with pytest.raises(DataError, match=r"messages\[1\]\.content: missing"):
        normalise(W, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}, "messages")
    with pytest.raises(DataError, match=r"messages\[0\]\.content: expected a string, got int"):
        normalise(W, {"messages": [{"role": "user", "content": 3}]}, "messages")
    with pytest.raises(DataError, match=r"completion: expected a string, got list"):
        normalise(W, {"prompt": "a", "completion": ["b"]}, "prompt_completion")


def test_content_list_of_text_parts_is_joined():
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                        {"role": "assistant", "content": "c"}]}
    assert normalise(W, row, "messages").messages[0]["content"] == "ab"


def test_content_problems_are_droppable_with_a_reason():
    with pytest.raises(RowDropped) as e:
        normalise(W, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
                  "messages")
    assert e.value.reason == "empty message content" and "messages[1].content" in str(e.value)
    with pytest.raises(RowDropped) as e:
        normalise(W, {"messages": [{"role": "user", "content": "a"}]}, "messages", train_on="assistant")
    assert e.value.reason == "no assistant turn"
    with pytest.raises(RowDropped, match="empty"):
        normalise(W, {"text": ""}, "text")


def test_no_assistant_turn_is_fine_when_training_on_everything():
    s = normalise(W, {"messages": [{"role": "user", "content": "a"}]}, "messages", train_on="all")
    assert s.messages == [{"role": "user", "content": "a"}]


def test_declared_format_with_missing_key_names_the_rows_keys():
    with pytest.raises(DataError) as e:
        normalise(W, {"prompt": "a", "response": "b"}, "alpaca")
    assert str(e.value).startswith("train.jsonl:12: format 'alpaca' needs 'instruction' and 'output'")
    assert "(prompt, response)" in str(e.value)
