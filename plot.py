"""
Figures as text: line charts in SVG with round axis ticks, heat-map colours, and PNG bytes for
pictures embedded in an SVG. Numpy alone, no plotting package.

A leaf: it imports nothing of audiotx's. audiotx.py draws the LR range test with it, report.py
every figure of the report. Not run on its own.
"""

import math
import struct
import zlib
from html import escape

import numpy as np

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf", "#000000"]


def nice_ticks(lo: float, hi: float, most: int = 7, integer: bool = False) -> list:
    """Ticks at whole multiples of a round step (1, 2, 2.5 or 5 times a power of ten; at least 1
    for an integer axis such as epochs) covering [lo, hi], at most `most` of them."""
    if hi == lo:  # one value: a range around it
        lo, hi = lo - (abs(lo) or 1) / 2, hi + (abs(hi) or 1) / 2
    steps = (m * 10.0 ** e for e in range(math.floor(math.log10(hi - lo)) - 2, 20)
             for m in (1, 2, 2.5, 5))
    for step in sorted(st for st in steps if st >= 1 or not integer):
        first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
        if last - first + 1 <= most:
            return [round(k * step, 12) for k in range(first, last + 1)]
    return [lo, hi]


def svg_open(w, h, title, size=11) -> list:
    """An SVG's first elements: its frame, a white page and the title."""
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'font-family="sans-serif" font-size="{size}"><rect width="100%" height="100%" '
            f'fill="white"/>', f'<text x="10" y="16" font-size="13">{escape(title)}</text>']


def svg_lines(series, *, title, xlabel, ylabel, w=600, h=320, x_integer=False):
    """A line chart as SVG text; series: [(label, xs, ys, band or None)], band = (lows, highs);
    x_integer: x ticks at whole numbers only (epochs)."""
    left, right, top, bottom = 55, 150, 30, 42
    xs = np.concatenate([np.asarray(s[1], float) for s in series])
    ys = np.concatenate([np.asarray(v, float) for s in series for v in ([s[2]] + list(s[3] or []))])
    xticks = nice_ticks(xs.min(), xs.max(), integer=x_integer)
    yticks = nice_ticks(ys.min(), ys.max())
    x0, x1, y0, y1 = xticks[0], xticks[-1], yticks[0], yticks[-1]
    px = lambda x: left + (x - x0) / ((x1 - x0) or 1) * (w - left - right)  # noqa: E731
    py = lambda y: h - bottom - (y - y0) / ((y1 - y0) or 1) * (h - top - bottom)  # noqa: E731
    points = lambda a, b: " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(a, b))  # noqa: E731
    out = svg_open(w, h, title) + [
        f'<text x="{(left + w - right) / 2}" y="{h - 8}" text-anchor="middle">'
        f'{escape(xlabel)}</text>',
        f'<text x="14" y="{h / 2}" text-anchor="middle" transform="rotate(-90 14 {h / 2})">'
        f'{escape(ylabel)}</text>',
        f'<path d="M{left},{top} V{h - bottom} H{w - right}" stroke="black" fill="none"/>']
    out += [f'<text class="x" x="{px(v):.1f}" y="{h - bottom + 14}" text-anchor="middle">'
            f'{v:g}</text>' for v in xticks]
    out += [f'<text class="y" x="{left - 4}" y="{py(v) + 4:.1f}" text-anchor="end">{v:g}</text>'
            f'<path d="M{left},{py(v):.1f} H{w - right}" stroke="#ddd"/>' for v in yticks]
    for i, (label, sx, sy, band) in enumerate(series):
        color, ly = COLORS[i % len(COLORS)], top + 8 + 15 * i
        if band is not None:
            out.append(f'<polygon points="{points([*sx, *sx[::-1]], [*band[1], *band[0][::-1]])}" '
                       f'fill="{color}" fill-opacity="0.18" stroke="none"/>')
        out += [f'<polyline points="{points(sx, sy)}" fill="none" stroke="{color}" '
                'stroke-width="1.5"/>',
                f'<path d="M{w - right + 8},{ly} h16" stroke="{color}" stroke-width="2"/>',
                f'<text x="{w - right + 28}" y="{ly + 4}">{escape(label)}</text>']
    return "\n".join(out) + "\n</svg>\n"


def png(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 image as PNG bytes (zlib-compressed rows, each after filter byte 0)."""
    h, w, _ = rgb.shape
    chunk = lambda tag, data: (struct.pack(">I", len(data)) + tag + data  # noqa: E731
                               + struct.pack(">I", zlib.crc32(tag + data)))
    rows = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(rgb, dtype=np.uint8))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def heat_colors(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> (..., 3) uint8 colours from dark blue through green to yellow."""
    stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
                     float)
    x = np.clip(v, 0, 1)[..., None] * (len(stops) - 1)
    lo = np.floor(x).astype(int).clip(0, len(stops) - 2)
    return (stops[lo[..., 0]] * (1 - (x - lo)) + stops[lo[..., 0] + 1] * (x - lo)).astype(np.uint8)
