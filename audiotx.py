"""
audiotx: environmental sound classification on raw waveforms, from scratch.

Two architectures share one 1D-convolution front end over the waveform:
  cnn          front end -> mean+max pooling over time -> MLP classifier
  transformer  front end -> <cls> token + positional embedding -> pre-norm
               self-attention blocks written from plain tensor ops -> MLP head

The research core: the configuration, reading audio, datasets and folds, augmentation, the two
models, training, evaluation and metrics, and the training command. Tools import it and are run
through it: predict.py, report.py, tools.py (LR range test, tuning, benchmark). It imports only
leaves: layouts.py, decode.py, clips.py, fetch.py, files.py, logs.py, processes.py.

    python audiotx.py --arch transformer --heads 2 --kfold 4   # one configuration
    bash run.sh                                                 # every configuration
    pytest test_audiotx.py                                      # the tests

A run writes what it measures under runs/<name>/ (config.json, metrics.json, predictions.csv,
roc.csv, fold<i>/history.csv) and logs it to Weights & Biases (offline unless you are logged in).
"""

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib
import json
import math
import os
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

# torch's OpenMP (libgomp) lets an idle thread spin 300,000 times before it sleeps. Alone that
# is fast; beside another busy process the spinning threads take the cores from the threads they
# wait for, and each run slows many times over. 1000 spins is libgomp's own choice when it knows
# threads outnumber cores; it must be set before torch loads libgomp. The user's setting wins.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import numpy as np
import scipy
import scipy.io.wavfile
import scipy.signal
import torch
import torch.nn as nn
import torch.nn.functional as F

import decode
import fetch
from clips import Clips, to_int16
import layouts
from files import code_version, csv_text, read_settings, replace_with, shown_path, versions
from logs import Tracker, print_progress_factory, print_summary, wandb_mode
from processes import (WORKER, DeviceError, all_sum, barrier, gather_rows, rng_states,
                       set_rng_states, start_processes, stop_processes, to_device)

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = [HERE.parent / "shared" / "data" / "ESC-10", HERE / "data" / "ESC-50"]
CACHE_VERSION = 3  # bump when the cached waveform format changes


class UserError(Exception):
    """A problem with the user's data or flags: reported in one line, exit status 2."""


# ----------------------------------------------------------------------------------------
# config: one dataclass; the command line is built from its fields
# ----------------------------------------------------------------------------------------

def float_or_auto(text: str):
    try:
        return text if text == "auto" else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def flag(default, help: str, **how):
    """A Config field with its --help text; how: argparse's choices, or parse (the type)."""
    if isinstance(default, list):
        return field(default_factory=list, metadata={"help": help, **how})
    return field(default=default, metadata={"help": help, **how})


@dataclass
class Config:
    # model
    arch: str = flag("transformer", "architecture", choices=["cnn", "transformer"])
    heads: int = flag(2, "attention heads: 1 | 2 | 4 (must divide dim)")
    depth: int = flag(2, "attention blocks (>= 2)")
    dim: int = flag(128, "channels out of the front end = transformer width")
    dropout: float = flag(0.1, "in attention, MLPs and heads")
    # data
    data: str = flag("", "dataset folder, labels table or zip; else $AUDIOTX_DATA, or fetched")
    dataset: str = flag("auto", "the folder's layout", choices=["auto", "esc", "urbansound8k"])
    subset: str = flag("esc10", "which rows of meta/esc50.csv", choices=["esc10", "esc50"])
    sample_rate: int = flag(16000, "Hz after resampling")
    features: str = flag("logwave", "the stem's output, or its log", choices=["wave", "logwave"])
    clip_seconds: float = flag(5.0, "clips are padded or cropped to this length")
    # splits
    test_fold: int = flag(1, "official fold held out as the test set; 0 = none")
    kfold: int = flag(4, "validation folds over the remaining clips")
    # training
    epochs: int = flag(100, "passes over the training folds")
    batch_size: int = flag(32, "clips per step")
    lr: float | str = flag(2e-3, "peak learning rate; auto = the LR range test's suggestion",
                           parse=float_or_auto)
    weight_decay: float = flag(0.05, "AdamW, on weight matrices only")
    label_smoothing: float = flag(0.1, "share of each target spread over all classes")
    mixup: float = flag(0.4, "Beta(a, a) mixing of clip pairs; 0 = off")
    shift: bool = flag(True, "random circular time shift of each training clip")
    gain_db: float = flag(6.0, "random gain in [-gain_db, +gain_db] dB")
    stretch: float = flag(0.2, "each batch played at a random speed in [1 - s, 1 + s]; 0 = off")
    select: str = flag("best", "a fold keeps its best epoch or its last", choices=["best", "final"])
    balance: bool = flag(True, "weight the loss by sqrt inverse class frequency, classes over 2:1")
    per_class: int = flag(0, "train on at most N clips of each class per split (few-shot); 0 = all")
    init: str = flag("", "start from a run's fold-1 front end (and encoder); a new head")
    freeze: bool = flag(False, "with --init: train the new head alone")
    seed: int = flag(0, "fold i is seeded with seed + i")
    threads: int = flag(0, "torch CPU threads; 0 = torch's default")
    device: str = flag("auto", "auto: cuda, mps or cpu", choices=["auto", "cpu", "cuda", "mps"])
    precision: str = flag("auto", "auto = bf16 where the device has it natively (--amp: bf16)",
                          choices=["auto", "fp32", "bf16"])
    # output
    out: str = flag("", "results go to OUT/name/ (default runs/); --predict: its files")
    name: str = flag("", "default: derived from the configuration")
    restart: bool = flag(False, "discard saved state and results under out/name/")
    wandb: str = flag("auto", "W&B mode ($WANDB_MODE wins)",
                      choices=["auto", "online", "offline", "disabled"])
    project: str = flag("audiotx", "W&B project")
    entity: str = flag("", "W&B entity (team or user)")
    debug: bool = flag(False, "show tracebacks instead of one-line errors")
    lr_find: bool = flag(False, "LR range test on split 1's training clips: the suggested lr")
    # the tools' commands (predict.py, report.py, tools.py)
    report: str = flag("", "write DIR/REPORT.md from the finished runs in DIR, train nothing")
    tune: int = flag(0, "tune --arch on N random settings (successive halving); 0 = train")
    hparams: str = flag("", "JSON file of settings (a tuning's best.json); flags still win")
    bench: bool = flag(False, "time every architecture on random clips, train nothing")
    predict: list = flag([], "audio files or folders to classify (any length)")
    run: str = flag("", "--predict with this run's fold models; default: the shipped model")
    format: str = flag("text", "of --predict", choices=["text", "audacity", "raven", "csv", "json"])
    hop: float = flag(0.0, "--predict: seconds between windows; 0 = half the model's window")
    min_conf: float | str = flag(0.5, "an event's least probability, or auto", parse=float_or_auto)
    precision_target: float = flag(0.9, "--min-conf auto: each class's validation precision")
    min_db: float = flag(-50.0, "--predict: a window never louder (dBFS, 100 ms) holds no event")
    plot: bool = flag(False, "--predict: an SVG timeline of each recording in --out")
    shard: str = flag("", "--predict: i/n takes every n-th file from the i-th")

    @property
    def n_samples(self) -> int:
        """Samples in one clip at the model's rate."""
        return round(self.sample_rate * self.clip_seconds)


# Fields that change how a run is reported, not what it computes: a resumed run may differ in them.
REPORTING_FIELDS = {"data", "dataset", "device", "out", "name", "restart", "wandb", "project",
                    "entity", "debug", "threads", "report", "hparams", "bench", "tune", "lr_find",
                    "predict", "run", "format", "hop", "min_conf", "precision_target", "plot",
                    "shard", "min_db"}


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like every other bad input
        self.exit(2, f"audiotx: error: {message}\n")


def parse_args(argv=None) -> Config:
    """Build the command line from Config's fields: --test-fold sets test_fold."""
    parser = OneLineParser(description=__doc__.split("\n\n")[0].strip())
    for f in dataclasses.fields(Config):
        flag_name = "--" + f.name.replace("_", "-")
        helptext = f.metadata["help"] + " (default: %(default)s)"
        if f.type is bool:
            parser.add_argument(flag_name, action=argparse.BooleanOptionalAction,
                                default=f.default, help=helptext)
        elif f.type is list:
            parser.add_argument(flag_name, nargs="+", default=[], metavar="PATH", help=helptext)
        else:
            parser.add_argument(flag_name, type=f.metadata.get("parse", f.type), default=f.default,
                                choices=f.metadata.get("choices"), help=helptext)
    parser.add_argument("--amp", dest="precision", action="store_const", const="bf16",
                        help="mixed precision: the same as --precision bf16")
    parser.add_argument("--json", dest="format", action="store_const", const="json",
                        help="--predict: the same as --format json")
    args = parser.parse_args(argv)
    if args.hparams:  # the file's settings become defaults, so flags on the command line still win
        try:
            known = {f.name for f in dataclasses.fields(Config)}
            parser.set_defaults(**read_settings(args.hparams, known))
        except ValueError as e:
            parser.error(f"--hparams {args.hparams}: {e}")
        args = parser.parse_args(argv)
    return Config(**vars(args))


# ----------------------------------------------------------------------------------------
# checking the configuration against the flags and the processes
# ----------------------------------------------------------------------------------------

def check_config(cfg: Config):
    """Refuse flag combinations that cannot work, naming the flag."""
    for name in ["dim", "depth", "heads", "epochs", "batch_size", "sample_rate"]:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive: {getattr(cfg, name)}")
    if cfg.clip_seconds <= 0 or (cfg.lr != "auto" and cfg.lr <= 0):
        raise UserError("--clip-seconds and --lr must be positive")
    if cfg.arch == "transformer" and cfg.depth < 2:
        raise UserError(f"--depth must be at least 2 for the transformer, got {cfg.depth}")
    if cfg.dim % cfg.heads:
        raise UserError(f"--heads {cfg.heads} does not divide --dim {cfg.dim}")
    if cfg.dim % 4:
        raise UserError(f"--dim must be a multiple of 4 (the front end widens dim/4 to dim), "
                        f"got {cfg.dim}")
    if cfg.tune < 0 or (cfg.tune and not cfg.test_fold):
        raise UserError("--tune needs N >= 0 and a held-out --test-fold (the best set's test)")
    if cfg.kfold < 2:
        raise UserError(f"--kfold must be at least 2, got {cfg.kfold}")
    if cfg.bench and cfg.lr == "auto":
        raise UserError("--lr auto needs the training clips; --bench times random ones")
    if not 0 <= cfg.dropout < 1 or cfg.weight_decay < 0 or cfg.mixup < 0 or cfg.gain_db < 0:
        raise UserError("--dropout must be in [0, 1); --weight-decay, --mixup, --gain-db >= 0")
    if not 0 <= cfg.stretch < 0.5:
        raise UserError(f"--stretch must be in [0, 0.5), got {cfg.stretch}")
    if cfg.per_class < 0 or (cfg.freeze and not cfg.init):
        raise UserError("--per-class must be >= 0, and --freeze needs --init")
    if cfg.batch_size < 2 * WORKER.world:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch: with {WORKER.world} "
                        f"processes it must be at least {2 * WORKER.world} (BatchNorm needs 2 "
                        "clips in each process's share)")


def resolve_precision(cfg: Config) -> Config:
    """--precision auto -> bf16 on CUDA GPUs with bfloat16, and on CPUs where oneDNN has it natively
    (AVX512-BF16 or AMX); else fp32, since emulated bf16 is slower than fp32.
    config.json records the choice."""
    if cfg.precision != "auto":
        return cfg
    if WORKER.device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        return dataclasses.replace(cfg, precision="bf16" if native else "fp32")
    try:
        native = WORKER.device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return dataclasses.replace(cfg, precision="bf16" if native else "fp32")


def prepare(cfg: Config) -> Config:
    """The checked configuration with its precision resolved, torch's threads set to it."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return resolve_precision(cfg)


def run_name(cfg: Config) -> str:
    heads = f"-h{cfg.heads}" if cfg.arch == "transformer" else ""
    if cfg.tune:
        return cfg.name or f"tune-{cfg.arch}"
    return cfg.name or f"{cfg.arch}{heads}-test{cfg.test_fold}-k{cfg.kfold}"


# ----------------------------------------------------------------------------------------
# files: who writes them (rank 0 alone), csv, json, checkpoints (the rest: files.py)
# ----------------------------------------------------------------------------------------

def write_text(path: Path, text: str):
    """UTF-8 whatever the locale; under torchrun only rank 0 writes files (and in save_atomic)."""
    if WORKER.main:
        replace_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: Path, header, rows):
    write_text(path, csv_text(header, rows))


def write_rows(path: Path, rows: list):
    """A csv of dicts with the same keys: the first one's keys are the header."""
    write_csv(path, list(rows[0]), [list(r.values()) for r in rows])


def save_atomic(obj, path: Path):
    if WORKER.main:
        replace_with(path, lambda tmp: torch.save(obj, tmp))


def load_checked(path: Path):
    """torch.load, with a damaged or truncated file reported in one line instead of half-loaded."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        why = type(e).__name__
        raise UserError(f"{path}: damaged ({why}); delete it or rerun with --restart") from e


# ----------------------------------------------------------------------------------------
# data: reading audio, finding the dataset, caching, folds (the tables: layouts.py)
# ----------------------------------------------------------------------------------------

MAX_HOURS = 4  # the most audio one file may decode to, so a damaged header cannot fill memory


def read_wav(path):
    """scipy's (sample rate, samples (S,) or (S, channels)); a broken file is a UserError."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rate, data = scipy.io.wavfile.read(path)
        except OSError as e:  # absent, a folder, no permission
            raise UserError(f"{path}: cannot be read ({e.strerror})") from e
        except Exception as e:  # ValueError, EOFError or struct errors, by how the file is broken
            why = str(e).splitlines()[0]
            raise UserError(f"{path}: not a readable PCM/float WAV file ({why})") from e
    if any("EOF" in str(w.message) for w in caught):  # scipy reads a truncated file with a warning
        raise UserError(f"{path}: truncated (the data chunk is shorter than its header says)")
    return rate, data


def read_audio(path) -> tuple:
    """(sample rate, samples (S,) or (S, channels)) of an audio file: WAV through scipy, any other
    format through ffmpeg. A rate that cannot be sound, or more audio than MAX_HOURS, is refused."""
    try:
        wav = Path(path).suffix.lower() in (".wav", ".wave")
        rate, data = read_wav(path) if wav else decode.decode(path, MAX_HOURS)
        decode.check_rate(path, rate)
    except decode.DecodeError as e:
        raise UserError(str(e)) from None
    if len(data) > rate * MAX_HOURS * 3600:
        raise UserError(f"{path}: more than {MAX_HOURS} hours of audio; cut it into shorter files")
    return int(rate), data


def to_mono_float(path, data):
    """Integer or float samples (S,) or (S, channels) -> float32 (S,) in [-1, 1]."""
    scale = {np.dtype(np.int16): 2.0 ** 15, np.dtype(np.int32): 2.0 ** 31,
             np.dtype(np.int64): 2.0 ** 63}
    data = data.astype(data.dtype.newbyteorder("="), copy=False)  # RIFX files: big-endian
    if data.dtype == np.uint8:
        wave = (data.astype(np.float64) - 128.0) / 128.0
    elif data.dtype in scale:  # 24- and 36- to 64-bit samples arrive left-justified, so these fit
        wave = data.astype(np.float64) / scale[data.dtype]
    elif data.dtype in (np.float32, np.float64):
        wave = data.astype(np.float64)
    else:
        raise UserError(f"{path}: unsupported sample type {data.dtype}")
    if wave.ndim == 2:  # (S, channels) -> (S,): the mean, added a column at a time in the order
        mono = wave[:, 0].copy()  # numpy's mean adds them, which is slow over a short axis
        for c in range(1, wave.shape[1]):
            mono += wave[:, c]
        wave = mono / wave.shape[1]
    if wave.size == 0:
        raise UserError(f"{path}: the file holds no samples")
    if not np.isfinite(wave).all():
        raise UserError(f"{path}: the audio holds NaN or infinite samples")
    return wave.astype(np.float32)


def load_audio(path):
    """Read an audio file of any format; return (float32 mono wave in [-1, 1], sample rate)."""
    rate, data = read_audio(path)
    return to_mono_float(path, data), rate


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "audiotx"


def check_esc50(root: Path):
    """What an unpacked ESC-50 must pass before it is used: every clip its table lists (all 50
    classes, not only ESC-10's) is a readable WAV."""
    try:
        rows = layouts.read_esc(root, "esc50")
    except layouts.LayoutError as e:
        raise UserError(str(e)) from None
    for r in rows:
        read_wav(root / "audio" / r["filename"])


def find_data(arg: str) -> Path:
    """--data (a folder, a labels table or a zip), else $AUDIOTX_DATA, else the first default
    folder that exists, else ESC-50 fetched earlier, else ESC-50 fetched now."""
    given = arg or os.environ.get("AUDIOTX_DATA", "")
    try:
        if given:
            path = Path(given).expanduser()
            if path.is_file() and zipfile.is_zipfile(path):
                return fetch.unpack_once(path, cache_root(), check_esc50)
            if path.exists():
                return path
            raise UserError(f"{given}: no such folder or file (expected a folder of class folders, "
                            "a labels table, ESC-50's or UrbanSound8K's folder, or a zip of one)")
        fetched = cache_root() / "ESC-50"
        for path in DEFAULT_DATA + [fetched]:
            if (path / "audio").is_dir():
                return path
        return fetch.fetch_esc50(fetched, check_esc50)
    except fetch.FetchError as e:
        raise UserError(str(e)) from None


def cache_path(audio_dir: Path, table: list, cfg: Config) -> Path:
    """A cache file keyed by every clip's file name, size and mtime (and segment), and the rate
    and length."""
    h = hashlib.sha1(f"v{CACHE_VERSION} {cfg.sample_rate} {cfg.clip_seconds}".encode())
    for r in table:
        st = (audio_dir / r["filename"]).stat()
        h.update(f"{layouts.clip_name(r)} {st.st_size} {st.st_mtime_ns}\n".encode())
    return cache_root() / f"waves-{h.hexdigest()[:16]}.i16"


def to_rate(wave, rate: int, target_rate: int):
    """A float32 wave (L,) at rate resampled to target_rate (polyphase, scipy)."""
    if rate == target_rate:
        return wave
    g = math.gcd(rate, target_rate)
    return scipy.signal.resample_poly(wave, target_rate // g, rate // g).astype(np.float32)


def cut_segment(path, wave, rate: int, row: dict):
    """The part of a wave (L,) that a row's start and end (seconds; None: the file's own) name."""
    if row.get("start") is None and row.get("end") is None:
        return wave
    first = round((row.get("start") or 0) * rate)
    last = len(wave) if row.get("end") is None else min(len(wave), round(row["end"] * rate))
    if last <= first:
        raise UserError(f"{path}: the segment {layouts.clip_name(row)} lies past the file's end "
                        f"({len(wave) / rate:.3f} s)")
    return wave[first:last]


def decode_clips(audio_dir: Path, table: list, cfg: Config, store: Path) -> np.ndarray:
    """Decode every clip, resampled, into the file store as 16-bit samples one clip after the
    other, a file at a time: -> each clip's length in samples (N,). Counts what needed fixing."""
    lengths = np.zeros(len(table), dtype=np.int64)
    rates, seconds, multichannel = [], [], 0
    t0 = time.time()
    with open(store, "wb") as out:
        for i, r in enumerate(table):
            path = audio_dir / r["filename"]
            rate, data = read_audio(path)
            wave = cut_segment(path, to_mono_float(path, data), rate, r)
            multichannel += data.ndim == 2 and data.shape[1] > 1
            rates.append(rate)
            seconds.append(len(wave) / rate)
            samples = to_int16(to_rate(wave, rate, cfg.sample_rate))
            out.write(samples.tobytes())
            lengths[i] = len(samples)
            if (i + 1) % 100 == 0 or i + 1 == len(table):
                print(f"\rdecoding {i + 1}/{len(table)} clips ({time.time() - t0:.1f}s)", end="",
                      flush=True)
    print()
    common = max(set(rates), key=rates.count)
    odd = {f"a sample rate other than {common} Hz (resampled)": sum(r != common for r in rates),
           f"a length other than {cfg.clip_seconds:g} s (padded, or read as windows)":
               sum(abs(s - cfg.clip_seconds) > 1e-3 for s in seconds),
           "more than one channel (mixed down to mono)": multichannel}
    for what, count in odd.items():
        if count:
            print(f"warning: {count} of {len(table)} clips had {what}")
    return lengths


def load_clips(audio_dir: Path, table: list, cfg: Config) -> Clips:
    """Every clip at the model's rate, 16-bit, in one store (clips.py), decoded once and cached
    on disk: a raw file of the samples, and the lengths' file, written last, marking it whole."""
    path = cache_path(audio_dir, table, cfg)
    lengths_path = path.with_name(path.stem + "-lengths.npy")
    if lengths_path.is_file():
        try:
            lengths, store = np.load(lengths_path), np.fromfile(path, dtype=np.int16)
            if lengths.shape == (len(table),) and store.size == lengths.sum():
                return Clips(torch.from_numpy(store), torch.from_numpy(lengths), cfg.n_samples)
        except (ValueError, OSError, EOFError):
            pass
        print(f"warning: cache {path} is damaged; rebuilding it")
        lengths_path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    decoded = {}
    replace_with(path, lambda tmp: decoded.update(lengths=decode_clips(audio_dir, table, cfg,
                                                                       tmp)))
    replace_with(lengths_path, lambda tmp: np.save(tmp, decoded["lengths"]))
    return Clips(torch.from_numpy(np.fromfile(path, dtype=np.int16)),
                 torch.from_numpy(decoded["lengths"]), cfg.n_samples)


def deal_groups(groups, labels, k):
    """The part (0..k-1) of each clip, with every source recording's clips in one part and each
    class spread evenly over the parts."""
    names, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    group_label = [np.bincount(labels[inverse == g]).argmax() for g in range(len(names))]
    per_class = np.zeros((k, labels.max() + 1), dtype=np.int64)
    total = np.zeros(k, dtype=np.int64)
    part_of_group = np.zeros(len(names), dtype=np.int64)
    # Largest groups first within each class, so the greedy fill stays balanced.
    for g in sorted(range(len(names)), key=lambda g: (group_label[g], -sizes[g], names[g])):
        c = group_label[g]
        p = min(range(k), key=lambda p: (per_class[p, c], total[p], p))
        part_of_group[g] = p
        per_class[p, c] += sizes[g]
        total[p] += sizes[g]
    return part_of_group[inverse]


def split_folds(folds, groups, labels, test_fold, k, classes=None):
    """Test indices and k (train, val) index pairs; no source recording crosses a split."""
    folds, groups, labels = np.asarray(folds), np.asarray(groups), np.asarray(labels)
    official = sorted(set(folds.tolist()))
    if test_fold and test_fold not in official:
        raise UserError(f"--test-fold {test_fold} does not exist (folds: {official}; 0 = none)")
    test = np.flatnonzero(folds == test_fold)
    rest = np.flatnonzero(folds != test_fold)
    remaining = sorted(set(folds[rest].tolist()))
    if k == len(remaining):  # official folds as they are: the course's and the paper's protocol
        part = np.searchsorted(remaining, folds[rest])
    else:
        sources = len(set(groups[rest].tolist()))
        if k > sources:
            raise UserError(f"--kfold {k} is more than the {sources} source recordings allow")
        part = deal_groups(groups[rest], labels[rest], k)
    splits = [(rest[part != i], rest[part == i]) for i in range(k)]
    for i, (train_idx, val_idx) in enumerate(splits):
        absent = sorted(set(range(labels.max() + 1)) - set(labels[train_idx].tolist()))
        if len(val_idx) == 0 or absent:
            names = ", ".join(str(classes[c] if classes else c) for c in absent) or "no clips"
            raise UserError(f"--kfold {k}: validation fold {i + 1} leaves class(es) {names} with "
                            "no training clips; use fewer folds, or a dataset with that class in "
                            "more folds")
    return test, splits


@dataclass
class Dataset:
    root: Path              # the folder or table --data named (or found)
    audio_dir: Path         # the folder the table's file names are under
    layout: str             # ESC-50, UrbanSound8K, class folders or labels table
    table: list             # a row per clip (layouts.py), sorted by file
    classes: list           # sorted category names; label i is classes[i]
    labels: torch.Tensor    # (N,)
    test_idx: np.ndarray    # clips of the test fold (empty when --test-fold 0)
    splits: list            # k (train_idx, val_idx) pairs


DEALT_FOLDS = 5  # a dataset without folds of its own is dealt into a test fold and four more


def dealt_folds(table: list, labels: np.ndarray, classes: list, cfg: Config) -> np.ndarray:
    """Folds 1..5 for a dataset that names none: whole source recordings dealt to 5 folds,
    each class spread evenly, in the order of their names, so every run on the dataset shares
    them. A class with too few recordings for the folds asked for is refused, with what works."""
    groups = np.array([r["src_file"] for r in table])
    need = cfg.kfold if not cfg.test_fold and cfg.kfold != DEALT_FOLDS else DEALT_FOLDS
    for c, name in enumerate(classes):
        n = len(set(groups[labels == c].tolist()))
        if n < need:
            works = (f"--test-fold 0 --kfold {n} works with it" if n >= 2 else
                     "add recordings of it, or leave it out")
            raise UserError(f"class '{name}' has {n} recording(s), too few for "
                            f"{need} folds that each hold it; {works}")
    return deal_groups(groups, labels, DEALT_FOLDS) + 1


def print_dataset(ds: Dataset, cfg: Config):
    """The classes with their counts and the sizes of the splits, before anything is read."""
    counts = np.bincount(ds.labels.numpy(), minlength=len(ds.classes))
    named = ", ".join(f"{c} {n}" for c, n in zip(ds.classes, counts))
    print(f"data: {ds.root} ({ds.layout}), {len(ds.table)} clips, "
          f"{len(ds.classes)} classes: {named}")
    test = f"test fold {cfg.test_fold} {len(ds.test_idx)} clips" if len(ds.test_idx) else "no test"
    print(f"splits: {test}; validation folds of " + ", ".join(str(len(v)) for _, v in ds.splits)
          + " clips")


def load_dataset(cfg: Config) -> Dataset:
    """The table, labels and splits; no audio is read here."""
    root = find_data(cfg.data)
    try:
        audio_dir, table, layout = layouts.read_layout(root, cfg.subset, cfg.dataset)
    except layouts.LayoutError as e:
        raise UserError(str(e)) from None
    classes = sorted({r["category"] for r in table})
    labels = torch.tensor([classes.index(r["category"]) for r in table])
    folds = [r["fold"] for r in table]
    if None in folds:
        folds, layout = dealt_folds(table, labels.numpy(), classes, cfg), layout + ", folds dealt"
    test_idx, splits = split_folds(folds, [r["src_file"] for r in table], labels.numpy(),
                                   cfg.test_fold, cfg.kfold, classes)
    return Dataset(root, audio_dir, layout, table, classes, labels, test_idx, splits)


# ----------------------------------------------------------------------------------------
# augmentation
# ----------------------------------------------------------------------------------------

def shift(wave, lengths=None):
    """Roll each clip of wave (B, S) by a random amount within its own length (ESC clips are
    padded with silence, so a circular shift keeps them natural; padding stays at the end)."""
    B, S = wave.shape
    if lengths is None:  # one roll per clip: cheaper than gathering through a (B, S) index
        k = torch.randint(0, S, (B,))
        return torch.stack([w.roll(-j) for w, j in zip(wave, k.tolist())])
    n = lengths.cpu()
    k = (torch.rand(B) * n).long()
    return torch.stack([torch.cat([w[:m].roll(-j), w[m:]])
                        for w, m, j in zip(wave, n.tolist(), k.tolist())])


def resample(wave, speed: float, lengths=None):
    """Play wave (B, S) back `speed` times as fast, by linear interpolation, cut or zero-padded
    back to S samples: every frequency times speed, every duration over it. -> (wave, lengths)."""
    B, S = wave.shape
    n = max(2, round(S / speed))
    out = F.interpolate(wave[:, None], size=n, mode="linear", align_corners=True)[:, 0]  # (B, n)
    out = F.pad(out, (0, S - n)) if n < S else out[:, :S]
    return out, None if lengths is None else (lengths / speed).long().clamp(1, S)


def augment(wave, labels, n_classes, cfg: Config, lengths=None):
    """Batch augmentation with tensor ops: wave (B, S), labels (B,), lengths (B,) or None ->
    wave (B, S), soft targets (B, K), lengths (a mixed pair fills the longer's)."""
    B = len(wave)
    target = F.one_hot(labels, n_classes).float()
    if cfg.shift:
        wave = shift(wave, lengths)
    if cfg.stretch:  # one speed per batch: a single interpolation, where one per clip would gather
        wave, lengths = resample(wave, 1 + (2 * float(torch.rand(())) - 1) * cfg.stretch, lengths)
    if cfg.gain_db:
        wave = wave * 10 ** ((torch.rand(B, 1, device=wave.device) * 2 - 1) * cfg.gain_db / 20)
    if cfg.mixup:  # lam (B, 1): the first clip's share of the mix and of the target
        lam = torch.distributions.Beta(cfg.mixup, cfg.mixup).sample((B, 1))
        lam, perm = lam.to(wave.device), torch.randperm(B)
        wave = lam * wave + (1 - lam) * wave[perm]
        target = lam * target + (1 - lam) * target[perm]
        lengths = None if lengths is None else torch.maximum(lengths, lengths[perm])
    return wave, target, lengths


# ----------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------

def layer_len(n, k: int, s: int, pool: int):
    """Positions out of a conv layer (kernel k, stride s, padding (k - s) // 2) and its max-pool."""
    return ((n + 2 * ((k - s) // 2) - k) // s + 1) // pool


def length_mask(n, length: int):
    """(B, 1, length) mask of the first n[b] positions of each row."""
    return (torch.arange(length, device=n.device) < n[:, None])[:, None]


def stem_frames(wave, conv: nn.Conv1d):
    """conv, with one input channel, kernel k and stride s, over wave (B, S) as one matrix product
    of the wave's k-sample frames: (B, L, k) @ (k, C) -> (B, C, 1, L) in channels-last memory.
    The same numbers as conv1d, faster than oneDNN's convolution with one input channel."""
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    frames = F.pad(wave, (p, p)).unfold(1, k, s)  # (B, L, k), a view: frames overlap by k - s
    return (frames @ conv.weight.flatten(1).t()).transpose(1, 2).unsqueeze(2)  # -> (B, C, 1, L)


class ConvFrontEnd(nn.Module):
    """Four conv layers over the waveform: wave (B, S) -> x (B, T, dim), T = S / 2048
    (16 kHz: 5 s -> 39 frames)."""

    def __init__(self, *, dim: int, features: str = "wave"):
        super().__init__()
        # (in, out, kernel, stride, pool). The strided stem is a learnable filterbank, 4 ms filters
        # at 1 ms hops (16 kHz), max-pooled by 4; each later layer cuts time by 4 or 2 while
        # widening the channels. A coarser stem trades accuracy for speed (NOTES.md).
        self.plan = [(1, dim // 4, 64, 16, 4), (dim // 4, dim // 2, 3, 1, 4),
                     (dim // 2, dim, 3, 1, 4), (dim, dim, 3, 1, 2)]
        # logwave: the stem's output is the log of each band's rectified magnitude, as in a log
        # spectrogram, so a change of gain becomes a shift that the next BatchNorm removes
        self.log_stem = features == "logwave"
        # Conv1d's (out, in, k) weights, run as 2-D ops on (B, C, 1, L) (see forward); BatchNorm2d
        # holds the same state as BatchNorm1d
        self.convs = nn.ModuleList(nn.Conv1d(c_in, c_out, k, s, padding=(k - s) // 2, bias=False)
                                   for c_in, c_out, k, s, _ in self.plan)
        self.norms = nn.ModuleList(nn.BatchNorm2d(c_out) for _, c_out, _, _, _ in self.plan)

    def out_len(self, n_samples):
        """Frames out of n samples (an int, or a tensor of clip lengths): those a clip fills."""
        for _, _, k, s, pool in self.plan:
            n_samples = layer_len(n_samples, k, s, pool)
        return n_samples

    def pool(self, x, i: int):
        """Layer i's max-pool over time, before normalisation, so that BatchNorm and ReLU touch a
        quarter of the values: (B, C, 1, L) -> (B, C, 1, L / pool), the remainder dropped."""
        pool = self.plan[i][4]
        return F.max_pool2d(x, (1, pool)) if pool > 1 else x

    def normalise(self, x, i: int, n=None):
        """Layer i's BatchNorm and ReLU; with the frames each clip fills before the layer (B,),
        every frame past a clip's end zeroed. -> (x, the frames each clip fills after it)."""
        x = F.relu(self.norms[i](x))
        if n is None:
            return x, None
        _, _, k, s, pool = self.plan[i]
        n = layer_len(n, k, s, pool)
        return x * length_mask(n, x.shape[-1])[:, :, None], n  # (B, 1, 1, L) mask

    def forward(self, wave, lengths=None):
        """wave (B, S) -> (x (B, T, C), None), or with the clips' lengths (B,) in samples, (x, the
        frames each clip fills (B,)). Then everything past a clip's end is zeroed at the input
        and after every layer, so the padding never reaches a filled frame: the result is the
        same however long the padding and whatever it holds.

        Inside, activations are (B, C, 1, L) in channels-last memory, rows of C channels per
        time step: CPU kernels pool, normalise and convolve those much faster than rows of
        time, and the last layer's output is already the (B, T, C) the transformer reads."""
        if lengths is not None:
            wave = wave * (torch.arange(wave.shape[1], device=wave.device) < lengths[:, None])
        x = stem_frames(wave, self.convs[0])  # (B, C, 1, L): the stem reads the wave itself
        if self.log_stem:
            x = torch.log(self.pool(x.abs(), 0).float() + 1e-4)  # 1e-4: below 16-bit quiet
        else:
            x = self.pool(x, 0)
        x, n = self.normalise(x, 0, lengths)
        for i, conv in enumerate(self.convs[1:], start=1):
            x = F.conv2d(x, conv.weight[:, :, None], stride=(1, conv.stride[0]),
                         padding=(0, conv.padding[0]))  # (B, C, 1, L)
            x, n = self.normalise(self.pool(x, i), i, n)
        # (B, C, 1, T) channels-last -> (B, T, C); a clip too short to fill a frame keeps its first
        return x.squeeze(2).transpose(1, 2), None if n is None else n.clamp_min(1)


class Dropout(nn.Module):
    """nn.Dropout's behaviour with the mask cut from random 64-bit integers, four 16-bit draws
    each, cheaper than torch.rand's one float per value. P(drop) is p to within 1/65536."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        bits = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64,
                             device=x.device).view(torch.int16)[:n]  # uniform in [-32768, 32767]
        keep = bits.view(x.shape) >= round(self.p * 65536) - 32768
        return x * keep * (1 / (1 - self.p))


class SelfAttention(nn.Module):
    """Multi-head self-attention from plain tensor operations: x (B, T, C) -> (B, T, C)."""

    def __init__(self, *, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        assert dim % heads == 0, "heads must divide dim"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = Dropout(dropout)

    def forward(self, x, keep=None, weights: bool = False):
        """keep (B, T) bool: the tokens that may be attended to (None: all). weights: also return
        the attention weights (B, nh, T, T), before dropout."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
                   for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.heads)  # (B, nh, T, T)
        if keep is not None:  # padding gets zero weight, so it cannot move any token's output
            att = att.masked_fill(~keep[:, None, None, :], float("-inf"))
        att = att.softmax(dim=-1)
        y = (self.drop(att) @ v).transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return (self.proj(y), att) if weights else self.proj(y)


class MLP(nn.Module):
    def __init__(self, *, dim: int, hidden: int, out: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), Dropout(dropout),
                                 nn.Linear(hidden, out))

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, *, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim=dim, heads=heads, dropout=dropout)
        self.mlp = MLP(dim=dim, hidden=4 * dim, out=dim, dropout=dropout)
        self.drop = Dropout(dropout)

    def forward(self, x, keep=None, weights: bool = False):
        """x (B, T, C) -> x, or with weights, (x, the attention weights (B, nh, T, T))."""
        y, att = self.attn(self.ln1(x), keep, weights=True)
        x = x + self.drop(y)
        x = x + self.drop(self.mlp(self.ln2(x)))
        return (x, att) if weights else x


class CNNClassifier(nn.Module):
    """Front end, mean and max over time, MLP classifier: wave (B, S) -> logits (B, K)."""

    def __init__(self, *, dim: int, n_classes: int, dropout: float, features: str = "wave"):
        super().__init__()
        self.front = ConvFrontEnd(dim=dim, features=features)
        self.head = MLP(dim=2 * dim, hidden=dim, out=n_classes, dropout=dropout)

    def forward(self, wave, lengths=None):
        x, n = self.front(wave, lengths)  # (B, T, C), None or (B,) filled frames
        if n is None:
            return self.head(torch.cat([x.mean(1), x.amax(1)], dim=1))  # (B, 2C) -> (B, K)
        filled = length_mask(n, x.shape[1]).transpose(1, 2)  # (B, T, 1)
        mean = x.sum(1) / n[:, None]  # padded frames are zero
        top = x.masked_fill(~filled, float("-inf")).amax(1)
        return self.head(torch.cat([mean, top], dim=1))


class AudioTransformer(nn.Module):
    """Front end, <cls> + positions, attention blocks, MLP head: wave (B, S) -> logits (B, K)."""

    def __init__(self, *, dim: int, heads: int, depth: int, n_classes: int, n_samples: int,
                 dropout: float, features: str = "wave"):
        super().__init__()
        self.front = ConvFrontEnd(dim=dim, features=features)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, self.front.out_len(n_samples) + 1, dim) * 0.02)
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim=dim, heads=heads, dropout=dropout)
                                    for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = MLP(dim=dim, hidden=dim, out=n_classes, dropout=dropout)

    def forward(self, wave, lengths=None, attention: bool = False):
        """-> logits (B, K), or with attention, (logits, each block's attention weights
        (B, nh, 1 + T, 1 + T), <cls> at position 0)."""
        x, n = self.front(wave, lengths)  # (B, T, C), None or (B,) filled frames
        # (B, 1 + T): the tokens attention may read, <cls> and the filled frames
        keep = None if n is None else F.pad(length_mask(n, x.shape[1])[:, 0], (1, 0), value=True)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1)  # (B, 1 + T, C), <cls> at 0
        x = self.drop(x + self.pos[:, :x.shape[1]])
        atts = []
        for block in self.blocks:
            x, att = block(x, keep, weights=True)
            atts.append(att)
        logits = self.head(self.ln(x[:, 0]))  # the <cls> output -> (B, K)
        return (logits, atts) if attention else logits


def build_model(cfg: Config, n_classes: int) -> nn.Module:
    if ConvFrontEnd(dim=cfg.dim).out_len(cfg.n_samples) < 1:
        raise UserError(f"--clip-seconds {cfg.clip_seconds} at --sample-rate {cfg.sample_rate} is "
                        "too short for the front end")
    if cfg.arch == "cnn":
        return CNNClassifier(dim=cfg.dim, n_classes=n_classes, dropout=cfg.dropout,
                             features=cfg.features)
    return AudioTransformer(dim=cfg.dim, heads=cfg.heads, depth=cfg.depth, n_classes=n_classes,
                            n_samples=cfg.n_samples, dropout=cfg.dropout, features=cfg.features)


def count_params(model: nn.Module) -> dict:
    """Trainable and frozen parameters; buffers (BatchNorm statistics) on their own."""
    params = dict(model.named_parameters())
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "non_trainable": sum(p.numel() for p in model.parameters() if not p.requires_grad),
            "buffers": sum(b.numel() for n, b in model.state_dict().items() if n not in params)}


def load_fold_models(run_dir: Path, folds: str = "*") -> tuple:
    """(config, classes, the fold models) of a finished run: config.json, metrics.json and
    fold<folds>/model.pt (every fold by default), loaded with weights_only (a model file from
    elsewhere cannot run code)."""
    paths = sorted(run_dir.glob(f"fold{folds}/model.pt"))
    if not paths or not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir}: no trained run there (needs config.json and fold<i>/model.pt)")
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        fields = {f.name for f in dataclasses.fields(Config)}
        cfg = Config(**{k: v for k, v in saved.items() if k in fields})
        classes = saved["classes"]
        models = [build_model(cfg, len(classes)) for _ in paths]
        for model, path in zip(models, paths):
            model.load_state_dict(load_checked(path))  # half-precision files load into float32
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{run_dir}: damaged or from another version ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]})") from None
    return cfg, classes, [m.to(WORKER.device).eval() for m in models]


# ----------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------

def lr_at(cfg: Config, step: int, total: int) -> float:
    """One-cycle: cosine warm-up from lr/25 over 30% of steps, then cosine decay to ~0."""
    t = step / max(total - 1, 1)
    if t < 0.3:
        return cfg.lr * (0.04 + 0.96 * 0.5 * (1 - math.cos(math.pi * t / 0.3)))
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (t - 0.3) / 0.7))


def make_optimizer(cfg: Config, model: nn.Module):
    """AdamW; weight decay on matrices and conv kernels only, not on norms, biases or embeddings."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # --freeze: the head
    groups = [[p for n, p in named if (p.dim() >= 2 and n not in ("cls", "pos")) == decays]
              for decays in (True, False)]
    return torch.optim.AdamW([{"params": groups[0], "weight_decay": cfg.weight_decay},
                              {"params": groups[1], "weight_decay": 0.0}], lr=cfg.lr)


def n_batches(n: int, batch_size: int) -> int:
    """Batches of near-equal size (240 clips at 32: 8 x 30): no tiny last batch upsets BatchNorm."""
    return max(1, math.ceil(n / batch_size))


def train_step(model, opt, wave, target, cfg, lr: float, lengths=None, scale: float = 1.0,
               weight=None):
    """One AdamW step at learning rate lr on wave (B, S), soft targets (B, K), with the mean loss
    (each class weighted by weight (K,) where given) multiplied by scale: (loss, logits (B, K))."""
    for group in opt.param_groups:
        group["lr"] = lr
    # bf16 autocast runs matmuls and convs in bfloat16 (norms, softmax and the loss stay float32)
    with torch.autocast(wave.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        logits = model(wave, lengths)
    loss = F.cross_entropy(logits.float(), target, weight=weight,
                           label_smoothing=cfg.label_smoothing)
    opt.zero_grad(set_to_none=True)
    (loss * scale if scale != 1 else loss).backward()
    opt.step()
    return loss.item(), logits.detach()


def augmented_batches(clips: Clips, labels, idx, cfg, n_classes, order, part=None):
    """One pass over idx in the random order drawn from the generator `order` (the same in every
    process), a window of each clip (a random crop of a longer one), augmented: (the batch's
    size, wave (b, S), targets (b, K), lengths (b,) or None) of this process's share b of each
    batch. part = (rank, world) to take a share as another."""
    rank, world = part or (WORKER.rank, WORKER.world)
    perm = torch.from_numpy(idx)[torch.randperm(len(idx), generator=order)]
    for chunk in perm.tensor_split(n_batches(len(idx), cfg.batch_size)):
        share = chunk[rank::world]  # (b,)
        wave, n = clips.crops(share)
        wave, target, n = augment(wave.to(WORKER.device), labels[share].to(WORKER.device),
                                  n_classes, cfg, None if n is None else n.to(WORKER.device))
        yield len(chunk), wave, target, n


def train_epoch(model, opt, clips: Clips, labels, idx, cfg, n_classes, step, total, order,
                weight=None):
    """One pass over idx, each process training on its share of every batch, the loss weighted
    by class where weight (K,) is given. -> (mean loss, accuracy against the dominant target)."""
    model.train()
    for m in model.modules():  # --freeze: frozen layers keep their BatchNorm statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.weight.requires_grad:
            m.eval()
    loss_sum = correct = 0.0
    for size, wave, target, n in augmented_batches(clips, labels, idx, cfg, n_classes, order):
        # DDP averages the processes' gradients: weighting each share by its size makes that
        # the gradient of the whole batch's mean loss, as in one process
        loss, logits = train_step(model, opt, wave, target, cfg, lr_at(cfg, step, total), n,
                                  scale=len(wave) * WORKER.world / size, weight=weight)
        step += 1
        loss_sum += loss * len(wave)
        correct += (logits.argmax(1) == target.argmax(1)).sum().item()
    loss_sum, correct = all_sum(loss_sum, correct)
    return loss_sum / len(idx), correct / len(idx)


@torch.no_grad()
def predict(model, waves, lengths=None, precision: str = "fp32", batch_size=32):
    """Class probabilities (N, K) in eval mode, each process predicting every world-th clip.
    bf16 runs the model as the training steps do; batches of 32 keep the stem's output in cache."""
    model = getattr(model, "module", model)  # not through DDP, which would sync buffers each call
    model.eval()
    share = torch.arange(WORKER.rank, len(waves), WORKER.world)
    probs = []
    with torch.autocast(WORKER.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for idx in share.split(batch_size):
            n = None if lengths is None else lengths[idx].to(WORKER.device)
            probs.append(model(waves[idx].to(WORKER.device), n).float().softmax(1).cpu())  # (b, K)
    return gather_rows(torch.cat(probs) if probs else None)


def predict_windows(model, clips: Clips, rows: list, precision: str = "fp32", block: int = 256):
    """Class probabilities (W, K) of the windows rows ((clip, offset) pairs), read a block at a
    time so that a long recording never sits in memory as floats."""
    return torch.cat([predict(model, *clips.read(rows[first:first + block]), precision=precision)
                      for first in range(0, len(rows), block)])


def predict_clips(model, clips: Clips, idx, precision: str = "fp32"):
    """Class probabilities (N, K) of the clips idx, each the mean over its windows (one window
    for a clip no longer than the model's input)."""
    rows, owner = clips.windows(torch.as_tensor(idx), clips.n // 2)  # the windows, their clip
    probs = predict_windows(model, clips, rows, precision)  # (W, K)
    sums = torch.zeros(len(idx), probs.shape[1], dtype=probs.dtype).index_add_(0, owner, probs)
    return sums / torch.bincount(owner, minlength=len(idx))[:, None]


def evaluate(model, clips: Clips, idx, labels, precision: str = "fp32"):
    """(loss, accuracy, probs) on the clips idx without augmentation."""
    probs = predict_clips(model, clips, idx, precision)
    labels = labels[idx].cpu()
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    return loss, (probs.argmax(1) == labels).float().mean().item(), probs


def result_settings(cfg: Config) -> dict:
    """The settings that change what a run computes; a resumed run must match them."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in REPORTING_FIELDS}


def differences(saved: dict, cfg: Config) -> str:
    """Settings in which cfg differs from a saved run's, as flags ('' when none)."""
    return ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}"
                     for k, v in result_settings(cfg).items() if saved.get(k) != v)


def load_state(path: Path, cfg: Config):
    """The saved fold state, or None when absent; damaged or foreign state is reported, not used."""
    if not path.is_file():
        return None
    state = load_checked(path)
    changed = differences(state.get("settings", {}), cfg)
    if changed:
        raise UserError(f"{path}: saved with other settings ({changed}); rerun with --restart")
    return state


def class_weights(labels, n_classes: int, cfg: Config):
    """Each class's weight in the loss (K,), the square root of its inverse frequency, averaging
    1 over the clips, when --balance is on and the largest class has more than twice the clips
    of the smallest; else None. The full inverse lets a rare class's few clips pull too hard."""
    counts = np.bincount(np.asarray(labels), minlength=n_classes)
    present = counts[counts > 0]
    if not cfg.balance or present.max() <= 2 * present.min():
        return None
    w = 1 / np.sqrt(np.maximum(counts, 1))
    return torch.tensor(w * len(labels) / (w * counts).sum(), dtype=torch.float32)


def limit_per_class(idx: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most n clips of each class of idx, a seeded draw (--per-class); all of them for n = 0."""
    if not n:
        return idx
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(idx[labels[idx] == c])[:n] for c in np.unique(labels[idx])]
    return np.sort(np.concatenate(kept))


def init_parts(source_arch: str, arch: str) -> tuple:
    """The parameter names --init carries: the front end, and a transformer's encoder from one."""
    encoder = ("cls", "pos", "blocks.", "ln.") if source_arch == arch == "transformer" else ()
    return ("front.",) + encoder


def init_from(model, cfg: Config, say: bool = False):
    """--init: the front end (and encoder) of the first fold model of a finished run or a shipped
    model, which must have read its audio as this run does; --freeze fixes those weights. say:
    print what was carried over."""
    source, _, (trained,) = load_fold_models(Path(cfg.init).expanduser(), folds="1")
    differ = [f"--{k.replace('_', '-')} {getattr(source, k)}" for k in
              ("sample_rate", "clip_seconds", "features", "dim")
              if getattr(source, k) != getattr(cfg, k)]
    if differ:
        raise UserError(f"--init {cfg.init}: its model was trained with {', '.join(differ)}; pass "
                        "the same, so that it meets audio prepared as in its training")
    parts, own = init_parts(source.arch, cfg.arch), model.state_dict()
    fits = {k: v for k, v in trained.state_dict().items()  # a deeper source's extra blocks stay
            if k.startswith(parts) and k in own and own[k].shape == v.shape}
    model.load_state_dict(fits, strict=False)
    for name, p in model.named_parameters():
        p.requires_grad_(not (cfg.freeze and name.startswith(parts)))
    if say:
        what = "front end and encoder" if len(parts) > 1 else "front end"
        print(f"--init {cfg.init}: the {what} of its fold-1 {source.arch}"
              f"{' (frozen)' if cfg.freeze else ''}; a new head")


def start_fold(cfg: Config, n_classes: int, fold: int, state_path: Path) -> tuple:
    """A fold's model, optimiser, clip order (a generator) and state, seeded with seed + fold, or
    resumed from state_path where an earlier run saved it: (model, opt, order, state)."""
    torch.manual_seed(cfg.seed + fold)
    model = build_model(cfg, n_classes)
    if cfg.init:
        init_from(model, cfg)
    model = model.to(WORKER.device)
    if WORKER.world > 1 and WORKER.device.type == "cuda":  # statistics of the whole batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = make_optimizer(cfg, model)
    order = torch.Generator().manual_seed(cfg.seed + fold)  # clip order, the same in every process
    if WORKER.rank:  # rank 0 draws what one process would; the others their own augmentation
        torch.manual_seed(cfg.seed + fold + 1000 * WORKER.rank)
    state = load_state(state_path, cfg)
    if state is None:
        return model, opt, order, {"epoch": 0, "history": [], "best": None,
                                   "settings": result_settings(cfg)}
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    order.set_state(state["order"])
    set_rng_states(state["rng"], str(state_path))
    print(f"fold {fold}: resuming after epoch {state['epoch']}")
    return model, opt, order, state


def end_epoch(state: dict, row: dict, model, opt, order):
    """Record an epoch in the fold's state: its history row, the weights when it is the best by
    validation so far (highest accuracy, ties to the lower loss), and what resuming needs."""
    state["history"].append(row)
    best = state["best"]
    if best is None or (row["val_acc"], -row["val_loss"]) > (best["val_acc"], -best["val_loss"]):
        weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        state["best"] = {"epoch": row["epoch"], "val_acc": row["val_acc"],
                         "val_loss": row["val_loss"], "model": weights}
    state.update(epoch=row["epoch"], model=model.state_dict(), opt=opt.state_dict(),
                 order=order.get_state(), rng=rng_states())


def tested_model(cfg: Config, model, state: dict) -> tuple:
    """The model a fold tests and saves, chosen on validation only: (model, its epoch). --select
    final: the last epoch's, as trained; best: the best epoch's weights."""
    if cfg.select == "final":
        return model, cfg.epochs
    model.load_state_dict(state["best"]["model"])
    return model, state["best"]["epoch"]


def train_fold(cfg, clips: Clips, labels, split, fold, fold_dir: Path, n_classes, tracker,
               progress):
    """Train one fold for cfg.epochs, resuming from fold_dir/state.pt. Returns (the tested model,
    its epoch, the history, the last epoch's validation probabilities (N_val, K)).
    Under torchrun every process holds the same model, wrapped in DistributedDataParallel."""
    train_idx, val_idx = split
    train_idx = limit_per_class(train_idx, labels.numpy(), cfg.per_class, cfg.seed + fold)
    weight = class_weights(labels[train_idx], n_classes, cfg)
    weight = None if weight is None else weight.to(WORKER.device)
    state_path = fold_dir / "state.pt"
    model, opt, order, state = start_fold(cfg, n_classes, fold, state_path)
    net = model if WORKER.world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[WORKER.device] if WORKER.device.type == "cuda" else None)
    tracker.start(f"fold{fold}")
    for row in state["history"]:
        tracker.log(row)  # a resumed fold's W&B run still shows every epoch
    steps, final_val = n_batches(len(train_idx), cfg.batch_size), None
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        t0, step = time.time(), (epoch - 1) * steps
        tr_loss, tr_acc = train_epoch(net, opt, clips, labels, train_idx, cfg, n_classes, step,
                                      steps * cfg.epochs, order, weight)
        va_loss, va_acc, final_val = evaluate(model, clips, val_idx, labels, cfg.precision)
        row = {"epoch": epoch, "lr": lr_at(cfg, step, steps * cfg.epochs), "train_loss": tr_loss,
               "train_acc": tr_acc, "val_loss": va_loss, "val_acc": va_acc,
               "seconds": time.time() - t0}
        end_epoch(state, row, model, opt, order)
        save_atomic(state, state_path)
        write_rows(fold_dir / "history.csv", state["history"])
        tracker.log(row)
        progress(fold, row)
    if final_val is None:  # resumed after its last epoch: the saved weights are that epoch's
        final_val = predict_clips(model, clips, val_idx, cfg.precision)
    return *tested_model(cfg, model, state), state["history"], final_val


# ----------------------------------------------------------------------------------------
# evaluation and metrics: everything from the labels and the predicted probabilities
# ----------------------------------------------------------------------------------------

def confusion_matrix(labels, preds, n_classes):
    """Counts with rows = true class, columns = predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(preds)), 1)
    return cm


def roc_curve(scores, positive):
    """One-vs-rest ROC: (fpr, tpr) from (0, 0) to (1, 1); tied scores make one diagonal step."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp, fp = np.cumsum(y)[last_of_tie], np.cumsum(~y)[last_of_tie]
    return np.r_[0, fp] / max(fp[-1], 1), np.r_[0, tp] / max(tp[-1], 1)


def auc(fpr, tpr):
    """Trapezoid area; with ties stepped diagonally it equals the Mann-Whitney U / (n1 n0)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def summarize(labels, probs, classes):
    """Accuracy, per-class precision/recall/F1/AUC, macro F1 and AUC, confusion matrix."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    cm = confusion_matrix(labels, probs.argmax(1), len(classes))
    tp = np.diag(cm).astype(np.float64)
    precision = np.divide(tp, cm.sum(0), out=np.zeros_like(tp), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros_like(tp), where=cm.sum(1) > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(tp), where=both > 0)
    per_class, aucs = {}, []
    for c, name in enumerate(classes):
        pos = labels == c  # AUC is undefined unless both sides occur
        a = auc(*roc_curve(probs[:, c], pos)) if 0 < pos.sum() < len(pos) else None
        aucs += [a] if a is not None else []
        per_class[name] = {"precision": float(precision[c]), "recall": float(recall[c]),
                           "f1": float(f1[c]), "auc": a, "support": int(cm[c].sum())}
    present = cm.sum(1) > 0  # macro F1 over the classes that occur in this set
    return {"n": int(len(labels)), "accuracy": float(tp.sum() / max(len(labels), 1)),
            "macro_f1": float(f1[present].mean()),
            "macro_auc": float(np.mean(aucs)) if aucs else None,
            "per_class": per_class, "confusion": cm.tolist()}


def scored_split(has_test) -> str:
    """Where a configuration's F1, AUC, ROC and confusion are scored: the test fold when one is
    held out, else the last epoch's out-of-fold validation, which nothing chose."""
    return "test" if has_test else "val_final"


def pooled(results, labels, splits, test_idx, split: str):
    """Every fold model's predictions on `split` ("val" or "val_final": each on its own fold, by
    the chosen or the last epoch; "test": the test fold), stacked: (labels (N,), probs (N, K))."""
    probs = torch.cat([r[split] for r in results]).double()
    if split == "test":
        return labels[test_idx].repeat(len(results)), probs
    return labels[np.concatenate([v for _, v in splits])], probs


def gather_metrics(results, labels, splits, test_idx, classes) -> dict:
    """Pooled out-of-fold validation, the fold models on the test fold, and their ensemble."""
    folds = []
    for fold, (res, (_, val_idx)) in enumerate(zip(results, splits), start=1):
        fm = {"fold": fold, "chosen_epoch": res["chosen_epoch"], "seconds": res["seconds"],
              "val": summarize(labels[val_idx], res["val"], classes),
              "val_final": summarize(labels[val_idx], res["val_final"], classes)}
        if res["test"] is not None:
            fm["test"] = summarize(labels[test_idx], res["test"], classes)
        folds.append(fm)
    score = lambda s: summarize(*pooled(results, labels, splits, test_idx, s), classes)  # noqa
    metrics = {"val": score("val"), "val_final": score("val_final"), "test": None,
               "test_mean": None, "test_std": None, "ensemble_test": None, "folds": folds}
    if len(test_idx):
        accs = [fm["test"]["accuracy"] for fm in folds]
        ensemble = torch.stack([r["test"] for r in results]).double().mean(0)  # (N_test, K)
        metrics.update(test=score("test"),
                       test_mean=float(np.mean(accs)), test_std=float(np.std(accs)),
                       ensemble_test=summarize(labels[test_idx], ensemble, classes))
    return metrics


# ----------------------------------------------------------------------------------------
# result files and Weights & Biases
# ----------------------------------------------------------------------------------------

def prediction_rows(fold, split, filenames, idx, labels, probs):
    """Rows of predictions.csv: fold, split, filename, label, pred, one probability per class."""
    return [[fold, split, filenames[i], int(labels[i]), int(p.argmax())] + p.tolist()
            for i, p in zip(idx, probs.double().numpy())]


def roc_curves(labels, probs, n_classes: int) -> list:
    """One-vs-rest (fpr, tpr) of every class, as lists."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    return [[a.tolist() for a in roc_curve(probs[:, c], labels == c)] for c in range(n_classes)]


def write_results(run_dir, results, labels, splits, test_idx, filenames, classes):
    """predictions.csv for every validation (chosen and last epoch) and test prediction; roc.csv
    for the scored split. -> that split's (labels (N,), probs (N, K))."""
    rows = []
    for fold, (res, (_, val_idx)) in enumerate(zip(results, splits), start=1):
        for split in ("val", "val_final"):
            rows += prediction_rows(fold, split, filenames, val_idx, labels, res[split])
        if res["test"] is not None:
            rows += prediction_rows(fold, "test", filenames, test_idx, labels, res["test"])
    header = ["fold", "split", "filename", "label", "pred"] + [f"p_{c}" for c in classes]
    write_csv(run_dir / "predictions.csv", header, rows)
    scored_labels, scored_probs = pooled(results, labels, splits, test_idx,
                                         scored_split(len(test_idx)))
    curves = roc_curves(scored_labels, scored_probs, len(classes))
    write_csv(run_dir / "roc.csv", ["class", "fpr", "tpr"],
              [[name, a, b] for name, (fpr, tpr) in zip(classes, curves) for a, b in zip(fpr, tpr)])
    return scored_labels.numpy(), scored_probs.numpy()


def make_tracker(cfg: Config, run_dir: Path, config: dict, mode: str = "") -> Tracker:
    """The W&B runs of a configuration; under torchrun rank 0 alone logs."""
    mode = (mode or wandb_mode(cfg.wandb)) if WORKER.main else "disabled"
    return Tracker(run_dir, config, mode, cfg.project, cfg.entity)


def log_summary(tracker: Tracker, title: str, labels, probs, classes: list):
    """One set's metrics, confusion matrix and ROC curves to the tracker's current W&B run."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    tracker.summary(title, summarize(labels, probs, classes), list(map(int, labels)),
                    probs.argmax(1).tolist(), classes, roc_curves(labels, probs, len(classes)))


# ----------------------------------------------------------------------------------------
# runs: the run folder, each fold's result, the whole configuration
# ----------------------------------------------------------------------------------------

def clear_run_dir(run_dir: Path):
    """--restart: every file of the earlier run goes but its W&B runs (they may be online too)."""
    for p in sorted(run_dir.rglob("*"), reverse=True):
        if p.is_file() and "wandb" not in p.parts and p.name != ".lock":
            p.unlink()


@contextlib.contextmanager
def run_lock(run_dir: Path, restart: bool = False):
    """Rank 0 holds an exclusive lock on run_dir/.lock while the run lasts, so two runs never
    write one folder; the system drops it when the process ends, however it ends. --restart
    clears the folder once the lock is held."""
    if not WORKER.main:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{run_dir}: another run is using this folder; wait for it, or pass "
                            "--name or --out to run beside it") from None
        if restart:
            clear_run_dir(run_dir)
        yield


def claim_run_dir(cfg: Config, ds: Dataset, run_dir: Path) -> dict:
    """run_dir/config.json, the record of how the run started (kept when it resumes); another
    configuration under the same name is refused. -> the record."""
    model = build_model(cfg, len(ds.classes))
    if cfg.init:
        init_from(model, cfg, say=WORKER.main)
    # what a saved model needs to meet audio as in its training: the classes, sample rate, clip
    # length (one window), window hop and features are here, the code version too
    config = {**dataclasses.asdict(cfg), "name": run_name(cfg), "data": shown_path(ds.root),
              "classes": ds.classes, "window_hop_seconds": cfg.n_samples // 2 / cfg.sample_rate,
              "n_clips": len(ds.table), "versions": versions(), "code": code_version(HERE),
              "processes": WORKER.world, "device_used": str(WORKER.device),
              "params": count_params(model)}
    old = run_dir / "config.json"
    if WORKER.main and not old.is_file():
        write_json(old, config)
    elif WORKER.main:
        try:
            changed = differences(json.loads(old.read_text()), cfg)
        except ValueError:
            changed = "its config.json is damaged"
        if changed:
            raise UserError(f"{run_dir}: holds a run with a different configuration ({changed}); "
                            "pass --name to keep both, or --restart to replace it")
    barrier()  # the other processes look at the folder once rank 0 has cleared and claimed it
    return config


def load_clips_once(ds: Dataset, cfg: Config) -> Clips:
    """load_clips, the cache built by one process per machine while the others wait; on the
    device where it fits."""
    if WORKER.local_rank == 0:
        clips = load_clips(ds.audio_dir, ds.table, cfg)
    barrier()
    if WORKER.local_rank:
        clips = load_clips(ds.audio_dir, ds.table, cfg)
    return Clips(to_device(clips.store), clips.lengths, clips.n)


def fold_result(cfg, run_dir, clips, ds: Dataset, fold, tracker, progress) -> dict:
    """The tested model's probabilities on its validation fold and the test fold; a finished
    fold is read back from fold<i>/result.pt, never retrained."""
    fold_dir = run_dir / f"fold{fold}"
    if WORKER.main:
        fold_dir.mkdir(exist_ok=True)
    if (fold_dir / "result.pt").is_file():
        return load_checked(fold_dir / "result.pt")
    split, test_idx = ds.splits[fold - 1], ds.test_idx
    model, epoch, history, final_val = train_fold(cfg, clips, ds.labels, split, fold, fold_dir,
                                                  len(ds.classes), tracker, progress)
    predict_on = lambda idx: predict_clips(model, clips, idx, cfg.precision)  # noqa: E731
    res = {"chosen_epoch": epoch, "seconds": sum(r["seconds"] for r in history),
           "val_final": final_val, "val": predict_on(split[1]),
           "test": predict_on(test_idx) if len(test_idx) else None}
    scored = scored_split(len(test_idx))
    log_summary(tracker, scored, ds.labels[test_idx if len(test_idx) else split[1]], res[scored],
                ds.classes)
    tracker.finish()
    save_atomic(model.state_dict(), fold_dir / "model.pt")
    save_atomic(res, fold_dir / "result.pt")
    if WORKER.main:
        (fold_dir / "state.pt").unlink(missing_ok=True)  # the result replaces the resumable state
    return res


def print_balance(cfg: Config, ds: Dataset):
    """Whether --balance weights the loss, where the classes are over 2:1 uneven."""
    counts = np.bincount(ds.labels.numpy(), minlength=len(ds.classes))
    if class_weights(ds.labels, len(counts), dataclasses.replace(cfg, balance=True)) is not None:
        how = ("weighted by class, the rarer more (--no-balance: not)" if cfg.balance
               else "not weighted (--no-balance)")
        print(f"uneven classes, {counts.max()} clips against {counts.min()}: the loss is {how}")


def train_folds(cfg: Config, run_dir: Path, config: dict, ds: Dataset) -> dict:
    """Every fold trained (or read back), then the metrics and result files of the configuration."""
    if (run_dir / "metrics.json").is_file():
        print(f"{run_dir}: complete; nothing to do (--restart retrains it)")
        return json.loads((run_dir / "metrics.json").read_text())
    clips = load_clips_once(ds, cfg)
    where = f", {WORKER.world} processes" if WORKER.world > 1 else ""
    print(f"{run_dir}: {cfg.arch} on {len(ds.table)} clips, {len(ds.classes)} classes, test fold "
          f"{cfg.test_fold or 'none'}, {cfg.kfold} validation folds{where} on {WORKER.device.type}")
    print_balance(cfg, ds)
    tracker = make_tracker(cfg, run_dir, config)
    progress = print_progress_factory(cfg.epochs, cfg.kfold)
    results = [fold_result(cfg, run_dir, clips, ds, fold, tracker, progress)
               for fold in range(1, cfg.kfold + 1)]
    labels, splits, test_idx, classes = ds.labels, ds.splits, ds.test_idx, ds.classes
    metrics = gather_metrics(results, labels, splits, test_idx, classes)
    if not WORKER.main:
        return metrics
    # Training seconds summed over the saved epochs, so a resumed run reports the whole cost.
    metrics.update(classes=classes, params=config["params"],
                   seconds=sum(r["seconds"] for r in results))
    scored_labels, scored_probs = write_results(run_dir, results, labels, splits, test_idx,
                                                [layouts.clip_name(r) for r in ds.table], classes)
    write_json(run_dir / "metrics.json", metrics)
    tracker.start("summary")
    log_summary(tracker, scored_split(metrics["test"]), scored_labels, scored_probs, classes)
    tracker.finish()
    print_summary(metrics, cfg.select)
    if tracker.mode == "offline":
        print(f"W&B offline runs: {run_dir / 'wandb'} "
              f"(upload with: wandb sync {run_dir / 'wandb'}/offline-run-*)")
    return metrics


@contextlib.contextmanager
def open_run(cfg: Config):
    """Yields (the checked cfg, its dataset and splits, its run folder, locked)."""
    cfg = prepare(cfg)
    ds = load_dataset(cfg)
    print_dataset(ds, cfg)
    run_dir = Path(cfg.out or "runs") / run_name(cfg)
    with run_lock(run_dir, cfg.restart):
        yield cfg, ds, run_dir


def train(cfg: Config):
    """The experiment: data and splits, the run folder, k fold trainings, metrics, files."""
    with open_run(cfg) as (cfg, ds, run_dir):
        train_folds(cfg, run_dir, claim_run_dir(cfg, ds, run_dir), ds)


# ----------------------------------------------------------------------------------------
# main: the training command, or a tool's
# ----------------------------------------------------------------------------------------

def tool_for(cfg: Config) -> str:
    """The module whose command the flags ask for, or "" for training."""
    asked = {"predict": cfg.predict, "report": cfg.report,
             "tools": cfg.bench or cfg.tune or cfg.lr_find or cfg.lr == "auto"}
    return next((module for module, wanted in asked.items() if wanted), "")


def run_command(cfg: Config, command) -> int:
    """command(cfg) in the processes torchrun started (or this one alone), with a UserError as one
    line on stderr and exit status 2, and an interruption as a line saying what is kept."""
    try:
        start_processes(cfg.device)
        if WORKER.world > 1 and (cfg.report or cfg.bench):
            raise UserError("--report and --bench run in one process: leave out torchrun")
        return command(cfg) or 0
    except (UserError, DeviceError) as e:
        if cfg.debug:
            raise
        print(f"audiotx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the finished epochs are saved; run the same command again to resume",
              file=sys.stderr)
        return 130
    finally:
        stop_processes()


def main(argv=None) -> int:
    """Train, or run the command of the tool the flags ask for: the tool is imported here alone,
    so that it can import this module."""
    cfg = parse_args(argv)
    tool = tool_for(cfg)
    return run_command(cfg, importlib.import_module(tool).command if tool else train)


if __name__ == "__main__":
    import audiotx  # as the module the tools import, so one UserError: not a copy named __main__
    sys.exit(audiotx.main())
