"""
audiotx: environmental sound classification on raw waveforms, from scratch.

Two architectures share one 1D-convolution front end over the waveform:
  cnn          front end -> mean+max pooling over time -> MLP classifier
  transformer  front end -> <cls> token + positional embedding -> pre-norm
               self-attention blocks written from plain tensor ops -> MLP head

    python audiotx.py --arch transformer --heads 2 --kfold 4   # one configuration
    bash run.sh                                                 # every configuration
    pytest test_audiotx.py                                      # the tests
    python audiotx.py --predict my_recording.wav                # classify with the shipped model

Everything a run measures is written under runs/<name>/ (config.json, metrics.json,
predictions.csv, roc.csv, fold<i>/history.csv) and logged to Weights & Biases (offline unless
you are logged in). Headline, 2 CPU cores, 100 epochs: `python audiotx.py --arch cnn --kfold 4`
classifies the held-out official fold 1 of ESC-10 at 0.838 as an ensemble of its 4 fold models
(results/cnn-test1-k4/, from `OUT=results bash run.sh`).
"""

import argparse
import base64
import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import http.client
import inspect
import io
import json
import math
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
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
import scipy.stats
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
SHIPPED_MODEL = HERE / "models" / "esc10-cnn-test1-k4"  # what --predict uses without --run
DEFAULT_DATA = [HERE.parent / "shared" / "data" / "ESC-10", HERE / "data" / "ESC-50"]
ESC50_URL = "https://github.com/karolpiczak/ESC-50/archive/refs/heads/master.zip"  # $AUDIOTX_ESC50_URL wins
ESC50_MB = 600  # the archive's size, for the line that says what a first run fetches
ESC_NAME = re.compile(r"^(\d+)-(\w+)-([A-Za-z]+)-(\d+)\.wav$")  # {fold}-{src}-{take}-{target}.wav
CACHE_VERSION = 2  # bump when the cached waveform format changes (2: clip lengths beside the waves)
ESC10 = {0: "dog", 1: "rooster", 10: "rain", 11: "sea_waves", 12: "crackling_fire", 20: "crying_baby",
         21: "sneezing", 38: "clock_tick", 40: "helicopter", 41: "chainsaw"}  # ESC-50 target -> name


class UserError(Exception):
    """A problem with the user's data or flags: reported in one line, exit status 2."""


# ----------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------


@dataclass
class Config:
    # model
    arch: str = "transformer"        # cnn | transformer
    heads: int = 2                   # attention heads: 1 | 2 | 4 (must divide dim)
    depth: int = 2                   # attention blocks (>= 2)
    dim: int = 128                   # channels out of the front end = transformer width
    dropout: float = 0.1             # in attention, MLPs and heads
    # data
    data: str = ""                   # ESC-50-layout folder; else $AUDIOTX_DATA, else ../shared/data/ESC-10
    dataset: str = "auto"            # auto | esc | urbansound8k: the folder's layout; auto = by its table's name
    subset: str = "esc10"            # esc10 | esc50 (which rows of meta/esc50.csv)
    sample_rate: int = 16000         # Hz after resampling
    features: str = "logwave"        # wave | logwave (the stem's output log-compressed) | logmel (64 mel bands)
    clip_seconds: float = 5.0        # clips are padded or cropped to this length
    # splits
    test_fold: int = 1               # official fold held out as the test set; 0 = none
    kfold: int = 4                   # validation folds over the remaining clips
    # training
    epochs: int = 100                # passes over the training folds
    batch_size: int = 32             # clips per step
    lr: float = 2e-3                 # peak learning rate; auto = the LR range test's suggestion (--lr-find)
    weight_decay: float = 0.05       # AdamW, on weight matrices only
    label_smoothing: float = 0.1     # share of each target spread over all classes
    mixup: float = 0.4               # Beta(a, a) mixing of clip pairs; 0 = off
    shift: bool = True               # random circular time shift of each training clip
    gain_db: float = 6.0             # random gain in [-gain_db, +gain_db] dB
    stretch: float = 0.0             # each batch played at a random speed in [1 - s, 1 + s] (time and pitch); 0 = off
    select: str = "best"             # best | final: each fold's tested and saved model, its best validation epoch or its last
    seed: int = 0                    # fold i is seeded with seed + i
    threads: int = 0                 # torch CPU threads; 0 = torch's default
    device: str = "auto"             # auto | cpu | cuda | mps; auto = cuda, else mps, else cpu
    precision: str = "auto"          # auto | fp32 | bf16 (--amp): bfloat16 autocast; auto = bf16 where the device has it
    # output
    out: str = "runs"                # results go to out/name/
    name: str = ""                   # default: derived from the configuration
    restart: bool = False            # discard saved state and results under out/name/
    wandb: str = "auto"              # auto | online | offline | disabled ($WANDB_MODE wins)
    project: str = "audiotx"         # W&B project
    entity: str = ""                 # W&B entity (team or user)
    debug: bool = False              # show tracebacks instead of one-line errors
    report: str = ""                 # write DIR/REPORT.md from the finished runs in DIR, train nothing
    tune: int = 0                    # tune --arch with N random settings (successive halving); 0 = train
    hparams: str = ""                # JSON file of settings (e.g. a tuning's best.json); flags still win
    bench: bool = False              # time every architecture on random clips, write out/bench.json, train nothing
    lr_find: bool = False            # LR range test on split 1's training clips: lr_find.csv/.svg, the suggested --lr
    predict: list = dataclasses.field(default_factory=list)  # WAV files or folders to classify, train nothing
    run: str = ""                    # --predict with this run's fold models; default: the model in models/
    json: bool = False               # --predict: one JSON object per file on stdout


# Fields that change where or how a run is reported, not what it computes: a resumed run may differ in them.
REPORTING_FIELDS = {"data", "dataset", "device", "out", "name", "restart", "wandb", "project", "entity", "debug",
                    "threads", "report", "hparams", "bench", "tune", "lr_find", "predict", "run", "json"}  # hparams: its settings are in the others
CHOICES = {"arch": ["cnn", "transformer"], "features": ["wave", "logwave", "logmel"], "subset": ["esc10", "esc50"],
           "dataset": ["auto", "esc", "urbansound8k"], "device": ["auto", "cpu", "cuda", "mps"],
           "precision": ["auto", "fp32", "bf16"], "select": ["best", "final"],
           "wandb": ["auto", "online", "offline", "disabled"]}


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like every other bad input
        self.exit(2, f"audiotx: error: {message}\n")


def float_or_auto(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def load_hparams(path: str, parser) -> dict:
    """Settings from a JSON file: a flat {field: value} or a tuning's best.json ({"hparams": {...}})."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        parser.error(f"--hparams {path}: cannot read it as JSON ({e})")
    d = d.get("hparams", d)
    unknown = set(d) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        parser.error(f"--hparams {path}: unknown setting(s) {', '.join(sorted(unknown))}")
    return d


def parse_args(argv=None) -> Config:
    """Build the command line from Config's fields: --test-fold sets test_fold."""
    parser = OneLineParser(description=__doc__.split("\n\n")[0].strip())
    # --help shows each field's trailing comment, so the comment in Config is the one description
    helps = dict(re.findall(r"^\s+(\w+): \w+ = .*?#\s*(.*)$", inspect.getsource(Config), re.M))
    for f in dataclasses.fields(Config):
        flag, helptext = "--" + f.name.replace("_", "-"), helps.get(f.name, "") + " (default: %(default)s)"
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helptext)
        elif f.type is list:
            parser.add_argument(flag, nargs="+", default=[], metavar="PATH", help=helptext)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            kind = float_or_auto if f.name == "lr" else kind
            parser.add_argument(flag, type=kind, default=f.default, choices=CHOICES.get(f.name), help=helptext)
    parser.add_argument("--amp", dest="precision", action="store_const", const="bf16",
                        help="mixed precision: the same as --precision bf16")
    args = parser.parse_args(argv)
    if args.hparams:  # the file's settings become defaults, so flags given on the command line still win
        parser.set_defaults(**load_hparams(args.hparams, parser))
        args = parser.parse_args(argv)
    return Config(**vars(args))


def check_config(cfg: Config):
    """Refuse flag combinations that cannot work, naming the flag."""
    positive = ["dim", "depth", "heads", "epochs", "batch_size", "sample_rate"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.clip_seconds <= 0 or (cfg.lr != "auto" and cfg.lr <= 0):
        raise UserError("--clip-seconds and --lr must be positive")
    if cfg.arch == "transformer" and cfg.depth < 2:
        raise UserError(f"--depth must be at least 2 for the transformer, got {cfg.depth}")
    if cfg.dim % cfg.heads:
        raise UserError(f"--heads {cfg.heads} does not divide --dim {cfg.dim}")
    if cfg.dim % 4:
        raise UserError(f"--dim must be a multiple of 4 (the front end widens dim/4 -> dim), got {cfg.dim}")
    if cfg.tune < 0 or (cfg.tune and not cfg.test_fold):
        raise UserError("--tune needs a held-out --test-fold (the best set is later tested on it) and N >= 0")
    if cfg.kfold < 2:
        raise UserError(f"--kfold must be at least 2, got {cfg.kfold}")
    if cfg.bench and cfg.lr == "auto":
        raise UserError("--lr auto needs the training clips; --bench times random ones (give --lr a number)")
    if not 0 <= cfg.dropout < 1 or cfg.weight_decay < 0 or cfg.mixup < 0 or cfg.gain_db < 0:
        raise UserError("--dropout must be in [0, 1); --weight-decay, --mixup, --gain-db must be >= 0")
    if not 0 <= cfg.stretch < 0.5:
        raise UserError(f"--stretch must be in [0, 0.5), got {cfg.stretch}")
    if cfg.batch_size < 2 * WORKER.world:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch: with {WORKER.world} processes "
                        f"it must be at least {2 * WORKER.world} (BatchNorm needs 2 clips in each process's share)")


def resolve_precision(cfg: Config) -> Config:
    """--precision auto -> bf16 on CUDA GPUs with bfloat16, and on CPUs where oneDNN has it natively
    (AVX512-BF16 or AMX); else fp32, since emulated bf16 is slower than fp32.
    config.json records the choice."""
    if cfg.precision != "auto":
        return cfg
    if WORKER.device.type == "cuda":
        return dataclasses.replace(cfg, precision="bf16" if torch.cuda.is_bf16_supported() else "fp32")
    try:
        native = WORKER.device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return dataclasses.replace(cfg, precision="bf16" if native else "fp32")


def run_name(cfg: Config) -> str:
    heads = f"-h{cfg.heads}" if cfg.arch == "transformer" else ""
    return cfg.name or (f"tune-{cfg.arch}" if cfg.tune else f"{cfg.arch}{heads}-test{cfg.test_fold}-k{cfg.kfold}")


# ----------------------------------------------------------------------------------------
# processes and devices: one device decision, and torchrun's ranks
# ----------------------------------------------------------------------------------------

@dataclass
class Worker:
    """This process's place among torchrun's (rank 0 of 1 without torchrun) and its device."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


WORKER = Worker()  # filled in by start_processes(); what shards, gathers or writes files reads it


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """--device auto -> cuda, else mps, else cpu. Asking is safe on any machine: nothing CUDA
    initialises unless a GPU is there."""
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    name = ("cuda" if cuda else "mps" if mps else "cpu") if name == "auto" else name
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise UserError(f"--device {name}: no such device on this machine (torch {torch.__version__})")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def start_processes(cfg: Config):
    """One process on cfg.device, or under torchrun (WORLD_SIZE > 1) one of many: GPU
    LOCAL_RANK of this machine with NCCL, or a CPU share with gloo. Only rank 0 prints."""
    world, local_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    WORKER.rank, WORKER.world, WORKER.local_rank = int(os.environ.get("RANK", "0")), world, local_rank
    WORKER.device = pick_device(cfg.device, local_rank)
    if world == 1:
        return
    if WORKER.device.type == "mps":
        raise UserError("torchrun with --device mps: PyTorch has no process group for MPS; use --device cpu")
    if WORKER.device.type == "cuda":
        torch.cuda.set_device(WORKER.device)
    dist.init_process_group("nccl" if WORKER.device.type == "cuda" else "gloo")
    if not WORKER.main:
        sys.stdout = open(os.devnull, "w")  # one copy of the progress lines; errors still reach stderr


def stop_processes():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if WORKER.world > 1:
        dist.barrier()


def from_main(obj):
    """Rank 0's obj on every process."""
    if WORKER.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(*values) -> list:
    """Each value summed over the processes."""
    if WORKER.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=WORKER.device if WORKER.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def gather_rows(part):
    """Process r holds rows r, r + world, ... of a tensor (None when it holds none): the whole
    tensor, in order, on every process."""
    if WORKER.world == 1:
        return part
    parts = [None] * WORKER.world
    dist.all_gather_object(parts, None if part is None else part.cpu())
    held = [p for p in parts if p is not None]
    out = torch.empty(sum(len(p) for p in held), *held[0].shape[1:], dtype=held[0].dtype)
    for r, p in enumerate(parts):
        if p is not None:
            out[r::WORKER.world] = p
    return out


def to_device(t):
    """t on the device when it fits in half the free memory, else left on the CPU and moved a
    batch at a time (UrbanSound8K at 16 kHz is 2.2 GB)."""
    if t is None or WORKER.device.type == "cpu":
        return t
    free = torch.cuda.mem_get_info(WORKER.device)[0] if WORKER.device.type == "cuda" else 2 * t.nbytes + 1
    return t.to(WORKER.device) if t.nbytes < free / 2 else t


# ----------------------------------------------------------------------------------------
# files: atomic writes, csv, json, checkpoints, where the code and data came from
# ----------------------------------------------------------------------------------------

def write_text(path: Path, text: str):
    if not WORKER.main:
        return
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: Path, header, rows):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([f"{v:.17g}" if isinstance(v, float) else v for v in row] for row in rows)
    write_text(path, buf.getvalue())


def read_csv(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def save_atomic(obj, path: Path):
    """torch.save to a temporary name, then rename: a reader never sees half a file. Under
    torchrun only rank 0 writes files (here and in write_text)."""
    if not WORKER.main:
        return
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checked(path: Path):
    """torch.load, with a damaged or truncated file reported in one line instead of half-loaded."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise UserError(f"{path}: damaged ({type(e).__name__}); delete it, or rerun with --restart") from e


def shown_path(path: Path) -> str:
    """A path as config.json records it: under ~, else relative to the working folder, so no
    file the project commits holds this machine's absolute paths."""
    path, home = Path(path).resolve(), Path.home().resolve()
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else os.path.relpath(path)


def code_version() -> dict:
    """The checkout's git commit and whether its tracked files had changes; {} outside git."""
    def git(*args):
        return subprocess.run(["git", "-C", str(HERE), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "-uno"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__}


# ----------------------------------------------------------------------------------------
# data: reading wavs, the metadata table, fetching, caching, folds
# ----------------------------------------------------------------------------------------

def read_wav(path):
    """scipy's (sample rate, samples (S,) or (S, channels)); a broken or truncated file is a UserError."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rate, data = scipy.io.wavfile.read(path)
        except OSError as e:  # absent, a folder, no permission
            raise UserError(f"{path}: cannot be read ({e.strerror})") from e
        except Exception as e:  # scipy raises ValueError, EOFError or struct errors for broken files
            raise UserError(f"{path}: not a readable PCM/float WAV file ({str(e).splitlines()[0]})") from e
    if any("EOF" in str(w.message) for w in caught):  # scipy reads a truncated file with only a warning
        raise UserError(f"{path}: truncated (the data chunk is shorter than its header says)")
    return rate, data


def to_mono_float(path, data):
    """Integer or float samples (S,) or (S, channels) -> float32 (S,) in [-1, 1]."""
    scale = {np.dtype(np.int16): 2.0 ** 15, np.dtype(np.int32): 2.0 ** 31,
             np.dtype(np.int64): 2.0 ** 63}
    data = data.astype(data.dtype.newbyteorder("="))  # RIFX files hold big-endian samples
    if data.dtype == np.uint8:
        wave = (data.astype(np.float64) - 128.0) / 128.0
    elif data.dtype in scale:  # 24- and 36- to 64-bit samples arrive left-justified, so these fit
        wave = data.astype(np.float64) / scale[data.dtype]
    elif data.dtype in (np.float32, np.float64):
        wave = data.astype(np.float64)
    else:
        raise UserError(f"{path}: unsupported sample type {data.dtype}")
    if wave.ndim == 2:
        wave = wave.mean(axis=1)  # (S, channels) -> (S,)
    if wave.size == 0:
        raise UserError(f"{path}: the file holds no samples")
    if not np.isfinite(wave).all():
        raise UserError(f"{path}: the audio holds NaN or infinite samples")
    return wave.astype(np.float32)


def load_wav(path):
    """Read a PCM or float WAV; return (float32 mono wave in [-1, 1], sample rate)."""
    rate, data = read_wav(path)
    return to_mono_float(path, data), int(rate)


def read_meta(path: Path) -> list:
    """A metadata table as (line number, {column: value}), names and values stripped, read the same
    after a spreadsheet saved it: a byte-order mark, Windows line ends, quoted fields, ';' as the
    separator, empty rows, columns in another order or added."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:  # a spreadsheet's own 8-bit encoding; the columns we read are ASCII
        text = raw.decode("cp1252", errors="replace")
    first = text.split("\n", 1)[0]
    separator = ";" if first.count(";") > first.count(",") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator)
    header = [h.strip() for h in next(reader, [])]
    return [(reader.line_num, dict(zip(header, [c.strip() for c in cells] + [""] * len(header))))
            for cells in reader if any(c.strip() for c in cells)]


def check_columns(meta: Path, numbered: list, needed: set):
    missing = needed - set(numbered[0][1] if numbered else {})
    if missing:
        raise UserError(f"{meta}: missing column(s) {', '.join(sorted(missing))}")


def table_row(data_dir: Path, meta: Path, line: int, filename: str, fold: str, category: str,
              src: str, columns=("filename", "category")) -> dict:
    """One clip of the table; columns name the file's and the class's columns for the errors."""
    if not (data_dir / "audio" / filename).is_file():
        raise UserError(f"{meta} row {line}, column {columns[0]}: audio/{filename} does not exist")
    if not category:
        raise UserError(f"{meta} row {line}, column {columns[1]}: empty")
    if not fold.isdigit() or int(fold) < 1:
        raise UserError(f"{meta} row {line}, column fold: {fold!r} is not a positive whole number")
    return {"filename": filename, "fold": int(fold), "category": category, "src_file": src}


def checked_table(meta: Path, table: list, what: str) -> list:
    if len({r["category"] for r in table}) < 2:
        raise UserError(f"{meta}: fewer than two classes in the {what} rows")
    return sorted(table, key=lambda r: r["filename"])


def rows_from_names(data_dir: Path, meta: Path) -> list:
    """Without meta/esc50.csv, the table from ESC-50 file names: {fold}-{src}-{take}-{target}.wav."""
    names = sorted(p.name for p in (data_dir / "audio").glob("*.wav"))
    bad = [n for n in names if not ESC_NAME.match(n)]
    if not names or bad:
        raise UserError(f"{meta}: missing, and {'audio/' + bad[0] if bad else 'audio/ holds no .wav file'} "
                        "does not follow ESC-50's {fold}-{src}-{take}-{target}.wav names to stand in for it")
    print(f"warning: {meta} is missing; folds, sources and classes come from the file names")
    parts = [ESC_NAME.match(n).groups() for n in names]  # (fold, src, take, target)
    rows = [{"filename": n, "fold": p[0], "src_file": p[1], "category": ESC10.get(int(p[3]), f"target{int(p[3]):02d}")}
            for n, p in zip(names, parts)]
    if len({p[3] for p in parts}) > len(ESC10):  # a full ESC-50 folder: mark its ESC-10 rows
        for row, p in zip(rows, parts):
            row["esc10"] = str(int(p[3]) in ESC10)
    return rows


def read_esc(data_dir: Path, subset: str) -> list:
    """Rows of meta/esc50.csv (or ESC-50 file names without it): audio/<filename>."""
    meta = data_dir / "meta" / "esc50.csv"
    numbered = read_meta(meta) if meta.is_file() else list(enumerate(rows_from_names(data_dir, meta), 2))
    check_columns(meta, numbered, {"filename", "fold", "category"})
    if subset == "esc10" and "esc10" in numbered[0][1]:
        numbered = [(line, r) for line, r in numbered if r["esc10"].lower() == "true"]
    table = []
    for line, r in numbered:
        match = ESC_NAME.match(r["filename"])
        src = r.get("src_file") or (match.group(2) if match else r["filename"])
        table.append(table_row(data_dir, meta, line, r["filename"], r["fold"], r["category"], src))
    return checked_table(meta, table, subset)


def read_urbansound(data_dir: Path, meta: Path) -> list:
    """Rows of metadata/UrbanSound8K.csv: audio/fold<k>/<slice_file_name>, with the freesound
    recording (fsID) a slice was cut from as its source, so no recording crosses a split."""
    if not meta.is_file():
        raise UserError(f"{meta}: missing (--dataset urbansound8k expects it and audio/fold<k>/)")
    numbered = read_meta(meta)
    check_columns(meta, numbered, {"slice_file_name", "fsID", "fold", "class"})
    table = [table_row(data_dir, meta, line, f"fold{r['fold']}/{r['slice_file_name']}", r["fold"],
                       r["class"], r["fsID"], ("slice_file_name", "class")) for line, r in numbered]
    return checked_table(meta, table, "UrbanSound8K")


def read_table(data_dir: Path, subset: str, dataset: str = "auto") -> list:
    """Rows (filename under audio/, fold, category, src_file) of the folder's table, sorted by filename."""
    us8k = data_dir / "metadata" / "UrbanSound8K.csv"
    if dataset == "urbansound8k" or (dataset == "auto" and us8k.is_file()):
        return read_urbansound(data_dir, us8k)
    return read_esc(data_dir, subset)


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "audiotx"


BY_HAND = ("download ESC-50 yourself (the README says how) and pass --data DIR or ZIP, "
           "or set AUDIOTX_DATA")


def copy_with_progress(source, sink, done: int, total: int):
    """Copy in 1 MB blocks with a progress line: in place on a terminal, every 5 s in a log."""
    t0 = last = time.time()
    start, every = done, 0.2 if sys.stdout.isatty() else 5.0
    while block := source.read1(1 << 20):  # what has arrived; b"" when the server hangs up early
        sink.write(block)
        done += len(block)
        if time.time() - last >= every or done == total:
            last, rate = time.time(), (done - start) / max(time.time() - t0, 1e-9)
            left = f", {(total - done) / max(rate, 1) / 60:.1f} min left" if total else ""
            shown = f" of {total / 1e6:.0f} MB ({done / total:.0%})" if total else " MB"
            end = "\r" if sys.stdout.isatty() else "\n"
            print(f"fetched {done / 1e6:.0f}{shown} at {rate / 1e6:.1f} MB/s{left}   ", end=end,
                  flush=True)
    if sys.stdout.isatty():
        print()


def download(url: str, path: Path, tries: int = 4):
    """url -> path through path.part, resuming a cut transfer with an HTTP Range request where the
    server allows it (else from the start), tries times at most."""
    part, why = path.with_name(path.name + ".part"), ""
    for attempt in range(1, tries + 1):
        have = part.stat().st_size if part.is_file() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                resumed = response.status == 206
                total = int(response.headers.get("Content-Length") or 0) + (have if resumed else 0)
                with open(part, "ab" if resumed else "wb") as f:
                    copy_with_progress(response, f, have if resumed else 0, total)
            if not total or part.stat().st_size == total:
                os.replace(part, path)
                return
            why = f"the connection closed at {part.stat().st_size:,} of {total:,} bytes"
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the saved part is no prefix of what the server holds now
                part.unlink()
                continue
            raise UserError(f"could not fetch {url}: HTTP {e.code} {e.reason}; {BY_HAND}") from None
        except (OSError, http.client.HTTPException) as e:  # no network, DNS, a dropped connection
            why = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        again = "; trying again" if attempt < tries else ""
        print(f"\nfetch {attempt}/{tries} failed ({why}){again}")
        time.sleep(attempt if attempt < tries else 0)
    raise UserError(f"could not fetch {url} ({why}); run again to resume, or {BY_HAND}")


def unpack_checked(archive: Path, dest: Path):
    """Check every member's CRC, unpack into a temporary folder, check that every clip the table
    lists is a readable WAV, then rename the dataset's folder into place: dest, when it exists,
    is always whole."""
    try:
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if name.startswith(("/", "\\")) or ".." in Path(name).parts or ":" in name:
                    raise UserError(f"{archive}: member {name!r} would land outside the folder")
            bad = z.testzip()
            if bad:
                raise UserError(f"{archive}: member {bad} fails its CRC check (a damaged download)")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
            z.extractall(tmp)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise UserError(f"{archive}: not a whole zip archive ({e})") from None
    try:
        root = min((p.parent for p in tmp.rglob("audio") if p.is_dir()), key=lambda p: len(p.parts),
                   default=None)
        if root is None:
            raise UserError(f"{archive}: holds no audio/ folder (expected ESC-50's layout)")
        for r in read_table(root, "esc50"):  # every row, not only ESC-10's
            read_wav(root / "audio" / r["filename"])
        os.replace(root, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_esc50(dest: Path) -> Path:
    """Download ESC-50's archive into the cache and unpack it to dest; one process at a time."""
    url = os.environ.get("AUDIOTX_ESC50_URL") or ESC50_URL
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / "fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits here, then finds the folder
        if (dest / "audio").is_dir():
            return dest
        print(f"no dataset found: fetching ESC-50 (about {ESC50_MB} MB) from {url} into {dest}; "
              "to use a copy you have, pass --data DIR or ZIP or set AUDIOTX_DATA", flush=True)
        archive = dest.parent / "ESC-50.zip"
        download(url, archive)
        try:
            unpack_checked(archive, dest)
        except UserError as e:
            archive.unlink()  # never trusted again
            raise UserError(f"{e}; deleted it, so the next run fetches it again") from None
        archive.unlink()  # the folder is the dataset now
    return dest


def unpack_once(archive: Path) -> Path:
    """--data some.zip: unpacked once into the cache, keyed by the zip's name, size and time."""
    st = archive.stat()
    key = hashlib.sha1(f"{archive.name} {st.st_size} {st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = cache_root() / f"{archive.stem}-{key}"
    if not (dest / "audio").is_dir():
        print(f"unpacking {archive} into {dest}", flush=True)
        unpack_checked(archive, dest)
    return dest


def find_data(arg: str) -> Path:
    """--data (a folder or a zip), else $AUDIOTX_DATA, else the first default folder that exists,
    else ESC-50 fetched earlier, else ESC-50 fetched now."""
    given = arg or os.environ.get("AUDIOTX_DATA", "")
    if given:
        path = Path(given).expanduser()
        if path.is_file() and zipfile.is_zipfile(path):
            return unpack_once(path)
        if (path / "audio").is_dir():
            return path
        raise UserError(f"{given}: no audio/ folder there (expected ESC-50's layout, audio/*.wav + "
                        "meta/esc50.csv, UrbanSound8K's, audio/fold<k>/*.wav + "
                        "metadata/UrbanSound8K.csv, or a zip of either)")
    fetched = cache_root() / "ESC-50"
    for path in DEFAULT_DATA + [fetched]:
        if (path / "audio").is_dir():
            return path
    return fetch_esc50(fetched)


def cache_path(data_dir: Path, table: list, cfg: Config) -> Path:
    """Cache file keyed by every audio file's name, size and mtime, and the target rate and length."""
    h = hashlib.sha1(f"v{CACHE_VERSION} {cfg.sample_rate} {cfg.clip_seconds}".encode())
    for r in table:
        st = (data_dir / "audio" / r["filename"]).stat()
        h.update(f"{r['filename']} {st.st_size} {st.st_mtime_ns}\n".encode())
    return cache_root() / f"waves-{h.hexdigest()[:16]}.npy"


def to_rate(wave, rate: int, target_rate: int):
    """A float32 wave (L,) at rate resampled to target_rate (polyphase, scipy)."""
    if rate == target_rate:
        return wave
    g = math.gcd(rate, target_rate)
    return scipy.signal.resample_poly(wave, target_rate // g, rate // g).astype(np.float32)


def fit_clip(wave, rate, target_rate, n_samples):
    """Resample to target_rate, then pad with zeros or crop (centred) to n_samples."""
    wave = to_rate(wave, rate, target_rate)
    if len(wave) < n_samples:
        return np.pad(wave, (0, n_samples - len(wave)))
    start = (len(wave) - n_samples) // 2
    return wave[start:start + n_samples]


def decode_clips(data_dir: Path, table: list, cfg: Config) -> tuple:
    """Decode and resample every clip: waves (N, S) float32 and each clip's length in samples
    before padding (N,) int64. Counts what needed fixing."""
    n_samples = round(cfg.sample_rate * cfg.clip_seconds)
    waves = np.zeros((len(table), n_samples), dtype=np.float32)
    kept = np.zeros(len(table), dtype=np.int64)
    rates, lengths, multichannel = [], [], 0
    t0 = time.time()
    for i, r in enumerate(table):
        path = data_dir / "audio" / r["filename"]
        rate, data = read_wav(path)
        wave = to_mono_float(path, data)
        multichannel += data.ndim == 2
        rates.append(rate)
        lengths.append(len(wave) / rate)
        waves[i] = fit_clip(wave, rate, cfg.sample_rate, n_samples)
        kept[i] = min(n_samples, math.ceil(len(wave) * cfg.sample_rate / rate))  # resample_poly's output length
        if (i + 1) % 100 == 0 or i + 1 == len(table):
            print(f"\rdecoding {i + 1}/{len(table)} clips ({time.time() - t0:.1f}s)", end="", flush=True)
    print()
    common_rate = max(set(rates), key=rates.count)
    odd = {f"a sample rate other than {common_rate} Hz (resampled)": sum(r != common_rate for r in rates),
           f"a length other than {cfg.clip_seconds:g} s (padded or cropped)":
               sum(abs(n - cfg.clip_seconds) > 1e-3 for n in lengths),
           "more than one channel (mixed down to mono)": multichannel}
    for what, count in odd.items():
        if count:
            print(f"warning: {count} of {len(table)} clips had {what}")
    return waves, kept


def clips_and_lengths(waves: np.ndarray, kept: np.ndarray) -> tuple:
    full = bool((kept == waves.shape[1]).all())
    return torch.from_numpy(waves), None if full else torch.from_numpy(kept)


def load_clips(data_dir: Path, table: list, cfg: Config) -> tuple:
    """All clips as one (N, S) float32 tensor, decoded once and cached on disk, and their lengths
    in samples (N,), or None when every clip fills S (then nothing needs masking)."""
    path = cache_path(data_dir, table, cfg)
    lengths_path = path.with_name(path.stem + "-lengths.npy")
    n_samples = round(cfg.sample_rate * cfg.clip_seconds)
    if path.is_file():
        try:
            waves, kept = np.load(path), np.load(lengths_path)
            if waves.shape == (len(table), n_samples) and waves.dtype == np.float32 and kept.shape == (len(table),):
                return clips_and_lengths(waves, kept)
        except (ValueError, OSError, EOFError):
            pass
        print(f"warning: cache {path} is damaged; rebuilding it")
    waves, kept = decode_clips(data_dir, table, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    for array, final in [(kept, lengths_path), (waves, path)]:  # the waves last: their file marks a whole cache
        tmp = final.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, array)
        os.replace(tmp, final)
    return clips_and_lengths(waves, kept)


def regroup(groups, labels, k):
    """Assign whole source recordings to k parts, balancing each class across parts."""
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
        raise UserError(f"--test-fold {test_fold} does not exist (official folds: {official}; 0 = none)")
    test = np.flatnonzero(folds == test_fold)
    rest = np.flatnonzero(folds != test_fold)
    remaining = sorted(set(folds[rest].tolist()))
    if k == len(remaining):  # official folds as they are: the course's and the paper's protocol
        part = np.searchsorted(remaining, folds[rest])
    else:
        if k > len(set(groups[rest].tolist())):
            raise UserError(f"--kfold {k} is more than the {len(set(groups[rest].tolist()))} source recordings allow")
        part = regroup(groups[rest], labels[rest], k)
    splits = [(rest[part != i], rest[part == i]) for i in range(k)]
    for i, (train, val) in enumerate(splits):
        absent = sorted(set(range(labels.max() + 1)) - set(labels[train].tolist()))
        if len(val) == 0 or absent:
            names = ", ".join(str(classes[c] if classes else c) for c in absent) or "no clips"
            raise UserError(f"--kfold {k}: validation fold {i + 1} leaves class(es) {names} with no training "
                            "clips; use fewer folds, or a dataset with that class in more folds")
    return test, splits


@dataclass
class Dataset:
    root: Path
    table: list             # rows of meta/esc50.csv, sorted by filename
    classes: list           # sorted category names; label i is classes[i]
    labels: torch.Tensor    # (N,)
    test_idx: np.ndarray    # clips of the test fold (empty when --test-fold 0)
    splits: list            # k (train_idx, val_idx) pairs


def load_dataset(cfg: Config) -> Dataset:
    """The table, labels and splits; no audio is read here."""
    root = find_data(cfg.data)
    table = read_table(root, cfg.subset, cfg.dataset)
    classes = sorted({r["category"] for r in table})
    labels = torch.tensor([classes.index(r["category"]) for r in table])
    test_idx, splits = split_folds([r["fold"] for r in table], [r["src_file"] for r in table],
                                   labels.numpy(), cfg.test_fold, cfg.kfold, classes)
    return Dataset(root, table, classes, labels, test_idx, splits)


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
    return torch.stack([torch.cat([w[:m].roll(-j), w[m:]]) for w, m, j in zip(wave, n.tolist(), k.tolist())])


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

def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """Triangular filters evenly spaced on the mel scale (2595 log10(1 + f / 700)) from 0 Hz to
    Nyquist, each rising from its lower neighbour's centre to 1 and falling to the next's: (F, n_mels)."""
    mel, hz = lambda f: 2595 * np.log10(1 + f / 700), lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    edges = hz(np.linspace(0, mel(sample_rate / 2), n_mels + 2))  # (n_mels + 2,) Hz
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)  # (F,)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1) each
    return torch.from_numpy(np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid))).T).float()


class LogMel(nn.Module):
    """Log mel spectrogram, normalised per band: wave (B, S) -> (B, n_mels, S // hop + 1).
    64 ms Hann windows at 16 ms hops and 64 bands at 16 kHz."""

    def __init__(self, *, sample_rate: int, n_fft: int = 1024, hop: int = 256, n_mels: int = 64):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("fbank", mel_filterbank(sample_rate, n_fft, n_mels), persistent=False)
        self.norm = nn.BatchNorm1d(n_mels)  # log energies differ by band; this puts them on one scale

    def forward(self, wave):
        with torch.autocast(wave.device.type, enabled=False):  # the log of small energies needs float32
            spec = torch.stft(wave.float(), self.n_fft, self.hop, window=self.window, return_complex=True)
            mel = self.fbank.t() @ spec.abs().square()  # (n_mels, F) @ (B, F, frames) -> (B, n_mels, frames)
            return self.norm(torch.log(mel + 1e-6))


def layer_len(n, k: int, s: int, pool: int):
    """Positions out of a conv layer (kernel k, stride s, padding (k - s) // 2) and its max-pool."""
    return ((n + 2 * ((k - s) // 2) - k) // s + 1) // pool


def within(n, length: int):
    """(B, 1, length) mask of the first n[b] positions of each row."""
    return (torch.arange(length, device=n.device) < n[:, None])[:, None]


def stem_frames(wave, conv: nn.Conv1d):
    """conv, with one input channel, kernel k and stride s, over wave (B, S) as one matrix product
    of the wave's k-sample frames: (B, L, k) @ (k, C) -> (B, C, 1, L) in channels-last memory.
    The same numbers as conv1d, faster than oneDNN's convolution with one input channel."""
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    frames = F.pad(wave, (p, p)).unfold(1, k, s)  # (B, L, k), a view: frames overlap by k - s samples
    return (frames @ conv.weight.flatten(1).t()).transpose(1, 2).unsqueeze(2)  # (B, L, C) -> (B, C, 1, L)


class ConvFrontEnd(nn.Module):
    """Four conv layers over the waveform, or over its log mel spectrogram with the bands as
    channels: wave (B, S) -> x (B, T, dim), T = S / 2048 (16 kHz: 5 s -> 39 frames)."""

    def __init__(self, *, dim: int, features: str = "wave", sample_rate: int = 16000):
        super().__init__()
        # (in, out, kernel, stride, pool). On the waveform the strided stem is a learnable filterbank,
        # 4 ms filters at 1 ms hops (16 kHz), max-pooled by 4; each later layer halves or quarters
        # time while widening the channels. Coarser stems were faster and less accurate (NOTES.md).
        self.mel = LogMel(sample_rate=sample_rate) if features == "logmel" else None
        # logwave: the stem's filters as a learnable filterbank, its output the log of each band's
        # rectified magnitude, max-pooled; log-mel input's edge over the waveform is that log
        self.log_stem = features == "logwave"
        if self.mel is None:
            plan = [(1, dim // 4, 64, 16, 4), (dim // 4, dim // 2, 3, 1, 4), (dim // 2, dim, 3, 1, 4),
                    (dim, dim, 3, 1, 2)]
        else:  # 16 ms frames: three halvings reach the waveform's 128 ms per frame
            plan = [(self.mel.fbank.shape[1], dim // 4, 3, 1, 2), (dim // 4, dim // 2, 3, 1, 2),
                    (dim // 2, dim, 3, 1, 2), (dim, dim, 3, 1, 1)]
        # The weights are Conv1d's (out, in, k); the layers run as 2-D ops on (B, C, 1, L), see forward
        self.convs = nn.ModuleList(nn.Conv1d(c_in, c_out, k, s, padding=(k - s) // 2, bias=False)
                                   for c_in, c_out, k, s, _ in plan)
        self.norms = nn.ModuleList(nn.BatchNorm2d(c_out) for _, c_out, _, _, _ in plan)  # same state as 1d
        self.plan = plan

    def out_len(self, n_samples):
        """Frames out of n samples (an int, or a tensor of clip lengths): those a clip fills."""
        n = self.input_len(n_samples)
        for _, _, k, s, pool in self.plan:
            n = layer_len(n, k, s, pool)
        return n

    def input_len(self, n_samples):
        """Positions of the first layer's input: samples, or mel frames."""
        return n_samples // self.mel.hop + 1 if self.mel else n_samples

    def forward(self, wave, lengths=None):
        """wave (B, S) -> (features (B, T, C), None), or with the clips' lengths (B,) in samples,
        (features, the frames each clip fills (B,)). Then everything past a clip's end is zeroed at the input and
        after every layer, so the padding never reaches a filled frame: the result is the same
        however long the padding and whatever it holds.

        Inside, activations are (B, C, 1, L) in channels-last memory, rows of C channels per time
        step: CPU kernels pool, normalise and convolve those much faster than rows of time, and the
        last layer's output is already the (B, T, C) the transformer reads."""
        if lengths is not None:
            wave = wave * (torch.arange(wave.shape[1], device=wave.device) < lengths[:, None])
        n = None if lengths is None else self.input_len(lengths)
        x = None  # the waveform stem reads the wave itself
        if self.mel:  # (B, n_mels, frames) -> (B, n_mels, 1, frames) channels-last
            x = self.mel(wave).unsqueeze(2).contiguous(memory_format=torch.channels_last)
            x = x if n is None else x * within(n, x.shape[-1])[:, :, None]
        for i, (conv, norm, (*_, pool)) in enumerate(zip(self.convs, self.norms, self.plan)):
            x = stem_frames(wave, conv) if x is None else F.conv2d(
                x, conv.weight.unsqueeze(2), stride=(1, conv.stride[0]), padding=(0, conv.padding[0]))  # (B, C, 1, L)
            x = x.abs() if self.log_stem and i == 0 else x
            if pool > 1:  # first, so normalisation and ReLU touch a quarter of the values
                x = F.max_pool2d(x, (1, pool))  # (B, C, 1, L / pool), remainder dropped
            x = torch.log(x.float() + 1e-4) if self.log_stem and i == 0 else x  # 1e-4: below 16-bit quiet
            x = F.relu(norm(x))
            if n is not None:
                n = layer_len(n, conv.kernel_size[0], conv.stride[0], pool)
                x = x * within(n, x.shape[-1])[:, :, None]  # (B, 1, 1, L) mask
        # (B, C, 1, T) channels-last -> (B, T, C) contiguous; a clip too short to fill one frame keeps its first
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
        bits = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        bits = bits.view(torch.int16)[:n]
        keep = bits.view(x.shape) >= round(self.p * 65536) - 32768  # uniform int16 in [-32768, 32767]
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

    def forward(self, x, keep=None):
        """keep (B, T) bool: the tokens that may be attended to (None: all)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.heads)  # (B, nh, T, T)
        if keep is not None:  # padding gets zero weight, so it cannot move any token's output
            att = att.masked_fill(~keep[:, None, None, :], float("-inf"))
        att = att.softmax(dim=-1)
        self.att = att.detach()  # kept for cls_attention's figures; no copy, replaced on every call
        att = self.drop(att)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, *, dim: int, hidden: int, out: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), Dropout(dropout), nn.Linear(hidden, out))

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

    def forward(self, x, keep=None):
        x = x + self.drop(self.attn(self.ln1(x), keep))
        return x + self.drop(self.mlp(self.ln2(x)))


class CNNClassifier(nn.Module):
    """Front end, mean and max over time, fully connected classifier: wave (B, S) -> logits (B, K)."""

    def __init__(self, *, dim: int, n_classes: int, dropout: float, features: str = "wave", sample_rate: int = 16000):
        super().__init__()
        self.front = ConvFrontEnd(dim=dim, features=features, sample_rate=sample_rate)
        self.head = MLP(dim=2 * dim, hidden=dim, out=n_classes, dropout=dropout)

    def forward(self, wave, lengths=None):
        x, n = self.front(wave, lengths)  # (B, T, C), None or (B,) filled frames
        if n is None:
            return self.head(torch.cat([x.mean(1), x.amax(1)], dim=1))  # (B, 2C) -> (B, K)
        filled = within(n, x.shape[1]).transpose(1, 2)  # (B, T, 1)
        mean, top = x.sum(1) / n[:, None], x.masked_fill(~filled, float("-inf")).amax(1)  # over filled frames only
        return self.head(torch.cat([mean, top], dim=1))


class AudioTransformer(nn.Module):
    """Front end, <cls> + positions, attention blocks, MLP head: wave (B, S) -> logits (B, K)."""

    def __init__(self, *, dim: int, heads: int, depth: int, n_classes: int, n_samples: int, dropout: float,
                 features: str = "wave", sample_rate: int = 16000):
        super().__init__()
        self.front = ConvFrontEnd(dim=dim, features=features, sample_rate=sample_rate)
        n_tokens = self.front.out_len(n_samples) + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n_tokens, dim) * 0.02)
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim=dim, heads=heads, dropout=dropout) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = MLP(dim=dim, hidden=dim, out=n_classes, dropout=dropout)

    def forward(self, wave, lengths=None):
        x, n = self.front(wave, lengths)  # (B, T, C), None or (B,) filled frames
        keep = None if n is None else F.pad(within(n, x.shape[1])[:, 0], (1, 0), value=True)  # (B, 1 + T)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1)  # (B, 1 + T, C), <cls> at 0
        x = self.drop(x + self.pos[:, :x.shape[1]])
        for block in self.blocks:
            x = block(x, keep)
        return self.head(self.ln(x[:, 0]))  # the <cls> output -> (B, K)


def build_model(cfg: Config, n_classes: int) -> nn.Module:
    n_samples = round(cfg.sample_rate * cfg.clip_seconds)
    inputs = {"features": cfg.features, "sample_rate": cfg.sample_rate}
    front = ConvFrontEnd(dim=cfg.dim, **inputs)
    if front.out_len(n_samples) < 1:
        raise UserError(f"--clip-seconds {cfg.clip_seconds} at --sample-rate {cfg.sample_rate} is too short "
                        f"for the {cfg.features} front end")
    if cfg.arch == "cnn":
        return CNNClassifier(dim=cfg.dim, n_classes=n_classes, dropout=cfg.dropout, **inputs)
    return AudioTransformer(dim=cfg.dim, heads=cfg.heads, depth=cfg.depth, n_classes=n_classes,
                            n_samples=n_samples, dropout=cfg.dropout, **inputs)


def count_params(model: nn.Module) -> dict:
    """Trainable and frozen parameters; buffers (BatchNorm statistics) on their own."""
    params = dict(model.named_parameters())
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "non_trainable": sum(p.numel() for p in model.parameters() if not p.requires_grad),
            "buffers": sum(b.numel() for n, b in model.state_dict().items() if n not in params)}


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
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n not in ("cls", "pos")]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n not in ("cls", "pos"))]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=cfg.lr)


def n_batches(n: int, batch_size: int) -> int:
    """Near-equal batch sizes (240 clips at 32 -> 8 x 30), so no tiny last batch upsets BatchNorm."""
    return max(1, math.ceil(n / batch_size))


def train_step(model, opt, wave, target, cfg, lr: float, lengths=None, scale: float = 1.0):
    """One AdamW step at learning rate lr on wave (B, S), soft targets (B, K), with the mean loss
    multiplied by scale: (loss, logits (B, K))."""
    for group in opt.param_groups:
        group["lr"] = lr
    # bf16 autocast runs the matmuls and convs in bfloat16 (norms, softmax and the loss stay float32)
    with torch.autocast(wave.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        logits = model(wave, lengths)
    loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
    opt.zero_grad(set_to_none=True)
    (loss * scale if scale != 1 else loss).backward()
    opt.step()
    return loss.item(), logits.detach()


def train_epoch(model, opt, waves, labels, idx, cfg, n_classes, step, total, order, lengths=None):
    """One pass over idx in the random order drawn from the generator `order` (the same in every
    process); each process trains on its share of every batch. Returns (mean loss, accuracy against the dominant target) over the whole pass."""
    model.train()
    perm = torch.from_numpy(idx)[torch.randperm(len(idx), generator=order)]
    loss_sum = correct = 0.0
    for chunk in perm.tensor_split(n_batches(len(idx), cfg.batch_size)):
        share = chunk[WORKER.rank::WORKER.world]  # (B / world,) this process's share
        wave, target, n = augment(waves[share].to(WORKER.device), labels[share].to(WORKER.device), n_classes,
                                  cfg, None if lengths is None else lengths[share].to(WORKER.device))
        # DDP averages the processes' gradients: weighting each share by its size makes that
        # the gradient of the whole batch's mean loss, as in one process
        loss, logits = train_step(model, opt, wave, target, cfg, lr_at(cfg, step, total), n,
                                  scale=len(share) * WORKER.world / len(chunk))
        step += 1
        loss_sum += loss * len(share)
        correct += (logits.argmax(1) == target.argmax(1)).sum().item()
    loss_sum, correct = all_sum(loss_sum, correct)
    return loss_sum / len(idx), correct / len(idx)


@torch.no_grad()
def predict(model, waves, precision: str = "fp32", lengths=None, batch_size=32):
    """Class probabilities (N, K) in eval mode, each process predicting every world-th clip.
    bf16 runs the model as the training steps do; batches of 32 keep the stem's output in cache."""
    model = getattr(model, "module", model)  # not through DDP, which would sync buffers on every call
    model.eval()
    share = torch.arange(WORKER.rank, len(waves), WORKER.world)
    probs = []
    with torch.autocast(WORKER.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for idx in share.split(batch_size):
            n = None if lengths is None else lengths[idx].to(WORKER.device)
            probs.append(model(waves[idx].to(WORKER.device), n).float().softmax(1).cpu())  # (b, K)
    return gather_rows(torch.cat(probs) if probs else None)


def evaluate(model, waves, labels, precision: str = "fp32", lengths=None):
    """(loss, accuracy, probs) on clips without augmentation."""
    probs = predict(model, waves, precision, lengths)
    labels = labels.cpu()
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


def rng_states() -> list:
    """Every process's random state (the CPU's, and the GPU's where one is used), in rank order."""
    own = {"cpu": torch.get_rng_state()}
    if WORKER.device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(WORKER.device)
    if WORKER.world == 1:
        return [own]
    states = [None] * WORKER.world
    dist.all_gather_object(states, own)
    return states


def set_rng_state(saved, path: Path):
    if len(saved) != WORKER.world:
        raise UserError(f"{path}: saved by {len(saved)} process(es), resumed by {WORKER.world}; "
                        "resume with the same number, or rerun with --restart")
    torch.set_rng_state(saved[WORKER.rank]["cpu"])
    if "cuda" in saved[WORKER.rank] and WORKER.device.type == "cuda":
        torch.cuda.set_rng_state(saved[WORKER.rank]["cuda"], WORKER.device)


def train_fold(cfg, waves, labels, split, fold, fold_dir: Path, n_classes, tracker, progress, lengths=None):
    """Train one fold for cfg.epochs, resuming from fold_dir/state.pt. Returns (the chosen model,
    its epoch, the history, the last epoch's validation probabilities (N_val, K)).
    Under torchrun every process holds the same model, wrapped in DistributedDataParallel."""
    train_idx, val_idx = split
    torch.manual_seed(cfg.seed + fold)
    model = build_model(cfg, n_classes).to(WORKER.device)
    if WORKER.world > 1 and WORKER.device.type == "cuda":  # batch statistics over the whole batch, as in one process
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = make_optimizer(cfg, model)
    order = torch.Generator().manual_seed(cfg.seed + fold)  # the epochs' clip order, shared by the processes
    if WORKER.rank:  # rank 0 draws what one process would; the others their own augmentation and dropout
        torch.manual_seed(cfg.seed + fold + 1000 * WORKER.rank)
    steps = n_batches(len(train_idx), cfg.batch_size)
    state_path = fold_dir / "state.pt"
    state = load_state(state_path, cfg)
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        order.set_state(state.get("order", order.get_state()))
        set_rng_state(state["rng"], state_path)
        print(f"fold {fold}: resuming after epoch {state['epoch']}")
    else:
        state = {"epoch": 0, "history": [], "best": None, "settings": result_settings(cfg)}
    net = model if WORKER.world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[WORKER.device] if WORKER.device.type == "cuda" else None)
    tracker.start(f"fold{fold}")
    for row in state["history"]:
        tracker.log(row)  # a resumed fold's W&B run still shows every epoch
    val_w, val_y = waves[val_idx], labels[val_idx]
    val_n = None if lengths is None else lengths[val_idx]
    final_val = None  # the last epoch's validation probabilities (N_val, K)
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        t0 = time.time()
        lr = lr_at(cfg, (epoch - 1) * steps, steps * cfg.epochs)
        tr_loss, tr_acc = train_epoch(net, opt, waves, labels, train_idx, cfg, n_classes,
                                      (epoch - 1) * steps, steps * cfg.epochs, order, lengths)
        va_loss, va_acc, final_val = evaluate(model, val_w, val_y, cfg.precision, val_n)
        row = {"epoch": epoch, "lr": lr, "train_loss": tr_loss, "train_acc": tr_acc,
               "val_loss": va_loss, "val_acc": va_acc, "seconds": time.time() - t0}
        state["history"].append(row)
        best = state["best"]
        # Chosen on validation only: highest accuracy, ties to the lower validation loss.
        if best is None or (va_acc, -va_loss) > (best["val_acc"], -best["val_loss"]):
            state["best"] = {"epoch": epoch, "val_acc": va_acc, "val_loss": va_loss,
                             "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        state.update(epoch=epoch, model=model.state_dict(), opt=opt.state_dict(), order=order.get_state(),
                     rng=rng_states())
        save_atomic(state, state_path)
        write_csv(fold_dir / "history.csv", list(row), [list(r.values()) for r in state["history"]])
        tracker.log(row)
        progress(fold, row)
    if final_val is None:  # resumed after its last epoch: the saved weights are that epoch's
        final_val = predict(model, val_w, cfg.precision, val_n)
    if cfg.select == "best":
        model.load_state_dict(state["best"]["model"])
    return model, state["best"]["epoch"] if cfg.select == "best" else cfg.epochs, state["history"], final_val


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
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    per_class, aucs = {}, []
    for c, name in enumerate(classes):
        pos = labels == c
        a = auc(*roc_curve(probs[:, c], pos)) if 0 < pos.sum() < len(pos) else None  # undefined without both
        aucs += [a] if a is not None else []
        per_class[name] = {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                           "auc": a, "support": int(cm[c].sum())}
    present = cm.sum(1) > 0  # macro F1 over the classes that occur in this set
    return {"n": int(len(labels)), "accuracy": float(tp.sum() / max(len(labels), 1)),
            "macro_f1": float(f1[present].mean()), "macro_auc": float(np.mean(aucs)) if aucs else None,
            "per_class": per_class, "confusion": cm.tolist()}


def pooled(results, labels, splits, test_idx, split: str):
    """Every fold model's predictions on `split` ("val" or "val_final": each its own fold, by the
    chosen or the last epoch; "test": the test fold), stacked: (labels (N,), probs (N, K) float64)."""
    if split == "test":
        return labels[test_idx].repeat(len(results)), torch.cat([r["test"] for r in results]).double()
    return labels[np.concatenate([v for _, v in splits])], torch.cat([r[split] for r in results]).double()


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
    metrics = {"val": summarize(*pooled(results, labels, splits, test_idx, "val"), classes),
               "val_final": summarize(*pooled(results, labels, splits, test_idx, "val_final"), classes),
               "test": None, "test_mean": None, "test_std": None, "ensemble_test": None, "folds": folds}
    if len(test_idx):
        accs = [fm["test"]["accuracy"] for fm in folds]
        ensemble = torch.stack([r["test"] for r in results]).double().mean(0)  # (k, N_test, K) -> (N_test, K)
        metrics.update(test=summarize(*pooled(results, labels, splits, test_idx, "test"), classes),
                       test_mean=float(np.mean(accs)), test_std=float(np.std(accs)),
                       ensemble_test=summarize(labels[test_idx], ensemble, classes))
    return metrics


# ----------------------------------------------------------------------------------------
# logging: progress lines, result files, Weights & Biases
# ----------------------------------------------------------------------------------------

def print_progress_factory(cfg: Config, k: int):
    """Per-epoch line with the fold, the epoch and the time left for the whole run."""
    t0, done = time.time(), [0]

    def progress(fold, row):
        done[0] += 1
        left = (time.time() - t0) / done[0] * (k * cfg.epochs - (fold - 1) * cfg.epochs - row["epoch"])
        print(f"fold {fold}/{k} epoch {row['epoch']:3d}/{cfg.epochs} lr {row['lr']:.2e} "
              f"train {row['train_loss']:.3f} {row['train_acc']:6.1%} val {row['val_loss']:.3f} "
              f"{row['val_acc']:6.1%} {row['seconds']:.1f}s left {left / 60:.1f}m", flush=True)
    return progress


def print_summary(metrics: dict, select: str):
    """The pooled validation of the last epoch and, with --select best, of the best epoch: that
    one chose each fold's epoch on the fold itself, so it is optimistic."""
    print("\n" + "-" * 72)
    print(f"{'set':<40}{'accuracy':>10}{'macro F1':>10}{'macro AUC':>11}")
    for key, label in (("val_final", "validation, final epoch (pooled)"),
                       ("val", "validation, best epoch (optimistic)" if select == "best" else ""),
                       ("test", "test (fold models)"), ("ensemble_test", "test (ensemble)")):
        m = metrics.get(key)
        if m and label:
            print(f"{label:<40}{m['accuracy']:>10.4f}{m['macro_f1']:>10.4f}{m['macro_auc']:>11.4f}")
    if metrics["test"]:
        print(f"test accuracy over fold models: {metrics['test_mean']:.4f} +- {metrics['test_std']:.4f}")
    p = metrics["params"]
    print(f"parameters: {p['trainable']:,} trainable, {p['non_trainable']:,} non-trainable; "
          f"buffers: {p['buffers']:,}")
    print(f"time: {metrics['seconds'] / 60:.1f} min")


def prediction_rows(fold, split, filenames, labels, probs):
    probs = probs.double().numpy()
    return [[fold, split, f, int(y), int(p.argmax())] + p.tolist() for f, y, p in zip(filenames, labels, probs)]


def write_predictions(run_dir: Path, rows: list, classes: list):
    """predictions.csv: fold, split, filename, label, pred, then one probability per class."""
    header = ["fold", "split", "filename", "label", "pred"] + [f"p_{c}" for c in classes]
    write_csv(run_dir / "predictions.csv", header, rows)


def write_roc(run_dir: Path, labels, probs, classes):
    rows = []
    for c, name in enumerate(classes):
        fpr, tpr = roc_curve(probs[:, c], np.asarray(labels) == c)
        rows += [[name, a, b] for a, b in zip(fpr.tolist(), tpr.tolist())]
    write_csv(run_dir / "roc.csv", ["class", "fpr", "tpr"], rows)


def write_results(run_dir, results, labels, splits, test_idx, filenames, classes):
    """predictions.csv for every validation (chosen and last epoch) and test prediction; roc.csv
    for the test set (the last epoch's pooled validation predictions when there is none)."""
    rows = []
    for fold, (res, (_, val_idx)) in enumerate(zip(results, splits), start=1):
        for split in ("val", "val_final"):
            rows += prediction_rows(fold, split, [filenames[i] for i in val_idx], labels[val_idx], res[split])
        if res["test"] is not None:
            rows += prediction_rows(fold, "test", [filenames[i] for i in test_idx], labels[test_idx], res["test"])
    write_predictions(run_dir, rows, classes)
    roc_labels, roc_probs = pooled(results, labels, splits, test_idx, "test" if len(test_idx) else "val_final")
    write_roc(run_dir, roc_labels.numpy(), roc_probs.numpy(), classes)
    return roc_labels.numpy(), roc_probs.numpy()


def wandb_mode(cfg: Config) -> str:
    """$WANDB_MODE wins; auto is online only where W&B credentials are configured."""
    mode = os.environ.get("WANDB_MODE") or cfg.wandb
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode != "auto":
        return mode
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    return "online" if os.environ.get("WANDB_API_KEY") or logged_in else "offline"


class Tracker:
    """One W&B run per fold and one for the whole configuration. W&B is imported only when
    used, and any W&B failure prints one warning and turns it off: the files are the record."""

    def __init__(self, cfg: Config, run_dir: Path, config: dict, mode: str = ""):
        mode = mode if WORKER.main else "disabled"  # under torchrun rank 0 alone logs
        self.mode, self.run_dir, self.config, self.cfg = mode or wandb_mode(cfg), run_dir, config, cfg
        self.run, self.wandb = None, None
        if self.mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")  # our own lines say where the files are
        os.environ.setdefault("WANDB_CACHE_DIR", str(run_dir / "wandb" / "cache"))
        os.environ.setdefault("WANDB_DATA_DIR", str(run_dir / "wandb" / "data"))
        if self.mode == "offline":  # nothing in the home folder; online runs need the user's login there
            os.environ.setdefault("WANDB_CONFIG_DIR", str(run_dir / "wandb" / "config"))
        self._guard(self._import)

    def _import(self):
        import wandb
        self.wandb = wandb

    def _guard(self, fn, *args):
        if self.mode == "disabled":
            return None
        try:
            return fn(*args)
        except Exception as e:  # never let logging cost the training
            print(f"warning: W&B turned off after an error: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            self.mode = "disabled"

    def start(self, job: str):
        self.finish()
        self._guard(self._start, job)

    def _start(self, job):
        name = self.run_dir.name
        self.run = self.wandb.init(
            project=self.cfg.project, entity=self.cfg.entity or None, group=name, job_type=job,
            name=f"{name}-{job}", config=self.config, dir=str(self.run_dir), mode=self.mode,
            settings=self.wandb.Settings(console="off", quiet=True, x_disable_stats=True, disable_git=True))
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")
        if self.mode == "online":  # the report links to every online run
            with open(self.run_dir / "wandb_urls.txt", "a") as f:
                f.write(f"{self.run.url}\n")

    def log(self, row: dict):
        if self.run:
            self._guard(self.run.log, dict(row))

    def summary(self, metrics: dict, labels, probs, classes, title: str):
        """Summary numbers, confusion matrix, ROC curves and a per-class table for one set."""
        if self.run:
            self._guard(self._summary, metrics, labels, probs, classes, title)

    def _summary(self, metrics, labels, probs, classes, title):
        w, probs = self.wandb, np.asarray(probs)
        self.run.summary.update({f"{title}/{k}": metrics[k] for k in ("accuracy", "macro_f1", "macro_auc")})
        self.run.summary.update({f"params/{k}": v for k, v in self.config["params"].items()})
        curves = [roc_curve(probs[:, c], np.asarray(labels) == c) for c in range(len(classes))]
        table = w.Table(columns=["class", "precision", "recall", "f1", "auc"],
                        data=[[c] + [m[k] for k in ("precision", "recall", "f1", "auc")]
                              for c, m in metrics["per_class"].items()])
        self.run.log({
            f"{title}/confusion": w.plot.confusion_matrix(y_true=list(map(int, labels)),
                                                          preds=probs.argmax(1).tolist(), class_names=classes),
            f"{title}/roc": w.plot.line_series(xs=[c[0].tolist() for c in curves], ys=[c[1].tolist() for c in curves],
                                               keys=classes, title=f"ROC ({title})", xname="false positive rate"),
            f"{title}/per_class": table})

    def finish(self):
        if self.run:
            self._guard(self.run.finish)
        self.run = None


# ----------------------------------------------------------------------------------------
# prediction on a user's own recordings
# ----------------------------------------------------------------------------------------

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


def wav_files(paths: list) -> list:
    """Each PATH, or a folder's *.wav files, recursively, in name order."""
    files = []
    for p in map(Path, paths):
        wavs = sorted(q for q in p.rglob("*") if q.suffix.lower() == ".wav") if p.is_dir() else [p]
        files += wavs
    return files


def windows(wave, n: int) -> tuple:
    """A wave (L,) as clip-length windows (W, n): a shorter one padded as in training, a longer one
    cut at a hop of half a window, the last ending at the end. -> (windows, starts in samples)."""
    if len(wave) <= n:
        return F.pad(wave, (0, n - len(wave)))[None], [0]
    starts = list(range(0, len(wave) - n + 1, n // 2))
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


def predict_files(cfg: Config) -> int:
    """--predict: the fold models' averaged probabilities for each file (each window's, averaged
    over its windows); one line per file, or JSON lines. A file that cannot be read is named on
    stderr and skipped; the exit status is then 2."""
    run_dir = Path(cfg.run).expanduser() if cfg.run else SHIPPED_MODEL
    run_cfg, classes, models = load_fold_models(run_dir)
    precision = resolve_precision(dataclasses.replace(run_cfg, precision="auto")).precision
    n, rate = round(run_cfg.sample_rate * run_cfg.clip_seconds), run_cfg.sample_rate
    decoded, failed = [], 0
    for path in wav_files(cfg.predict):
        try:
            wave, file_rate = load_wav(path)
        except UserError as e:  # read_wav names the file and what is wrong with it
            print(f"audiotx: error: {e}", file=sys.stderr)
            failed += 1
            continue
        wave = torch.from_numpy(to_rate(wave, file_rate, rate))
        decoded.append((path, len(wave) / rate, *windows(wave, n)))
    if decoded:  # every window of every file in one pass of batches, through each fold model
        wins = torch.cat([d[2] for d in decoded])  # (W, S): every file's windows
        probs = sum(predict(m, wins, precision) for m in models) / len(models)  # (W, K)
        width = max(len(str(d[0])) for d in decoded)
        for (path, seconds, _, starts), p in zip(decoded, probs.split([len(d[3]) for d in decoded])):
            print(prediction_line(path, seconds, starts, n / rate, p, classes, cfg.json, rate,
                                  width))
    return 2 if failed else 0


# ----------------------------------------------------------------------------------------
# run and main
# ----------------------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold run_dir/.lock while training, so two runs never write one folder; a lock left by
    a killed run (its process is gone) is taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            pid = int(lock.read_text().strip() or 0) if lock.is_file() else 0
            if pid and pid_alive(pid):
                raise UserError(f"{run_dir}: another run (pid {pid}) is using this folder; "
                                "wait for it, or pass --name or --out to run beside it") from None
            lock.unlink(missing_ok=True)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def prepare_run_dir(cfg: Config, run_dir: Path, config: dict):
    """config.json in run_dir; a different configuration under the same name is refused."""
    old = run_dir / "config.json"
    if old.is_file():
        try:
            changed = differences(json.loads(old.read_text()), cfg)
        except ValueError:
            changed = "its config.json is damaged"
        if changed:
            raise UserError(f"{run_dir}: holds a run with a different configuration ({changed}); "
                            "pass --name to keep both, or --restart to replace it")
    if not old.is_file():  # a resumed run keeps the record of how it started (threads, W&B mode, ...)
        write_json(old, config)


def clear_run_dir(run_dir: Path):
    """--restart: every file of the earlier run goes, but its W&B runs (they are kept online too)."""
    for p in sorted(run_dir.rglob("*"), reverse=True):
        if p.is_file() and "wandb" not in p.parts and p.name != ".lock":
            p.unlink()


def fold_result(cfg, run_dir, clips, ds: Dataset, fold, tracker, progress) -> dict:
    """The chosen model's probabilities on its validation fold and the test fold; a finished
    fold is read back from fold<i>/result.pt, never retrained."""
    fold_dir = run_dir / f"fold{fold}"
    if WORKER.main:
        fold_dir.mkdir(exist_ok=True)
    if (fold_dir / "result.pt").is_file():
        return load_checked(fold_dir / "result.pt")
    (waves, lengths), split, test_idx, labels, classes = clips, ds.splits[fold - 1], ds.test_idx, ds.labels, ds.classes
    model, epoch, history, final_val = train_fold(cfg, waves, labels, split, fold, fold_dir, len(classes),
                                                  tracker, progress, lengths)
    on = lambda idx: (waves[idx], cfg.precision, None if lengths is None else lengths[idx])  # noqa: E731
    res = {"chosen_epoch": epoch, "seconds": sum(r["seconds"] for r in history), "val_final": final_val,
           "val": predict(model, *on(split[1])), "test": predict(model, *on(test_idx)) if len(test_idx) else None}
    shown = "test" if len(test_idx) else "val_final"
    shown_labels = labels[test_idx] if len(test_idx) else labels[split[1]]
    tracker.summary(summarize(shown_labels, res[shown], classes), shown_labels, res[shown], classes, shown)
    tracker.finish()
    save_atomic(model.state_dict(), fold_dir / "model.pt")
    save_atomic(res, fold_dir / "result.pt")
    if WORKER.main:
        (fold_dir / "state.pt").unlink(missing_ok=True)  # the result replaces the resumable state
    return res


def load_clips_once(ds: Dataset, cfg: Config) -> tuple:
    """load_clips, with the cache built by one process per machine while the others wait for
    it; then on the device where it fits."""
    if WORKER.local_rank == 0:
        waves, lengths = load_clips(ds.root, ds.table, cfg)
    barrier()
    if WORKER.local_rank:
        waves, lengths = load_clips(ds.root, ds.table, cfg)
    return to_device(waves), to_device(lengths)


def run_locked(cfg: Config, run_dir: Path, config: dict, ds: Dataset) -> dict:
    if (run_dir / "metrics.json").is_file():
        print(f"{run_dir}: complete; nothing to do (--restart retrains it)")
        return json.loads((run_dir / "metrics.json").read_text())
    clips = load_clips_once(ds, cfg)  # waves (N, S), lengths (N,) or None
    print(f"{run_dir}: {cfg.arch} on {len(ds.table)} clips, {len(ds.classes)} classes, "
          f"test fold {cfg.test_fold or 'none'}, {cfg.kfold} validation folds"
          + (f", {WORKER.world} processes on {WORKER.device.type}" if WORKER.world > 1 else f" on {WORKER.device.type}"))
    tracker = Tracker(cfg, run_dir, config)
    progress = print_progress_factory(cfg, cfg.kfold)
    results = [fold_result(cfg, run_dir, clips, ds, fold, tracker, progress) for fold in range(1, cfg.kfold + 1)]
    labels, splits, test_idx, classes = ds.labels, ds.splits, ds.test_idx, ds.classes
    metrics = gather_metrics(results, labels, splits, test_idx, classes)
    if not WORKER.main:
        return metrics
    # Training seconds summed over the saved epochs, so a resumed run reports the whole cost.
    metrics.update(classes=classes, params=config["params"], seconds=sum(r["seconds"] for r in results))
    roc_labels, roc_probs = write_results(run_dir, results, labels, splits, test_idx,
                                          [r["filename"] for r in ds.table], classes)
    write_json(run_dir / "metrics.json", metrics)
    tracker.start("summary")
    tracker.summary(metrics["test"] or metrics["val_final"], roc_labels, roc_probs, classes,
                    "test" if metrics["test"] else "val_final")
    tracker.finish()
    print_summary(metrics, cfg.select)
    if tracker.mode == "offline":
        print(f"W&B offline runs: {run_dir / 'wandb'} (upload with: wandb sync {run_dir / 'wandb'}/offline-run-*)")
    return metrics


def run(cfg: Config) -> dict:
    """The experiment: data, splits, k fold trainings, test metrics, files."""
    check_config(cfg)
    cfg = resolve_precision(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ds = load_dataset(cfg)
    run_dir = Path(cfg.out) / run_name(cfg)
    with run_lock(run_dir) if WORKER.main else contextlib.nullcontext():
        if cfg.restart and WORKER.main:
            clear_run_dir(run_dir)
        if cfg.lr_find or cfg.lr == "auto":  # config.json records the number
            cfg = dataclasses.replace(cfg, lr=from_main(find_lr(cfg, ds, run_dir) if WORKER.main else None))
            if cfg.lr_find:
                return {"lr": cfg.lr}
        config = {**dataclasses.asdict(cfg), "name": run_name(cfg), "data": shown_path(ds.root),
                  "classes": ds.classes, "n_clips": len(ds.table), "versions": versions(),
                  "code": code_version(), "processes": WORKER.world,
                  "device_used": str(WORKER.device),
                  "params": count_params(build_model(cfg, len(ds.classes)))}
        if WORKER.main:
            prepare_run_dir(cfg, run_dir, config)
        barrier()  # the other processes look at the folder once rank 0 has cleared and claimed it
        if cfg.tune:
            return tune(cfg, ds, load_clips_once(ds, cfg), run_dir)
        return run_locked(cfg, run_dir, config, ds)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        start_processes(cfg)
        if WORKER.world > 1 and (cfg.report or cfg.bench):
            raise UserError("--report and --bench run in one process: leave out torchrun")
        if cfg.predict:
            return predict_files(cfg)
        if cfg.report:
            write_report(Path(cfg.report))
        elif cfg.bench:
            check_config(cfg)
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            bench(resolve_precision(cfg))
        else:
            run(cfg)
    except UserError as e:
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
    return 0


# ----------------------------------------------------------------------------------------
# tools: tuning (successive halving over random settings, scored on validation folds only)
# ----------------------------------------------------------------------------------------

SPACE = {  # what --tune samples; depth only for the transformer
    "lr": lambda r: float(round(10 ** r.uniform(-3.3, -2.2), 5)),
    "weight_decay": lambda r: float(round(10 ** r.uniform(-3, -0.7), 4)),
    "dropout": lambda r: float(r.choice([0.0, 0.1, 0.2, 0.3])),
    "dim": lambda r: int(r.choice([64, 128, 192])),
    "depth": lambda r: int(r.choice([2, 3, 4])),
    "mixup": lambda r: float(r.choice([0.0, 0.2, 0.4, 1.0])),
    "gain_db": lambda r: float(r.choice([0.0, 6.0])),
    "label_smoothing": lambda r: float(r.choice([0.0, 0.1])),
}


def score_trial(cfg: Config, ds: Dataset, clips: tuple, trial_dir: Path, n_folds: int) -> float:
    """Mean over the first n_folds validation folds of the last 10% of epochs' accuracy."""
    tracker = Tracker(cfg, trial_dir, {}, mode="disabled")  # trials are many; W&B gets the final runs
    accs = []
    for fold in range(1, n_folds + 1):
        fold_dir = trial_dir / f"fold{fold}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        _, _, history, _ = train_fold(cfg, clips[0], ds.labels, ds.splits[fold - 1], fold, fold_dir,
                                   len(ds.classes), tracker, lambda *_: None, clips[1])
        tail = max(1, len(history) // 10)
        accs.append(np.mean([r["val_acc"] for r in history[-tail:]]))
        if WORKER.main:
            (fold_dir / "state.pt").unlink(missing_ok=True)
    return float(np.mean(accs))


def tune(cfg: Config, ds: Dataset, clips: tuple, out: Path) -> dict:
    """--tune N: the settings as given (trial 0) and N - 1 random ones; a third survive each rung
    (epochs/4 on 2 folds, epochs/2 on all folds, then all epochs on all folds), and the search
    stops when one is left (training it again would only re-score it). A trial's score is its
    mean over folds of the validation accuracy of its last 10% of epochs. Only ds.splits
    are used: the test fold is never read. Writes out/trials.csv (every trial at every rung) and
    out/best.json; a rerun reuses the scores in trials.csv whose settings still match."""
    rng = np.random.default_rng(cfg.seed)
    names = [n for n in SPACE if n != "depth" or cfg.arch == "transformer"]
    # Trial 0 is the recipe as given, so the search returns it unless another setting beats it.
    trials = [{n: getattr(cfg, n) for n in names}] + [{n: SPACE[n](rng) for n in names} for _ in range(cfg.tune - 1)]
    done = {(int(r["trial"]), int(r["rung"])): float(r["score"]) for r in read_csv(out / "trials.csv")
            if int(r["trial"]) < len(trials) and all(float(r[n]) == float(trials[int(r["trial"])][n]) for n in names)} \
        if (out / "trials.csv").is_file() else {}
    rows, alive = [], list(range(len(trials)))
    for rung, (epochs, n_folds) in enumerate([(max(cfg.epochs // 4, 1), 2), (max(cfg.epochs // 2, 1), cfg.kfold),
                                              (cfg.epochs, cfg.kfold)]):
        scores = {}
        for t in alive:
            trial_cfg = dataclasses.replace(cfg, **trials[t], epochs=epochs, tune=0)
            scores[t] = done.get((t, rung))
            if scores[t] is None:
                scores[t] = score_trial(trial_cfg, ds, clips, out / f"trial{t}-rung{rung}", n_folds)
            rows.append({"trial": t, "rung": rung, "epochs": epochs, "folds": n_folds, **trials[t],
                         "score": scores[t]})
            write_csv(out / "trials.csv", list(rows[0]), [list(r.values()) for r in rows])
            print(f"tune {cfg.arch}: rung {rung} trial {t} ({epochs} epochs, {n_folds} folds) "
                  f"score {scores[t]:.4f} {trials[t]}", flush=True)
        alive = sorted(alive, key=lambda t: -scores[t])[:max(1, math.ceil(len(alive) / 3))]
        if len(alive) == 1:
            break
    best = {"arch": cfg.arch, "score": scores[alive[0]], "trial": alive[0], "hparams": trials[alive[0]]}
    write_json(out / "best.json", best)
    print(f"tune {cfg.arch}: best trial {alive[0]}, score {best['score']:.4f}: {best['hparams']}")
    return best


# ----------------------------------------------------------------------------------------
# tools: the LR range test
# ----------------------------------------------------------------------------------------

def lr_range_test(cfg, waves, labels, train_idx, n_classes, steps: int = 200, lo: float = 1e-6, hi: float = 1.0,
                  lengths=None):
    """LR range test (Smith 2017): from a fresh model, one step per batch of train_idx while the
    learning rate grows exponentially from lo to hi, until the smoothed loss passes 4x its lowest.
    Returns the rows (step, lr, loss, smoothed); suggest_lr reads the peak from them."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, n_classes).to(WORKER.device)
    opt = make_optimizer(cfg, model)
    model.train()
    rows, avg, lowest = [], 0.0, math.inf
    batches = []
    for step in range(steps):
        if not batches:  # a fresh random order each pass over the training clips
            perm = torch.from_numpy(train_idx)[torch.randperm(len(train_idx))]
            batches = list(perm.tensor_split(n_batches(len(train_idx), cfg.batch_size)))
        chunk = batches.pop()
        lr = lo * (hi / lo) ** (step / (steps - 1))
        wave, target, n = augment(waves[chunk].to(WORKER.device), labels[chunk].to(WORKER.device), n_classes, cfg,
                                  None if lengths is None else lengths[chunk].to(WORKER.device))
        loss, _ = train_step(model, opt, wave, target, cfg, lr, n)
        avg = 0.9 * avg + 0.1 * loss
        smoothed = avg / (1 - 0.9 ** (step + 1))  # bias-corrected exponential average
        rows.append({"step": step + 1, "lr": lr, "loss": loss, "smoothed": smoothed})
        lowest = min(lowest, smoothed)
        if not math.isfinite(loss) or smoothed > 4 * lowest:
            break
    return rows


def suggest_lr(rows) -> float:
    """The learning rate at the smoothed loss's minimum: the largest at which the loss still
    falls, which Smith (2018) takes as one-cycle's peak (the schedule spends little time there).
    The steepest descent, the other common rule, proved unstable here (NOTES.md)."""
    return float(min(rows, key=lambda r: r["smoothed"])["lr"])


def lr_find_svg(rows, name: str) -> str:
    """Loss against log10 learning rate, capped at 1.5x the starting loss so the final blow-up
    does not flatten the part that matters."""
    cap = 1.5 * rows[0]["smoothed"]
    return svg_lines([(key, [math.log10(r["lr"]) for r in rows], [min(r[key], cap) for r in rows], None)
                      for key in ("loss", "smoothed")],
                     title=f"{name}: LR range test (loss capped at {cap:.2f})", xlabel="log10 learning rate",
                     ylabel="training loss")


def find_lr(cfg: Config, ds: Dataset, run_dir: Path) -> float:
    """The LR range test's suggested peak learning rate, from run_dir/lr_find.csv when an earlier
    run of this folder wrote it (so a resumed --lr auto run keeps its number), else measured now
    on validation split 1's training clips (never the test fold)."""
    path = run_dir / "lr_find.csv"
    if path.is_file():
        rows = [{k: float(v) for k, v in r.items()} for r in read_csv(path)]
    else:
        waves, lengths = load_clips(ds.root, ds.table, cfg)
        rows = lr_range_test(dataclasses.replace(cfg, lr=1.0), to_device(waves), ds.labels, ds.splits[0][0],
                             len(ds.classes), lengths=to_device(lengths))
        write_csv(path, list(rows[0]), [list(r.values()) for r in rows])
        write_text(run_dir / "lr_find.svg", lr_find_svg(rows, run_dir.name))
    lr = suggest_lr(rows)
    print(f"LR range test ({path}, {len(rows)} steps): suggested peak learning rate {lr:.3g} "
          "(the learning rate at the smoothed loss's minimum)")
    return lr


# ----------------------------------------------------------------------------------------
# tools: benchmark, against this machine's own matrix-product speed
# ----------------------------------------------------------------------------------------

def matmul_gflops(n: int = 2048, repeat: int = 5) -> float:
    """float32 GFLOP/s of a large matrix product: the practical ceiling for our layers."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool and caches
    t0 = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n ** 3 * repeat / (time.perf_counter() - t0) / 1e9


def step_flops(model, wave, labels, n_classes) -> tuple:
    """(forward FLOPs per clip, training-step FLOPs per clip), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fwd:
        model(wave[:1])
    model.train()
    with FlopCounterMode(display=False) as step:
        F.cross_entropy(model(wave), F.one_hot(labels, n_classes).float()).backward()
    model.zero_grad(set_to_none=True)
    return fwd.get_total_flops(), step.get_total_flops() / len(wave)


def bench_row(cfg: Config, n_train: int = 240, n_val: int = 80, n_classes: int = 10) -> dict:
    """Speed of one architecture on random clips shaped like the course configuration's folds."""
    n_samples = round(cfg.sample_rate * cfg.clip_seconds)
    torch.manual_seed(cfg.seed)
    waves, labels = torch.randn(n_train + n_val, n_samples) * 0.1, torch.arange(n_train + n_val) % n_classes
    model = build_model(cfg, n_classes).to(WORKER.device)
    opt, order = make_optimizer(cfg, model), torch.Generator().manual_seed(cfg.seed)
    batch = waves[:cfg.batch_size].to(WORKER.device), labels[:cfg.batch_size].to(WORKER.device)
    fwd_flops, train_flops = step_flops(model, *batch, n_classes)
    train_epoch(model, opt, waves, labels, np.arange(n_train), cfg, n_classes, 0, 100, order)  # warm-up
    t0 = time.perf_counter()
    train_epoch(model, opt, waves, labels, np.arange(n_train), cfg, n_classes, 1, 100, order)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate(model, waves[n_train:], labels[n_train:], cfg.precision)
    t_eval = time.perf_counter() - t0
    epoch = t_train + t_eval
    return {"arch": cfg.arch, "heads": cfg.heads if cfg.arch == "transformer" else None,
            "params": count_params(model)["trainable"], "fwd_mflops_per_clip": fwd_flops / 1e6,
            "train_clips_per_s": n_train / t_train, "eval_clips_per_s": n_val / t_eval, "s_per_epoch": epoch,
            "train_gflops": train_flops * n_train / t_train / 1e9,
            "default_command_min": cfg.kfold * cfg.epochs * epoch / 60}


def bench(cfg: Config) -> dict:
    """--bench: one row per architecture, the projected default command and grid, and how close
    the training step comes to the matrix product's GFLOP/s; written to out/bench.json too."""
    import resource
    peak = matmul_gflops()
    rows = [bench_row(dataclasses.replace(cfg, arch=a, heads=h))
            for a, h in (("cnn", cfg.heads), ("transformer", 1), ("transformer", 2), ("transformer", 4))]
    # Each architecture runs with fold 1 held out (the rows: 240 training + 80 validation clips per
    # fold) and with none (300 + 100): an epoch's time grows with its clips, so the second costs 5/4.
    grid_min = (1 + 400 / 320) * sum(r["default_command_min"] for r in rows)
    print(f"{'arch':<14}{'params':>9}{'MFLOP/clip':>11}{'train/s':>9}{'eval/s':>8}{'s/epoch':>9}"
          f"{'GFLOP/s':>9}{'of peak':>8}{'100 ep x 4':>11}")
    for r in rows:
        name = r["arch"] + (f"-h{r['heads']}" if r["heads"] else "")
        print(f"{name:<14}{r['params']:>9,}{r['fwd_mflops_per_clip']:>11.1f}{r['train_clips_per_s']:>9.0f}"
              f"{r['eval_clips_per_s']:>8.0f}{r['s_per_epoch']:>9.2f}{r['train_gflops']:>9.1f}"
              f"{r['train_gflops'] / peak:>8.0%}{r['default_command_min']:>9.1f} m")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"matrix product: {peak:.1f} GFLOP/s with {torch.get_num_threads()} threads; run.sh grid projected "
          f"{grid_min:.0f} min; peak resident memory {rss:.0f} MiB")
    result = {"rows": rows, "matmul_gflops": peak, "grid_min": grid_min, "peak_rss_mib": rss,
              "threads": torch.get_num_threads(), "versions": versions()}
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(cfg.out) / "bench.json", result)
    return result


# ----------------------------------------------------------------------------------------
# tools: the report, REPORT.md and SVG figures from the files finished runs wrote
# ----------------------------------------------------------------------------------------

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf", "#000000"]


def xml_escape(text) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


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


def svg_lines(series, *, title, xlabel, ylabel, w=600, h=320, x_integer=False):
    """A line chart as SVG text; series: [(label, xs, ys, band or None)], band = (lows, highs);
    x_integer: x ticks at whole numbers only (epochs)."""
    left, right, top, bottom = 55, 150, 30, 42
    xs = np.concatenate([np.asarray(s[1], float) for s in series])
    ys = np.concatenate([np.asarray(v, float) for s in series for v in ([s[2]] + list(s[3] or []))])
    xticks, yticks = nice_ticks(xs.min(), xs.max(), integer=x_integer), nice_ticks(ys.min(), ys.max())
    x0, x1, y0, y1 = xticks[0], xticks[-1], yticks[0], yticks[-1]
    px = lambda x: left + (x - x0) / ((x1 - x0) or 1) * (w - left - right)  # noqa: E731
    py = lambda y: h - bottom - (y - y0) / ((y1 - y0) or 1) * (h - top - bottom)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="11"><rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left}" y="16" font-size="13">{xml_escape(title)}</text>',
           f'<text x="{(left + w - right) / 2}" y="{h - 8}" text-anchor="middle">{xml_escape(xlabel)}</text>',
           f'<text x="14" y="{h / 2}" text-anchor="middle" transform="rotate(-90 14 {h / 2})">{xml_escape(ylabel)}</text>',
           f'<path d="M{left},{top} V{h - bottom} H{w - right}" stroke="black" fill="none"/>']
    out += [f'<text class="x" x="{px(v):.1f}" y="{h - bottom + 14}" text-anchor="middle">{v:g}</text>' for v in xticks]
    out += [f'<text class="y" x="{left - 4}" y="{py(v) + 4:.1f}" text-anchor="end">{v:g}</text>'
            f'<path d="M{left},{py(v):.1f} H{w - right}" stroke="#ddd"/>' for v in yticks]
    for i, (label, sx, sy, band) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        if band is not None:
            pts = list(zip(sx, band[1])) + list(zip(sx, band[0]))[::-1]
            out.append(f'<polygon points="{" ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)}" '
                       f'fill="{color}" fill-opacity="0.18" stroke="none"/>')
        out.append(f'<polyline points="{" ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(sx, sy))}" '
                   f'fill="none" stroke="{color}" stroke-width="1.5"/>')
        ly = top + 8 + 15 * i
        out += [f'<path d="M{w - right + 8},{ly} h16" stroke="{color}" stroke-width="2"/>',
                f'<text x="{w - right + 28}" y="{ly + 4}">{xml_escape(label)}</text>']
    return "\n".join(out) + "\n</svg>\n"


def svg_confusion(cm, classes, title):
    """Confusion matrix heat map with counts; rows true, columns predicted."""
    cm = np.asarray(cm)
    label = 7 * max(len(str(c)) for c in classes) + 10  # room for the longest class name at 12 px
    cell, left, top = 34, label + 20, 40
    size = len(classes) * cell
    w, h = left + size + 20, top + size + label + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="12"><rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13">{xml_escape(title)}</text>',
           f'<text x="{left + size / 2}" y="{h - 6}" text-anchor="middle">predicted</text>',
           f'<text x="10" y="{top - 8}">true</text>']
    rows = np.maximum(cm.sum(1, keepdims=True), 1)
    for i, name in enumerate(classes):
        out += [f'<text x="{left - 4}" y="{top + i * cell + cell / 2 + 4}" text-anchor="end">{xml_escape(name)}</text>',
                f'<text x="{left + i * cell + cell / 2 + 4}" y="{top + size + 6}" text-anchor="end" '
                f'transform="rotate(-90 {left + i * cell + cell / 2 + 4} {top + size + 6})">{xml_escape(name)}</text>']
        for j in range(len(classes)):
            share = cm[i, j] / rows[i, 0]  # colour by the row's share, so classes of any size compare
            out += [f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell}" height="{cell}" '
                    f'fill="rgb({int(255 - 225 * share)},{int(255 - 155 * share)},255)" stroke="#fff"/>',
                    f'<text x="{left + j * cell + cell / 2}" y="{top + i * cell + cell / 2 + 4}" text-anchor="middle" '
                    f'fill="{"white" if share > 0.6 else "black"}">{cm[i, j]}</text>']
    return "\n".join(out) + "\n</svg>\n"


def load_runs(root: Path) -> list:
    """Every finished configuration under root: its config, metrics, per-fold histories and ROC points."""
    runs = []
    for m in sorted(root.glob("*/metrics.json")):
        d = m.parent
        config, metrics = json.loads((d / "config.json").read_text()), json.loads(m.read_text())
        histories = [read_csv(d / f"fold{i}" / "history.csv") for i in range(1, config["kfold"] + 1)]
        runs.append({"name": d.name, "dir": d, "config": config, "metrics": metrics, "histories": histories,
                     "roc": read_csv(d / "roc.csv")})
    return runs


def headline(run) -> dict:
    """The numbers of one configuration that the tables compare: validation accuracy of each fold's
    last epoch (its history's last row), which nothing chose, and of its best (optimistic)."""
    m, folds = run["metrics"], run["metrics"]["folds"]
    val = [float(h[-1]["val_acc"]) for h in run["histories"]]
    best = [f["val"]["accuracy"] for f in folds]
    shown = m["test"] or m.get("val_final") or m["val"]
    return {"val_mean": float(np.mean(val)), "val_std": float(np.std(val)), "val_folds": val,
            "best_mean": float(np.mean(best)),
            "test_folds": [f["test"]["accuracy"] for f in folds] if m["test"] else None,
            "f1": shown["macro_f1"], "auc": shown["macro_auc"],
            "on": "test" if m["test"] else "val, final epoch" if "val_final" in m
            else "val, best epoch"}


def split_label(config) -> str:
    return f"test fold {config['test_fold']}, k={config['kfold']}" if config["test_fold"] else \
        f"no test fold, k={config['kfold']}"


def config_table(runs) -> list:
    lines = ["| configuration | arch | heads | split | trainable | non-trainable | val acc, final epoch | "
             "val acc, best epoch (optimistic) | test acc (fold models) | ensemble test acc | macro F1 | "
             "macro AUC | F1/AUC on | minutes |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        c, m, h = r["config"], r["metrics"], headline(r)
        test = f"{m['test_mean']:.3f} ± {m['test_std']:.3f}" if m["test"] else "-"
        ens = f"{m['ensemble_test']['accuracy']:.3f}" if m["ensemble_test"] else "-"
        lines.append(f"| {r['name']} | {c['arch']} | {c['heads'] if c['arch'] == 'transformer' else '-'} | "
                     f"{split_label(c)} | {m['params']['trainable']:,} | {m['params']['non_trainable']:,} | "
                     f"{h['val_mean']:.3f} ± {h['val_std']:.3f} | {h['best_mean']:.3f} | {test} | {ens} | {h['f1']:.3f} | {h['auc']:.3f} | "
                     f"{h['on']} | {m['seconds'] / 60:.1f} |")
    return lines


def paired(a, b):
    """Mean of a - b over paired folds, its 95% t interval and the paired t-test p-value."""
    d = np.asarray(a) - np.asarray(b)
    if len(d) < 2 or np.allclose(d, d[0]):
        return float(d.mean()), float(d.mean()), float(d.mean()), 1.0 if np.allclose(d, 0) else 0.0
    half = scipy.stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half), float(scipy.stats.ttest_rel(a, b).pvalue)


def best_per_split(runs) -> dict:
    """{split: its configuration with the highest mean validation accuracy}; the test fold plays no part."""
    splits = sorted({split_label(r["config"]) for r in runs})
    return {s: max((r for r in runs if split_label(r["config"]) == s), key=lambda r: headline(r)["val_mean"])
            for s in splits}


def verdict(best, group) -> list:
    """The comparison in one sentence: is the best configuration's lead beyond noise?"""
    others = [r for r in group if r is not best]
    if not others:
        return []
    beyond = [r["name"] for r in others if paired(headline(best)["val_folds"], headline(r)["val_folds"])[1] > 0]
    params = {r["name"]: r["metrics"]["params"]["trainable"] for r in group}
    smallest = min(params, key=params.get)
    lead = (f"its lead is beyond noise over {', '.join(f'`{n}`' for n in beyond)} and within noise over the rest"
            if beyond else "but every difference from it is within noise on these folds")
    return [f"**Verdict.** `{best['name']}` has the highest final-epoch validation accuracy, {lead}. The smallest model, "
            f"`{smallest}` ({params[smallest]:,} parameters, {max(params.values()) / params[smallest]:.1f}x fewer "
            f"than the largest), is the better buy where accuracies are tied."]


def class_comparison(group) -> list:
    """Per-class F1 of the best transformer against the cnn, on the pooled validation predictions."""
    cnn = [r for r in group if r["config"]["arch"] == "cnn"]
    tfs = [r for r in group if r["config"]["arch"] == "transformer"]
    if not cnn or not tfs:
        return []
    tf = max(tfs, key=lambda r: headline(r)["val_mean"])
    on = lambda r: r["metrics"].get("val_final") or r["metrics"]["val"]  # noqa: E731
    a, b = on(cnn[0])["per_class"], on(tf)["per_class"]
    lines = [f"Per-class F1 on the pooled validation predictions, `{tf['name']}` against `{cnn[0]['name']}`:", "",
             "| class | cnn F1 | transformer F1 | transformer − cnn |", "|---|---|---|---|"]
    for c in sorted(a, key=lambda c: b[c]["f1"] - a[c]["f1"]):
        lines.append(f"| {c} | {a[c]['f1']:.3f} | {b[c]['f1']:.3f} | {b[c]['f1'] - a[c]['f1']:+.3f} |")
    return lines


def heads_comparison(group) -> list:
    tfs = sorted((r for r in group if r["config"]["arch"] == "transformer"), key=lambda r: r["config"]["heads"])
    if len(tfs) < 2:
        return []
    cells = ", ".join(f"{r['config']['heads']} head(s) {headline(r)['val_mean']:.3f} ± {headline(r)['val_std']:.3f}"
                      for r in tfs)
    return [f"Heads, by validation accuracy over folds: {cells}."]


def analysis(runs) -> list:
    """Which configuration is best, by validation accuracy, and whether each gap is beyond noise."""
    lines = ["## Analysis", "",
             "The best configuration of each split is the one with the highest mean final-epoch validation accuracy over its "
             "folds; the test fold plays no part in choosing it. Each other configuration of the same split is "
             "compared with it fold by fold (the folds are the same clips): the mean difference, its 95% "
             "t interval, and the paired t-test. With k folds there are only k pairs, so an interval that "
             "contains 0 means the difference is within noise.", ""]
    for split, best in best_per_split(runs).items():
        group = [r for r in runs if split_label(r["config"]) == split]
        hb = headline(best)
        lines += [f"### {split}: best is `{best['name']}`", "",
                  f"Final-epoch validation accuracy {hb['val_mean']:.3f} ± {hb['val_std']:.3f} over folds"
                  + (f"; fold-model test accuracy {best['metrics']['test_mean']:.3f}, k-fold ensemble "
                     f"{best['metrics']['ensemble_test']['accuracy']:.3f}." if best["metrics"]["test"] else "."), "",
                  "| compared with | Δ final-epoch val acc (best − other) | 95% CI | p | Δ test acc | 95% CI | p | "
                  "accuracy per 100k params |", "|---|---|---|---|---|---|---|---|"]
        for r in group:
            h = headline(r)
            dv = paired(hb["val_folds"], h["val_folds"])
            dt = paired(hb["test_folds"], h["test_folds"]) if hb["test_folds"] else None
            per = (h["val_mean"] if not r["metrics"]["test"] else r["metrics"]["test_mean"]) \
                / (r["metrics"]["params"]["trainable"] / 1e5)
            test_cells = f"{dt[0]:+.3f} | [{dt[1]:+.3f}, {dt[2]:+.3f}] | {dt[3]:.2f}" if dt else "- | - | -"
            noise = " (within noise)" if dv[1] <= 0 <= dv[2] and r is not best else ""
            lines.append(f"| `{r['name']}`{' (itself)' if r is best else ''} | {dv[0]:+.3f}{noise} | "
                         f"[{dv[1]:+.3f}, {dv[2]:+.3f}] | {dv[3]:.2f} | {test_cells} | {per:.3f} |")
        lines += [""] + verdict(best, group) + [""] + class_comparison(group) + [""] + heads_comparison(group) + [""]
    return lines


def shown_predictions(run):
    """(split, its rows of predictions.csv): the test fold's, else the last epoch's validation."""
    rows = read_csv(run["dir"] / "predictions.csv")
    split = next(s for s in ("test", "val_final", "val") if any(r["split"] == s for r in rows))
    return split, [r for r in rows if r["split"] == split]


def misclassified(run) -> list:
    """Every wrong prediction of the test fold (pooled validation where there is none), one row per
    clip and fold model, and the class pairs confused most often."""
    split, rows = shown_predictions(run)
    classes = run["metrics"]["classes"]
    wrong = [r for r in rows if r["label"] != r["pred"]]
    n = len(rows)
    on = {"test": "test fold, every fold model", "val_final": "pooled validation folds, final epoch",
          "val": "pooled validation folds, best epoch"}[split]
    lines = [f"### `{run['name']}`: {len(wrong)} of {n} predictions wrong ({on})", "",
             "| clip | true class | predicted | p(true) | p(predicted) | fold model |", "|---|---|---|---|---|---|"]
    for r in sorted(wrong, key=lambda r: (r["filename"], int(r["fold"]))):
        t, p = classes[int(r["label"])], classes[int(r["pred"])]
        lines.append(f"| {r['filename']} | {t} | {p} | {float(r['p_' + t]):.2f} | {float(r['p_' + p]):.2f} | "
                     f"{r['fold']} |")
    pairs = {}
    for r in wrong:
        pair = (classes[int(r["label"])], classes[int(r["pred"])])
        pairs[pair] = pairs.get(pair, 0) + 1
    top = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    return lines + ["", "Most confused (true → predicted): "
                    + "; ".join(f"{t} → {p} ({c})" for (t, p), c in top) + ".", ""]


def tuning_section(root: Path) -> list:
    """The best settings per architecture, with every trial behind them."""
    lines = ["## Hyperparameters", ""]
    tunings = sorted(root.glob("tune-*/best.json"))
    if not tunings:
        return lines + ["No tuning has run here: every configuration used the defaults in `config.json`. "
                        "`python audiotx.py --arch ARCH --tune N --out DIR` tunes on the validation folds "
                        "and `run.sh` then uses its `best.json`.", ""]
    for path in tunings:
        best, trials = json.loads(path.read_text()), read_csv(path.parent / "trials.csv")
        lines += [f"### {best['arch']}: best validation score {best['score']:.3f} (trial {best['trial']})", "",
                  "`" + json.dumps(best["hparams"]) + "`", "", "| " + " | ".join(trials[0]) + " |",
                  "|" + "---|" * len(trials[0])]
        lines += ["| " + " | ".join(f"{float(v):.4g}" if k == "score" else v for k, v in t.items()) + " |"
                  for t in trials]
        lines.append("")
    return lines


def run_figures(run, fig_dir: Path) -> list:
    """Curves, ROC and confusion SVGs of one configuration; returns the Markdown that shows them."""
    name, m, classes = run["name"], run["metrics"], run["metrics"]["classes"]
    hist = {k: np.array([[float(row[k]) for row in h] for h in run["histories"]])  # (k folds, epochs)
            for k in ("train_loss", "val_loss", "train_acc", "val_acc")}
    epochs = np.arange(1, hist["val_acc"].shape[1] + 1)
    band = lambda a: (a.min(0), a.max(0))  # noqa: E731  spread over folds
    for kind in ("loss", "acc"):
        svg = svg_lines([(f"{s} {kind}", epochs, hist[f"{s}_{kind}"].mean(0), band(hist[f"{s}_{kind}"]))
                         for s in ("train", "val")],
                        title=f"{name}: {kind} per epoch (mean over folds, band = min-max)", xlabel="epoch",
                        ylabel=kind, x_integer=True)
        write_text(fig_dir / f"{name}-{kind}.svg", svg)
    shown = m["test"] or m.get("val_final") or m["val"]
    roc = [(c, [float(r["fpr"]) for r in run["roc"] if r["class"] == c],
            [float(r["tpr"]) for r in run["roc"] if r["class"] == c], None) for c in classes]
    grid = np.linspace(0, 1, 101)  # macro average: each class's ROC interpolated on one fpr grid
    macro = np.mean([np.interp(grid, fpr, tpr) for _, fpr, tpr, _ in roc], axis=0)
    on = "test" if m["test"] else "pooled validation, final epoch" if "val_final" in m else "pooled validation"
    write_text(fig_dir / f"{name}-roc.svg", svg_lines(
        roc + [(f"macro (AUC {shown['macro_auc']:.3f})", grid, macro, None)],
        title=f"{name}: ROC on {on}", xlabel="false positive rate", ylabel="true positive rate"))
    write_text(fig_dir / f"{name}-confusion.svg", svg_confusion(shown["confusion"], classes, f"{name}: {on}"))
    return [f"### {name}", "", f"![loss](figures/{name}-loss.svg) ![accuracy](figures/{name}-acc.svg)", "",
            f"![ROC](figures/{name}-roc.svg) ![confusion matrix](figures/{name}-confusion.svg)", ""]


# ----------------------------------------------------------------------------------------
# tools: Grad-CAM and attention over the clip's spectrogram
# ----------------------------------------------------------------------------------------

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


def svg_spectrogram(wave, sample_rate: int, seconds: float, *, title: str, curve=None, rows=()):
    """The clip's log-mel spectrogram (low bands at the bottom) with a curve over time laid on it
    (curve = (label, values (T,))), and under it one heat-map row per (label, values (T,)) in rows.
    Curves and rows are each scaled to their own peak."""
    left, top, w, spec_h, row_h = 70, 30, 600, 160, 18
    with torch.no_grad():
        mel = LogMel(sample_rate=sample_rate).eval()(wave[None].float())[0].numpy()  # (F, frames)
    mel = (mel - mel.min()) / max(np.ptp(mel), 1e-9)
    image = base64.b64encode(png(heat_colors(mel[::-1]))).decode()
    h = top + spec_h + row_h * len(rows) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + w + 20}" height="{h}" '
           'font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{left}" y="16" font-size="13">{xml_escape(title)}</text>',
           f'<image x="{left}" y="{top}" width="{w}" height="{spec_h}" preserveAspectRatio="none" '
           f'href="data:image/png;base64,{image}"/>',
           f'<text x="{left - 4}" y="{top + spec_h / 2}" text-anchor="end">mel bands</text>']
    if curve is not None:
        v = np.asarray(curve[1], float) / max(float(np.max(curve[1])), 1e-12)
        xs = left + (np.arange(len(v)) + 0.5) * w / len(v)
        pts = " ".join(f"{x:.1f},{top + spec_h * (1 - y):.1f}" for x, y in zip(xs, v))
        out += [f'<polyline points="{pts}" fill="none" stroke="white" stroke-width="3"/>',
                f'<polyline points="{pts}" fill="none" stroke="#d62728" stroke-width="1.5"/>',
                f'<text x="{left + w - 4}" y="{top + 14}" text-anchor="end" fill="white">'
                f'{xml_escape(curve[0])}</text>']
    for k, (label, values) in enumerate(rows):
        v = np.asarray(values, float) / max(float(np.max(values)), 1e-12)
        y, cell = top + spec_h + 4 + k * row_h, w / len(v)
        out.append(f'<text x="{left - 4}" y="{y + 13}" text-anchor="end">{xml_escape(label)}</text>')
        out += [f'<rect x="{left + t * cell:.1f}" y="{y}" width="{cell + 0.5:.1f}" height="{row_h - 2}" '
                f'fill="rgb({c[0]},{c[1]},{c[2]})"/>' for t, c in enumerate(heat_colors(v))]
    axis = top + spec_h + row_h * len(rows) + 20
    out += [f'<text x="{left + t / seconds * w:.1f}" y="{axis}" text-anchor="middle">{t:g} s</text>'
            for t in nice_ticks(0, seconds) if t <= seconds]
    return "\n".join(out) + "\n</svg>\n"


def grad_cam(model, wave, target: int):
    """Grad-CAM over time at the front end's output: wave (S,) -> (T,) scaled to [0, 1]. Each
    channel is weighted by its mean gradient of the target logit over time (Selvaraju et al. 2017)."""
    model.eval()
    feats = {}
    handle = model.front.register_forward_hook(lambda module, inputs, out: feats.update(x=out[0]))
    try:
        logits = model(wave[None])  # (1, K)
    finally:
        handle.remove()
    x = feats["x"]  # (1, T, C)
    grad, = torch.autograd.grad(logits[0, target], x)  # (1, T, C)
    cam = F.relu((grad.mean(1, keepdim=True) * x).sum(2))[0]  # (T,)
    return (cam / cam.max().clamp_min(1e-12)).detach()


@torch.no_grad()
def cls_attention(model, wave):
    """The <cls> token's attention over the T frames: per block and head (depth, nh, T), and rolled
    out over the blocks (T,), with the residual counted as half of each block (Abnar & Zuidema 2020)."""
    model.eval()
    model(wave[None])
    atts = [block.attn.att[0] for block in model.blocks]  # depth x (nh, 1 + T, 1 + T)
    n = atts[0].shape[-1]
    eye = torch.eye(n, device=atts[0].device)
    rollout = eye
    for att in atts:
        rollout = (0.5 * att.mean(0) + 0.5 * eye) @ rollout  # (1 + T, 1 + T)
    return torch.stack([att[:, 0, 1:] for att in atts]), rollout[0, 1:]


def fold_model_1(run):
    """(config, fold model 1) of a finished run; None without its checkpoints (not in git)."""
    if not (run["dir"] / "fold1" / "model.pt").is_file():
        return None
    cfg, _, models = load_fold_models(run["dir"], folds="1")
    return cfg, models[0]


def chosen_clips(run) -> list:
    """Fold model 1's predictions on two clips per class: its surest right one and surest wrong one."""
    rows = [r for r in shown_predictions(run)[1] if r["fold"] == "1"]
    surest = lambda r: max(float(v) for k, v in r.items() if k.startswith("p_"))  # noqa: E731
    picked = []
    for label in sorted({r["label"] for r in rows}, key=int):
        for right in (True, False):
            pool = [r for r in rows if r["label"] == label and (r["pred"] == label) == right]
            picked += sorted(pool, key=lambda r: (-surest(r), r["filename"]))[:1]
    return picked


def explain_section(best, runs, fig_dir: Path) -> list:
    """Grad-CAM of the best configuration's fold-1 model on two clips per class, and the <cls>
    attention of every transformer of the same split on two of those clips."""
    lines = ["## What the models attend to", ""]
    loaded = fold_model_1(best)
    if loaded is None:
        return lines + [f"No figures: {best['dir']}/fold1/model.pt is absent (checkpoints stay out of git).", ""]
    cfg, model = loaded
    try:
        ds = load_dataset(dataclasses.replace(cfg, data=cfg.data if Path(cfg.data).expanduser().is_dir() else ""))
        waves, _ = load_clips(ds.root, ds.table, cfg)  # the report's clips are ESC's, full length
    except UserError as e:
        return lines + [f"No figures: {e}", ""]
    index = {r["filename"]: i for i, r in enumerate(ds.table)}
    classes = best["metrics"]["classes"]
    clips = chosen_clips(best)
    lines += [f"Grad-CAM at the front end's last layer of `{best['name']}` (fold model 1) over time, on its "
              "surest right and surest wrong clip of each class, over the clip's log-mel spectrogram.", ""]
    for r in clips:
        wave, pred = waves[index[r["filename"]]], int(r["pred"])
        name = f"gradcam-{best['name']}-{Path(r['filename']).stem}.svg"
        title = f"{r['filename']}: true {classes[int(r['label'])]}, predicted {classes[pred]}"
        cam = (f"Grad-CAM ({classes[pred]})", grad_cam(model, wave, pred).numpy())
        write_text(fig_dir / name, svg_spectrogram(wave, cfg.sample_rate, cfg.clip_seconds, title=title, curve=cam))
        lines.append(f"![Grad-CAM {r['filename']}](figures/{name})")
    lines += ["", "The `<cls>` token's attention over time in the last block, one row per head, and rolled "
              "out over all blocks, for every transformer of the same split on the same two clips:", ""]
    for run in (r for r in runs if split_label(r["config"]) == split_label(best["config"])
                and r["config"]["arch"] == "transformer"):
        loaded = fold_model_1(run)
        for r in clips[:2] if loaded else []:
            wave = waves[index[r["filename"]]]
            per_head, rollout = cls_attention(loaded[1], wave)
            rows = [(f"head {h + 1}", a.numpy()) for h, a in enumerate(per_head[-1])] + [("rollout", rollout.numpy())]
            name = f"attention-{run['name']}-{Path(r['filename']).stem}.svg"
            title = f"{run['name']}: {r['filename']} (true {classes[int(r['label'])]})"
            write_text(fig_dir / name, svg_spectrogram(wave, cfg.sample_rate, cfg.clip_seconds, title=title, rows=rows))
            lines.append(f"![attention {run['name']} {r['filename']}](figures/{name})")
    return lines + [""]


def write_report(root: Path) -> Path:
    """REPORT.md and figures/*.svg in root, from every finished configuration below it."""
    runs = load_runs(root)
    if not runs:
        raise UserError(f"{root}: no finished configuration found (no */metrics.json); run bash run.sh first")
    fig_dir = root / "figures"
    fig_dir.mkdir(exist_ok=True)
    lines = ["# audiotx report", "",
             f"Written by `python audiotx.py --report {root}` from the files of {len(runs)} finished "
             f"configuration(s) in this folder. Accuracy is a fraction of clips; ± is the standard deviation "
             f"over the fold models. Macro F1 and AUC are on the test fold (every fold model's predictions "
             f"pooled), or on the pooled out-of-fold validation predictions where there is no test fold.", "",
             "## Every configuration", ""] + config_table(runs) + [""]
    lines += analysis(runs) + tuning_section(root)
    lines += ["## Misclassified clips of each split's best configuration", ""]
    bests = list(best_per_split(runs).values())
    for best in bests:
        lines += misclassified(best)
    # the figures for the course split's best configuration (the one with a test fold), else the first
    lines += explain_section(max(bests, key=lambda r: r["config"]["test_fold"] > 0), runs, fig_dir)
    lines += ["## Curves, ROC and confusion matrices", ""]
    for run in runs:
        lines += run_figures(run, fig_dir)
    urls = [u for r in runs if (r["dir"] / "wandb_urls.txt").is_file()
            for u in (r["dir"] / "wandb_urls.txt").read_text().split()]
    if urls:
        lines += ["## Weights & Biases runs", ""] + [f"- {u}" for u in urls] + [""]
    write_text(root / "REPORT.md", "\n".join(lines))
    print(f"wrote {root / 'REPORT.md'} and {len(list(fig_dir.glob('*.svg')))} figures")
    return root / "REPORT.md"


if __name__ == "__main__":
    sys.exit(main())
