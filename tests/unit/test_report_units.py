"""The report's pieces without a model: charts, escaping of hostile run files, live-run reading, ETA, trackers'
naming and secret redaction."""

from __future__ import annotations

import json
import math
import re

import pytest

from effine.report.facts import length_histogram
from effine.report.html import render_run
from effine.report.load import load_run
from effine.report.svg import Chart, Series, line_chart, nice_ticks
from effine.report.watch import sparkline, state_of
from effine.train.trackers import redact, scalars, secret_values

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>"\' onmouseover="alert(2)'


def test_length_histogram_counts_every_sample():
    h = length_histogram([1, 5, 5, 64, 30], bins=8)
    assert sum(h["counts"]) == 5 and len(h["edges"]) == 9 and h["edges"][-1] >= 64
    assert h["counts"][-1] == 1  # the longest sample lands in the last bin
    assert length_histogram([]) == {"edges": [], "counts": []}


@pytest.mark.parametrize("lo,hi", [(0, 1), (10.2, 10.9), (1e-5, 3e-4), (5, 5), (-3, 12000)])
def test_nice_ticks_cover_the_range(lo, hi):
    t = nice_ticks(lo, hi)
    assert t[0] <= lo and t[-1] >= hi and 2 <= len(t) <= 12 and t == sorted(t)


def test_line_chart_skips_non_finite_and_escapes_labels():
    svg = line_chart(Chart(XSS, "step", "loss", [Series(XSS, [(1, 2.0), (2, math.nan), (3, math.inf), (4, 1.0)])]))
    assert "<script" not in svg and "<img" not in svg and "&lt;script&gt;" in svg
    assert len(re.search(r'points="([^"]*)"', svg).group(1).split()) == 2
    assert "no data" in line_chart(Chart("t", "x", "y", [Series("s", [(1, math.nan)])]))


def _hostile_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"model:\n  name: {json.dumps(XSS)}\nadapter:\n  method: lora\n")
    (run / "metrics.jsonl").write_text(
        json.dumps({"kind": "start", "step": 0, "total_steps": 10, "time": 100.0}) + "\n"
        + json.dumps({"kind": "train", "step": 2, "loss": 3.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 500.0,
                      "time": 110.0}) + "\n"
        + json.dumps({"kind": "eval", "step": 2, "eval_loss": 2.5, "eval_ppl": 12.0, "time": 111.0}) + "\n"
        + '{"kind": "train", "step": 3, "lo')  # a live run's half-written last line
    summary = {"steps": 2, "eval_before": {"eval_loss": 3.0}, "eval_after": {"eval_loss": 2.5},
               "samples": [{"prompt": XSS, "before": XSS, "after": XSS}],
               "data": {"source": XSS, "dropped": {XSS: 2}, "dropped_at": {XSS: [XSS]}, "template": XSS},
               "task_eval": {"metric": XSS, "data": XSS, "n": XSS, "before": {"score": 0.1, "ci": [0.0, 0.2]},
                             "after": {"score": 0.2, "ci": [0.1, 0.3]}, "rows_before": XSS, "rows_after": XSS},
               "environment": {XSS: XSS}, "memory": {"peak_rss_bytes": 2**30, "planned": {"error": XSS}}}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "data_example.json").write_text(json.dumps({"example": {"where": XSS, "segments": [
        {"text": XSS, "trained": True, "special": False}]}, "length_histogram": {"edges": [0, 1], "counts": [1]}}))
    return run


def test_hostile_run_files_cannot_inject_markup(tmp_path):
    page = render_run(load_run(_hostile_run(tmp_path)))
    assert "<script" not in page and "<img" not in page and 'onmouseover="' not in page
    assert page.count("&lt;script&gt;") >= 8  # it is all there, as text
    assert "<h2>Task metrics before / after" in page
    (tmp_path / "outside.jsonl").write_text('{"prompt": "private"}\n')
    run = load_run(tmp_path / "run")
    run.summary["task_eval"].update(rows_before="../outside.jsonl", rows_after="../outside.jsonl")
    assert "private" not in render_run(run)  # per-row files are read only from inside the run dir


def test_live_run_state_and_eta(tmp_path):
    run = load_run(_hostile_run(tmp_path))
    (run.path / "summary.json").unlink()
    run = load_run(run.path)  # the half-written line is skipped
    st = state_of(run, now=112.0)
    assert (st.status, st.step, st.total) == ("running", 2, 10)
    assert st.eta == pytest.approx((110 - 100) / 2 * 8 - 2)  # 5 s/step, 8 steps left, 2 s since the last row
    assert st.eval_loss == (2, 2.5) and st.elapsed == pytest.approx(12.0) and st.quiet_for == pytest.approx(1.0)
    page = render_run(run)  # a live or crashed run still gets a page, saying what is missing
    assert "no summary.json yet" in page and "<polyline " in page and "Not recorded" in page


def test_sparkline():
    s = sparkline([3.0, 2.0, 1.0, math.nan, 1.0])
    assert s == "█▅▁▁"  # NaN dropped; 2.0 is half-way: block 4 of 0..7
    assert len(sparkline([float(i) for i in range(500)], width=40)) == 40
    assert sparkline([]) == ""


def test_tracker_names_and_secret_redaction():
    assert scalars("train", {"step": 3, "loss": 1.5, "lr": 1e-4, "grad_norm": math.nan, "time": 9.0}) == {
        "train/loss": 1.5, "train/lr": 1e-4}
    assert scalars("eval", {"step": 3, "eval_loss": 2.0, "eval_ppl": 7.4}) == {"eval/loss": 2.0, "eval/ppl": 7.4}
    assert scalars("start", {"step": 0, "total_steps": 9}) == {}
    env = {"HF_TOKEN": "hf_abcdef123", "MY_API_KEY": "k3y-value", "PATH": "/usr/bin", "GH_TOKEN": "x"}
    secrets = secret_values(env)
    assert set(secrets) == {"hf_abcdef123", "k3y-value"}  # PATH is no secret; 1-char values are not redacted
    cfg = {"model": {"name": "https://u:hf_abcdef123@host/m"}, "eval": {"prompts": ["k3y-value here", 3]}}
    assert redact(cfg, secrets) == {"model": {"name": "https://u:***@host/m"}, "eval": {"prompts": ["*** here", 3]}}
