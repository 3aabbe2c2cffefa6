"""The shipped model from a finished run: its config.json, metrics.json and predictions.csv (the
out-of-fold validation predictions --min-conf auto reads), and each fold model in half precision.

    python results/experiments/shipped-model/ship.py RUN_DIR models/esc10-cnn-test1-k4
"""

import shutil
import sys
from pathlib import Path

import torch


def ship(run: Path, to: Path):
    shutil.rmtree(to, ignore_errors=True)
    to.mkdir(parents=True)
    for name in ("config.json", "metrics.json", "predictions.csv"):
        shutil.copy(run / name, to / name)
    for path in sorted(run.glob("fold*/model.pt")):
        state = torch.load(path, weights_only=True, map_location="cpu")
        half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        (to / path.parent.name).mkdir()
        torch.save(half, to / path.parent.name / "model.pt")


if __name__ == "__main__":
    ship(Path(sys.argv[1]), Path(sys.argv[2]))
