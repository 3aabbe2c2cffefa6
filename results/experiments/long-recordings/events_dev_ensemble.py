"""
Event rules on recordings of one fold's clips, read by a run whose fold models all held that fold
out (its test fold): the shipped model's situation on fold 1 (an average of fold models that never
heard the clips), on another fold, so that fold 1 chooses nothing.

    python audiotx.py --arch cnn --test-fold 2 --kfold 4 --out DIR --name cnn-test2-k4
    python results/experiments/long-recordings/events_dev_ensemble.py DIR/cnn-test2-k4 2

Reads every recording once with --min-conf 0 (every window's probabilities), then scores the
thresholds and window rules of events.py on them.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(HERE))
import events  # noqa: E402
import predict  # noqa: E402
from test_audiotx import field_recording, one_clip_a_class, score_events  # noqa: E402


def read_recordings(run: str, fold: int, seeds: range) -> list:
    """[(the record with every window, its 100 ms levels (dBFS), the truth)] of a recording per
    seed."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            wav = Path(tmp) / f"field {seed}.wav"
            truth = field_recording(wav, one_clip_a_class(fold, seed), seed)
            rec = subprocess.run([sys.executable, str(HERE / "audiotx.py"), "--predict", str(wav),
                                  "--run", run, "--json", "--min-conf", "0"], capture_output=True,
                                 text=True, check=True).stdout
            levels = events.Levels(16000)
            for _, block in predict.model_rate_blocks(wav, 16000):  # as --predict reads it
                levels.push(block)
            out.append((json.loads(rec), levels.db(), truth))
    return out


def score(recs: list, threshold: float, edge: float, min_db: float) -> tuple:
    """(clips found, the most gap events in one recording, gap events in all)."""
    hits, gaps = 0, []
    for rec, db, truth in recs:
        classes, rate = list(rec["probs"]), 16000
        starts = [round(w["start"] * rate) for w in rec["windows"]]
        ends = [round(w["end"] * rate) for w in rec["windows"]]
        probs = np.array([[w["probs"][c] for c in classes] for w in rec["windows"]])
        audible = db >= min_db
        hit = events.detections(starts, ends, probs, np.full(len(classes), threshold), audible,
                                rate)
        found = events.find_events(starts, ends, probs, hit, classes, rate, audible, edge=edge)
        h, g = score_events(found, truth, rec["settings"]["hop_seconds"])
        hits, gaps = hits + h, gaps + [g]
    return hits, max(gaps), sum(gaps)


def main():
    run, fold = sys.argv[1], int(sys.argv[2])
    recs = read_recordings(run, fold, range(10))
    n = sum(len(t) for _, _, t in recs)
    print(f"{len(recs)} recordings of fold {fold} clips, {n} clips, read by {run}")
    for min_db in (-np.inf, -50):  # -inf: every frame audible, the rules before --min-db
        for edge in (0.0, 0.9):
            for threshold in (0.3, 0.35, 0.4, 0.45, 0.5, 0.55):
                hits, most, total = score(recs, threshold, edge, min_db)
                print(f"min-db {min_db} edge {edge:.1f} min-conf {threshold:.2f}: {hits}/{n} = "
                      f"{hits / n:.3f}, gap events {total} (at most {most} in a recording)")


if __name__ == "__main__":
    main()
