"""
Files for audiotx: writing by a temporary name and a rename (a reader never sees half a file),
csv text with floats that read back exactly, and the record of where a run's code came from.

A leaf: it imports nothing of audiotx's, which decides who writes (rank 0 alone under torchrun)
and calls these. Not run on its own.
"""

import csv
import io
import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import scipy
import torch


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


def csv_text(header, rows) -> str:
    """A csv with a header; floats in full (17 significant digits), so they read back exactly."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([f"{v:.17g}" if isinstance(v, float) else v for v in row] for row in rows)
    return buf.getvalue()


def read_csv(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_settings(path: str, known: set) -> dict:
    """Settings from a JSON file: {field: value}, or a tuning's best.json ({"hparams": {...}});
    a ValueError says what is wrong with it."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read it as JSON ({e})") from None
    d = d.get("hparams", d)
    if set(d) - known:
        raise ValueError(f"unknown setting(s) {', '.join(sorted(set(d) - known))}")
    return d


def shown_path(path: Path) -> str:
    """A path as config.json records it: under ~, else relative to the working folder, so no
    file the project commits holds this machine's absolute paths."""
    path, home = Path(path).resolve(), Path.home().resolve()
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else os.path.relpath(path)


def code_version(folder: Path) -> dict:
    """The git commit of the checkout in folder and whether its tracked files had changes; {}
    outside git."""
    def git(*args):
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "-uno"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__}
