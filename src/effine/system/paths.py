"""Where effine keeps what it downloads and converts: one cache root for models, data and libraries."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_VAR = "EFFINE_CACHE"


def cache_root(cache_dir: str | None = None) -> Path:
    """``cache_dir`` (``model.cache_dir``), else ``$EFFINE_CACHE``, else ``~/.cache/effine`` (created)."""
    root = Path(cache_dir or os.environ.get(CACHE_VAR) or Path.home() / ".cache" / "effine").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
