"""Small line plots as inline SVG, drawn on the server: no charting library, no script, no CDN.

A plot is a few dozen elements (axes, one polyline and its points per series, a legend), so a
run page with a plot per client stays a few kilobytes and renders before any JavaScript runs.
Labels are escaped: client names come from the registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 560, 220
LEFT, RIGHT, TOP, BOTTOM = 52, 130, 12, 34
LEGEND = 12  # series named in the legend
COLORS = ("#1e88e5", "#e53935", "#43a047", "#fb8c00", "#8e24aa", "#00897b", "#6d4c41", "#546e7a")


@dataclass(frozen=True)
class Series:
    label: str
    points: list[tuple[float, float]]


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    if high <= low:
        return [low]
    step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(step))
    step = min((m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= step), default=step)
    start = math.ceil(low / step) * step
    ticks, value = [], start
    while value <= high + step * 1e-6:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value - round(value)) < 1e-9 else f"{value:.3g}"


def line_plot(series: list[Series], x_label: str, y_label: str, budget: float | None = None) -> str:
    """An SVG document fragment: one line per series, integer x ticks, ``budget`` as a dashed
    horizontal line (a privacy budget)."""
    points = [p for s in series for p in s.points if math.isfinite(p[1])]
    if not points:
        return ""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points] + ([budget] if budget is not None else [])
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(ys)), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y1 = y0 + 1
    y1 += (y1 - y0) * 0.05
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * inner_w

    def sy(y: float) -> float:
        return TOP + (1 - (y - y0) / (y1 - y0)) * inner_h

    parts = [
        f'<svg class="plot" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'role="img" aria-label="{escape(y_label)} per {escape(x_label)}" '
        'xmlns="http://www.w3.org/2000/svg">',
        f'<line x1="{LEFT}" y1="{TOP + inner_h}" x2="{LEFT + inner_w}" y2="{TOP + inner_h}" '
        'stroke="#888"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + inner_h}" stroke="#888"/>',
    ]
    for tick in _ticks(y0, y1):
        y = sy(tick)
        parts.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + inner_w}" y2="{y:.1f}" stroke="#eee"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">'
            f"{_fmt(tick)}</text>"
        )
    x_ticks = sorted({round(x) for x in xs}) if x1 - x0 <= 20 else _ticks(x0, x1)
    for tick in x_ticks:
        x = sx(tick)
        parts.append(
            f'<text x="{x:.1f}" y="{TOP + inner_h + 16}" text-anchor="middle" font-size="11">'
            f"{_fmt(tick)}</text>"
        )
    parts.append(
        f'<text x="{LEFT + inner_w / 2:.1f}" y="{HEIGHT - 4}" text-anchor="middle" '
        f'font-size="11">{escape(x_label)}</text>'
        f'<text x="12" y="{TOP + inner_h / 2:.1f}" text-anchor="middle" font-size="11" '
        f'transform="rotate(-90 12 {TOP + inner_h / 2:.1f})">{escape(y_label)}</text>'
    )
    if budget is not None:
        y = sy(budget)
        parts.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + inner_w}" y2="{y:.1f}" stroke="#e53935" '
            f'stroke-dasharray="5 4"/><text x="{LEFT + inner_w + 6}" y="{y + 4:.1f}" '
            f'font-size="11" fill="#e53935">budget {_fmt(budget)}</text>'
        )
    for index, line in enumerate(series):
        color = COLORS[index % len(COLORS)]
        kept = sorted(p for p in line.points if math.isfinite(p[1]))
        if not kept:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in kept)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        parts.extend(
            f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}">'
            f"<title>{escape(line.label)}: round {_fmt(x)}, {y:.4g}</title></circle>"
            for x, y in kept
        )
        legend_y = TOP + 14 * index + 8
        if index < LEGEND:  # more lines than that: their points' tooltips name them
            parts.append(
                f'<rect x="{LEFT + inner_w + 8}" y="{legend_y - 8}" width="10" height="10" '
                f'fill="{color}"/><text x="{LEFT + inner_w + 22}" y="{legend_y + 1}" '
                f'font-size="11">{escape(line.label[:16])}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)
