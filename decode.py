"""
Decoding audio files that are not WAV (FLAC, MP3, OGG/Opus, M4A, AIFF, WebM, ...) through ffmpeg,
a system program, run as a pipe: no Python package is needed, and a file is read in blocks.
For recordings too long to hold, any file a block at a time (a WAV through scipy's memory map, a
block of it read at a time), and a resampler whose blocks join as one call over the whole would.

A leaf: it imports nothing of audiotx's, which reads WAV files itself with scipy and hands every
other file to decode(). Every problem is a DecodeError whose text names the file and says what to
do, ffmpeg's absence included. Not run on its own.
"""

import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import scipy.io.wavfile
import scipy.signal

BLOCK_SECONDS = 30  # what one block of a long recording holds: a few MB at any common rate


class DecodeError(Exception):
    """A file ffmpeg cannot decode, or no ffmpeg; the text is the whole message."""


def check_rate(path, rate: int):
    """A rate that cannot be sound is refused: a damaged header would be resampled many-fold."""
    if rate < 1000:
        raise DecodeError(f"{path}: a sample rate of {rate} Hz in its header; sound needs 1000 "
                          "or more (a damaged or mislabelled file?)")


def wav_stream_header(path, head: bytes) -> tuple:
    """(channels, sample rate, where the samples start) of the WAV stream ffmpeg writes to a
    pipe: RIFF, then chunks; the data chunk's size is unknown, so it runs to the end."""
    at = 12
    channels = rate = None
    while at + 8 <= len(head) and head[:4] == b"RIFF":
        chunk, size = head[at:at + 4], int.from_bytes(head[at + 4:at + 8], "little")
        if chunk == b"fmt ":
            channels = int.from_bytes(head[at + 10:at + 12], "little")
            rate = int.from_bytes(head[at + 12:at + 16], "little")
        if chunk == b"data" and channels:
            return channels, rate, at + 8
        at += 8 + size + (size & 1)
    raise DecodeError(f"{path}: ffmpeg found no audio stream in it")


def ffmpeg_command(path) -> list:
    """ffmpeg writing the first audio stream as a 32-bit float WAV stream at the file's own rate
    and channels, so that mixing down and resampling are the same as for a WAV file."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise DecodeError(f"{path}: not a WAV file, and reading it needs ffmpeg, which is not "
                          "installed (Debian or Ubuntu: sudo apt install ffmpeg; macOS: brew "
                          "install ffmpeg; Windows: winget install ffmpeg), or convert it to WAV")
    return [exe, "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn", "-f", "wav",
            "-acodec", "pcm_f32le", "-"]


def pipe_blocks(path, block_seconds: float = BLOCK_SECONDS):
    """Any file ffmpeg reads, a block at a time: yields (sample rate, samples (S, channels)
    float32) pairs, every block but the last block_seconds long."""
    with tempfile.TemporaryFile() as err, subprocess.Popen(ffmpeg_command(path),
                                                            stdout=subprocess.PIPE,
                                                            stderr=err) as proc:
        head = proc.stdout.read(4096)
        if len(head) >= 44:
            channels, rate, start = wav_stream_header(path, head)
            frame = 4 * channels
            size = frame * max(1, round(rate * block_seconds))
            pending = head[start:]
            while chunk := proc.stdout.read(size - len(pending)):
                pending += chunk
                if len(pending) >= size:
                    yield rate, np.frombuffer(pending, np.float32).reshape(-1, channels)
                    pending = b""
            usable = len(pending) // frame * frame
            if usable:
                yield rate, np.frombuffer(pending[:usable], np.float32).reshape(-1, channels)
        if proc.wait():
            err.seek(0)
            why = (err.read().decode(errors="replace").strip().splitlines() or ["no reason"])[-1]
            raise DecodeError(f"{path}: ffmpeg cannot decode it ({why})")
        if len(head) < 44:
            raise DecodeError(f"{path}: ffmpeg found no audio stream in it")


def decode(path, max_hours: float) -> tuple:
    """(sample rate, samples (S, channels) float32) of any file ffmpeg reads, whole: its blocks
    joined, refused past max_hours so that a damaged header cannot fill memory."""
    parts, rate, seconds = [], None, 0.0
    for rate, block in pipe_blocks(path):
        parts.append(block)
        seconds += len(block) / max(rate, 1)
        if seconds > max_hours * 3600:
            raise DecodeError(f"{path}: more than {max_hours} hours of audio; cut it into "
                              "shorter files")
    if rate is None:
        raise DecodeError(f"{path}: ffmpeg found no audio in it")
    return rate, np.concatenate(parts)


def wav_blocks(path, block_seconds: float = BLOCK_SECONDS):
    """A WAV file a block at a time, as scipy reads it: yields (sample rate, samples (S,) or
    (S, channels) in the file's type) pairs. Each block is copied out of the memory map and the
    map dropped, so memory holds one block, however long the file. Sample types scipy cannot
    map (24-bit) are read whole through scipy, or streamed through ffmpeg where it is installed."""
    try:
        rate, mapped = scipy.io.wavfile.read(path, mmap=True)
    except ValueError as e:
        if "greater than file size" in str(e):
            raise DecodeError(f"{path}: truncated (the data chunk is shorter than its header "
                              "says)") from None
        if "not compatible" not in str(e):  # the sample types scipy cannot map: 24-bit
            raise
        if shutil.which("ffmpeg"):
            yield from pipe_blocks(path, block_seconds)
        else:
            yield scipy.io.wavfile.read(path)
        return
    offset, dtype, shape = mapped.offset, mapped.dtype, mapped.shape
    del mapped  # one map per block below: the pages of a block leave memory with it
    step = max(1, round(rate * block_seconds))
    frame = dtype.itemsize * (shape[1] if len(shape) > 1 else 1)
    for first in range(0, shape[0], step):
        count = min(step, shape[0] - first)
        block = np.memmap(path, dtype, "r", offset + first * frame, (count, *shape[1:]))
        yield rate, np.array(block)
        del block


def blocks(path, block_seconds: float = BLOCK_SECONDS):
    """Any audio file a block at a time: a WAV through scipy, anything else through ffmpeg."""
    wav = Path(path).suffix.lower() in (".wav", ".wave")
    return wav_blocks(path, block_seconds) if wav else pipe_blocks(path, block_seconds)


class Resampler:
    """scipy's polyphase resampling of a long wave fed a block at a time: every output sample is
    the one resample_poly over the whole wave gives, up to float rounding, since each stretch is
    computed with enough of the wave on either side for the filter, and begins on a whole
    period of the rate ratio so that the filter's phases line up."""

    def __init__(self, rate: int, target_rate: int):
        g = math.gcd(rate, target_rate)
        self.up, self.down = target_rate // g, rate // g
        reach = 10 * max(self.up, self.down) / self.up + 2  # input samples the filter spans
        # on either side (resample_poly's filter is 20 * max(up, down) + 1 taps at the up rate)
        self.context = self.down * math.ceil(reach / self.down)
        self.step = self.down * math.ceil(rate * 5 / self.down)  # input samples per stretch
        self.buffer = np.zeros(0, np.float32)  # input samples from self.at - context on
        self.at = 0  # the next stretch's first input sample, counted from the buffer's start

    def stretch(self, first: int, last: int, final: bool) -> np.ndarray:
        """Output samples of the input samples buffer[first:last] (first a whole period)."""
        lo = max(0, first - self.context)
        part = self.buffer[lo:last if final else last + self.context]
        out = scipy.signal.resample_poly(part, self.up, self.down)
        skip = (first - lo) // self.down * self.up
        n = math.ceil((last - first) * self.up / self.down)
        return out[skip:skip + n].astype(np.float32)

    def push(self, wave: np.ndarray, final: bool = False) -> np.ndarray:
        """Output samples for the wave (L,) fed so far, as far as the filter's reach allows; with
        final, the rest, the wave's end included."""
        if self.up == self.down:
            return wave
        self.buffer = np.concatenate([self.buffer, wave])
        out = []
        while self.at + self.step + self.context <= len(self.buffer):
            out.append(self.stretch(self.at, self.at + self.step, False))
            self.at += self.step
        if final and self.at < len(self.buffer):
            out.append(self.stretch(self.at, len(self.buffer), True))
            self.at = len(self.buffer)
        keep = max(0, self.at - self.context)  # drop what no later stretch reads
        self.buffer, self.at = self.buffer[keep:], self.at - keep
        return np.concatenate(out) if out else np.zeros(0, np.float32)
