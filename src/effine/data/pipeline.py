"""The data pipeline: from ``data.path`` to tokenised train and eval examples, with a report.

    train, eval, report = build_datasets(cfg.data, tokenizer, cache_dir)
    print(report.format())

Steps: read rows (``builtin:NAME`` resolved to a cached JSONL), detect or apply the row format, normalise,
render and tokenise with label masks, apply the overlength policy, split off eval rows (or read ``eval_path``).

Bad input policy. A problem that means the file is not what the config says stops the run with a
:class:`DataError` naming ``file:line`` (``file:row N`` for JSON/Parquet), the field path and what to do. A row
that is well-formed but cannot be trained on as text is dropped, counted by reason, and listed with its location
in ``data_report.txt``; more than ``data.max_bad_fraction`` of the rows read dropped stops the run.

==========================================  ====================================================================
input                                       behaviour
==========================================  ====================================================================
malformed JSONL line / JSON / CSV quoting   error ``file:line``
unreadable Parquet                          error naming the file
not UTF-8                                   error ``file:line`` (the first bad line)
NUL byte in the file (outside JSON text)    error ``file:line``: the file is corrupt
NUL character inside a text (``\u0000``)    dropped: ``NUL character in text``
byte-order mark                             accepted (file start, and any JSONL line start)
line over 16 MiB (a 50 MB line)             dropped: ``line longer than 16 MiB``; read past in 1 MiB
                                            chunks, never held in memory (CSV: error, the field limit)
empty file / only blank lines               error: no rows
row that is not an object; missing/null     error ``file:line: field.path``
field; unknown role; non-string content
tool calls, tool/function turns             dropped: ``tool calls / tool results``
image/audio content parts                   dropped: ``non-text content part (image_url)``
empty message (assistant or any)            dropped: ``empty message content``
no assistant turn (train_on != all)         dropped: ``no assistant turn``
conversation ending in a user turn          kept; the trailing user turn is context, untrained
consecutive same-role turns                 kept as written; dropped if the chat template rejects them
special-token text in a message             kept, encoded as plain text (:mod:`effine.data.literals`)
special-token text in text / prompt rows    kept as control tokens: such rows are raw model text (pre-rendered)
longer than data.max_length                 data.overlength: truncate / drop / error (drops here are not bad)
==========================================  ====================================================================

Results are cached under ``CACHE/tokenized/HASH.npz`` (plain integer and string arrays, loaded with
``allow_pickle=False``), keyed by the data file bytes, the tokenizer (vocabulary, special tokens, template) and
every config field that changes the output; a second run with the same inputs skips tokenisation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from effine.config import DataConfig
from effine.data.builtin import PREFIX, resolve_builtin
from effine.data.example import Example
from effine.data.formats import RowDropped, detect_or_fail, normalise
from effine.data.packing import pack_examples, packing_efficiency
from effine.data.sources import Row, read_rows
from effine.data.template import Encoder, adds_bos
from effine.errors import DataError

PIPELINE_VERSION = 2  # bump when the output for the same inputs changes: old cache entries stop matching
EXAMPLES_KEPT = 3  # locations per drop reason in the summary: enough to go and look, not a dump
LISTED_DROPS = 10_000  # dropped rows listed one by one in data_report.txt

Log = Callable[[str], Any]


def default_cache_dir() -> Path:
    """``$EFFINE_CACHE``, else ``~/.cache/effine``."""
    from effine.system.paths import cache_root

    return cache_root()


# -- report ------------------------------------------------------------------------------------------------------


@dataclass
class DataReport:
    """Counts and statistics of one :func:`~effine.data.pipeline.build_datasets` run.

    Token statistics describe the training split after the overlength policy.
    """

    source: str = ""
    row_format: str = ""
    template: str = ""
    rows_read: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_at: dict[str, list[str]] = field(default_factory=dict)
    dropped_rows: list[str] = field(default_factory=list)  # "where: reason", the first LISTED_DROPS
    bad_rows: int = 0  # dropped rows that count towards data.max_bad_fraction
    truncated: int = 0
    length_mean: float = 0.0
    length_p50: int = 0
    length_p95: int = 0
    length_max: int = 0
    total_tokens: int = 0
    supervised_tokens: int = 0
    tokenized_tokens: int = 0  # tokens produced by the tokenizer, before truncation
    tokenize_seconds: float = 0.0
    packing_efficiency: float | None = None
    cache: str = ""  # "", "written PATH" or "hit PATH"

    def drop(self, reason: str, where: str, bad: bool = True) -> None:
        """Count one dropped row under ``reason``, remembering its location if it is among the first few."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.bad_rows += bad
        seen = self.dropped_at.setdefault(reason, [])
        if len(seen) < EXAMPLES_KEPT:
            seen.append(where)
        if len(self.dropped_rows) < LISTED_DROPS:
            self.dropped_rows.append(f"{where}: {reason}")

    def full(self) -> str:
        """:meth:`format` plus every dropped row with its location and reason: the content of data_report.txt."""
        text = self.format()
        if self.dropped_rows:
            n = sum(self.dropped.values())
            more = f" (the first {len(self.dropped_rows):,} of {n:,})" if n > len(self.dropped_rows) else ""
            text += f"\n\ndropped rows{more}:\n" + "\n".join(f"  {r}" for r in self.dropped_rows)
        return text + "\n"

    @property
    def tokens_per_second(self) -> float:
        return self.tokenized_tokens / self.tokenize_seconds if self.tokenize_seconds > 0 else 0.0

    def set_lengths(self, train: list[Example]) -> None:
        """Fill the length and token statistics from the training examples."""
        lengths = sorted(len(e) for e in train)
        if not lengths:
            return
        self.length_mean = sum(lengths) / len(lengths)
        self.length_p50 = _percentile(lengths, 50)
        self.length_p95 = _percentile(lengths, 95)
        self.length_max = lengths[-1]
        self.total_tokens = sum(lengths)
        self.supervised_tokens = sum(e.num_trained for e in train)

    def drop_summary(self) -> str:
        """One line per drop reason with example locations; empty when nothing was dropped."""
        lines = []
        for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            at = ", ".join(self.dropped_at.get(reason, []))
            lines.append(f"  dropped {n:,} row{'s' if n != 1 else ''}: {reason} (e.g. {at})")
        return "\n".join(lines)

    def format(self) -> str:
        """A short multi-line summary for the log and ``effine data check``."""
        dropped = sum(self.dropped.values())
        share = self.supervised_tokens / self.total_tokens if self.total_tokens else 0.0
        lines = [
            f"data: {self.source} (format {self.row_format}; template: {self.template or 'n/a'})",
            f"  rows read {self.rows_read:,} -> train {self.train_examples:,}, eval {self.eval_examples:,}; "
            f"dropped {dropped:,}; truncated {self.truncated:,}",
        ]
        if dropped:
            lines.append(self.drop_summary())
        lines += [
            f"  train tokens per sample: mean {self.length_mean:.0f}, p50 {self.length_p50}, p95 {self.length_p95}, "
            f"max {self.length_max}",
            f"  train tokens: {self.total_tokens:,} total, {self.supervised_tokens:,} supervised ({share:.0%})",
        ]
        if self.tokenize_seconds:
            lines.append(f"  tokenized {self.tokenized_tokens:,} tokens in {self.tokenize_seconds:.1f} s "
                         f"({self.tokens_per_second:,.0f} tokens/s)")
        if self.packing_efficiency is not None:
            lines.append(f"  packing efficiency {self.packing_efficiency:.1%} (filled / capacity)")
        if self.cache:
            lines.append(f"  cache: {self.cache}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataReport:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an already sorted list."""
    k = max(0, min(len(sorted_values) - 1, -(-len(sorted_values) * q // 100) - 1))
    return sorted_values[int(k)]


# -- reading and encoding ----------------------------------------------------------------------------------------


def _resolve_path(path: str, cache_dir: Path) -> Path:
    return resolve_builtin(path, cache_dir) if path.startswith(PREFIX) else Path(path)


def _fit(ex: Example, cfg: DataConfig, report: DataReport) -> Example:
    """Apply the overlength policy to one example (and drop examples with nothing to train)."""
    if len(ex) > cfg.max_length:
        if cfg.overlength == "error":
            raise DataError(f"{ex.where}: sample is {len(ex):,} tokens, longer than data.max_length="
                            f"{cfg.max_length} — raise data.max_length, or set data.overlength to truncate or drop")
        if cfg.overlength == "drop":
            raise RowDropped(f"{ex.where}: longer than max_length", f"longer than max_length={cfg.max_length}",
                             bad=False)
        ex = Example(ex.input_ids[: cfg.max_length], ex.labels[: cfg.max_length], ex.where)
        if ex.num_trained == 0:
            raise RowDropped(f"{ex.where}: nothing trained within max_length",
                             f"no trained token within the first {cfg.max_length} tokens", bad=False)
        report.truncated += 1
    elif ex.num_trained == 0:
        raise RowDropped(f"{ex.where}: no trained tokens", "no trained tokens")
    return ex


def _encode_rows(rows: Iterable[Row], cfg: DataConfig, encoder: Encoder, report: DataReport) -> list[Example]:
    """Normalise, encode and fit every row; structural errors propagate, content problems are counted."""
    out: list[Example] = []
    fmt = None if cfg.format == "auto" else cfg.format
    for where, data in rows:
        report.rows_read += 1
        if isinstance(data, RowDropped):  # a line the reader skipped (too long to hold)
            report.drop(data.reason, where, data.bad)
            continue
        if fmt is None:
            fmt = detect_or_fail(where, data)  # the first row decides, as data.format documents
            report.row_format = report.row_format or fmt
        try:
            ex = encoder.encode(normalise(where, data, fmt, cfg.train_on))
            report.tokenized_tokens += len(ex)
            out.append(_fit(ex, cfg, report))
        except RowDropped as e:
            report.drop(e.reason, where, e.bad)
    report.row_format = report.row_format or fmt or cfg.format
    return out


def _split(examples: list[Example], cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    """Hold out ``eval_fraction`` of the examples (capped at ``max_eval_rows``), chosen by ``seed``; both splits
    keep file order."""
    n = len(examples)
    n_eval = round(n * cfg.eval_fraction) if cfg.eval_fraction > 0 else 0
    if cfg.eval_fraction > 0 and n >= 2:
        n_eval = max(1, n_eval)
    if cfg.max_eval_rows is not None:
        n_eval = min(n_eval, cfg.max_eval_rows)
    n_eval = min(n_eval, max(0, n - 1))  # always leave something to train on
    order = list(range(n))
    random.Random(f"effine-split:{cfg.seed}").shuffle(order)
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


# -- cache -------------------------------------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_identity(tokenizer: Any) -> str:
    """A digest of everything about a tokenizer that changes token ids: vocabulary, merges, special tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(tokenizer, "pad_token_id", None),
                adds_bos(tokenizer)]
    h.update(json.dumps(specials).encode())
    return h.hexdigest()


_CACHE_FIELDS = ("path", "format", "eval_path", "eval_fraction", "max_eval_rows", "limit", "max_length",
                 "overlength", "train_on", "system_prompt", "seed")


def cache_key(cfg: DataConfig, files: list[Path], tokenizer: Any, template_source: str) -> str:
    """The content hash that names a tokenised cache entry."""
    h = hashlib.sha256(f"effine-data-v{PIPELINE_VERSION}".encode())
    for f in files:
        h.update(_file_digest(f).encode())
    h.update(tokenizer_identity(tokenizer).encode())
    h.update(hashlib.sha256(template_source.encode()).hexdigest().encode())
    h.update(json.dumps({k: getattr(cfg, k) for k in _CACHE_FIELDS}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _pack_arrays(prefix: str, examples: list[Example]) -> dict[str, np.ndarray]:
    lengths = np.array([len(e) for e in examples], dtype=np.int64)
    flat = lambda attr: np.fromiter(itertools.chain.from_iterable(getattr(e, attr) for e in examples),  # noqa: E731
                                    dtype=np.int32, count=int(lengths.sum()))
    return {f"{prefix}_lengths": lengths, f"{prefix}_ids": flat("input_ids"), f"{prefix}_labels": flat("labels"),
            f"{prefix}_where": np.array([e.where for e in examples], dtype=str)}


def _unpack_arrays(prefix: str, z: Any) -> list[Example]:
    ends = np.cumsum(z[f"{prefix}_lengths"])
    ids, labels = z[f"{prefix}_ids"].tolist(), z[f"{prefix}_labels"].tolist()
    wheres = z[f"{prefix}_where"].tolist()
    starts = [0, *ends[:-1].tolist()]
    return [Example(ids[s:e], labels[s:e], w) for s, e, w in zip(starts, ends.tolist(), wheres)]


def save_cache(path: Path, train: list[Example], eval_: list[Example], report: DataReport) -> None:
    """Write a cache entry atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    arrays = {**_pack_arrays("train", train), **_pack_arrays("eval", eval_),
              "report": np.array([json.dumps(report.to_dict())])}
    try:
        with tmp.open("wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_cache(path: Path) -> tuple[list[Example], list[Example], DataReport] | None:
    """Read a cache entry; None when it is missing or unreadable (then it is simply rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return (_unpack_arrays("train", z), _unpack_arrays("eval", z),
                    DataReport.from_dict(json.loads(str(z["report"][0]))))
    except (OSError, ValueError, KeyError):
        return None


# -- entry point -------------------------------------------------------------------------------------------------


def build_datasets(cfg: DataConfig, tokenizer: Any, cache_dir: Path | None = None, log: Log = print
                   ) -> tuple[list[Example], list[Example], DataReport]:
    """Read, normalise, tokenise and split the data of ``cfg``; return ``(train, eval, report)``.

    ``cache_dir`` (default :func:`default_cache_dir`) holds built-in datasets and the tokenised cache.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    encoder = Encoder(tokenizer, chat_template=cfg.chat_template, system_prompt=cfg.system_prompt,
                      train_on=cfg.train_on, log=log)
    train_file = _resolve_path(cfg.path, cache_dir)
    eval_file = _resolve_path(cfg.eval_path, cache_dir) if cfg.eval_path else None
    for f, key in ((train_file, "data.path"), (eval_file, "data.eval_path")):
        if f is not None and not f.is_file():
            raise DataError(f"{key}: {f}: data file not found — check the path (relative paths are taken from the "
                            "directory you run effine in)")
    key = cache_key(cfg, [f for f in (train_file, eval_file) if f], tokenizer, encoder.template.source)
    cache_file = cache_dir / "tokenized" / f"{key}.npz"
    cached = load_cache(cache_file)
    if cached is not None:
        train, eval_, report = cached
        if report.row_format in ("messages", "sharegpt", "alpaca"):
            encoder.announce()  # the fallback template is still worth knowing about on a cache hit
        report.cache = f"hit {cache_file}"
    else:
        train, eval_, report = _build(cfg, encoder, train_file, eval_file, log)
        save_cache(cache_file, train, eval_, report)
        report.cache = f"written {cache_file}"
    check_bad_fraction(cfg, report)
    if cfg.packing is not False:  # true or auto (auto may still turn it off for a model: train/batching.py)
        report.packing_efficiency = packing_efficiency(pack_examples(train, cfg.max_length), cfg.max_length)
    return train, eval_, report


def check_bad_fraction(cfg: DataConfig, report: DataReport) -> None:
    """Stop when more than ``data.max_bad_fraction`` of the rows read were dropped as unusable."""
    if report.rows_read and report.bad_rows / report.rows_read > cfg.max_bad_fraction:
        raise DataError(f"{cfg.path}: {report.bad_rows:,} of {report.rows_read:,} rows "
                        f"({report.bad_rows / report.rows_read:.0%}) are unusable, more than data.max_bad_fraction="
                        f"{cfg.max_bad_fraction}:\n{report.drop_summary()}\n  Fix those rows, or raise "
                        "data.max_bad_fraction to train on the rest.")


def _build(cfg: DataConfig, encoder: Encoder, train_file: Path, eval_file: Path | None, log: Log
           ) -> tuple[list[Example], list[Example], DataReport]:
    source = cfg.path if str(train_file) == cfg.path else f"{cfg.path} ({train_file})"
    report = DataReport(source=source, template=encoder.template.description)
    start = time.perf_counter()
    examples = _encode_rows(itertools.islice(read_rows(train_file), cfg.limit), cfg, encoder, report)
    if eval_file is not None:
        train = examples
        eval_ = _encode_rows(read_rows(eval_file), cfg, encoder, report)[: cfg.max_eval_rows]
    else:
        train, eval_ = _split(examples, cfg)
    report.tokenize_seconds = time.perf_counter() - start
    report.train_examples, report.eval_examples = len(train), len(eval_)
    report.set_lengths(train)
    if report.dropped:
        log(f"data: dropped {sum(report.dropped.values()):,} of {report.rows_read:,} rows:\n{report.drop_summary()}")
    if not report.rows_read:
        raise DataError(f"{cfg.path}: no rows — the file is empty (or holds only blank lines / a header); "
                        "point data.path at the training data")
    if not train:
        raise DataError(f"{cfg.path}: no usable training rows ({report.rows_read:,} read"
                        f"{', all dropped' if report.rows_read else ''}) — see the dropped-row summary above")
    return train, eval_, report
