"""report.html of a real tiny run: sections, escaping, task metrics when present, the comparison page, and a real
browser (headless Chromium) rendering it with visible plots and no console errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from effine.cli import main

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
BLUE, RED, GREEN = (0x25, 0x63, 0xEB), (0xDC, 0x26, 0x26), (0xBB, 0xF7, 0xD0)  # loss line, eval loss, trained token


def test_report_page_has_every_section_and_escapes_user_text(reported_run):
    run, summary = reported_run
    page = (run / "report.html").read_text()
    for title in ("Training curves", "Task metrics", "Generations before / after", "Data",
                  "Memory: planned vs measured", "Config", "Run environment"):
        assert f"<h2>{title}" in page, title
    assert "No task evaluation in this run" in page  # summary.json has no task_eval: said, not failed
    # self-contained: no script at all, nothing fetched (the CSP forbids both), charts are inline SVG
    assert "<script" not in page and 'src="http' not in page and "<link" not in page
    assert "default-src 'none'" in page
    assert len(re.findall(r"<polyline ", page)) >= 5  # train loss, eval loss, lr, grad norm, tokens/s
    # the prompt's markup is shown as text
    assert "say &lt;b&gt;hi&lt;/b&gt; &amp; &lt;script&gt;alert(1)&lt;/script&gt;" in page
    # data: histogram bars and the trained tokens marked
    assert page.count('<span class="t">') + page.count('<span class="t s">') >= 1
    assert "Token length of the training samples" in page
    # numbers from the run itself
    assert f"{summary['eval_after']['eval_loss']:.4f}" in page
    assert summary["memory"]["peak_rss_bytes"] > 50 * 2**20
    assert summary["memory"]["planned"]["total_bytes"] > 0
    assert summary["environment"]["torch"] in page
    assert len(summary["samples"]) == 4  # 2 eval.prompts + 2 prompts_from_eval, each with before and after
    assert all(set(s) == {"prompt", "before", "after"} for s in summary["samples"])


def test_task_eval_section_and_rebuild_via_cli(reported_run, tmp_path, capsys):
    run0, _ = reported_run
    run = tmp_path / "run"
    shutil.copytree(run0, run, ignore=shutil.ignore_patterns("adapter", "wandb", "mlruns", "tensorboard"))
    summary = json.loads((run / "summary.json").read_text())
    summary["task_eval"] = {"metric": "exact_match", "data": "data/<test>.jsonl", "n": 50,
                            "before": {"score": 0.12, "ci": [0.04, 0.22]}, "after": {"score": 0.3, "ci": [0.18, 0.42]},
                            "rows_before": "task_eval_before.jsonl", "rows_after": "task_eval_after.jsonl"}
    (run / "summary.json").write_text(json.dumps(summary))
    row = {"prompt": "2+2=<i>?</i>", "reference": "4"}
    (run / "task_eval_before.jsonl").write_text(json.dumps(row | {"prediction": "five", "score": 0.0}) + "\n")
    (run / "task_eval_after.jsonl").write_text(json.dumps(row | {"prediction": "4", "score": 1.0}) + "\n")
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0
    assert str(run / "report.html") in capsys.readouterr().out
    page = (run / "report.html").read_text()
    assert "Task metrics before / after" in page and "No task evaluation" not in page
    assert "exact_match" in page and "data/&lt;test&gt;.jsonl" in page
    assert "0.04 – 0.22" in page and "0.18 – 0.42" in page
    assert "0.120 → 0.300" in page  # the key-number card
    assert "2+2=&lt;i&gt;?&lt;/i&gt;" in page and "five" in page


def test_comparison_page_overlays_runs(reported_run, tmp_path):
    run0, _ = reported_run
    other = tmp_path / "other-run"
    shutil.copytree(run0, other, ignore=shutil.ignore_patterns("adapter", "wandb", "mlruns", "tensorboard"))
    (other / "summary.json").unlink()  # a run without summary (live or crashed) still compares
    out = tmp_path / "cmp.html"
    assert main(["report", str(run0), str(other), "--out", str(out)]) == 0
    page = out.read_text()
    assert "2 runs compared" in page and "other-run" in page and "no summary" in page
    assert len(re.findall(r"<polyline ", page)) >= 10  # every curve drawn for both runs
    assert re.search(r'href="[^"]*run/report\.html"', page)  # links to the per-run page


def _chromium(url: str, tmp: Path, shot: Path) -> str:
    """Screenshot ``url`` with headless Chromium; return its stderr (console messages are logged there)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
           "--window-size=1280,2400", f"--screenshot={shot}", url]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    return proc.stderr


def _near(img, rgb, tol=12):
    """Mask of the pixels within ``tol`` of colour ``rgb`` (antialiased edges differ; line cores do not)."""
    return (np.abs(img - np.array(rgb)) <= tol).all(axis=2)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian package `chromium`; `make test` installs "
                    "it when run as root)")
def test_report_renders_in_headless_chromium(reported_run, tmp_path):
    from PIL import Image

    run, _ = reported_run
    stderr = _chromium((run / "report.html").resolve().as_uri(), tmp_path, tmp_path / "page.png")
    console = [l for l in stderr.splitlines() if ":CONSOLE" in l]
    assert console == [], console
    img = np.asarray(Image.open(tmp_path / "page.png").convert("RGB")).astype(int)  # (H, W, 3)
    assert img.shape == (2400, 1280, 3)
    # not blank: the curves, the eval points and the trained-token highlight are all on screen in their colours
    blue = _near(img, BLUE)
    assert blue.sum() > 2000 and _near(img, RED).sum() > 100 and _near(img, GREEN, 4).sum() > 100
    # ... and the blue lines span several charts (rows far apart), not one stray mark
    rows = np.nonzero(blue.any(axis=1))[0]
    assert rows.max() - rows.min() > 200

    # the check can fail: the same page with an injected script and a remote image logs CSP console errors
    bad = tmp_path / "bad.html"
    bad.write_text((run / "report.html").read_text().replace(
        "</main>", '<script>console.error("x")</script><img src="http://127.0.0.1:9/x.png"></main>'))
    stderr = _chromium(bad.as_uri(), tmp_path, tmp_path / "bad.png")
    assert len([l for l in stderr.splitlines() if ":CONSOLE" in l]) == 2, stderr[-2000:]
