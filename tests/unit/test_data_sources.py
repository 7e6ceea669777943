"""Reading rows from files (JSONL, JSON, CSV, Parquet) and the built-in datasets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from effine.data.builtin import chitchat_conversation, evals_messages, resolve_builtin
from effine.data.sources import read_rows
from effine.errors import DataError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_rows_carry_their_line_and_skip_blank_lines(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert list(read_rows(p)) == [(f"{p}:1", {"text": "a"}), (f"{p}:4", {"text": "b"})]


def test_malformed_jsonl_line_names_file_line_and_column(tmp_path):
    p = write(tmp_path / "data.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text" "c"}\n')
    with pytest.raises(DataError) as e:
        list(read_rows(p))
    msg = str(e.value)
    assert msg.startswith(f"{p}:3: invalid JSON (Expecting ':' delimiter at column 9)")
    assert "fix or remove this line" in msg


def test_jsonl_row_that_is_not_an_object_is_an_error(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "a"}\n["a", "b"]\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: expected a JSON object .* got list"):
        list(read_rows(p))


def test_json_top_level_list_and_wrapped_list(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}]
    p = write(tmp_path / "list.json", json.dumps(rows))
    assert list(read_rows(p)) == [(f"{p}:row 1", rows[0]), (f"{p}:row 2", rows[1])]
    q = write(tmp_path / "wrapped.json", json.dumps({"version": 2, "data": rows}))
    assert [w for w, _ in read_rows(q)] == [f"{q}:row 1", f"{q}:row 2"]


def test_json_without_rows_and_non_object_row_are_errors(tmp_path):
    with pytest.raises(DataError, match="top-level list"):
        list(read_rows(write(tmp_path / "a.json", '{"a": 1}')))
    with pytest.raises(DataError, match=r"b\.json:row 2: expected a JSON object"):
        list(read_rows(write(tmp_path / "b.json", '[{"text": "x"}, 3]')))


def test_csv_rows_name_the_physical_line_where_the_record_starts(tmp_path):
    p = write(tmp_path / "d.csv", 'prompt,completion\nhi,"hello\nthere"\n\nq,a\n')
    assert list(read_rows(p)) == [(f"{p}:2", {"prompt": "hi", "completion": "hello\nthere"}),
                                  (f"{p}:5", {"prompt": "q", "completion": "a"})]


def test_csv_record_with_wrong_field_count_is_an_error(tmp_path):
    p = write(tmp_path / "d.csv", "prompt,completion\na,b,c\n")
    with pytest.raises(DataError, match=r"d\.csv:2: 3 fields but the header has 2"):
        list(read_rows(p))


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"]}), p)
    rows = list(read_rows(p))
    assert rows[2] == (f"{p}:row 3", {"prompt": "c", "completion": "z"})


def test_unknown_extension_lists_supported_ones(tmp_path):
    with pytest.raises(DataError) as e:
        list(read_rows(write(tmp_path / "d.txt", "hello")))
    assert ".jsonl" in str(e.value) and ".parquet" in str(e.value) and ".csv" in str(e.value)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        list(read_rows(tmp_path / "nope.jsonl"))


# -- built-in datasets ------------------------------------------------------------------------------------------


def msg(text: str, sender: str) -> dict:
    return {"text": text, "timestamp": "t", "sender": sender}


def test_chitchat_conversation_roles_merging_and_ending():
    turns = [[msg("hi", "A"), msg("", "A"), msg("there", "A")], [msg("  ", "B")], [msg("more", "A")],
             [msg("hello", "B")], [msg("bye", "A")]]
    assert chitchat_conversation(turns) == [
        {"role": "user", "content": "hi\nthere\nmore"},  # B's empty turn vanished, so A's turns merge
        {"role": "assistant", "content": "hello"},
    ]  # the trailing user turn is dropped
    assert chitchat_conversation([[msg("alone", "A")]]) is None


def test_evals_row_conversion():
    row = {"input": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
           "ideal": ["4", "four"]}
    assert evals_messages(row) == [*row["input"], {"role": "assistant", "content": "4"}]
    only_system = {"input": [{"role": "system", "content": "Name a colour."}], "ideal": "red"}
    assert evals_messages(only_system) == [{"role": "user", "content": "Name a colour."},
                                           {"role": "assistant", "content": "red"}]
    assert evals_messages({"input": "plain prompt", "ideal": "x"}) is None
    assert evals_messages({"input": [{"role": "user", "content": "q"}], "ideal": []}) is None


def test_builtin_chitchat_is_converted_once_into_the_cache(tmp_path):
    path = resolve_builtin("builtin:chitchat", tmp_path)
    assert path == tmp_path / "data" / "chitchat.jsonl"
    rows = [json.loads(line) for line in path.open()]
    # 7,168 conversations in the package; the ~4k in which someone answers become training conversations.
    assert 3900 <= len(rows) <= 4100
    for row in rows[:500]:
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles, roles[1:]))  # strictly alternating
        assert all(m["content"].strip() for m in row["messages"])
    mtime = path.stat().st_mtime_ns
    assert resolve_builtin("chitchat", tmp_path) == path and path.stat().st_mtime_ns == mtime  # reused
    assert not list(path.parent.glob("*.tmp"))


def test_unknown_builtin_lists_the_available_ones(tmp_path):
    with pytest.raises(DataError, match="builtin:chitchat"):
        resolve_builtin("builtin:nope", tmp_path)


def test_jsonl_with_byte_order_mark(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n')
    assert list(read_rows(p)) == [(f"{p}:1", {"text": "a"})]


@pytest.mark.skipif(importlib.util.find_spec("evals") is None,
                    reason="evals not installed (builtin:evals installs it on first use; not done in unit tests)")
def test_builtin_evals_rows_are_chat_conversations(tmp_path):
    path = resolve_builtin("builtin:evals", tmp_path)
    rows = [json.loads(line) for line in path.open()]
    assert 1000 <= len(rows) <= 3000
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles[-1] == "assistant" and "user" in roles and set(roles) <= {"system", "user", "assistant"}


@pytest.mark.skipif(importlib.util.find_spec("evals") is None,
                    reason="evals not installed (builtin:evals installs it on first use; not done in unit tests)")
def test_builtin_evals_tomi_splits_by_story(tmp_path):
    """Train and test share no story (the six questions about one story stay in one split); test is ~20%."""
    from effine.eval.task import read_task_rows

    train = [json.loads(line) for line in resolve_builtin("builtin:evals-tomi", tmp_path).open()]
    test = read_task_rows(resolve_builtin("builtin:evals-tomi-test", tmp_path))
    assert len(train) + len(test) == 5993 and 0.15 < len(test) / 5993 < 0.25
    story = lambda text: text.rsplit(". ", 1)[0]  # noqa: E731
    train_stories = {story(r["messages"][0]["content"]) for r in train}
    assert not train_stories & {story(r.messages[0]["content"]) for r in test}
    assert all(len(r.references) == 1 and r.references[0].isidentifier() for r in test)  # "pantry", "blue_box"
    assert len({story(r.messages[0]["content"]) for r in test[:12]}) > 6  # shuffled: the first N are a sample
