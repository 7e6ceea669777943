"""Reading training rows from files: JSONL, JSON, CSV and Parquet.

Every row comes with ``where``, the location a person needs to find it again: ``path:LINE`` for line-based
files (JSONL, CSV; 1-based physical line) and ``path:row N`` for files without useful lines (JSON, Parquet; 1-based
row number). Every error names that location and says what to do.

A line too long to be a trainable row (over :data:`MAX_LINE_BYTES`, e.g. a 50 MB single line) is not held in
memory: it is read past in chunks and yielded as a :class:`~effine.data.formats.RowDropped` instead of a row, which
the pipeline counts. A byte-order mark is tolerated at the start of the file and at the start of any JSONL line
(files concatenated with ``cat``).

    for where, data in read_rows("train.jsonl"):
        ...  # where == "train.jsonl:3", data == {"messages": [...]}
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from effine.data.formats import RowDropped
from effine.errors import DataError

Row = tuple[str, "dict[str, Any] | RowDropped"]
"""``(where, data)``: a row's location and its fields (or, for a line too long to read, why it was skipped)."""

MAX_LINE_BYTES = 16 << 20
"""Longest JSONL line (and CSV field, in characters) read as a row: 16 MiB, far beyond any data.max_length."""

SUPPORTED = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")


def read_rows(path: str | Path) -> Iterator[Row]:
    """Yield ``(where, row)`` for every row of a data file, dispatching on the file extension."""
    p = Path(path)
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
               ".parquet": _read_parquet}
    reader = readers.get(p.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported data file type '{p.suffix or '(no extension)'}' — use one of "
                        f"{', '.join(SUPPORTED)}, or a builtin: dataset (builtin:chitchat)")
    if not p.is_file():
        raise DataError(f"{path}: data file not found — check data.path (relative paths are taken from the "
                        "directory you run effine in)")
    yield from reader(p, str(path))


def _not_object(where: str, value: Any) -> DataError:
    kind = "null" if value is None else type(value).__name__
    return DataError(f"{where}: expected a JSON object (one row of fields), got {kind} — wrap the row as an "
                     "object, e.g. {\"messages\": [...]}")


def _read_jsonl(p: Path, name: str) -> Iterator[Row]:
    """One JSON object per line; blank lines are skipped but still counted, so line numbers match an editor.

    Read as bytes and decoded line by line, so a bad byte is reported on its own line (a text-mode reader decodes
    ahead in blocks and would blame an earlier line).
    """
    with p.open("rb") as f:
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            lineno += 1
            where = f"{name}:{lineno}"
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                length = len(raw) + _skip_rest_of_line(f)
                yield where, RowDropped(f"{where}: line of {length:,} bytes, longer than {MAX_LINE_BYTES:,}",
                                        f"line longer than {MAX_LINE_BYTES >> 20} MiB")
                continue
            try:
                line = raw.decode("utf-8").lstrip("\ufeff")  # a BOM: file start, or files joined with `cat`
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start + 1} of the line) — save "
                                "the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                if "\x00" in line:
                    raise DataError(f"{where}: NUL byte at column {line.index(chr(0)) + 1} — the file is corrupt "
                                    "(binary data, or zeros left by an interrupted write); fix or remove this line"
                                    ) from None
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}) — fix or remove this line"
                                ) from None
            if not isinstance(value, dict):
                raise _not_object(where, value)
            yield where, value


def _skip_rest_of_line(f: Any) -> int:
    """Read past the rest of an overlong line a chunk at a time (bounded memory); return how much was skipped."""
    skipped = 0
    while True:
        chunk = f.readline(1 << 20)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


def _json_records(value: Any, name: str) -> list[Any]:
    """The list of records in a JSON document: the document itself, or the one list-of-objects value it holds."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(lists) == 1:
            return value[lists[0]]
        if len(lists) > 1:
            raise DataError(f"{name}: the top-level object holds several lists of rows ({', '.join(lists)}) — "
                            "keep one, or convert the file to JSONL")
    raise DataError(f"{name}: expected a top-level list of row objects, or an object holding one such list — "
                    "reshape the file, or convert it to JSONL (one object per line)")


def _read_json(p: Path, name: str) -> Iterator[Row]:
    try:
        value = json.loads(p.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not valid UTF-8 ({e.reason}) — save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{name}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}) — fix the file") from None
    for i, record in enumerate(_json_records(value, name), start=1):
        where = f"{name}:row {i}"
        if not isinstance(record, dict):
            raise _not_object(where, record)
        yield where, record


def _read_csv(p: Path, name: str) -> Iterator[Row]:
    """CSV with a header row; ``where`` is the physical line a record starts on (quoted fields may span lines)."""
    csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))  # default 128 KiB: too small for documents
    with p.open("r", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return
            last_line = reader.line_num
            for record in reader:
                start, last_line = last_line + 1, reader.line_num
                if not record or all(not cell.strip() for cell in record):
                    continue  # blank line
                where = f"{name}:{start}"
                if len(record) != len(header):
                    unclosed = " (an unclosed quote swallows the lines after it)" if "\n" in record[-1] else ""
                    raise DataError(f"{where}: {len(record)} fields but the header has {len(header)} "
                                    f"({', '.join(header)}){unclosed} — quote fields that contain commas or newlines")
                yield where, dict(zip(header, record))
        except UnicodeDecodeError as e:
            raise DataError(f"{name}:{reader.line_num + 1}: not valid UTF-8 ({e.reason}) — save the file as UTF-8"
                            ) from None
        except csv.Error as e:
            if "field larger than field limit" in str(e):
                raise DataError(f"{name}:{reader.line_num}: a field longer than {MAX_LINE_BYTES >> 20} Mi "
                                "characters (or an unclosed quote) — remove or split that row") from None
            raise DataError(f"{name}:{reader.line_num}: malformed CSV ({e}) — fix the quoting on this line"
                            ) from None


def _read_parquet(p: Path, name: str) -> Iterator[Row]:
    """Parquet via pyarrow, a batch at a time so that large files are not loaded whole."""
    import pyarrow.parquet as pq  # imported here: only Parquet users pay for it

    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises several types for a corrupt or non-Parquet file
        raise DataError(f"{name}: cannot read as Parquet ({e}) — check the file") from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            i += 1
            yield f"{name}:row {i}", record
