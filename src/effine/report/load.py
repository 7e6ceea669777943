"""Reading a run directory (finished, live or crashed) into one object the report page and `effine watch` use.

Every file is optional except that the directory must look like a run (config.yaml or metrics.jsonl): a run that
is still going has no summary.json, an old run has no data_example.json, a run without task evaluation has no
``task_eval`` in its summary. Malformed JSON lines (a half-written last line of a live run) are skipped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from effine.errors import EffineError


@dataclass
class RunData:
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    config_text: str = ""
    summary: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    data_example: dict[str, Any] = field(default_factory=dict)
    data_report_text: str = ""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def series(self, kind: str, key: str) -> list[tuple[float, float]]:
        """(step, value) of every ``kind`` row that has a finite ``key``."""
        out = []
        for r in self.rows:
            v = r.get(key)
            if r.get("kind") == kind and isinstance(v, (int, float)) and math.isfinite(v) and "step" in r:
                out.append((float(r["step"]), float(v)))
        return out

    @property
    def total_steps(self) -> int | None:
        """The planned optimizer steps (the loop's "start" row; config's max_steps as a fallback)."""
        for r in reversed(self.rows):
            if r.get("kind") == "start" and isinstance(r.get("total_steps"), int):
                return r["total_steps"]
        steps = (self.config.get("train") or {}).get("max_steps")
        return steps if isinstance(steps, int) else None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a partial or corrupt line (a live run mid-write) is skipped, not an error."""
    rows = []
    try:
        text = path.read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_run(path: str | Path) -> RunData:
    p = Path(path)
    if not p.is_dir():
        raise EffineError(f"{p}: not a directory — give a run directory (the output.dir of `effine train`).")
    if not (p / "config.yaml").is_file() and not (p / "metrics.jsonl").is_file():
        raise EffineError(f"{p}: not an effine run directory (no config.yaml or metrics.jsonl).")
    run = RunData(path=p)
    if (p / "config.yaml").is_file():
        import yaml

        run.config_text = (p / "config.yaml").read_text()
        try:
            loaded = yaml.safe_load(run.config_text)
            run.config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            run.config = {}
    summary = _json(p / "summary.json")
    run.summary = summary if isinstance(summary, dict) else None
    run.rows = read_rows(p / "metrics.jsonl")
    before = _json(p / "before.json")
    run.before = before if isinstance(before, dict) else {}
    example = _json(p / "data_example.json")
    run.data_example = example if isinstance(example, dict) else {}
    if (p / "data_report.txt").is_file():
        run.data_report_text = (p / "data_report.txt").read_text()
    return run
