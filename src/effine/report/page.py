"""The page frame shared by the single-run report and the comparison page: inline CSS, no script, and a
Content-Security-Policy that forbids any script and any network fetch (so even a bug in escaping could not run
code or phone home). Small HTML helpers that escape everything they are given live here too."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

from effine.report.svg import esc, fmt

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2937;background:#f8fafc}
header{background:#0f172a;color:#f8fafc;padding:18px 28px}
header h1{margin:0;font-size:20px;font-weight:600}
header .sub{color:#94a3b8;font-size:13px;margin-top:4px;word-break:break-all}
main{padding:14px 28px 40px;max-width:1220px}
section{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:14px 18px;margin:14px 0}
h2{font-size:16px;margin:0 0 10px}
h3{font-size:14px;margin:12px 0 6px;color:#334155}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #e2e8f0;border-radius:6px;padding:8px 12px;min-width:150px;background:#f8fafc}
.card .v{font-size:18px;font-weight:600}
.card .k{font-size:12px;color:#64748b}
.grid2{display:grid;grid-template-columns:repeat(auto-fill,minmax(500px,1fr));gap:12px}
.chartbox h3{margin:0 0 4px}
svg.chart{width:100%;max-width:720px;height:auto;display:block}
svg .plot{fill:#fbfdff;stroke:#cbd5e1}
svg .empty{fill:#f1f5f9}
svg .grid{stroke:#e2e8f0}
svg .tick{font-size:10px;fill:#64748b}
svg .axis{font-size:11px;fill:#334155}
svg .muted{font-size:13px;fill:#94a3b8}
svg .whisker{stroke:#0f172a;stroke-width:1.5}
.legend{font-size:12px;color:#334155;margin:2px 0 0 58px}
.key{margin-right:14px;white-space:nowrap}
.key i{display:inline-block;width:12px;height:3px;vertical-align:middle;margin-right:5px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid #e2e8f0;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#f1f5f9;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
pre,.tokens{font:12px/1.5 ui-monospace,SFMono-Regular,Menlo,monospace;white-space:pre-wrap;word-break:break-word;
 margin:0;background:#f8fafc;border:1px solid #e2e8f0;border-radius:6px;padding:8px}
.tokens .t{background:#bbf7d0;color:#14532d;border-radius:2px}
.tokens .s{color:#94a3b8}
.tokens .t.s{color:#166534}
.muted{color:#64748b}
.good{color:#15803d}.bad{color:#b91c1c}
.warn{background:#fef3c7;border:1px solid #fcd34d;border-radius:6px;padding:6px 10px}
details summary{cursor:pointer;color:#334155}
a{color:#1d4ed8}
"""


def page(title: str, subtitle: str, body: list[str]) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><div class=\"sub\">{esc(subtitle)} · report written {esc(now)}</div>"
            "</header><main>" + "\n".join(body) + "</main></body></html>\n")


def section(title: str, inner: str, anchor: str = "") -> str:
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return f"<section{ident}><h2>{esc(title)}</h2>{inner}</section>"


def card(label: str, value: str, cls: str = "") -> str:
    return f'<div class="card"><div class="k">{esc(label)}</div><div class="v {esc(cls)}">{esc(value)}</div></div>'


def table(head: list[str], rows: list[list[Any]], num_cols: set[int] = frozenset()) -> str:
    """A table; cells are escaped (pass :class:`Raw` for markup built here)."""
    th = "".join(f'<th class="num">{esc(h)}</th>' if i in num_cols else f"<th>{esc(h)}</th>"
                 for i, h in enumerate(head))
    body = []
    for r in rows:
        tds = "".join(f'<td class="num">{cell(c)}</td>' if i in num_cols else f"<td>{cell(c)}</td>"
                      for i, c in enumerate(r))
        body.append(f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class Raw(str):
    """Markup produced by this package (already escaped): :func:`cell` passes it through."""


def cell(v: Any) -> str:
    if isinstance(v, Raw):
        return str(v)
    if v is None:
        return '<span class="muted">–</span>'
    if isinstance(v, float):
        return esc(fmt(v))
    if isinstance(v, int) and not isinstance(v, bool):
        return esc(f"{v:,}")
    return esc(v)


def mib(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def num(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and math.isfinite(v) else "–"
