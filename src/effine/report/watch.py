"""``effine watch RUN_DIR``: a terminal view of a run, live or finished, read from its files only.

It reads metrics.jsonl (the loop's ``start`` row gives the total steps; ``train`` rows the step, loss, lr and
throughput; ``eval`` rows the eval loss), the last line of train.log, and summary.json (present once the run has
finished). So it works from any shell, on the same machine or over a shared filesystem, without touching the
training process. On a finished run it prints the final state and returns.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from effine.report.load import RunData, load_run

BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 60) -> str:
    """``values`` as one line of block characters (averaged into ``width`` buckets when longer)."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return ""
    if len(vals) > width:
        n = len(vals)
        vals = [sum(vals[i * n // width:(i + 1) * n // width]) / max(1, (i + 1) * n // width - i * n // width)
                for i in range(width)]
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(BLOCKS[min(len(BLOCKS) - 1, int((v - lo) / span * len(BLOCKS)))] for v in vals)


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "–"
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclass
class WatchState:
    status: str  # "finished", "running", "starting"
    step: int
    total: int | None
    elapsed: float | None
    eta: float | None
    loss: list[float]
    last_loss: float | None
    tokens_per_s: float | None
    lr: float | None
    eval_loss: tuple[int, float] | None
    log_line: str
    quiet_for: float | None = None  # seconds since the last metrics row (a stopped run stops updating)


def _last_log_line(run_dir: Path) -> str:
    try:
        with (run_dir / "train.log").open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = [l for l in f.read().decode("utf-8", "replace").splitlines() if l.strip()]
        return lines[-1][-200:] if lines else ""
    except OSError:
        return ""


def state_of(run: RunData, now: float | None = None) -> WatchState:
    now = time.time() if now is None else now
    train = [r for r in run.rows if r.get("kind") == "train" and isinstance(r.get("step"), int)]
    starts = [r for r in run.rows if r.get("kind") == "start"]
    total = run.total_steps
    step = train[-1]["step"] if train else (starts[-1].get("step", 0) if starts else 0)
    if run.summary and isinstance(run.summary.get("steps"), int):
        step = run.summary["steps"]
    t0 = starts[-1].get("time") if starts else None
    elapsed = (train[-1]["time"] if run.finished and train else now) - t0 if t0 else None
    eta = None
    # Seconds per step from this session's train rows (after a resume only the resumed part counts).
    recent = [r for r in train if t0 is None or r.get("time", 0) >= t0]
    if total and not run.finished and recent and t0:
        done_here = recent[-1]["step"] - starts[-1].get("step", 0)
        if done_here > 0:
            eta = (recent[-1]["time"] - t0) / done_here * (total - step) - (now - recent[-1]["time"])
            eta = max(eta, 0.0)
    evals = [(int(r["step"]), r["eval_loss"]) for r in run.rows if r.get("kind") == "eval"
             and isinstance(r.get("eval_loss"), (int, float)) and math.isfinite(r["eval_loss"])]
    status = "finished" if run.finished else ("running" if run.rows else "starting")
    last = train[-1] if train else {}
    return WatchState(status=status, step=step, total=total, elapsed=elapsed, eta=0.0 if run.finished else eta,
                      loss=[r["loss"] for r in train if isinstance(r.get("loss"), (int, float))],
                      last_loss=last.get("loss"), tokens_per_s=last.get("tokens_per_s"), lr=last.get("lr"),
                      eval_loss=evals[-1] if evals else None, log_line=_last_log_line(run.path),
                      quiet_for=now - run.rows[-1]["time"] if run.rows and "time" in run.rows[-1] else None)


def render(run: RunData, st: WatchState):
    """A rich renderable of the state (a panel with a progress bar, the loss sparkline and the numbers)."""
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", justify="right")
    grid.add_column()
    total = st.total or max(st.step, 1)
    pct = 100 * st.step / total if total else 0
    bar = Table.grid(padding=(0, 1))
    bar.add_row(ProgressBar(total=total, completed=st.step, width=40),
                Text(f"step {st.step:,} / {st.total:,}" if st.total else f"step {st.step:,} / ?")
                + Text(f"  ({pct:.0f}%)"))
    grid.add_row("progress", bar)
    quiet = f"   last update {_duration(st.quiet_for)} ago" if st.status == "running" else ""
    grid.add_row("time", f"elapsed {_duration(st.elapsed)}   ETA {_duration(st.eta)}{quiet}")
    if st.last_loss is not None:
        lo, hi = (min(st.loss), max(st.loss)) if st.loss else (st.last_loss, st.last_loss)
        grid.add_row("train loss", f"{st.last_loss:.4f}   (min {lo:.4f}, max {hi:.4f})")
        grid.add_row("", Text(sparkline(st.loss), style="green"))
    if st.eval_loss:
        grid.add_row("eval loss", f"{st.eval_loss[1]:.4f} at step {st.eval_loss[0]:,}")
    if st.tokens_per_s is not None:
        grid.add_row("throughput", f"{st.tokens_per_s:,.0f} tokens/s")
    if st.lr is not None:
        grid.add_row("lr", f"{st.lr:.2e}")
    s = run.summary or {}
    if st.status == "finished":
        eb, ea = (s.get("eval_before") or {}).get("eval_loss"), (s.get("eval_after") or {}).get("eval_loss")
        if isinstance(eb, (int, float)) and isinstance(ea, (int, float)):
            grid.add_row("eval before → after", f"{eb:.4f} → {ea:.4f}")
    if st.log_line:
        grid.add_row("log", Text(st.log_line, style="dim", overflow="ellipsis", no_wrap=True))
    colour = {"finished": "green", "running": "cyan"}.get(st.status, "yellow")
    return Panel(grid, title=f"effine watch: {run.path}", subtitle=f"[{colour}]{st.status}[/]", expand=False)


def watch(run_dir: str | Path, interval: float = 2.0, once: bool = False, console=None) -> WatchState:
    """Show the run; refresh every ``interval`` seconds until it finishes (or once). Returns the last state."""
    from rich.console import Console
    from rich.live import Live

    console = console or Console()
    run = load_run(run_dir)
    st = state_of(run)
    if once or st.status == "finished" or not console.is_terminal:
        console.print(render(run, st))
        if once or st.status == "finished":
            _print_report_path(console, run)
            return st
    with Live(render(run, st), console=console, auto_refresh=False, transient=False) as live:
        while st.status != "finished":
            time.sleep(interval)
            run = load_run(run_dir)
            st = state_of(run)
            live.update(render(run, st), refresh=True)
    _print_report_path(console, run)
    return st


def _print_report_path(console, run: RunData) -> None:
    if (run.path / "report.html").is_file():  # unwrapped, so the path can be copied or clicked
        console.print(f"report: {run.path / 'report.html'}", soft_wrap=True, markup=False, highlight=False)
