"""What a resume must not change silently: the run's fingerprint, stored in every checkpoint.

A resumed run continues exactly only if it sees the same data (file contents, split, tokenisation, template,
packing), the same model and precision, the same adapter and quantization, and the same batch shape and seed (the
data order is a function of them). :func:`fingerprint` collects those settings and the sha256 of the data files;
:func:`check_resume` compares the checkpoint's with the current run's and stops with every difference shown as
``key.path: old -> new``, unless ``--resume-force`` was given (then the differences are logged). Settings outside the
fingerprint (learning rate, schedule, max_steps, eval, logging) may change on resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Callable

from effine.config import Config
from effine.errors import ConfigError

from effine.train.checkpoint import file_sha256

DATA_KEYS = ("format", "eval_fraction", "max_eval_rows", "limit", "max_length", "overlength", "train_on",
             "chat_template", "system_prompt", "packing", "seed")
TRAIN_KEYS = ("batch_size", "tokens_per_step", "grad_accum", "seed")


def _data_file(spec: str | None, cache_dir: Path) -> str | None:
    if spec is None:
        return None
    if spec.startswith("builtin:"):
        from effine.data import resolve_builtin

        return file_sha256(resolve_builtin(spec, cache_dir))
    return file_sha256(Path(spec)) if Path(spec).is_file() else None


def fingerprint(cfg: Config, template_source: str | None, cache_dir: Path) -> dict[str, Any]:
    """The settings and data hashes a resume must match (nested like the config: ``data.sha256``, ...)."""
    return {
        "model": {"name": cfg.model.name, "revision": cfg.model.revision, "dtype": cfg.model.dtype},
        "data": {"sha256": _data_file(cfg.data.path, cache_dir),
                 "eval_sha256": _data_file(cfg.data.eval_path, cache_dir),
                 "template_sha256": hashlib.sha256(template_source.encode()).hexdigest() if template_source else None,
                 **{k: getattr(cfg.data, k) for k in DATA_KEYS}},
        "adapter": dataclasses.asdict(cfg.adapter),
        "quant": dataclasses.asdict(cfg.quant),
        "train": {k: getattr(cfg.train, k) for k in TRAIN_KEYS},
    }


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """``key.path: old -> new`` for every leaf that differs (a key only one side has counts as a difference)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            out += differences(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{path}.{k}" if path else k)
        return out
    return [] if old == new else [f"{path}: {_short(old)} -> {_short(new)}"]


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def check_resume(old: dict | None, new: dict, checkpoint: Path, force: bool, log: Callable[[str], None]) -> None:
    """Stop (ConfigError) when the checkpoint was trained with other settings, unless ``force``."""
    if old is None:
        log(f"[effine] {checkpoint} has no fingerprint.json (an older effine wrote it): settings not checked.")
        return
    diffs = differences(old, new)
    if not diffs:
        return
    listed = "\n  ".join(diffs)
    if force:
        log(f"[effine] --resume-force: resuming from {checkpoint} although these settings changed:\n  {listed}")
        return
    raise ConfigError(f"resume: {checkpoint} was trained with different settings:\n  {listed}\n"
                      "A resumed run continues exactly only with the same data, model and batch shape. Restore "
                      "those settings, or choose a new output.dir to start afresh, or pass --resume-force to "
                      "continue anyway (the differences are then logged).")
