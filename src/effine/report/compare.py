"""One page comparing several runs: the key numbers side by side and the training curves overlaid."""

from __future__ import annotations

import os
from pathlib import Path

from effine.report.html import config_value, curve_charts
from effine.report.load import RunData, load_run
from effine.report.page import Raw, mib, num, page, section, table
from effine.report.svg import PALETTE, esc


def _task(run: RunData, when: str):
    te = (run.summary or {}).get("task_eval")
    r = te.get(when) if isinstance(te, dict) and isinstance(te.get(when), dict) else {}
    return r.get("score")


def run_labels(runs: list[RunData]) -> list[str]:
    """Each run's directory name, or its last two path parts where names repeat (runs/a/run, runs/b/run)."""
    names = [r.name for r in runs]
    return [n if names.count(n) == 1 else f"{r.path.parent.name}/{n}" for n, r in zip(names, runs)]


def render_comparison(runs: list[RunData], out_dir: Path) -> str:
    rows = []
    labels = run_labels(runs)
    for i, run in enumerate(runs):
        s = run.summary or {}
        train = run.series("train", "loss")
        report = run.path / "report.html"
        name = esc(labels[i])
        if report.is_file():
            name = f'<a href="{esc(os.path.relpath(report, out_dir))}">{name}</a>'
        swatch = f'<i style="display:inline-block;width:10px;height:10px;background:{PALETTE[i % len(PALETTE)]}"></i> '
        rows.append([Raw(swatch + name), config_value(run.config, "model.name"),
                     config_value(run.config, "adapter.method"), config_value(run.config, "quant.method"),
                     s.get("steps", int(train[-1][0]) if train else None),
                     num((s.get("eval_before") or {}).get("eval_loss")),
                     num((s.get("eval_after") or {}).get("eval_loss")),
                     num(train[-1][1]) if train else None, _task(run, "before"), _task(run, "after"),
                     s.get("tokens_per_s"), mib((s.get("memory") or {}).get("peak_rss_bytes")),
                     "finished" if run.finished else "no summary (live or stopped)"])
    head = ["run", "model", "method", "quant", "steps", "eval loss before", "eval loss after", "last train loss",
            "task before", "task after", "tokens/s", "peak RSS", "status"]
    body = [section("Key numbers", table(head, rows, {4, 5, 6, 7, 8, 9, 10, 11})),
            section("Training curves (overlaid)", f'<div class="grid2">{"".join(curve_charts(runs, labels))}</div>')]
    return page(f"effine: {len(runs)} runs compared", " · ".join(str(r.path) for r in runs), body)


def write_comparison(run_dirs: list[Path | str], out: Path | str) -> Path:
    runs = [load_run(d) for d in run_dirs]
    out = Path(out)
    out.write_text(render_comparison(runs, out.resolve().parent), encoding="utf-8")
    return out
