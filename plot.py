"""
Figures as text: line charts in SVG with round axis ticks, heat-map colours, PNG bytes for
pictures embedded in an SVG, and the timeline of a long recording (its log-mel spectrogram, a
row per class, the events). Numpy alone, no plotting package.

A leaf: it imports nothing of audiotx's. tools.py draws the LR range test with it, report.py
every figure of the report, predict.py the timelines. Not run on its own.
"""

import base64
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


# ---- spectrograms and the timeline of a long recording ----

def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular filters evenly spaced on the mel scale (2595 log10(1 + f / 700)) from 0 Hz to
    Nyquist, each rising from its lower neighbour's centre to 1 and falling to the next's:
    (F, n_mels) float32."""
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    edges = hz(np.linspace(0, mel(sample_rate / 2), n_mels + 2))  # (n_mels + 2,) Hz
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)  # (F,)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1) each
    rise, fall = (freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)  # (n_mels, F) each
    return np.maximum(0, np.minimum(rise, fall)).T.astype(np.float32)


class MelColumns:
    """The mel spectrogram of a recording fed a block at a time, in at most `most` columns: each
    column the mean power of a run of Hann-windowed frames; past `most`, neighbouring columns
    merge in pairs and each later column takes twice the frames, so hours cost what minutes do."""

    def __init__(self, sample_rate: int, n_fft: int = 512, n_mels: int = 48, most: int = 4096):
        self.bank, self.window = mel_filterbank(sample_rate, n_fft, n_mels), np.hanning(n_fft)
        self.n_fft, self.most, self.per = n_fft, most, 1  # per: frames in a column
        self.columns, self.run, self.in_run = [], 0.0, 0  # finished columns; the one filling
        self.pending = np.zeros(0, np.float32)

    def push(self, wave: np.ndarray):
        """More of the recording: samples (L,) as floats or 16-bit."""
        wave = np.concatenate([self.pending, np.asarray(wave, np.float32)])
        whole = len(wave) // self.n_fft * self.n_fft
        frames, self.pending = wave[:whole].reshape(-1, self.n_fft), wave[whole:]
        power = np.abs(np.fft.rfft(frames * self.window)) ** 2 @ self.bank  # (frames, n_mels)
        for row in power:
            self.run, self.in_run = self.run + row, self.in_run + 1
            if self.in_run == self.per:
                self.columns.append(self.run / self.per)
                self.run, self.in_run = 0.0, 0
                if len(self.columns) == self.most:
                    pairs = np.array(self.columns).reshape(-1, 2, len(row)).mean(1)
                    self.columns, self.per = list(pairs), self.per * 2

    def image(self, width: int) -> np.ndarray:
        """The log power in at most width columns, low bands last: (n_mels, C), scaled to
        [0, 1]."""
        cols = np.array(self.columns or [np.zeros(self.bank.shape[1])])  # (C, n_mels)
        group = math.ceil(len(cols) / width)
        cols = cols[:len(cols) // group * group or len(cols)]
        cols = cols.reshape(-1, min(group, len(cols)), cols.shape[1]).mean(1)
        db = np.log10(cols.T[::-1] + 1e-10)
        return (db - db.min()) / max(float(np.ptp(db)), 1e-9)


def time_ticks(seconds: float) -> tuple:
    """Round ticks for a time axis of seconds length, in seconds, minutes or hours: (ticks in
    seconds, the unit's name, seconds per unit)."""
    unit, scale = ("s", 1) if seconds < 180 else ("min", 60) if seconds < 3 * 3600 else ("h", 3600)
    ticks = [t * scale for t in nice_ticks(0, seconds / scale, integer=unit != "s")]
    return [t for t in ticks if t <= seconds], unit, scale


def svg_timeline(mel: np.ndarray, seconds: float, window_starts, probs, classes: list,
                 events: list, title: str, w: int = 1200) -> str:
    """A recording's timeline: its spectrogram (mel (n_mels, C) in [0, 1]), a heat-map row per
    class of each window's probability (probs (W, K), windows at window_starts seconds), and the
    events as boxes over both."""
    left, top, spec_h, row_h = 110, 30, 140, 14
    rows = np.zeros((len(classes), w))  # each class's probability at each pixel column
    x_of = lambda t: left + t / max(seconds, 1e-9) * w  # noqa: E731
    cols = [int(x_of(s) - left) for s in window_starts] + [w]
    for a, b, p in zip(cols, cols[1:], probs):  # a pixel shows the last window begun by it
        rows[:, a:b] = np.asarray(p)[:, None]
    spec = base64.b64encode(png(heat_colors(mel))).decode()
    heat = base64.b64encode(png(heat_colors(rows))).decode()
    body_h = spec_h + 4 + row_h * len(classes)
    out = svg_open(left + w + 20, top + body_h + 40, title) + [
        f'<image x="{left}" y="{top}" width="{w}" height="{spec_h}" preserveAspectRatio="none" '
        f'href="data:image/png;base64,{spec}"/>',
        f'<text x="{left - 4}" y="{top + spec_h / 2}" text-anchor="end">mel bands</text>',
        f'<image x="{left}" y="{top + spec_h + 4}" width="{w}" height="{row_h * len(classes)}" '
        f'preserveAspectRatio="none" style="image-rendering:pixelated" '
        f'href="data:image/png;base64,{heat}"/>']
    out += [f'<text x="{left - 4}" y="{top + spec_h + 4 + row_h * (k + 0.8):.1f}" '
            f'text-anchor="end">{escape(c)}</text>' for k, c in enumerate(classes)]
    for e in events:  # a box in the class's row; over the spectrogram too while they are few
        k, x0, x1 = classes.index(e["label"]), x_of(e["start"]), x_of(e["end"])
        tip = (f'<title>{escape(e["label"])} {e["start"]:.3f}-{e["end"]:.3f} s, '
               f'max {e["max"]:.2f}</title>')
        out += [f'<rect x="{x0:.1f}" y="{top}" width="{max(x1 - x0, 1):.1f}" height="{spec_h}" '
                f'fill="none" stroke="white" stroke-width="1">{tip}</rect>'] * (len(events) <= 60)
        out += [f'<rect x="{x0:.1f}" y="{top + spec_h + 4 + row_h * k}" '
                f'width="{max(x1 - x0, 1):.1f}" height="{row_h}" fill="none" stroke="#d62728" '
                f'stroke-width="1.5">{tip}</rect>']
    ticks, unit, scale = time_ticks(seconds)
    axis = top + body_h + 16
    out += [f'<text x="{x_of(t):.1f}" y="{axis}" text-anchor="middle">{t / scale:g} {unit}</text>'
            f'<path d="M{x_of(t):.1f},{top + body_h} v4" stroke="black"/>' for t in ticks]
    return "\n".join(out) + "\n</svg>\n"
