"""
Classifying recordings with a trained run's fold models (the shipped model by default): each
file cut into clip-length windows, every window through every fold model, the probabilities
averaged over models and windows. One line per file, or one JSON object with its windows.

    python audiotx.py --predict my_recording.wav recordings/        # the shipped model
    python audiotx.py --predict clip.wav --run runs/cnn-test1-k4 --json
    python predict.py my_recording.wav --run runs/cnn-test1-k4    # the same, without --predict

audiotx.py's main imports this module for --predict.
"""

import dataclasses
import json
import sys
from pathlib import Path

import audiotx  # before torch: it sets OpenMP's spin count, which torch reads once

import numpy as np
import torch

from audiotx import (UserError, load_audio, load_fold_models, predict_windows, resolve_precision,
                     to_rate)
from clips import Clips, to_int16
from layouts import AUDIO_SUFFIXES, is_audio

SHIPPED_MODEL = audiotx.HERE / "models" / "esc10-cnn-test1-k4"  # what --predict uses without --run


def audio_files(paths: list) -> list:
    """Each PATH, or a folder's audio files (layouts.AUDIO_SUFFIXES), recursively, in name order."""
    files = []
    for p in map(Path, paths):
        files += sorted(q for q in p.rglob("*") if is_audio(q)) if p.is_dir() else [p]
    return files


def prediction_line(path, seconds, starts, window_s, probs, classes, as_json: bool, rate: int,
                    width: int) -> str:
    """One file's answer: its path and top 3 classes, or a JSON object (with its windows when
    the file is longer than one)."""
    mean = probs.double().mean(0)  # (K,)
    named = lambda p: {c: round(float(v), 6) for c, v in zip(classes, p)}  # noqa: E731
    if not as_json:
        top = mean.argsort(descending=True)[:3].tolist()
        name = max(map(len, classes))
        return f"{str(path):<{width}}" + "".join(f"  {classes[c]:<{name}} {float(mean[c]):.3f}"
                                                  for c in top)
    out = {"file": str(path), "pred": classes[int(mean.argmax())], "probs": named(mean)}
    if len(starts) > 1:
        out["windows"] = [{"start": round(s / rate, 4),
                           "end": round(min(s / rate + window_s, seconds), 4),
                           "pred": classes[int(p.argmax())], "probs": named(p)}
                          for s, p in zip(starts, probs)]
    return json.dumps(out)


def read_files(paths: list, rate: int, n: int) -> tuple:
    """Every readable file of paths at the model's rate, in one 16-bit store as training holds
    its clips: (the files, their Clips); a file that cannot be read is named on stderr."""
    files, samples, failed = [], [], 0
    found = audio_files(paths)
    if not found:
        raise UserError(f"no audio file in {', '.join(map(str, paths))} (by name: "
                        f"{', '.join(sorted(AUDIO_SUFFIXES))})")
    for path in found:
        try:
            wave, file_rate = load_audio(path)
        except UserError as e:  # it names the file and what is wrong with it
            print(f"audiotx: error: {e}", file=sys.stderr)
            failed += 1
            continue
        files.append(path)
        samples.append(to_int16(to_rate(wave, file_rate, rate)))
    lengths = torch.tensor([len(s) for s in samples], dtype=torch.int64)
    store = torch.from_numpy(np.concatenate(samples) if samples else np.zeros(0, np.int16))
    return files, Clips(store, lengths, n), failed


def command(cfg: audiotx.Config) -> int:
    """--predict: the fold models' averaged probabilities for each file (each window's, averaged
    over its windows, the windows evaluation reads); one line per file, or JSON lines. A file
    that cannot be read is named on stderr and skipped; the exit status is then 2."""
    run_dir = Path(cfg.run).expanduser() if cfg.run else SHIPPED_MODEL
    run_cfg, classes, models = load_fold_models(run_dir)
    precision = resolve_precision(dataclasses.replace(run_cfg, precision="auto")).precision
    n, rate = run_cfg.n_samples, run_cfg.sample_rate
    saved = json.loads((run_dir / "config.json").read_text())  # the run's window hop, where saved
    hop = round(saved["window_hop_seconds"] * rate) if "window_hop_seconds" in saved else n // 2
    files, clips, failed = read_files(cfg.predict, rate, n)
    if files:  # every window of every file in one pass of batches, through each fold model
        rows, owner = clips.windows(torch.arange(len(files)), hop)
        probs = sum(predict_windows(m, clips, rows, precision) for m in models) / len(models)
        width = max(len(str(f)) for f in files)
        for i, path in enumerate(files):
            starts = [s for (c, s) in rows if c == i]
            print(prediction_line(path, int(clips.lengths[i]) / rate, starts, n / rate,
                                  probs[owner == i], classes, cfg.json, rate, width))
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(audiotx.run_command(audiotx.parse_args(["--predict", *sys.argv[1:]]), command))
