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

import torch
import torch.nn.functional as F

from audiotx import UserError, load_audio, load_fold_models, predict, resolve_precision, to_rate
from layouts import is_audio

SHIPPED_MODEL = audiotx.HERE / "models" / "esc10-cnn-test1-k4"  # what --predict uses without --run


def audio_files(paths: list) -> list:
    """Each PATH, or a folder's audio files (layouts.AUDIO_SUFFIXES), recursively, in name order."""
    files = []
    for p in map(Path, paths):
        files += sorted(q for q in p.rglob("*") if is_audio(q)) if p.is_dir() else [p]
    return files


def windows(wave, n: int, hop: int) -> tuple:
    """A wave (L,) as clip-length windows (W, n): a shorter one padded as in training, a longer one
    cut every hop samples, the last ending at the end. -> (windows, starts in samples)."""
    if len(wave) <= n:
        return F.pad(wave, (0, n - len(wave)))[None], [0]
    starts = list(range(0, len(wave) - n + 1, hop))
    starts += [len(wave) - n] if starts[-1] != len(wave) - n else []
    return torch.stack([wave[s:s + n] for s in starts]), starts


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


def command(cfg: audiotx.Config) -> int:
    """--predict: the fold models' averaged probabilities for each file (each window's, averaged
    over its windows); one line per file, or JSON lines. A file that cannot be read is named on
    stderr and skipped; the exit status is then 2."""
    run_dir = Path(cfg.run).expanduser() if cfg.run else SHIPPED_MODEL
    run_cfg, classes, models = load_fold_models(run_dir)
    precision = resolve_precision(dataclasses.replace(run_cfg, precision="auto")).precision
    n, rate = run_cfg.n_samples, run_cfg.sample_rate
    saved = json.loads((run_dir / "config.json").read_text())  # the run's window hop, where saved
    hop = round(saved.get("window_hop_seconds", run_cfg.clip_seconds / 2) * rate)
    decoded, failed = [], 0
    for path in audio_files(cfg.predict):
        try:
            wave, file_rate = load_audio(path)
        except UserError as e:  # it names the file and what is wrong with it
            print(f"audiotx: error: {e}", file=sys.stderr)
            failed += 1
            continue
        wave = torch.from_numpy(to_rate(wave, file_rate, rate))
        decoded.append((path, len(wave) / rate, *windows(wave, n, hop)))
    if decoded:  # every window of every file in one pass of batches, through each fold model
        wins = torch.cat([d[2] for d in decoded])  # (W, S): every file's windows
        probs = sum(predict(m, wins, precision) for m in models) / len(models)  # (W, K)
        width = max(len(str(d[0])) for d in decoded)
        per_file = probs.split([len(d[3]) for d in decoded])
        for (path, seconds, _, starts), p in zip(decoded, per_file):
            print(prediction_line(path, seconds, starts, n / rate, p, classes, cfg.json, rate,
                                  width))
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(audiotx.run_command(audiotx.parse_args(["--predict", *sys.argv[1:]]), command))
