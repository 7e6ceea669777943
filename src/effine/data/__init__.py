"""The data pipeline: files and built-in datasets -> normalised samples -> tokenised, label-masked examples.

    from effine.data import build_datasets, collate, batch_order, pack_examples
    train, eval_, report = build_datasets(cfg.data, tokenizer, cache_dir)
    print(report.format())
"""

from effine.data.builtin import BUILDERS, resolve_builtin
from effine.data.collate import batch_order, collate
from effine.data.example import IGNORE, Example
from effine.data.formats import FORMATS, RowDropped, Sample, detect_format, normalise
from effine.data.inspect import render_labels
from effine.data.packing import PackedRow, pack_examples, packing_efficiency
from effine.data.pipeline import DataReport, build_datasets, default_cache_dir
from effine.data.sources import Row, read_rows
from effine.data.template import CHATML, ChatTemplate, Encoder, adds_bos, resolve_chat_template

__all__ = [
    "BUILDERS", "CHATML", "FORMATS", "IGNORE", "ChatTemplate", "DataReport", "Encoder", "Example", "PackedRow",
    "Row", "RowDropped", "Sample", "adds_bos", "batch_order", "build_datasets", "collate", "default_cache_dir",
    "detect_format", "normalise", "pack_examples", "packing_efficiency", "read_rows", "render_labels",
    "resolve_builtin", "resolve_chat_template",
]
