"""
A long field recording for the streaming benchmark: ESC-10 clips of the given folds, drawn at
random (fixed seed), upsampled to 48 kHz stereo 16-bit, with 3-8 s of quiet noise between them,
until the recording is as long as asked. Written as a WAV a block at a time.

    python results/experiments/long-recordings/make_recording.py OUT.wav --hours 1 [--folds 1]
"""

import argparse
import csv
import math
from pathlib import Path

import numpy as np
import scipy.io.wavfile
import scipy.signal

RATE = 48000


def wav_header(frames: int, channels: int = 2, rate: int = RATE) -> bytes:
    """A 16-bit PCM WAV header for frames frames: RIFF, or RF64 (a ds64 chunk holding the sizes)
    when the sizes pass 32 bits, as for 10 hours of 48 kHz stereo."""
    data = frames * channels * 2
    u32 = lambda v: v.to_bytes(4, "little")  # noqa: E731
    fmt = (b"fmt " + u32(16) + (1).to_bytes(2, "little") + channels.to_bytes(2, "little")
           + u32(rate) + u32(rate * channels * 2) + (channels * 2).to_bytes(2, "little")
           + (16).to_bytes(2, "little"))
    if 36 + data < 2 ** 32:
        return b"RIFF" + u32(36 + data) + b"WAVE" + fmt + b"data" + u32(data)
    ds64 = (b"ds64" + u32(28) + (72 + data).to_bytes(8, "little") + data.to_bytes(8, "little")
            + frames.to_bytes(8, "little") + u32(0))
    return b"RF64" + u32(2 ** 32 - 1) + b"WAVE" + ds64 + fmt + b"data" + u32(2 ** 32 - 1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--hours", type=float, default=1.0)
    p.add_argument("--folds", default="1")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[3].parent
                                         / "shared" / "data" / "ESC-10"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    folds = {int(f) for f in a.folds.split(",")}
    with open(Path(a.data) / "meta" / "esc50.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["esc10"] == "True" and int(r["fold"]) in folds]
    rng = np.random.default_rng(a.seed)
    frames = round(a.hours * 3600 * RATE)
    done, truth = 0, []
    with open(a.out, "wb") as out:
        out.write(wav_header(frames))
        while done < frames:
            gap = rng.normal(0, 10 ** (-50 / 20), round(rng.uniform(3, 8) * RATE))  # -50 dBFS
            r = rows[rng.integers(len(rows))]
            rate, clip = scipy.io.wavfile.read(Path(a.data) / "audio" / r["filename"])
            g = math.gcd(rate, RATE)
            clip = scipy.signal.resample_poly(clip / 32768.0, RATE // g, rate // g)
            truth.append((done + len(gap), len(clip), r["category"]))
            piece = np.concatenate([gap, clip])[:frames - done]
            samples = np.clip(np.round(piece * 32768), -32768, 32767).astype("<i2")
            out.write(np.repeat(samples[:, None], 2, axis=1).tobytes())  # the same in both channels
            done += len(piece)
    with open(Path(a.out).with_suffix(".truth.csv"), "w") as f:
        f.write("start,end,label\n")
        f.writelines(f"{s / RATE:.3f},{(s + n) / RATE:.3f},{c}\n" for s, n, c in truth
                     if s + n <= frames)


if __name__ == "__main__":
    main()
