"""
What sounds when in recordings of any length, with a trained run's fold models (the shipped model
by default). A recording is read a block at a time, resampled as training resampled it, and cut
into windows of the model's length every --hop seconds; each window goes through every fold
model and the probabilities are averaged. Windows whose top class reaches --min-conf (auto: a
threshold per class, chosen on the run's out-of-fold validation predictions) and that hold a sound
louder than --min-db become events.

    python audiotx.py --predict my_recording.wav recordings/        # the shipped model
    python audiotx.py --predict field/ --format raven --out detections/ --plot
    python audiotx.py --predict clip.wav --run runs/cnn-test1-k4 --json
    python predict.py my_recording.wav --run runs/cnn-test1-k4    # the same, without --predict

Without --out, everything goes to stdout: a line per recording with its events (text), a JSON
object per recording (json), or the combined table (audacity, raven, csv). With --out DIR, one
file per recording, named after it, a JSON record beside it (which marks it done: a rerun skips
it), and the combined table. audiotx.py's main imports this module for --predict.
"""

import dataclasses
import json
import queue
import re
import sys
import threading
import time
from pathlib import Path

import audiotx  # before torch: it sets OpenMP's spin count, which torch reads once

import numpy as np
import torch

import decode
import events
from audiotx import (UserError, load_fold_models, predict, resolve_precision, to_mono_float,
                     write_text)
from clips import SCALE, Clips, stream_windows, to_int16
from files import csv_text, read_csv, shown_path
from layouts import AUDIO_SUFFIXES, is_audio
from plot import MelColumns, svg_timeline

SHIPPED_MODEL = audiotx.HERE / "models" / "esc10-cnn-test1-k4"  # what --predict uses without --run
SUFFIXES = {"audacity": ".txt", "raven": ".selections.txt", "csv": ".csv", "json": ".json"}
BATCH = 64  # windows through the models at once


# ----------------------------------------------------------------------------------------
# the model: fold models, their window, their thresholds
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Model:
    run_dir: Path
    classes: list
    models: list
    precision: str
    rate: int        # samples per second the models read
    n: int           # samples in a window
    hop: int         # samples between window starts
    thresholds: np.ndarray  # (K,) a window's top class at its threshold is a detection
    settings: dict   # what chose the detections, stated in every output

    def probs(self, windows: list) -> torch.Tensor:
        """Windows (16-bit samples (n,), or fewer at a short recording's end) -> the fold models'
        mean probabilities (B, K)."""
        lengths = torch.tensor([len(w) for w in windows])
        clips = Clips(torch.from_numpy(np.concatenate(windows)), lengths, self.n)
        waves, held = clips.read([(i, 0) for i in range(len(windows))])
        return sum(predict(m, waves, held, self.precision) for m in self.models) / len(self.models)


def validation_thresholds(run_dir: Path, classes: list, target: float) -> np.ndarray:
    """Per class, the lowest threshold at which the run's out-of-fold validation predictions of
    it reach the precision target (events.class_thresholds); the test fold chooses nothing."""
    path = run_dir / "predictions.csv"
    if not path.is_file():
        raise UserError(f"--min-conf auto needs the run's validation predictions ({path}); give a "
                        "probability instead, e.g. --min-conf 0.5")
    rows = [r for r in read_csv(path) if r["split"] == "val"]
    labels = np.array([int(r["label"]) for r in rows])
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    return events.class_thresholds(labels, probs, target)


def load_model(cfg: audiotx.Config) -> Model:
    """The run's fold models (the shipped model without --run), the window hop and thresholds."""
    run_dir = Path(cfg.run).expanduser() if cfg.run else SHIPPED_MODEL
    run_cfg, classes, models = load_fold_models(run_dir)
    precision = resolve_precision(dataclasses.replace(run_cfg, precision="auto")).precision
    n, rate = run_cfg.n_samples, run_cfg.sample_rate
    saved = json.loads((run_dir / "config.json").read_text())  # the run's window hop, where saved
    hop = round(cfg.hop * rate) if cfg.hop else round(saved.get("window_hop_seconds", 0) * rate)
    hop = hop or n // 2
    if cfg.min_conf == "auto":
        thresholds = validation_thresholds(run_dir, classes, cfg.precision_target)
        for c in np.flatnonzero(np.isinf(thresholds)):
            print(f"warning: no threshold gives {classes[c]} a validation precision of "
                  f"{cfg.precision_target:g}: it is never an event", file=sys.stderr)
        how = f"auto (per class, {cfg.precision_target:g} precision on validation)"
    else:
        thresholds, how = np.full(len(classes), cfg.min_conf), f"{cfg.min_conf:g}"
    shown = "the shipped model" if run_dir == SHIPPED_MODEL else shown_path(run_dir)
    settings = {"model": shown, "hop_seconds": round(hop / rate, 3), "min_conf": how,
                "min_db": cfg.min_db,
                "thresholds": {c: round(float(t), 4) for c, t in zip(classes, thresholds)}}
    return Model(run_dir, classes, models, precision, rate, n, hop, thresholds, settings)


def settings_line(model: Model) -> str:
    s = model.settings
    return (f"audiotx: {s['model']}, hop {s['hop_seconds']:g} s, min-conf {s['min_conf']}, "
            f"min-db {s['min_db']:g}")


# ----------------------------------------------------------------------------------------
# one recording: read a block at a time, windows, probabilities, events
# ----------------------------------------------------------------------------------------

def model_rate_blocks(path, rate: int):
    """A recording's samples at the model's rate, 16-bit as training holds them, a block at a
    time: mixed down and resampled as audiotx.load_audio and to_rate do for a whole file."""
    resampler = None
    for file_rate, block in decode.blocks(path):
        if resampler is None:
            decode.check_rate(path, file_rate)
            resampler = decode.Resampler(int(file_rate), rate)
        yield file_rate, to_int16(resampler.push(to_mono_float(path, block)))
    if resampler is None:
        raise UserError(f"{path}: the file holds no samples")
    yield file_rate, to_int16(resampler.push(np.zeros(0, np.float32), final=True))


READ_ERRORS = (UserError, decode.DecodeError, OSError, ValueError, EOFError)  # a bad file's


def unreadable(path, e: Exception) -> str:
    """The line that names a file that could not be read, and why."""
    if isinstance(e, (UserError, decode.DecodeError)):
        return str(e)
    return f"{path}: not a readable audio file ({str(e).splitlines()[0]})"


def read_ahead(items, depth: int = 2):
    """items, made in a thread of their own up to depth ahead of their use: the next blocks are
    read, mixed and resampled while the models work on the windows before them."""
    ready, stop, done = queue.Queue(depth), threading.Event(), object()

    def offer(item) -> bool:
        """Put item in the queue once there is room; False once the reader has stopped."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def make():
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((done, None))
        except BaseException as e:  # raised again where the items are used
            offer((done, e))

    threading.Thread(target=make, daemon=True).start()
    try:
        while (got := ready.get())[0] is not done:
            yield got[0]
        if got[1] is not None:
            raise got[1]
    finally:
        stop.set()


def classify(path: Path, model: Model, plot: bool) -> dict:
    """One recording -> {seconds, its sample rate, starts and ends of its windows (samples),
    probs (W, K), db (F,) the level of each 100 ms, mel (the timeline's spectrogram, with
    plot)}."""
    mel, total, file_rate = MelColumns(model.rate) if plot else None, 0, 0
    levels = events.Levels(model.rate)

    def samples():
        nonlocal total, file_rate
        for file_rate, block in read_ahead(model_rate_blocks(path, model.rate)):
            total += len(block)
            levels.push(block)
            if mel is not None:
                mel.push(block / SCALE)
            yield block

    starts, probs, batch = [], [], []
    for start, window in stream_windows(samples(), model.n, model.hop):
        starts.append(start)
        batch.append(window)
        if len(batch) == BATCH:
            probs.append(model.probs(batch))
            batch = []
    if batch:
        probs.append(model.probs(batch))
    return {"seconds": total / model.rate, "file_rate": int(file_rate), "starts": starts,
            "ends": [min(s + model.n, total) for s in starts],
            "probs": torch.cat(probs).double().numpy(), "db": levels.db(), "mel": mel}


def record(name: str, path: Path, found: dict, model: Model) -> dict:
    """A recording's JSON record: the mean over its windows (what evaluation scores), its
    windows and its events, and the settings that chose them."""
    probs, rate, classes = found["probs"], model.rate, model.classes
    named = lambda p: {c: round(float(v), 6) for c, v in zip(classes, p)}  # noqa: E731
    mean, audible = probs.mean(0), found["db"] >= model.settings["min_db"]  # quiet frames: False
    hit = events.detections(found["starts"], found["ends"], probs, model.thresholds, audible, rate)
    return {"file": str(path), "name": name, "seconds": round(found["seconds"], 3),
            "sample_rate": found["file_rate"],
            "pred": classes[int(mean.argmax())], "probs": named(mean),
            "windows": [{"start": events.seconds(s, rate), "end": events.seconds(e, rate),
                         "pred": classes[int(p.argmax())], "detected": bool(h), "probs": named(p)}
                        for s, e, p, h in zip(found["starts"], found["ends"], probs, hit)],
            "events": events.find_events(found["starts"], found["ends"], probs, hit, classes, rate,
                                         audible),
            "settings": model.settings}


# ----------------------------------------------------------------------------------------
# outputs: a line or a file per recording, and the combined table
# ----------------------------------------------------------------------------------------

def window_table(rec: dict, model: Model) -> tuple:
    """The record's windows as (starts, ends) in samples, probabilities (W, K), detections (W,)."""
    w = rec["windows"]
    starts = [round(x["start"] * model.rate) for x in w]
    ends = [round(x["end"] * model.rate) for x in w]
    return (starts, ends, np.array([[x["probs"][c] for c in model.classes] for x in w]),
            np.array([x["detected"] for x in w]))


def text_lines(rec: dict, model: Model, width: int) -> list:
    """A recording's line: its path and top 3 classes over the windows; then, for a recording
    longer than a window, a line per event."""
    mean = np.array([rec["probs"][c] for c in model.classes])
    top, name = mean.argsort()[::-1][:3], max(map(len, model.classes))
    lines = [f"{rec['file']:<{width}}" + "".join(f"  {model.classes[c]:<{name}} {mean[c]:.3f}"
                                                 for c in top)]
    if len(rec["windows"]) > 1:
        lines += [f"  {e['start']:10.3f} {e['end']:10.3f}  {e['label']:<{name}} max {e['max']:.3f}"
                  f" mean {e['mean']:.3f}" for e in rec["events"]] or ["  no events"]
    return lines


def table_text(fmt: str, recs: list, model: Model) -> str:
    """The recordings' table in fmt; times run on from one recording to the next (offset by the
    durations before it) in the Audacity and Raven tables."""
    classes, offset, out = model.classes, 0.0, []
    if fmt == "audacity":
        for rec in recs:
            out += events.audacity_lines(rec["events"], settings_line(model), offset)[bool(out):]
            offset += rec["seconds"]
        return "\n".join(out) + "\n"
    if fmt == "raven":
        for rec in recs:
            heard = min(rec["sample_rate"], model.rate)  # the band the model heard
            out += events.raven_rows(rec["events"], Path(rec["file"]).name, heard,
                                     model.settings["thresholds"], len(out) + 1, offset)
            offset += rec["seconds"]
        return "\n".join("\t".join(map(str, r)) for r in [events.RAVEN_COLUMNS] + out) + "\n"
    if fmt == "csv":
        for rec in recs:
            out += events.window_rows(rec["file"], *window_table(rec, model), classes, model.rate)
        s = model.settings  # the settings, stated
        detected = f"detected at min-conf {s['min_conf']}, min-db {s['min_db']:g}"
        return csv_text(["file", "start", "end", detected, *(f"p_{c}" for c in classes)], out)
    return "".join(json.dumps(rec) + "\n" for rec in recs)  # json: a line per recording


def timeline_svg(rec: dict, found: dict, model: Model) -> str:
    """The recording's timeline (plot.svg_timeline), from classify's mel columns."""
    starts = [w["start"] for w in rec["windows"]]
    return svg_timeline(found["mel"].image(1200), rec["seconds"], starts, found["probs"],
                        model.classes, rec["events"], f"{rec['file']}: {settings_line(model)}")


def write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)  # a folder's recordings keep their subfolders
    write_text(path, text)


class Outputs:
    """The files of --out: per recording, its table in the format asked (and a timeline with
    --plot) and the JSON record, written last so that it marks the recording done; and at the
    end the combined table, from every record."""

    def __init__(self, cfg: audiotx.Config, model: Model, shard: str):
        self.dir, self.fmt, self.plot, self.model = Path(cfg.out), cfg.format, cfg.plot, model
        suffix = SUFFIXES[self.fmt] if self.fmt != "json" else ".jsonl"
        self.combined = self.dir / f"combined{shard}{suffix}"

    def files(self, name: str) -> list:
        paths = [self.dir / (name + SUFFIXES[self.fmt])] if self.fmt != "json" else []
        svg = [self.dir / f"{name}.svg"] if self.plot else []
        return paths + svg + [self.dir / f"{name}.json"]

    def done(self, name: str):
        """The record of a recording whose files are all there, made with these settings."""
        if not all(p.is_file() for p in self.files(name)):
            return None
        try:
            rec = json.loads((self.dir / f"{name}.json").read_text())
        except ValueError:
            return None
        return rec if rec.get("settings") == self.model.settings else None

    def save(self, rec: dict, found: dict):
        name = rec["name"]
        if self.fmt != "json":
            write(self.dir / (name + SUFFIXES[self.fmt]), table_text(self.fmt, [rec], self.model))
        if self.plot:
            write(self.dir / f"{name}.svg", timeline_svg(rec, found, self.model))
        write(self.dir / f"{name}.json", json.dumps(rec, indent=1) + "\n")

    def finish(self, recs: list):
        write(self.combined, table_text(self.fmt, recs, self.model))
        print(f"wrote {len(recs)} recording(s) to {self.dir}, the combined table "
              f"{self.combined.name}", file=sys.stderr)


# ----------------------------------------------------------------------------------------
# many recordings: walking folders, shards, progress
# ----------------------------------------------------------------------------------------

def audio_files(paths: list) -> list:
    """(file, its output name) of each PATH, or of a folder's audio files (AUDIO_SUFFIXES) at any
    depth, in name order: a folder's files are named by their path in it, without the suffix."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += [(q, q.relative_to(p).with_suffix("").as_posix())
                      for q in sorted(q for q in p.rglob("*") if is_audio(q) and q.is_file())]
        else:
            found.append((p, p.stem))
    if not found:
        raise UserError(f"no audio file in {', '.join(map(str, paths))} (by name: "
                        f"{', '.join(sorted(AUDIO_SUFFIXES))})")
    return found


def shard_of(spec: str) -> tuple:
    """--shard i/n -> (i, n), 1 <= i <= n; (1, 1) without it."""
    m = re.fullmatch(r"(\d+)/(\d+)", spec or "1/1")
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise UserError(f"--shard {spec}: expected i/n with 1 <= i <= n, e.g. --shard 2/8")
    return int(m[1]), int(m[2])


def take_shard(found: list, spec: str) -> tuple:
    """--shard i/n: every n-th file from the i-th, and the combined table's tag."""
    i, n = shard_of(spec)
    return found[i - 1::n], f"-{i}-of-{n}" if spec else ""


class Progress:
    """A line on stderr: files done, hours of audio, audio-hours per minute and the time left
    (by the bytes still to read); rewritten in place on a terminal, else a line every 30 s."""

    def __init__(self, found: list):
        self.sizes = [p.stat().st_size if p.is_file() else 0 for p, _ in found]
        self.t0, self.hours, self.done = time.time(), 0.0, 0
        self.shown = self.t0
        self.tty = sys.stderr.isatty()

    def update(self, seconds: float):
        self.done, self.hours = self.done + 1, self.hours + seconds / 3600
        now, total = time.time(), len(self.sizes)
        if total < 2 or not (self.tty or now - self.shown > 30):
            return
        spent = now - self.t0
        read = sum(self.sizes[:self.done])
        left = spent * (sum(self.sizes) - read) / max(read, 1)
        start = "\r" if self.tty else ""
        print(f"{start}files {self.done}/{total}, {self.hours:.2f} h of audio, "
              f"{self.hours / max(spent / 60, 1e-9):.1f} audio-h/min, "
              f"{int(left // 60)}:{int(left % 60):02d} left", end="" if self.tty else "\n",
              file=sys.stderr, flush=True)
        self.shown = now
        if self.tty and self.done == total:
            print(file=sys.stderr)


def check_flags(cfg: audiotx.Config):
    if cfg.hop < 0 or not 0 < cfg.precision_target <= 1 or cfg.min_db > 0:
        raise UserError("--hop must be >= 0, --precision-target in (0, 1] and --min-db (dBFS) "
                        "at most 0")
    if cfg.min_conf != "auto" and not 0 <= cfg.min_conf <= 1:
        raise UserError(f"--min-conf must be a probability in [0, 1] or auto, got {cfg.min_conf}")
    if cfg.out and cfg.format == "text":
        raise UserError("--out writes files: name their --format (audacity, raven, csv or json)")
    if cfg.plot and not cfg.out:
        raise UserError("--plot writes an SVG per recording: name the folder with --out")
    shard_of(cfg.shard)


def check_names(found: list):
    """Two recordings that would write one output name are refused before any work."""
    names = {}
    for path, name in found:
        if names.setdefault(name, path) != path:
            raise UserError(f"{names[name]} and {path} would write the same outputs ({name}); "
                            "rename one or predict them apart")


def records(found: list, model: Model, outputs, plot: bool):
    """Each recording's record, made, or read back where --out holds it done; an unreadable
    recording is named on stderr and gives None."""
    for path, name in found:
        rec = outputs and outputs.done(name)
        if rec:
            yield rec
            continue
        try:
            found_here = classify(path, model, plot)
        except READ_ERRORS as e:
            print(f"audiotx: error: {unreadable(path, e)}", file=sys.stderr)
            yield None
            continue
        rec = record(name, path, found_here, model)
        if outputs:
            outputs.save(rec, found_here)
        yield rec


def command(cfg: audiotx.Config) -> int:
    """--predict: every recording's windows, probabilities and events, to stdout or --out. A
    file that cannot be read is named on stderr and skipped; the exit status is then 2."""
    check_flags(cfg)
    found, shard = take_shard(audio_files(cfg.predict), cfg.shard)
    check_names(found)
    model = load_model(cfg)
    outputs = Outputs(cfg, model, shard) if cfg.out else None
    progress, recs, width = Progress(found), [], max(len(str(p)) for p, _ in found)
    if cfg.format == "text":
        print(f"# {settings_line(model)}")
    for rec in records(found, model, outputs, cfg.plot):
        progress.update(rec["seconds"] if rec else 0.0)
        if rec is None:
            continue
        recs.append(rec)
        if not outputs and cfg.format in ("text", "json"):  # a line as soon as it is known
            lines = text_lines(rec, model, width) if cfg.format == "text" else [json.dumps(rec)]
            print("\n".join(lines), flush=True)
    if outputs:
        outputs.finish(recs)
    elif cfg.format not in ("text", "json"):
        print(table_text(cfg.format, recs, model), end="")
    failed = len(found) - len(recs)
    if failed and len(found) > 1:
        print(f"audiotx: {failed} of {len(found)} files could not be read (named above)",
              file=sys.stderr)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(audiotx.run_command(audiotx.parse_args(["--predict", *sys.argv[1:]]), command))
