"""
What sounds when in a long recording: per-class thresholds chosen on a run's out-of-fold
validation predictions, windows merged into events, and the tables sound people open (an Audacity
label track, a Raven selection table, a csv of windows).

A window is a detection when its top class reaches that class's threshold and it holds a sound
louder than the quiet (--min-db); a window below either is no detection, so quiet stretches and
sounds of no known class get no forced answer. Consecutive detections of one class merge into one
event. Times come from sample indices, rounded to milliseconds, so they never drift.

A leaf: it imports nothing of audiotx's; predict.py feeds it. Not run on its own.
"""

import numpy as np

# a window at a run's end under this share of its inner neighbour's probability holds less of
# the sound than it does, and is left out of the event (a development check, NOTES)
EDGE = 0.9
FRAME_SECONDS = 0.1  # the stretch a level is measured over: a bark or a tick fills one
# a window whose audible frames all lie in this share of it at one end leaves them to the window
# beyond that end, which holds them nearer its middle (a development check, NOTES)
EDGE_SHARE = 0.3
RAVEN_COLUMNS = ["Selection", "View", "Channel", "Begin Time (s)", "End Time (s)", "Low Freq (Hz)",
                 "High Freq (Hz)", "Class", "Confidence", "Begin File", "File Offset (s)",
                 "Threshold"]


def seconds(sample: int, rate: int) -> float:
    """A sample index as seconds, to the millisecond: 606.7, never 606.7000000000694."""
    return round(sample / rate, 3)


# ---- thresholds ----

def precision_threshold(probs: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The lowest threshold on the probabilities of the predictions of one class above which at
    least target of them are right (inf where none is): its recall is then the most that
    target allows."""
    order = np.argsort(-probs, kind="stable")
    p, right = probs[order], correct[order]
    precision = np.cumsum(right) / np.arange(1, len(p) + 1)  # of the top 1, 2, ... predictions
    tied_last = np.append(p[1:] != p[:-1], True)  # a threshold keeps every tie or none
    ok = np.flatnonzero((precision >= target) & tied_last)
    return float(p[ok[-1]]) if len(ok) else float("inf")


def class_thresholds(labels: np.ndarray, probs: np.ndarray, target: float) -> np.ndarray:
    """Per class (K,): the threshold of precision_threshold over the clips predicted as it, from
    labels (N,) and probabilities (N, K) that no model trained on."""
    preds = probs.argmax(1)
    return np.array([precision_threshold(probs[preds == c, c], labels[preds == c] == c, target)
                     for c in range(probs.shape[1])])


# ---- levels: where a recording is louder than the quiet ----

def frame_length(rate: int) -> int:
    """Samples in one frame of FRAME_SECONDS at rate."""
    return round(rate * FRAME_SECONDS)


def decibels(frames: np.ndarray) -> np.ndarray:
    """(F, n) samples in [-1, 1] -> (F,) each frame's level in dBFS; digital silence is -100."""
    return 10 * np.log10(np.mean(frames ** 2, axis=1) + 1e-10)


class Levels:
    """The level of every 100 ms frame of a recording (dBFS), fed a block of 16-bit samples at a
    time; the frames lie on one grid from the recording's first sample."""

    def __init__(self, rate: int):
        self.n, self.rest, self.parts = frame_length(rate), np.zeros(0), []

    def push(self, block: np.ndarray):
        x = np.concatenate([self.rest, block / 32768.0])
        k = len(x) // self.n
        self.parts.append(decibels(x[:k * self.n].reshape(k, self.n)))
        self.rest = x[k * self.n:]

    def db(self) -> np.ndarray:
        """(F,) the levels, the last frame the part of one that the recording fills."""
        return np.concatenate(self.parts + ([decibels(self.rest[None])] if len(self.rest) else []))


def heard(starts, ends, audible: np.ndarray, frame: int, share: float = EDGE_SHARE) -> np.ndarray:
    """(W,) whether each window holds a sound above the quiet (audible, (F,) per frame of frame
    samples) away from its ends: a window that holds only the edge of a sound, its onset at the
    window's end or its tail at the start, tends to name it wrongly."""
    keep = np.zeros(len(starts), bool)
    for w, (s, e) in enumerate(zip(starts, ends)):
        a, b = s // frame, -(-e // frame)
        loud = np.flatnonzero(audible[a:b])
        edge = round(share * (b - a))
        keep[w] = len(loud) > 0 and not ((w > 0 and loud[-1] < edge) or
                                         (w + 1 < len(starts) and loud[0] >= b - a - edge))
    return keep


# ---- events ----

def strongest(starts, ends, top, p) -> np.ndarray:
    """(W,) whether each window's top class is at least as likely as that of every overlapping
    window naming another class: a window that sees part of a louder neighbour's sound often
    names it wrongly, and less surely than the window that holds it."""
    keep = np.ones(len(top), bool)
    for w in range(len(top)):
        v = w + 1
        while v < len(top) and starts[v] < ends[w]:
            if top[v] != top[w]:
                keep[w if p[w] < p[v] else v] &= p[w] == p[v]
            v += 1
    return keep


def detections(starts, ends, probs: np.ndarray, thresholds: np.ndarray, audible: np.ndarray,
               rate: int, share: float = EDGE_SHARE) -> np.ndarray:
    """(W,) whether each window (starts and ends in samples, probabilities (W, K)) is a
    detection: its top class reaches its threshold, it holds a sound away from its ends (heard),
    and no overlapping window names another class more surely (strongest)."""
    top, p = probs.argmax(1), probs.max(1)
    hit = (p >= thresholds[top]) & heard(starts, ends, audible, frame_length(rate), share)
    return hit & strongest(starts, ends, top, np.where(hit, p, -1.0))


def find_events(starts, ends, probs: np.ndarray, hit: np.ndarray, classes: list, rate: int,
                audible: np.ndarray, edge: float = EDGE) -> list:
    """Windows (starts and ends in samples, probabilities (W, K), detections (W,)) -> events,
    each {start, end (s), label, max, mean (the class's probability over its windows)}.

    A lone window's event is the window. A run of windows loses its end windows while they are
    less sure than their inner neighbour (EDGE), and overlaps the windows beyond by their shared
    part, where the sound most likely is not: each end gives half of that overlap away, so that
    each window stands for its middle stretch, one hop long. An event starts at its first
    audible frame: before it, its first window held only the quiet ahead of the sound. Its end
    stays: a sound's tail fades under the quiet rather than stopping (NOTES)."""
    top, p, frame = probs.argmax(1), probs.max(1), frame_length(rate)
    events, first = [], None
    for w in range(len(top)):
        if hit[w] and first is None:
            first = w
        if first is not None and (w + 1 == len(top) or not hit[w + 1] or top[w + 1] != top[w]):
            a, b = first, w
            while a < b and p[a] < edge * p[a + 1]:
                a += 1
            while b > a and p[b] < edge * p[b - 1]:
                b -= 1
            c, span = int(top[a]), probs[a:b + 1, top[a]]
            start, end = starts[a], ends[b]
            if b > a:  # half the overlap with a neighbour window, where there is one
                start += max(0, ends[a - 1] - start) // 2 if a > 0 else 0
                end -= max(0, end - starts[b + 1]) // 2 if b + 1 < len(top) else 0
            loud = np.flatnonzero(audible[start // frame:-(-end // frame)])
            start = max(start, (start // frame + loud[0]) * frame) if len(loud) else start
            events.append({"start": seconds(start, rate), "end": seconds(end, rate),
                           "label": classes[c], "max": round(float(span.max()), 4),
                           "mean": round(float(span.mean()), 4)})
            first = None
    return events


# ---- tables ----

def audacity_lines(events: list, settings: str, offset: float = 0.0) -> list:
    """An Audacity label track: start, end, label per line, tab-separated, in seconds. Audacity
    keeps only the label's text, so the confidence goes in it ("dog 0.87"); the settings are a
    point label at the start."""
    lines = [f"{offset:.3f}\t{offset:.3f}\t{settings}"]
    return lines + [f"{e['start'] + offset:.3f}\t{e['end'] + offset:.3f}\t{e['label']} "
                    f"{e['max']:.2f}" for e in events]


def raven_rows(events: list, file: str, sample_rate: int, thresholds: dict, first: int = 1,
               offset: float = 0.0) -> list:
    """Rows of a Raven selection table (RAVEN_COLUMNS), numbered from first; times offset by
    offset seconds (the running total of the files before, in a combined table); the whole band
    up to half the file's sample rate."""
    return [[first + i, "Spectrogram 1", 1, f"{e['start'] + offset:.3f}",
             f"{e['end'] + offset:.3f}", 0, sample_rate // 2, e["label"], f"{e['max']:.4f}",
             file, f"{e['start']:.3f}", f"{thresholds[e['label']]:.4f}"]
            for i, e in enumerate(events)]


def window_rows(file: str, starts, ends, probs: np.ndarray, hit: np.ndarray, classes: list,
                rate: int) -> list:
    """Rows of the csv of windows: file, start, end, the class detected ("" for none), and a
    probability per class."""
    top = probs.argmax(1)
    return [[file, seconds(s, rate), seconds(e, rate), classes[c] if h else "",
             *(f"{v:.4f}" for v in p)] for s, e, c, h, p in zip(starts, ends, top, hit, probs)]
