"""Seeing what a run did: the self-contained report.html (:mod:`.html`), a comparison page for several runs
(:mod:`.compare`), the live terminal view of ``effine watch`` (:mod:`.watch`), and what a training run records
for them (:mod:`.facts`)."""

from __future__ import annotations

from pathlib import Path


def build_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """report.html of one run (default ``RUN_DIR/report.html``), or one comparison page of several runs
    (default ``./effine-compare.html``)."""
    if len(run_dirs) == 1:
        from effine.report.html import write_run_report

        return write_run_report(run_dirs[0], out)
    from effine.report.compare import write_comparison

    return write_comparison(run_dirs, out or "effine-compare.html")


def write_report_safely(run_dir: Path, log=print) -> Path | None:
    """The end-of-training hook: write report.html, but never fail a finished run over its report."""
    try:
        path = build_report([run_dir])
    except Exception as e:  # noqa: BLE001 - the adapter and summary are saved; a report bug must not lose them
        log(f"report.html not written ({type(e).__name__}: {e}); rebuild it with `effine report {run_dir}`")
        return None
    log(f"report: {path}")
    return path
