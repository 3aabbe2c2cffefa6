"""
Recordings of any length, held compactly: every clip's samples in one 16-bit store at the model's
rate, each clip a (start, length) in it. Training reads a clip as one window of the model's
length, a random crop of a longer recording that is drawn anew every time; evaluation and
prediction read every window of it, at the same window starts (window_starts), and average.

A leaf: it imports nothing of audiotx's. A clip shorter than a window is one window, padded with
zeros, with its length beside it so that the model masks the padding. Not run on its own.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SCALE = 32768.0  # 16-bit samples <-> floats in [-1, 1], as a 16-bit WAV file reads


def to_int16(wave: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> 16-bit, rounded, the loudest clipped."""
    return np.clip(np.round(wave * SCALE), -32768, 32767).astype(np.int16)


def window_starts(length: int, n: int, hop: int) -> list:
    """Where the windows of n samples of a recording of length samples begin: every hop, and the
    last ending at the recording's end; one window at 0 for a recording no longer than n."""
    if length <= n:
        return [0]
    starts = list(range(0, length - n + 1, hop))
    return starts + ([length - n] if starts[-1] != length - n else [])


def stream_windows(blocks, n: int, hop: int):
    """The windows of a recording fed as blocks of samples (L,), as window_starts places them on
    the whole: yields (start, its samples (n,), fewer for a recording shorter than a window),
    each as soon as its samples are in, holding no more than a window and a block."""
    buffer, origin, total, start, last = np.zeros(0, np.int16), 0, 0, 0, -1
    for block in blocks:
        buffer, total = np.concatenate([buffer, block]), total + len(block)
        while start + n <= total:
            yield start, buffer[start - origin:start - origin + n]
            last, start = start, start + hop
        keep = max(origin, min(start, total - n))  # the next window, or the last one, begins here
        buffer, origin = buffer[keep - origin:], keep
    for s in window_starts(total, n, hop):  # the last window, ending at the end, or the only one
        if s > last:
            yield s, buffer[s - origin:s - origin + n]


@dataclass
class Clips:
    store: torch.Tensor    # (total,) int16: every clip's samples, one after another
    lengths: torch.Tensor  # (N,) int64: the samples of each clip
    n: int                 # samples in one window, the model's input

    def __post_init__(self):
        self.starts = torch.cumsum(self.lengths, 0) - self.lengths  # (N,) where each clip begins

    def __len__(self):
        return len(self.lengths)

    def read(self, rows: list):
        """(clip, offset in it) pairs -> waves (B, n) float32 and the samples each holds (B,), or
        None when every one fills its window."""
        waves, held = [], []
        for i, offset in rows:
            start, length = int(self.starts[i]) + offset, min(int(self.lengths[i]) - offset, self.n)
            waves.append(F.pad(self.store[start:start + length], (0, self.n - length)))
            held.append(length)
        wave = torch.stack(waves).float() / SCALE  # (B, n)
        held = torch.tensor(held)
        return wave, None if bool((held == self.n).all()) else held.to(wave.device)

    def crops(self, idx):
        """One window of each clip of idx: a random crop where the clip is longer than a window
        (torch's generator draws it), else the whole clip. -> (waves (B, n), lengths or None)."""
        spare = (self.lengths[idx] - self.n).clamp_min(0)  # (B,) the room a crop may start in
        offsets = [int(torch.randint(0, int(s) + 1, ())) if s else 0 for s in spare]
        return self.read(list(zip(idx.tolist(), offsets)))

    def windows(self, idx, hop: int):
        """Every window of each clip of idx: (the rows (clip, offset) in order, and the position
        in idx of the clip each row belongs to (W,))."""
        rows = [(i, s) for i in idx.tolist()
                for s in window_starts(int(self.lengths[i]), self.n, hop)]
        position = {i: k for k, i in enumerate(idx.tolist())}
        return rows, torch.tensor([position[i] for i, _ in rows])
