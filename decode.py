"""
Decoding audio files that are not WAV (FLAC, MP3, OGG/Opus, M4A, AIFF, WebM, ...) through ffmpeg,
a system program, run as a pipe: no Python package is needed, and a file is read in blocks.

A leaf: it imports nothing of audiotx's, which reads WAV files itself with scipy and hands every
other file to decode(). Every problem is a DecodeError whose text names the file and says what to
do, ffmpeg's absence included. Not run on its own.
"""

import shutil
import subprocess
import tempfile

import numpy as np


class DecodeError(Exception):
    """A file ffmpeg cannot decode, or no ffmpeg; the text is the whole message."""


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


def decode(path, max_hours: float) -> tuple:
    """(sample rate, samples (S, channels) float32) of any file ffmpeg reads, through a pipe read
    in blocks: the first audio stream as 32-bit float WAV at its own rate and channels, so that
    mixing down and resampling are the same as for a WAV file."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise DecodeError(f"{path}: not a WAV file, and reading it needs ffmpeg, which is not "
                          "installed (Debian or Ubuntu: sudo apt install ffmpeg; macOS: brew "
                          "install ffmpeg; Windows: winget install ffmpeg), or convert it to WAV")
    command = [exe, "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn", "-f", "wav",
               "-acodec", "pcm_f32le", "-"]
    with tempfile.TemporaryFile() as err, subprocess.Popen(command, stdout=subprocess.PIPE,
                                                            stderr=err) as proc:
        data, limit = bytearray(), None
        while block := proc.stdout.read(1 << 20):
            data += block
            if limit is None and len(data) >= 4096:  # the header is in: the channels and rate
                channels, rate, start = wav_stream_header(path, bytes(data[:4096]))
                limit = start + 4 * channels * max(rate, 1) * max_hours * 3600
            if limit is not None and len(data) > limit:
                proc.kill()
                raise DecodeError(f"{path}: more than {max_hours} hours of audio; cut it "
                                  "into shorter files")
        if proc.wait():
            err.seek(0)
            why = (err.read().decode(errors="replace").strip().splitlines() or ["no reason"])[-1]
            raise DecodeError(f"{path}: ffmpeg cannot decode it ({why})")
    channels, rate, start = wav_stream_header(path, bytes(data[:4096]))
    samples = np.frombuffer(data, np.float32, offset=start, count=(len(data) - start) // 4)
    return rate, samples[:len(samples) // channels * channels].reshape(-1, channels)
