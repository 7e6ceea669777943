"""Metrics: JSON lines in the run directory, and a loss-curve plot a person can look at."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per event to ``run_dir/metrics.jsonl`` (flushed, so a crash loses nothing), and
    hands the same values to the run's experiment trackers (:mod:`effine.train.trackers`)."""

    def __init__(self, path: Path, trackers: Any = None):
        self.path = path
        self.trackers = trackers
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a")

    def write(self, kind: str, **values: Any) -> None:
        row = {"kind": kind, "time": round(time.time(), 3), **values}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self.trackers is not None:
            self.trackers.log(kind, values)

    def close(self) -> None:
        self._f.close()
        if self.trackers is not None:
            self.trackers.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, out_png: Path) -> Path | None:
    """Train loss per logged step and eval loss, as a PNG. Returns None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r["kind"] == "eval" and math.isfinite(r["eval_loss"])]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / supervised token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
