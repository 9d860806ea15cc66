"""Small server-side SVG charts for the console (no script, no external library: the
console's Content-Security-Policy allows neither inline script nor other origins).

Each function returns SVG markup as :class:`markupsafe.Markup`; every text in it is
escaped. Colours are SVG presentation attributes, which the CSP's ``style-src`` does not
govern.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from markupsafe import Markup, escape

__all__ = ["PALETTE", "bar_chart", "line_chart"]

PALETTE = ("#1f5fa8", "#c0392b", "#27855a", "#8e44ad", "#d68910", "#117a8b")
_W, _H, _L, _R, _T, _B = 720, 240, 48, 150, 16, 36


def _x(i: int, n: int) -> float:
    return _L + (_W - _L - _R) * (i / (n - 1) if n > 1 else 0.5)


def _y(v: float, y_max: float) -> float:
    return _T + (_H - _T - _B) * (1 - (v / y_max if y_max else 0))


def _frame(
    title: str, y_max: float, fmt: str, xs: Sequence[datetime], x_format: str = "%Y-%m-%d"
) -> list[str]:
    parts = [
        f'<svg class="chart" viewBox="0 0 {_W} {_H}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<line class="axis" x1="{_L}" y1="{_H - _B}" x2="{_W - _R}" y2="{_H - _B}"/>',
        f'<line class="axis" x1="{_L}" y1="{_T}" x2="{_L}" y2="{_H - _B}"/>',
    ]
    for frac in (0.0, 0.5, 1.0):
        v = y_max * frac
        parts.append(
            f'<text x="{_L - 6}" y="{_y(v, y_max) + 4:.1f}" text-anchor="end">'
            f"{escape(format(v, fmt))}</text>"
        )
    for i, x in enumerate(xs):
        if len(xs) <= 8 or i in (0, len(xs) - 1):
            parts.append(
                f'<text x="{_x(i, len(xs)):.1f}" y="{_H - _B + 16}" text-anchor="middle">'
                f"{escape(x.strftime(x_format))}</text>"
            )
    return parts


def line_chart(
    title: str,
    series: Mapping[str, Mapping[datetime, float | None]],
    *,
    y_max: float = 1.0,
    fmt: str = ".0%",
    x_format: str = "%Y-%m-%d",
) -> Markup:
    """One line per series over the union of their x values (windows, oldest first);
    a missing or ``None`` value breaks the line. ``x_format`` labels the x values
    (``strftime``)."""
    xs = sorted({x for points in series.values() for x in points})
    parts = _frame(title, y_max, fmt, xs, x_format)
    for k, (name, points) in enumerate(sorted(series.items())):
        colour = PALETTE[k % len(PALETTE)]
        run: list[str] = []
        for i, x in enumerate(xs):
            v = points.get(x)
            if v is None:
                parts.extend(_polyline(run, colour))
                run = []
                continue
            run.append(f"{_x(i, len(xs)):.1f},{_y(v, y_max):.1f}")
        parts.extend(_polyline(run, colour))
        parts.append(
            f'<text x="{_W - _R + 8}" y="{_T + 14 * (k + 1)}" fill="{colour}">'
            f"{escape(name or '(unknown)')}</text>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def _polyline(points: list[str], colour: str) -> list[str]:
    if not points:
        return []
    if len(points) == 1:
        x, y = points[0].split(",")
        return [f'<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>']
    return [f'<polyline class="line" stroke="{colour}" points="{" ".join(points)}"/>']


def bar_chart(title: str, values: Mapping[datetime, float], *, fmt: str = ".0f") -> Markup:
    """One bar per x value (windows, oldest first)."""
    xs = sorted(values)
    y_max = max(values.values(), default=0.0) or 1.0
    parts = _frame(title, y_max, fmt, xs)
    width = max(4.0, (_W - _L - _R) / max(len(xs), 1) * 0.6)
    for i, x in enumerate(xs):
        top = _y(values[x], y_max)
        parts.append(
            f'<rect x="{_x(i, len(xs)) - width / 2:.1f}" y="{top:.1f}" width="{width:.1f}" '
            f'height="{_H - _B - top:.1f}" fill="{PALETTE[0]}"/>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
