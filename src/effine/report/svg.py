"""Charts as inline SVG, drawn in Python: the report page needs no script, no library and no network.

Line charts (several series, optional markers, hover titles per point) and bar charts (histograms). Every label
goes through :func:`esc`; numbers are formatted here, so nothing a user wrote reaches the markup unescaped.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f")
W, H = 560, 240
PAD_L, PAD_R, PAD_T, PAD_B = 58, 14, 12, 40


def esc(text: object) -> str:
    """HTML/SVG-escape any value (quotes too: it may land in an attribute)."""
    return html.escape(str(text), quote=True)


def fmt(v: float) -> str:
    """A short, readable number for ticks and tooltips."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.2e}"
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 1:
        return f"{v:.3g}"
    return f"{v:.3g}"


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]
    color: str = PALETTE[0]
    markers: bool = False
    dashed: bool = False


@dataclass
class Chart:
    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)


def _finite(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out = []
    for x, y in points:
        try:
            x, y = float(x), float(y)
        except (TypeError, ValueError):
            continue
        if math.isfinite(x) and math.isfinite(y):
            out.append((x, y))
    return out


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def line_chart(chart: Chart, width: int = W, height: int = H) -> str:
    """An SVG line chart; an empty one says "no data" (the section stays, so the layout never jumps)."""
    series = [(s, _finite(s.points)) for s in chart.series]
    series = [(s, pts) for s, pts in series if pts]
    head = (f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{esc(chart.title)}</title>')
    if not series:
        return (head + f'<rect x="0" y="0" width="{width}" height="{height}" class="empty"/>'
                f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="muted">no data</text></svg>')
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    pw, ph = width - PAD_L - PAD_R, height - PAD_T - PAD_B

    def sx(x: float) -> float:
        return PAD_L + (x - x0) / ((x1 - x0) or 1) * pw

    def sy(y: float) -> float:
        return PAD_T + ph - (y - y0) / ((y1 - y0) or 1) * ph

    out = [head, f'<rect x="{PAD_L}" y="{PAD_T}" width="{pw}" height="{ph}" class="plot"/>']
    for t in yt:
        out.append(f'<line x1="{PAD_L}" x2="{PAD_L + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="grid"/>'
                   f'<text x="{PAD_L - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" class="tick">{esc(fmt(t))}</text>')
    for t in xt:
        out.append(f'<text x="{sx(t):.1f}" y="{PAD_T + ph + 16}" text-anchor="middle" class="tick">'
                   f'{esc(fmt(t))}</text>')
    out.append(f'<text x="{PAD_L + pw / 2}" y="{height - 6}" text-anchor="middle" class="axis">'
               f'{esc(chart.x_label)}</text>')
    out.append(f'<text transform="translate(13 {PAD_T + ph / 2}) rotate(-90)" text-anchor="middle" class="axis">'
               f'{esc(chart.y_label)}</text>')
    for s, pts in series:
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        dash = ' stroke-dasharray="5 4"' if s.dashed else ""
        out.append(f'<polyline points="{path}" fill="none" stroke="{esc(s.color)}" stroke-width="2"{dash}>'
                   f'<title>{esc(s.label)}</title></polyline>')
        if s.markers or len(pts) == 1:
            for x, y in pts:
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{esc(s.color)}">'
                           f'<title>{esc(s.label)}: step {esc(fmt(x))}, {esc(fmt(y))}</title></circle>')
    out.append("</svg>")
    legend = "".join(f'<span class="key"><i style="background:{esc(s.color)}"></i>{esc(s.label)}</span>'
                     for s, _ in series)
    return "".join(out) + (f'<div class="legend">{legend}</div>' if len(series) > 1 else "")


def bar_chart(title: str, labels: list[str], counts: list[int], x_label: str, y_label: str,
              width: int = W, height: int = H, color: str = PALETTE[0]) -> str:
    """Vertical bars (a histogram: one bar per bin, ``labels`` under every few bars)."""
    head = (f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{esc(title)}</title>')
    if not counts or max(counts) <= 0:
        return (head + f'<rect x="0" y="0" width="{width}" height="{height}" class="empty"/>'
                f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="muted">no data</text></svg>')
    yt = nice_ticks(0, max(counts))
    pw, ph = width - PAD_L - PAD_R, height - PAD_T - PAD_B
    bw = pw / len(counts)
    out = [head, f'<rect x="{PAD_L}" y="{PAD_T}" width="{pw}" height="{ph}" class="plot"/>']
    for t in yt:
        y = PAD_T + ph - t / yt[-1] * ph
        out.append(f'<line x1="{PAD_L}" x2="{PAD_L + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{esc(fmt(t))}</text>')
    every = max(1, math.ceil(len(counts) / 8))
    for i, (lab, c) in enumerate(zip(labels, counts)):
        h = c / yt[-1] * ph
        x = PAD_L + i * bw
        out.append(f'<rect x="{x + 1:.1f}" y="{PAD_T + ph - h:.1f}" width="{max(bw - 2, 1):.1f}" height="{h:.1f}" '
                   f'fill="{esc(color)}"><title>{esc(lab)}: {c:,}</title></rect>')
        if i % every == 0:
            out.append(f'<text x="{x + bw / 2:.1f}" y="{PAD_T + ph + 16}" text-anchor="middle" class="tick">'
                       f'{esc(lab.split("-")[0])}</text>')
    out.append(f'<text x="{PAD_L + pw / 2}" y="{height - 6}" text-anchor="middle" class="axis">{esc(x_label)}</text>')
    out.append(f'<text transform="translate(13 {PAD_T + ph / 2}) rotate(-90)" text-anchor="middle" class="axis">'
               f'{esc(y_label)}</text></svg>')
    return "".join(out)


def interval_chart(title: str, rows: list[tuple[str, float, float | None, float | None]], x_label: str,
                   width: int = W, color: str | None = None) -> str:
    """Horizontal bars with confidence whiskers: ``(label, value, ci_low, ci_high)`` per row (task metrics)."""
    rows = [r for r in rows if isinstance(r[1], (int, float)) and math.isfinite(r[1])]
    height = PAD_T + 34 * max(len(rows), 1) + PAD_B
    head = (f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{esc(title)}</title>')
    if not rows:
        return head + f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="muted">no data</text></svg>'
    hi = max(max(r[1], r[3] if r[3] is not None else r[1]) for r in rows)
    xt = nice_ticks(0, hi if hi > 0 else 1)
    left, pw = 90, width - 90 - PAD_R
    ph = 34 * len(rows)

    def sx(v: float) -> float:
        return left + v / xt[-1] * pw

    out = [head]
    for t in xt:
        out.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{PAD_T}" y2="{PAD_T + ph}" class="grid"/>'
                   f'<text x="{sx(t):.1f}" y="{PAD_T + ph + 16}" text-anchor="middle" class="tick">'
                   f"{esc(fmt(t))}</text>")
    for i, (lab, v, lo, up) in enumerate(rows):
        y = PAD_T + i * 34 + 7
        c = PALETTE[i % len(PALETTE)] if color is None else color
        out.append(f'<text x="{left - 8}" y="{y + 14}" text-anchor="end" class="axis">{esc(lab)}</text>'
                   f'<rect x="{left}" y="{y}" width="{max(sx(v) - left, 1):.1f}" height="20" fill="{esc(c)}" '
                   f'opacity="0.85"><title>{esc(lab)}: {esc(fmt(v))}</title></rect>')
        if lo is not None and up is not None:
            out.append(f'<line x1="{sx(lo):.1f}" x2="{sx(up):.1f}" y1="{y + 10}" y2="{y + 10}" class="whisker"/>'
                       f'<line x1="{sx(lo):.1f}" x2="{sx(lo):.1f}" y1="{y + 4}" y2="{y + 16}" class="whisker"/>'
                       f'<line x1="{sx(up):.1f}" x2="{sx(up):.1f}" y1="{y + 4}" y2="{y + 16}" class="whisker"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" class="axis">{esc(x_label)}</text>'
               "</svg>")
    return "".join(out)
