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
    python audiotx.py --report runs                             # REPORT.md, figures (report.py)

Everything a run measures is written under runs/<name>/ (config.json, metrics.json,
predictions.csv, roc.csv, fold<i>/history.csv) and logged to Weights & Biases (offline unless
you are logged in). Headline, 2 CPU cores, 100 epochs: `python audiotx.py --arch cnn --kfold 4`
classifies the held-out official fold 1 of ESC-10 at 0.875 as an ensemble of its 4 fold models
(results/cnn-test1-k4/, from `OUT=results bash run.sh`).
"""

import argparse
import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import http.client
import importlib
import inspect
import io
import json
import math
import os
import platform
import re
import shutil
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
from html import escape
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
# where a first run fetches the data from, unless $AUDIOTX_ESC50_URL says otherwise
ESC50_URL = "https://github.com/karolpiczak/ESC-50/archive/refs/heads/master.zip"
ESC50_MB = 600  # the archive's size, for the line that says what a first run fetches
ESC_NAME = re.compile(r"^(\d+)-(\w+)-([A-Za-z]+)-(\d+)\.wav$")  # {fold}-{src}-{take}-{target}.wav
CACHE_VERSION = 2  # bump when the cached waveform format changes (2: clip lengths beside the waves)
ESC10 = {0: "dog", 1: "rooster", 10: "rain", 11: "sea_waves", 12: "crackling_fire",  # target: name
         20: "crying_baby", 21: "sneezing", 38: "clock_tick", 40: "helicopter", 41: "chainsaw"}


class UserError(Exception):
    """A problem with the user's data or flags: reported in one line, exit status 2."""


# ----------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------


@dataclass
class Config:
    # model
    arch: str = "transformer"    # cnn | transformer
    heads: int = 2               # attention heads: 1 | 2 | 4 (must divide dim)
    depth: int = 2               # attention blocks (>= 2)
    dim: int = 128               # channels out of the front end = transformer width
    dropout: float = 0.1         # in attention, MLPs and heads
    # data
    data: str = ""               # dataset folder or zip; else $AUDIOTX_DATA, else found or fetched
    dataset: str = "auto"        # auto | esc | urbansound8k: the folder's layout (auto: its table)
    subset: str = "esc10"        # esc10 | esc50 (which rows of meta/esc50.csv)
    sample_rate: int = 16000     # Hz after resampling
    features: str = "logwave"    # wave | logwave (the stem's output log-compressed)
    clip_seconds: float = 5.0    # clips are padded or cropped to this length
    # splits
    test_fold: int = 1           # official fold held out as the test set; 0 = none
    kfold: int = 4               # validation folds over the remaining clips
    # training
    epochs: int = 100            # passes over the training folds
    batch_size: int = 32         # clips per step
    lr: float = 2e-3             # peak learning rate; auto = the LR range test's suggestion
    weight_decay: float = 0.05   # AdamW, on weight matrices only
    label_smoothing: float = 0.1  # share of each target spread over all classes
    mixup: float = 0.4           # Beta(a, a) mixing of clip pairs; 0 = off
    shift: bool = True           # random circular time shift of each training clip
    gain_db: float = 6.0         # random gain in [-gain_db, +gain_db] dB
    stretch: float = 0.2         # each batch played at a random speed in [1 - s, 1 + s]; 0 = off
    select: str = "best"         # best | final: each fold keeps its best validation epoch or last
    seed: int = 0                # fold i is seeded with seed + i
    threads: int = 0             # torch CPU threads; 0 = torch's default
    device: str = "auto"         # auto | cpu | cuda | mps; auto = cuda, else mps, else cpu
    precision: str = "auto"      # auto | fp32 | bf16 (--amp); auto = bf16 where the device has it
    # output
    out: str = "runs"            # results go to out/name/
    name: str = ""               # default: derived from the configuration
    restart: bool = False        # discard saved state and results under out/name/
    wandb: str = "auto"          # auto | online | offline | disabled ($WANDB_MODE wins)
    project: str = "audiotx"     # W&B project
    entity: str = ""             # W&B entity (team or user)
    debug: bool = False          # show tracebacks instead of one-line errors
    report: str = ""             # write DIR/REPORT.md from the finished runs in DIR, train nothing
    tune: int = 0                # tune --arch on N random settings (successive halving); 0 = train
    hparams: str = ""            # JSON file of settings (a tuning's best.json); flags still win
    bench: bool = False          # time every architecture on random clips, train nothing
    lr_find: bool = False        # LR range test on split 1's training clips: the suggested lr
    predict: list = dataclasses.field(default_factory=list)  # WAV files or folders to classify
    run: str = ""                # --predict with this run's fold models; default: the shipped model
    json: bool = False           # --predict: one JSON object per file on stdout


# Fields that change where or how a run is reported, not what it computes (hparams: its settings
# are in the others): a resumed run may differ in them.
REPORTING_FIELDS = {"data", "dataset", "device", "out", "name", "restart", "wandb", "project",
                    "entity", "debug", "threads", "report", "hparams", "bench", "tune", "lr_find",
                    "predict", "run", "json"}
CHOICES = {"arch": ["cnn", "transformer"], "features": ["wave", "logwave"],
           "subset": ["esc10", "esc50"], "dataset": ["auto", "esc", "urbansound8k"],
           "device": ["auto", "cpu", "cuda", "mps"], "precision": ["auto", "fp32", "bf16"],
           "select": ["best", "final"], "wandb": ["auto", "online", "offline", "disabled"]}


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
    """Settings from a JSON file: {field: value}, or a tuning's best.json ({"hparams": {...}})."""
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
        flag = "--" + f.name.replace("_", "-")
        helptext = helps.get(f.name, "") + " (default: %(default)s)"
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=helptext)
        elif f.type is list:
            parser.add_argument(flag, nargs="+", default=[], metavar="PATH", help=helptext)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            kind = float_or_auto if f.name == "lr" else kind
            parser.add_argument(flag, type=kind, default=f.default, choices=CHOICES.get(f.name),
                                help=helptext)
    parser.add_argument("--amp", dest="precision", action="store_const", const="bf16",
                        help="mixed precision: the same as --precision bf16")
    args = parser.parse_args(argv)
    if args.hparams:  # the file's settings become defaults, so flags on the command line still win
        parser.set_defaults(**load_hparams(args.hparams, parser))
        args = parser.parse_args(argv)
    return Config(**vars(args))


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


def run_name(cfg: Config) -> str:
    heads = f"-h{cfg.heads}" if cfg.arch == "transformer" else ""
    if cfg.tune:
        return cfg.name or f"tune-{cfg.arch}"
    return cfg.name or f"{cfg.arch}{heads}-test{cfg.test_fold}-k{cfg.kfold}"


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
        raise UserError(f"--device {name}: no such device on this machine "
                        f"(torch {torch.__version__})")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def start_processes(cfg: Config):
    """One process on cfg.device, or under torchrun (WORLD_SIZE > 1) one of many: GPU
    LOCAL_RANK of this machine with NCCL, or a CPU share with gloo. Only rank 0 prints."""
    env = lambda name, default: int(os.environ.get(name, default))  # noqa: E731
    WORKER.rank, WORKER.world = env("RANK", 0), env("WORLD_SIZE", 1)
    WORKER.local_rank = env("LOCAL_RANK", 0)
    WORKER.device = pick_device(cfg.device, WORKER.local_rank)
    if WORKER.world == 1:
        return
    if WORKER.device.type == "mps":
        raise UserError("torchrun with --device mps: torch has no process group for MPS; use cpu")
    if WORKER.device.type == "cuda":
        torch.cuda.set_device(WORKER.device)
    dist.init_process_group("nccl" if WORKER.device.type == "cuda" else "gloo")
    if not WORKER.main:
        sys.stdout = open(os.devnull, "w")  # one copy of the progress lines; errors reach stderr


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
    on = WORKER.device if WORKER.device.type == "cuda" else "cpu"  # NCCL reduces on the GPU
    t = torch.tensor(values, dtype=torch.float64, device=on)
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
    cuda = WORKER.device.type == "cuda"
    free = torch.cuda.mem_get_info(WORKER.device)[0] if cuda else 2 * t.nbytes + 1
    return t.to(WORKER.device) if t.nbytes < free / 2 else t


# ----------------------------------------------------------------------------------------
# files: atomic writes, csv, json, checkpoints, where the code and data came from
# ----------------------------------------------------------------------------------------

def replace_with(path: Path, write):
    """write(tmp) to a temporary name beside path, then rename it to path: a reader never sees
    half a file, and a failed write leaves none behind. The temporary name keeps path's suffix,
    which np.save would otherwise append."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str):
    """Under torchrun only rank 0 writes files (here and in save_atomic)."""
    if WORKER.main:
        replace_with(path, lambda tmp: tmp.write_text(text))


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
    if WORKER.main:
        replace_with(path, lambda tmp: torch.save(obj, tmp))


def load_checked(path: Path):
    """torch.load, with a damaged or truncated file reported in one line instead of half-loaded."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        why = type(e).__name__
        raise UserError(f"{path}: damaged ({why}); delete it or rerun with --restart") from e


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
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__}


# ----------------------------------------------------------------------------------------
# data: reading wavs, the metadata table, fetching, caching, folds
# ----------------------------------------------------------------------------------------

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
    """Without meta/esc50.csv, the table from ESC-50 names, {fold}-{src}-{take}-{target}.wav."""
    names = sorted(p.name for p in (data_dir / "audio").glob("*.wav"))
    bad = [n for n in names if not ESC_NAME.match(n)]
    if not names or bad:
        what = "audio/" + bad[0] if bad else "audio/ holds no .wav file and"
        raise UserError(f"{meta}: missing, and {what} does not follow ESC-50's "
                        "{fold}-{src}-{take}-{target}.wav names to stand in for it")
    print(f"warning: {meta} is missing; folds, sources and classes come from the file names")
    parts = [ESC_NAME.match(n).groups() for n in names]  # (fold, src, take, target)
    rows = [{"filename": n, "fold": p[0], "src_file": p[1],
             "category": ESC10.get(int(p[3]), f"target{int(p[3]):02d}")}
            for n, p in zip(names, parts)]
    if len({p[3] for p in parts}) > len(ESC10):  # a full ESC-50 folder: mark its ESC-10 rows
        for row, p in zip(rows, parts):
            row["esc10"] = str(int(p[3]) in ESC10)
    return rows


def read_esc(data_dir: Path, subset: str) -> list:
    """Rows of meta/esc50.csv (or ESC-50 file names without it): audio/<filename>."""
    meta = data_dir / "meta" / "esc50.csv"
    if meta.is_file():
        numbered = read_meta(meta)
    else:
        numbered = list(enumerate(rows_from_names(data_dir, meta), 2))
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
    """The folder's table: rows (filename under audio/, fold, category, src_file), by filename."""
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
    """A cache file keyed by every audio file's name, size and mtime, and the rate and length."""
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
        # resample_poly's output length
        kept[i] = min(n_samples, math.ceil(len(wave) * cfg.sample_rate / rate))
        if (i + 1) % 100 == 0 or i + 1 == len(table):
            print(f"\rdecoding {i + 1}/{len(table)} clips ({time.time() - t0:.1f}s)", end="",
                  flush=True)
    print()
    common = max(set(rates), key=rates.count)
    odd = {f"a sample rate other than {common} Hz (resampled)": sum(r != common for r in rates),
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
            whole = waves.shape == (len(table), n_samples) and kept.shape == (len(table),)
            if whole and waves.dtype == np.float32:
                return clips_and_lengths(waves, kept)
        except (ValueError, OSError, EOFError):
            pass
        print(f"warning: cache {path} is damaged; rebuilding it")
    waves, kept = decode_clips(data_dir, table, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    for array, final in [(kept, lengths_path), (waves, path)]:  # the waves' file marks it whole
        replace_with(final, lambda tmp: np.save(tmp, array))
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
        part = regroup(groups[rest], labels[rest], k)
    splits = [(rest[part != i], rest[part == i]) for i in range(k)]
    for i, (train, val) in enumerate(splits):
        absent = sorted(set(range(labels.max() + 1)) - set(labels[train].tolist()))
        if len(val) == 0 or absent:
            names = ", ".join(str(classes[c] if classes else c) for c in absent) or "no clips"
            raise UserError(f"--kfold {k}: validation fold {i + 1} leaves class(es) {names} with "
                            "no training clips; use fewer folds, or a dataset with that class in "
                            "more folds")
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


def within(n, length: int):
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
        # widening the channels. Coarser stems were faster and less accurate (NOTES.md).
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

    def forward(self, wave, lengths=None):
        """wave (B, S) -> (x (B, T, C), None), or with the clips' lengths (B,) in samples, (x, the
        frames each clip fills (B,)). Then everything past a clip's end is zeroed at the input
        and after every layer, so the padding never reaches a filled frame: the result is the
        same however long the padding and whatever it holds.

        Inside, activations are (B, C, 1, L) in channels-last memory, rows of C channels per
        time step: CPU kernels pool, normalise and convolve those much faster than rows of
        time, and the last layer's output is already the (B, T, C) the transformer reads."""
        n = lengths
        if n is not None:
            wave = wave * (torch.arange(wave.shape[1], device=wave.device) < n[:, None])
        x = None  # the stem reads the wave itself
        for i, (conv, norm, (*_, pool)) in enumerate(zip(self.convs, self.norms, self.plan)):
            x = stem_frames(wave, conv) if x is None else F.conv2d(  # (B, C, 1, L)
                x, conv.weight[:, :, None], stride=(1, conv.stride[0]),
                padding=(0, conv.padding[0]))
            x = x.abs() if self.log_stem and i == 0 else x
            if pool > 1:  # first, so normalisation and ReLU touch a quarter of the values
                x = F.max_pool2d(x, (1, pool))  # (B, C, 1, L / pool), remainder dropped
            if self.log_stem and i == 0:
                x = torch.log(x.float() + 1e-4)  # 1e-4: below 16-bit quiet
            x = F.relu(norm(x))
            if n is not None:
                n = layer_len(n, conv.kernel_size[0], conv.stride[0], pool)
                x = x * within(n, x.shape[-1])[:, :, None]  # (B, 1, 1, L) mask
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

    def forward(self, x, keep=None):
        """keep (B, T) bool: the tokens that may be attended to (None: all)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
                   for t in (q, k, v))
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

    def forward(self, x, keep=None):
        x = x + self.drop(self.attn(self.ln1(x), keep))
        return x + self.drop(self.mlp(self.ln2(x)))


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
        filled = within(n, x.shape[1]).transpose(1, 2)  # (B, T, 1)
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

    def forward(self, wave, lengths=None):
        x, n = self.front(wave, lengths)  # (B, T, C), None or (B,) filled frames
        # (B, 1 + T): the tokens attention may read, <cls> and the filled frames
        keep = None if n is None else F.pad(within(n, x.shape[1])[:, 0], (1, 0), value=True)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1)  # (B, 1 + T, C), <cls> at 0
        x = self.drop(x + self.pos[:, :x.shape[1]])
        for block in self.blocks:
            x = block(x, keep)
        return self.head(self.ln(x[:, 0]))  # the <cls> output -> (B, K)


def build_model(cfg: Config, n_classes: int) -> nn.Module:
    n_samples = round(cfg.sample_rate * cfg.clip_seconds)
    if ConvFrontEnd(dim=cfg.dim).out_len(n_samples) < 1:
        raise UserError(f"--clip-seconds {cfg.clip_seconds} at --sample-rate {cfg.sample_rate} is "
                        "too short for the front end")
    if cfg.arch == "cnn":
        return CNNClassifier(dim=cfg.dim, n_classes=n_classes, dropout=cfg.dropout,
                             features=cfg.features)
    return AudioTransformer(dim=cfg.dim, heads=cfg.heads, depth=cfg.depth, n_classes=n_classes,
                            n_samples=n_samples, dropout=cfg.dropout, features=cfg.features)


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
    decays = {n: p.dim() >= 2 and n not in ("cls", "pos") for n, p in model.named_parameters()}
    groups = [[p for n, p in model.named_parameters() if decays[n] == d] for d in (True, False)]
    return torch.optim.AdamW([{"params": groups[0], "weight_decay": cfg.weight_decay},
                              {"params": groups[1], "weight_decay": 0.0}], lr=cfg.lr)


def n_batches(n: int, batch_size: int) -> int:
    """Batches of near-equal size (240 clips at 32: 8 x 30): no tiny last batch upsets BatchNorm."""
    return max(1, math.ceil(n / batch_size))


def train_step(model, opt, wave, target, cfg, lr: float, lengths=None, scale: float = 1.0):
    """One AdamW step at learning rate lr on wave (B, S), soft targets (B, K), with the mean loss
    multiplied by scale: (loss, logits (B, K))."""
    for group in opt.param_groups:
        group["lr"] = lr
    # bf16 autocast runs matmuls and convs in bfloat16 (norms, softmax and the loss stay float32)
    with torch.autocast(wave.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        logits = model(wave, lengths)
    loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
    opt.zero_grad(set_to_none=True)
    (loss * scale if scale != 1 else loss).backward()
    opt.step()
    return loss.item(), logits.detach()


def train_epoch(model, opt, waves, labels, idx, cfg, n_classes, step, total, order, lengths=None):
    """One pass over idx in the random order drawn from the generator `order` (the same in every
    process); each process trains on its share of every batch. -> (mean loss, accuracy against
    the dominant target) over the whole pass."""
    model.train()
    perm = torch.from_numpy(idx)[torch.randperm(len(idx), generator=order)]
    loss_sum = correct = 0.0
    for chunk in perm.tensor_split(n_batches(len(idx), cfg.batch_size)):
        share = chunk[WORKER.rank::WORKER.world]  # (B / world,) this process's share
        n = None if lengths is None else lengths[share].to(WORKER.device)
        wave, target, n = augment(waves[share].to(WORKER.device), labels[share].to(WORKER.device),
                                  n_classes, cfg, n)
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
    model = getattr(model, "module", model)  # not through DDP, which would sync buffers each call
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


def train_fold(cfg, waves, labels, split, fold, fold_dir: Path, n_classes, tracker, progress,
               lengths=None):
    """Train one fold for cfg.epochs, resuming from fold_dir/state.pt. Returns (the chosen model,
    its epoch, the history, the last epoch's validation probabilities (N_val, K)).
    Under torchrun every process holds the same model, wrapped in DistributedDataParallel."""
    train_idx, val_idx = split
    torch.manual_seed(cfg.seed + fold)
    model = build_model(cfg, n_classes).to(WORKER.device)
    if WORKER.world > 1 and WORKER.device.type == "cuda":  # statistics of the whole batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = make_optimizer(cfg, model)
    order = torch.Generator().manual_seed(cfg.seed + fold)  # clip order, the same in every process
    if WORKER.rank:  # rank 0 draws what one process would; the others their own augmentation
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
            weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            state["best"] = {"epoch": epoch, "val_acc": va_acc, "val_loss": va_loss,
                             "model": weights}
        state.update(epoch=epoch, model=model.state_dict(), opt=opt.state_dict(),
                     order=order.get_state(), rng=rng_states())
        save_atomic(state, state_path)
        write_csv(fold_dir / "history.csv", list(row), [list(r.values()) for r in state["history"]])
        tracker.log(row)
        progress(fold, row)
    if final_val is None:  # resumed after its last epoch: the saved weights are that epoch's
        final_val = predict(model, val_w, cfg.precision, val_n)
    if cfg.select == "final":
        return model, cfg.epochs, state["history"], final_val
    model.load_state_dict(state["best"]["model"])
    return model, state["best"]["epoch"], state["history"], final_val


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
    on = lambda s: summarize(*pooled(results, labels, splits, test_idx, s), classes)  # noqa: E731
    metrics = {"val": on("val"), "val_final": on("val_final"), "test": None, "test_mean": None,
               "test_std": None, "ensemble_test": None, "folds": folds}
    if len(test_idx):
        accs = [fm["test"]["accuracy"] for fm in folds]
        ensemble = torch.stack([r["test"] for r in results]).double().mean(0)  # (N_test, K)
        metrics.update(test=on("test"),
                       test_mean=float(np.mean(accs)), test_std=float(np.std(accs)),
                       ensemble_test=summarize(labels[test_idx], ensemble, classes))
    return metrics


def paired(a, b):
    """Mean of a - b over paired folds, its 95% t interval and the paired t-test p-value."""
    d = np.asarray(a) - np.asarray(b)
    if len(d) < 2 or np.allclose(d, d[0]):
        return float(d.mean()), float(d.mean()), float(d.mean()), 1.0 if np.allclose(d, 0) else 0.0
    half = scipy.stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    p = float(scipy.stats.ttest_rel(a, b).pvalue)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half), p


# ----------------------------------------------------------------------------------------
# logging: progress lines, result files, Weights & Biases
# ----------------------------------------------------------------------------------------

def print_progress_factory(cfg: Config, k: int):
    """Per-epoch line with the fold, the epoch and the time left for the whole run."""
    t0, done = time.time(), [0]

    def progress(fold, row):
        done[0] += 1
        to_go = k * cfg.epochs - (fold - 1) * cfg.epochs - row["epoch"]
        left = (time.time() - t0) / done[0] * to_go
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
        print(f"test accuracy over fold models: {metrics['test_mean']:.4f} "
              f"+- {metrics['test_std']:.4f}")
    p = metrics["params"]
    print(f"parameters: {p['trainable']:,} trainable, {p['non_trainable']:,} non-trainable; "
          f"buffers: {p['buffers']:,}")
    print(f"time: {metrics['seconds'] / 60:.1f} min")


def prediction_rows(fold, split, filenames, idx, labels, probs):
    """Rows of predictions.csv: fold, split, filename, label, pred, one probability per class."""
    return [[fold, split, filenames[i], int(labels[i]), int(p.argmax())] + p.tolist()
            for i, p in zip(idx, probs.double().numpy())]


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
            rows += prediction_rows(fold, split, filenames, val_idx, labels, res[split])
        if res["test"] is not None:
            rows += prediction_rows(fold, "test", filenames, test_idx, labels, res["test"])
    header = ["fold", "split", "filename", "label", "pred"] + [f"p_{c}" for c in classes]
    write_csv(run_dir / "predictions.csv", header, rows)
    shown = "test" if len(test_idx) else "val_final"
    roc_labels, roc_probs = pooled(results, labels, splits, test_idx, shown)
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
        self.mode, self.cfg = mode or wandb_mode(cfg), cfg
        self.run_dir, self.config = run_dir, config
        self.run, self.wandb = None, None
        if self.mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")  # our own lines say where the files are
        os.environ.setdefault("WANDB_CACHE_DIR", str(run_dir / "wandb" / "cache"))
        os.environ.setdefault("WANDB_DATA_DIR", str(run_dir / "wandb" / "data"))
        if self.mode == "offline":  # nothing in the home folder; online needs the user's login
            os.environ.setdefault("WANDB_CONFIG_DIR", str(run_dir / "wandb" / "config"))
        self.wandb = self._guard(importlib.import_module, "wandb")

    def _guard(self, fn, *args):
        if self.mode == "disabled":
            return None
        try:
            return fn(*args)
        except Exception as e:  # never let logging cost the training
            why = str(e).splitlines()[0][:200] if str(e) else ""
            print(f"warning: W&B turned off after an error: {type(e).__name__}: {why}")
            self.mode = "disabled"

    def start(self, job: str):
        self.finish()
        self._guard(self._start, job)

    def _start(self, job):
        name, w = self.run_dir.name, self.wandb
        self.run = w.init(project=self.cfg.project, entity=self.cfg.entity or None, group=name,
                          job_type=job, name=f"{name}-{job}", config=self.config,
                          dir=str(self.run_dir), mode=self.mode,
                          settings=w.Settings(console="off", quiet=True, x_disable_stats=True,
                                              disable_git=True))
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
        w, probs, keys = self.wandb, np.asarray(probs), ("precision", "recall", "f1", "auc")
        self.run.summary.update({f"{title}/{k}": metrics[k]
                                 for k in ("accuracy", "macro_f1", "macro_auc")})
        self.run.summary.update({f"params/{k}": v for k, v in self.config["params"].items()})
        curves = [roc_curve(probs[:, c], np.asarray(labels) == c) for c in range(len(classes))]
        self.run.log({
            f"{title}/confusion": w.plot.confusion_matrix(
                y_true=list(map(int, labels)), preds=probs.argmax(1).tolist(), class_names=classes),
            f"{title}/roc": w.plot.line_series(
                xs=[c[0].tolist() for c in curves], ys=[c[1].tolist() for c in curves],
                keys=classes, title=f"ROC ({title})", xname="false positive rate"),
            f"{title}/per_class": w.Table(columns=["class", *keys], data=[
                [c] + [m[k] for k in keys] for c, m in metrics["per_class"].items()])})

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
        per_file = probs.split([len(d[3]) for d in decoded])
        for (path, seconds, _, starts), p in zip(decoded, per_file):
            print(prediction_line(path, seconds, starts, n / rate, p, classes, cfg.json, rate,
                                  width))
    return 2 if failed else 0


# ----------------------------------------------------------------------------------------
# run and main
# ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def run_lock(run_dir: Path):
    """An exclusive lock on run_dir/.lock while training, so two runs never write one folder;
    the system drops it when the process ends, however it ends."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{run_dir}: another run is using this folder; wait for it, or pass "
                            "--name or --out to run beside it") from None
        yield


def prepare_run_dir(cfg: Config, run_dir: Path, config: dict):
    """config.json in run_dir; a different configuration under the same name is refused."""
    old = run_dir / "config.json"
    if not old.is_file():  # a resumed run keeps the record of how it started (threads, W&B, ...)
        return write_json(old, config)
    try:
        changed = differences(json.loads(old.read_text()), cfg)
    except ValueError:
        changed = "its config.json is damaged"
    if changed:
        raise UserError(f"{run_dir}: holds a run with a different configuration ({changed}); "
                        "pass --name to keep both, or --restart to replace it")


def clear_run_dir(run_dir: Path):
    """--restart: every file of the earlier run goes but its W&B runs (they may be online too)."""
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
    (waves, lengths), split, test_idx = clips, ds.splits[fold - 1], ds.test_idx
    val_idx = split[1]
    model, epoch, history, final_val = train_fold(cfg, waves, ds.labels, split, fold, fold_dir,
                                                  len(ds.classes), tracker, progress, lengths)
    on = lambda idx: predict(model, waves[idx], cfg.precision,  # noqa: E731
                             None if lengths is None else lengths[idx])
    res = {"chosen_epoch": epoch, "seconds": sum(r["seconds"] for r in history),
           "val_final": final_val, "val": on(val_idx),
           "test": on(test_idx) if len(test_idx) else None}
    shown, idx = ("test", test_idx) if len(test_idx) else ("val_final", val_idx)
    y = ds.labels[idx]
    tracker.summary(summarize(y, res[shown], ds.classes), y, res[shown], ds.classes, shown)
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
    where = f", {WORKER.world} processes" if WORKER.world > 1 else ""
    print(f"{run_dir}: {cfg.arch} on {len(ds.table)} clips, {len(ds.classes)} classes, test fold "
          f"{cfg.test_fold or 'none'}, {cfg.kfold} validation folds{where} on {WORKER.device.type}")
    tracker = Tracker(cfg, run_dir, config)
    progress = print_progress_factory(cfg, cfg.kfold)
    results = [fold_result(cfg, run_dir, clips, ds, fold, tracker, progress)
               for fold in range(1, cfg.kfold + 1)]
    labels, splits, test_idx, classes = ds.labels, ds.splits, ds.test_idx, ds.classes
    metrics = gather_metrics(results, labels, splits, test_idx, classes)
    if not WORKER.main:
        return metrics
    # Training seconds summed over the saved epochs, so a resumed run reports the whole cost.
    metrics.update(classes=classes, params=config["params"],
                   seconds=sum(r["seconds"] for r in results))
    roc_labels, roc_probs = write_results(run_dir, results, labels, splits, test_idx,
                                          [r["filename"] for r in ds.table], classes)
    write_json(run_dir / "metrics.json", metrics)
    tracker.start("summary")
    shown = "test" if metrics["test"] else "val_final"
    tracker.summary(metrics[shown], roc_labels, roc_probs, classes, shown)
    tracker.finish()
    print_summary(metrics, cfg.select)
    if tracker.mode == "offline":
        print(f"W&B offline runs: {run_dir / 'wandb'} "
              f"(upload with: wandb sync {run_dir / 'wandb'}/offline-run-*)")
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
            lr = from_main(find_lr(cfg, ds, run_dir) if WORKER.main else None)
            cfg = dataclasses.replace(cfg, lr=lr)
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
        if cfg.report:  # report.py imports this module: as itself, not as a second copy
            sys.modules.setdefault("audiotx", sys.modules[__name__])
            from report import write_report
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
    tracker = Tracker(cfg, trial_dir, {}, mode="disabled")  # trials are many; W&B gets the runs
    accs = []
    for fold in range(1, n_folds + 1):
        fold_dir = trial_dir / f"fold{fold}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        _, _, history, _ = train_fold(cfg, clips[0], ds.labels, ds.splits[fold - 1], fold,
                                      fold_dir, len(ds.classes), tracker, lambda *_: None, clips[1])
        tail = max(1, len(history) // 10)
        accs.append(np.mean([r["val_acc"] for r in history[-tail:]]))
        if WORKER.main:
            (fold_dir / "state.pt").unlink(missing_ok=True)
    return float(np.mean(accs))


def earlier_scores(path: Path, trials: list) -> dict:
    """{(trial, rung): score} from an earlier run's trials.csv, where the settings still match."""
    rows = read_csv(path) if path.is_file() else []
    same = lambda r: int(r["trial"]) < len(trials) and all(  # noqa: E731
        float(r[n]) == float(v) for n, v in trials[int(r["trial"])].items())
    return {(int(r["trial"]), int(r["rung"])): float(r["score"]) for r in rows if same(r)}


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
    trials = [{n: getattr(cfg, n) for n in names}]
    trials += [{n: SPACE[n](rng) for n in names} for _ in range(cfg.tune - 1)]
    done = earlier_scores(out / "trials.csv", trials)
    rows, alive = [], list(range(len(trials)))
    rungs = [(max(cfg.epochs // 4, 1), 2), (max(cfg.epochs // 2, 1), cfg.kfold),
             (cfg.epochs, cfg.kfold)]
    for rung, (epochs, n_folds) in enumerate(rungs):
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
    t = alive[0]
    best = {"arch": cfg.arch, "score": scores[t], "trial": t, "hparams": trials[t]}
    write_json(out / "best.json", best)
    print(f"tune {cfg.arch}: best trial {t}, score {best['score']:.4f}: {best['hparams']}")
    return best


# ----------------------------------------------------------------------------------------
# tools: line charts as SVG, for the LR range test and the report
# ----------------------------------------------------------------------------------------

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf", "#000000"]


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


def svg_open(w, h, title, size=11) -> list:
    """An SVG's first elements: its frame, a white page and the title."""
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'font-family="sans-serif" font-size="{size}"><rect width="100%" height="100%" '
            f'fill="white"/>', f'<text x="10" y="16" font-size="13">{escape(title)}</text>']


def svg_lines(series, *, title, xlabel, ylabel, w=600, h=320, x_integer=False):
    """A line chart as SVG text; series: [(label, xs, ys, band or None)], band = (lows, highs);
    x_integer: x ticks at whole numbers only (epochs)."""
    left, right, top, bottom = 55, 150, 30, 42
    xs = np.concatenate([np.asarray(s[1], float) for s in series])
    ys = np.concatenate([np.asarray(v, float) for s in series for v in ([s[2]] + list(s[3] or []))])
    xticks = nice_ticks(xs.min(), xs.max(), integer=x_integer)
    yticks = nice_ticks(ys.min(), ys.max())
    x0, x1, y0, y1 = xticks[0], xticks[-1], yticks[0], yticks[-1]
    px = lambda x: left + (x - x0) / ((x1 - x0) or 1) * (w - left - right)  # noqa: E731
    py = lambda y: h - bottom - (y - y0) / ((y1 - y0) or 1) * (h - top - bottom)  # noqa: E731
    points = lambda a, b: " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(a, b))  # noqa: E731
    out = svg_open(w, h, title) + [
        f'<text x="{(left + w - right) / 2}" y="{h - 8}" text-anchor="middle">'
        f'{escape(xlabel)}</text>',
        f'<text x="14" y="{h / 2}" text-anchor="middle" transform="rotate(-90 14 {h / 2})">'
        f'{escape(ylabel)}</text>',
        f'<path d="M{left},{top} V{h - bottom} H{w - right}" stroke="black" fill="none"/>']
    out += [f'<text class="x" x="{px(v):.1f}" y="{h - bottom + 14}" text-anchor="middle">'
            f'{v:g}</text>' for v in xticks]
    out += [f'<text class="y" x="{left - 4}" y="{py(v) + 4:.1f}" text-anchor="end">{v:g}</text>'
            f'<path d="M{left},{py(v):.1f} H{w - right}" stroke="#ddd"/>' for v in yticks]
    for i, (label, sx, sy, band) in enumerate(series):
        color, ly = COLORS[i % len(COLORS)], top + 8 + 15 * i
        if band is not None:
            out.append(f'<polygon points="{points([*sx, *sx[::-1]], [*band[1], *band[0][::-1]])}" '
                       f'fill="{color}" fill-opacity="0.18" stroke="none"/>')
        out += [f'<polyline points="{points(sx, sy)}" fill="none" stroke="{color}" '
                'stroke-width="1.5"/>',
                f'<path d="M{w - right + 8},{ly} h16" stroke="{color}" stroke-width="2"/>',
                f'<text x="{w - right + 28}" y="{ly + 4}">{escape(label)}</text>']
    return "\n".join(out) + "\n</svg>\n"


# ----------------------------------------------------------------------------------------
# tools: the LR range test
# ----------------------------------------------------------------------------------------

def lr_range_test(cfg, waves, labels, train_idx, n_classes, steps: int = 200, lo: float = 1e-6,
                  hi: float = 1.0, lengths=None):
    """LR range test (Smith 2017): from a fresh model, one step per batch of train_idx while the
    learning rate grows exponentially from lo to hi, until the smoothed loss passes 4x its
    lowest. Returns the rows (step, lr, loss, smoothed); suggest_lr reads the peak from them."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, n_classes).to(WORKER.device)
    opt = make_optimizer(cfg, model)
    model.train()
    rows, avg, lowest, batches = [], 0.0, math.inf, []
    for step in range(steps):
        if not batches:  # a fresh random order each pass over the training clips
            perm = torch.from_numpy(train_idx)[torch.randperm(len(train_idx))]
            batches = list(perm.tensor_split(n_batches(len(train_idx), cfg.batch_size)))
        chunk = batches.pop()
        lr = lo * (hi / lo) ** (step / (steps - 1))
        n = None if lengths is None else lengths[chunk].to(WORKER.device)
        wave, target, n = augment(waves[chunk].to(WORKER.device), labels[chunk].to(WORKER.device),
                                  n_classes, cfg, n)
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
    cap, lrs = 1.5 * rows[0]["smoothed"], [math.log10(r["lr"]) for r in rows]
    return svg_lines([(key, lrs, [min(r[key], cap) for r in rows], None)
                      for key in ("loss", "smoothed")],
                     title=f"{name}: LR range test (loss capped at {cap:.2f})",
                     xlabel="log10 learning rate", ylabel="training loss")


def find_lr(cfg: Config, ds: Dataset, run_dir: Path) -> float:
    """The LR range test's suggested peak learning rate, from run_dir/lr_find.csv when an earlier
    run of this folder wrote it (so a resumed --lr auto run keeps its number), else measured now
    on validation split 1's training clips (never the test fold)."""
    path = run_dir / "lr_find.csv"
    if path.is_file():
        rows = [{k: float(v) for k, v in r.items()} for r in read_csv(path)]
    else:
        waves, lengths = load_clips(ds.root, ds.table, cfg)
        rows = lr_range_test(dataclasses.replace(cfg, lr=1.0), to_device(waves), ds.labels,
                             ds.splits[0][0], len(ds.classes), lengths=to_device(lengths))
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
    """(forward FLOPs per clip, training-step FLOPs per clip), by torch's FlopCounterMode."""
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
    waves = torch.randn(n_train + n_val, n_samples) * 0.1
    labels = torch.arange(n_train + n_val) % n_classes
    model = build_model(cfg, n_classes).to(WORKER.device)
    opt, order = make_optimizer(cfg, model), torch.Generator().manual_seed(cfg.seed)
    batch = waves[:cfg.batch_size].to(WORKER.device), labels[:cfg.batch_size].to(WORKER.device)
    fwd_flops, train_flops = step_flops(model, *batch, n_classes)
    seconds = []
    for step in (0, 1):  # the first epoch warms up
        t0 = time.perf_counter()
        train_epoch(model, opt, waves, labels, np.arange(n_train), cfg, n_classes, step, 100, order)
        seconds.append(time.perf_counter() - t0)
    t_train, t0 = seconds[1], time.perf_counter()
    evaluate(model, waves[n_train:], labels[n_train:], cfg.precision)
    t_eval = time.perf_counter() - t0
    return {"arch": cfg.arch, "heads": cfg.heads if cfg.arch == "transformer" else None,
            "params": count_params(model)["trainable"], "fwd_mflops_per_clip": fwd_flops / 1e6,
            "train_clips_per_s": n_train / t_train, "eval_clips_per_s": n_val / t_eval,
            "s_per_epoch": t_train + t_eval, "train_gflops": train_flops * n_train / t_train / 1e9,
            "default_command_min": cfg.kfold * cfg.epochs * (t_train + t_eval) / 60}


def bench(cfg: Config) -> dict:
    """--bench: one row per architecture, the projected default command and grid, and how close
    the training step comes to the matrix product's GFLOP/s; written to out/bench.json too."""
    import resource
    peak = matmul_gflops()
    archs = (("cnn", cfg.heads), ("transformer", 1), ("transformer", 2), ("transformer", 4))
    rows = [bench_row(dataclasses.replace(cfg, arch=a, heads=h)) for a, h in archs]
    # Each architecture runs with fold 1 held out (the rows: 240 training + 80 validation clips
    # per fold) and with none (300 + 100): an epoch's time grows with its clips, so 5/4 as much.
    grid_min = (1 + 400 / 320) * sum(r["default_command_min"] for r in rows)
    print(f"{'arch':<14}{'params':>9}{'MFLOP/clip':>11}{'train/s':>9}{'eval/s':>8}{'s/epoch':>9}"
          f"{'GFLOP/s':>9}{'of peak':>8}{'100 ep x 4':>11}")
    for r in rows:
        name = r["arch"] + (f"-h{r['heads']}" if r["heads"] else "")
        print(f"{name:<14}{r['params']:>9,}"
              f"{r['fwd_mflops_per_clip']:>11.1f}{r['train_clips_per_s']:>9.0f}"
              f"{r['eval_clips_per_s']:>8.0f}{r['s_per_epoch']:>9.2f}{r['train_gflops']:>9.1f}"
              f"{r['train_gflops'] / peak:>8.0%}{r['default_command_min']:>9.1f} m")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"matrix product: {peak:.1f} GFLOP/s with {torch.get_num_threads()} threads; run.sh grid "
          f"projected {grid_min:.0f} min; peak resident memory {rss:.0f} MiB")
    result = {"rows": rows, "matmul_gflops": peak, "grid_min": grid_min, "peak_rss_mib": rss,
              "threads": torch.get_num_threads(), "versions": versions()}
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(cfg.out) / "bench.json", result)
    return result


if __name__ == "__main__":
    sys.exit(main())
