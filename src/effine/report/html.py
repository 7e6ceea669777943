"""report.html of one run: everything a person wants to see after (or during) a fine-tuning run, in one file.

Sections: key numbers, training curves (loss and eval loss, learning rate, gradient norm, tokens/s), task metrics
before/after (when the run evaluated a task: ``summary["task_eval"]``), sample generations before/after, data
(rows kept/dropped with reasons, token-length histogram, one example with the trained tokens marked), memory
(measured peak vs the planner's prediction), config and run environment. Any section whose inputs the run did not
write says so instead of failing: the page is also built for live and crashed runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from effine.report.load import RunData, read_rows
from effine.report.page import Raw, card, cell, mib, num, page, section, table
from effine.report.svg import PALETTE, Chart, Series, bar_chart, esc, fmt, interval_chart, line_chart

CONFIG_KEYS = ("model.name", "model.dtype", "model.device", "adapter.method", "adapter.r", "adapter.alpha",
               "quant.method", "quant.qat_bits", "data.path", "data.format", "data.max_length", "data.packing",
               "data.train_on", "train.max_steps", "train.epochs", "train.batch_size", "train.grad_accum", "train.lr",
               "train.schedule", "train.warmup_steps", "train.seed", "train.report_to")


def config_value(config: dict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def curve_charts(runs: list[RunData], labels: list[str] | None = None) -> list[str]:
    """The four training charts; with several runs each run gets one colour across all charts."""
    labels = labels or [r.name for r in runs]
    multi = len(runs) > 1
    loss = Chart("loss", "optimizer step", "loss (nats / supervised token)")
    lr = Chart("learning rate", "optimizer step", "lr")
    gn = Chart("gradient norm (before clipping)", "optimizer step", "global L2 norm")
    tps = Chart("throughput", "optimizer step", "tokens / s")
    for i, (run, label) in enumerate(zip(runs, labels)):
        c, c2 = (PALETTE[i % len(PALETTE)],) * 2 if multi else (PALETTE[0], PALETTE[1])
        tag = f"{label}: " if multi else ""
        loss.series.append(Series(f"{tag}train loss", run.series("train", "loss"), c))
        loss.series.append(Series(f"{tag}eval loss", run.series("eval", "eval_loss"), c2, markers=True,
                                  dashed=True))
        lr.series.append(Series(f"{tag}lr", run.series("train", "lr"), c))
        gn.series.append(Series(f"{tag}grad norm", run.series("train", "grad_norm"), c))
        tps.series.append(Series(f"{tag}tokens/s", run.series("train", "tokens_per_s"), c))
    return [f'<div class="chartbox"><h3>{esc(ch.title)}</h3>{line_chart(ch)}</div>' for ch in (loss, lr, gn, tps)]


def _key_numbers(run: RunData) -> str:
    s = run.summary or {}
    eb, ea = (s.get("eval_before") or {}).get("eval_loss"), (s.get("eval_after") or {}).get("eval_loss")
    cards = []
    if isinstance(eb, (int, float)) and isinstance(ea, (int, float)):
        cards.append(card("eval loss before → after", f"{num(eb)} → {num(ea)}", "good" if ea < eb else "bad"))
    te = s.get("task_eval")
    if isinstance(te, dict) and isinstance(te.get("before"), dict) and isinstance(te.get("after"), dict):
        b, a = te["before"].get("score"), te["after"].get("score")
        if isinstance(b, (int, float)) and isinstance(a, (int, float)):
            cards.append(card(f"{te.get('metric', 'task metric')} before → after", f"{num(b, 3)} → {num(a, 3)}",
                              "good" if a > b else ""))
    train = run.series("train", "loss")
    done = s.get("steps", int(train[-1][0]) if train else 0)
    total = run.total_steps
    cards.append(card("steps", f"{done:,}" + (f" / {total:,}" if total and not run.finished else "")))
    if isinstance(s.get("train_seconds"), (int, float)):
        cards.append(card("training time", f"{s['train_seconds']:,.0f} s"))
    tps = s.get("tokens_per_s") or (run.series("train", "tokens_per_s")[-1][1] if train else None)
    if tps:
        cards.append(card("tokens / s", f"{tps:,.0f}"))
    if train:
        cards.append(card("last train loss", num(train[-1][1])))
    peak = (s.get("memory") or {}).get("peak_rss_bytes")
    if peak:
        cards.append(card("peak RSS", mib(peak)))
    status = "" if run.finished else ('<p class="warn">This run has no summary.json yet: it is still running, or '
                                      "it stopped early. The numbers below are what it had written.</p>")
    return status + f'<div class="cards">{"".join(cards)}</div>'


def _task_section(run: RunData) -> str:
    te = (run.summary or {}).get("task_eval")
    if not isinstance(te, dict):
        return section("Task metrics", '<p class="muted">No task evaluation in this run (set <code>eval.data</code> '
                       "and <code>eval.metric</code>, or run <code>effine eval</code>).</p>", "task")
    metric = str(te.get("metric", "metric"))
    rows, bars = [], []
    for when in ("before", "after"):
        r = te.get(when) if isinstance(te.get(when), dict) else {}
        score, ci = r.get("score"), r.get("ci")
        lo, hi = (ci[0], ci[1]) if isinstance(ci, list) and len(ci) == 2 else (None, None)
        rows.append([when, score, Raw(f"{esc(fmt(lo))} – {esc(fmt(hi))}") if lo is not None else None])
        if isinstance(score, (int, float)):
            bars.append((when, float(score), lo, hi))
    info = (f'<p>{esc(metric)} on <code>{esc(te.get("data", "?"))}</code>, n = {esc(te.get("n", "?"))} rows; '
            "confidence intervals by bootstrap.</p>")
    out = info + table(["model", metric, "95% CI"], rows, {1}) + interval_chart(metric, bars, metric)
    out += _task_rows(run, te)
    return section("Task metrics before / after", out, "task")


def _task_rows(run: RunData, te: dict, limit: int = 6) -> str:
    """The first rows of the per-row files, before and after side by side (when both files are there)."""
    names = [str(te.get(k) or "") for k in ("rows_before", "rows_after")]
    if not all(names) or any(Path(n).name != n for n in names):  # only files inside the run dir are read
        return ""
    files = [run.path / n for n in names]
    if not all(f.is_file() for f in files):
        return ""
    before, after = (read_rows(f)[:limit] for f in files)
    rows = []
    for b, a in zip(before, after):
        rows.append([Raw(f"<pre>{esc(str(a.get('prompt', ''))[-400:])}</pre>"), a.get("reference"),
                     b.get("prediction"), b.get("score"), a.get("prediction"), a.get("score")])
    links = " · ".join(f'<a href="{esc(f.name)}">{esc(f.name)}</a>' for f in files)
    return (f"<h3>First {len(rows)} rows ({links})</h3>"
            + table(["prompt", "reference", "before", "score", "after", "score"], rows, {3, 5}))


def _pre(text: Any) -> Raw | None:
    if text is None:
        return None
    return Raw(f"<pre>{esc(text)}</pre>" if str(text).strip() else '<span class="muted">(empty)</span>')


def _samples_section(run: RunData) -> str:
    samples = (run.summary or {}).get("samples")
    if not isinstance(samples, list) or not samples:
        before = run.before.get("samples") if isinstance(run.before.get("samples"), list) else []
        if not before:
            return section("Generations before / after", '<p class="muted">No sample generations recorded.</p>')
        samples = [{"prompt": "", "before": b, "after": None} for b in before]
    rows = [[_pre(str(s.get("prompt", ""))[-300:]), _pre(s.get("before")), _pre(s.get("after"))]
            for s in samples if isinstance(s, dict)]
    return section("Generations before / after (greedy)", table(["prompt (last 300 chars)", "before", "after"], rows),
                   "samples")


def _data_section(run: RunData) -> str:
    d = (run.summary or {}).get("data")
    parts = []
    if isinstance(d, dict):
        dropped = d.get("dropped") or {}
        parts.append(table(["source", "format", "rows read", "train", "eval", "dropped", "truncated"],
                           [[d.get("source"), d.get("row_format"), d.get("rows_read"), d.get("train_examples"),
                             d.get("eval_examples"), sum(dropped.values()), d.get("truncated")]], {2, 3, 4, 5, 6}))
        if dropped:
            at = d.get("dropped_at") or {}
            parts.append("<h3>Dropped rows by reason</h3>" + table(
                ["reason", "rows", "e.g. at"], [[r, n, ", ".join(map(str, at.get(r, [])))]
                                                for r, n in sorted(dropped.items(), key=lambda kv: -kv[1])], {1}))
        share = d["supervised_tokens"] / d["total_tokens"] if d.get("total_tokens") else 0
        parts.append(f'<p>Train tokens per sample: mean {esc(num(d.get("length_mean"), 0))}, p50 '
                     f'{esc(d.get("length_p50"))}, p95 {esc(d.get("length_p95"))}, max {esc(d.get("length_max"))}; '
                     f'{esc(cell(d.get("total_tokens")))} tokens, {esc(cell(d.get("supervised_tokens")))} '
                     f"supervised ({share:.0%}). Template: {esc(d.get('template') or 'n/a')}.</p>")
    elif run.data_report_text:
        parts.append(f"<pre>{esc(run.data_report_text)}</pre>")
    hist = run.data_example.get("length_histogram") or {}
    edges, counts = hist.get("edges") or [], hist.get("counts") or []
    if counts and len(edges) == len(counts) + 1:
        labels = [f"{edges[i]}-{edges[i + 1] - 1}" for i in range(len(counts))]
        parts.append('<div class="chartbox"><h3>Token length of the training samples</h3>'
                     + bar_chart("token length histogram", labels, counts, "tokens per sample", "samples") + "</div>")
    ex = run.data_example.get("example")
    if isinstance(ex, dict) and isinstance(ex.get("segments"), list):
        spans = []
        for seg in ex["segments"]:
            cls = " ".join(c for c, on in (("t", seg.get("trained")), ("s", seg.get("special"))) if on)
            text = esc(seg.get("text", ""))
            spans.append(f'<span class="{cls}">{text}</span>' if cls else text)
        cut = (f", first {ex.get('shown_tokens')} shown" if ex.get("shown_tokens", 0) < ex.get("n_tokens", 0)
               else "")
        parts.append(f"<h3>One training sample ({esc(ex.get('where', ''))}: {esc(cell(ex.get('n_tokens')))} tokens, "
                     f"{esc(cell(ex.get('n_trained')))} trained{esc(cut)}; "
                     '<span class="tokens"><span class="t">trained tokens</span></span> carry the loss)</h3>'
                     f'<div class="tokens">{"".join(spans)}</div>')
    if not parts:
        parts.append('<p class="muted">No data report recorded.</p>')
    return section("Data", "".join(parts), "data")


def _memory_section(run: RunData) -> str:
    mem = (run.summary or {}).get("memory")
    if not isinstance(mem, dict):
        return section("Memory", '<p class="muted">Not recorded (the run has not finished, or predates this '
                       "report).</p>", "memory")
    plan = mem.get("planned") if isinstance(mem.get("planned"), dict) else {}
    rows = [["measured peak RSS of the training process", mib(mem.get("peak_rss_bytes"))]]
    bars = [("measured", mem["peak_rss_bytes"] / 2**20, None, None)] if mem.get("peak_rss_bytes") else []
    if "total_bytes" in plan:
        bars.insert(0, ("planned", plan["total_bytes"] / 2**20, None, None))
    if "cuda_max_allocated_bytes" in mem:
        rows.append(["measured peak CUDA memory allocated", mib(mem["cuda_max_allocated_bytes"])])
    if "total_bytes" in plan:
        rows.append([f"planned peak ({plan.get('device', '?')}, effine plan)", mib(plan["total_bytes"])])
        rows += [[f"  planned: {k}", mib(v)] for k, v in (plan.get("components") or {}).items() if v]
    elif plan.get("error"):
        rows.append(["planned peak", f"planner unavailable: {plan['error']}"])
    note = ('<p class="muted">Measured peak RSS is the whole process (Python, libraries, evaluation and generation '
            "included), so it sits above the plan's training peak when the process did other work too.</p>")
    chart = interval_chart("peak memory", bars, "MiB") if bars else ""
    return section("Memory: planned vs measured", chart + table(["", "size"], rows, {1}) + note, "memory")


def _config_section(run: RunData) -> str:
    rows = [[k, json.dumps(config_value(run.config, k))] for k in CONFIG_KEYS
            if config_value(run.config, k) is not None]
    full = f"<details><summary>full config.yaml</summary><pre>{esc(run.config_text)}</pre></details>"
    return section("Config", table(["key", "value"], rows) + full, "config")


def _env_section(run: RunData) -> str:
    env = (run.summary or {}).get("environment")
    if not isinstance(env, dict):
        return section("Run environment", '<p class="muted">Not recorded.</p>', "env")
    return section("Run environment", table(["", ""], [[k, v] for k, v in env.items()]), "env")


def render_run(run: RunData) -> str:
    model = config_value(run.config, "model.name") or "?"
    method = config_value(run.config, "adapter.method") or "?"
    body = [section("Summary", _key_numbers(run)),
            section("Training curves", f'<div class="grid2">{"".join(curve_charts([run]))}</div>', "curves"),
            _task_section(run), _samples_section(run), _data_section(run), _memory_section(run),
            _config_section(run), _env_section(run)]
    return page(f"effine run: {model} ({method})", str(run.path.resolve()), body)


def write_run_report(run_dir: Path | str, out: Path | str | None = None) -> Path:
    from effine.report.load import load_run

    run = load_run(run_dir)
    path = Path(out) if out else run.path / "report.html"
    path.write_text(render_run(run), encoding="utf-8")
    return path
