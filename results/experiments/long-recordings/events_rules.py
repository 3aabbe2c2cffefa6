"""
The quiet rules of events.py scored on the development recordings of events_dev.py (folds 2-5,
three a fold, each read by the one fold model of the shipped model that never trained on its
fold; fold 1 untouched): --min-db, the share of a window's ends whose sound it leaves to the
window beyond (events.EDGE_SHARE) and the event's start moved to the sound's onset, each on and
off, from one reading of every window.

    python results/experiments/long-recordings/events_rules.py
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
from events_dev import MODEL, fold_run  # noqa: E402
from test_audiotx import field_recording, one_clip_a_class, score_events  # noqa: E402

RATE = 16000


def read(tmp: Path) -> list:
    """[(starts, ends, probs (W, K), classes, levels (F,) dBFS, truth)] of the twelve recordings."""
    out = []
    for fold in (2, 3, 4, 5):
        run = fold_run(tmp, fold)
        for seed in range(3):
            wav = tmp / f"f{fold}s{seed}.wav"
            draw = 100 * fold + seed  # as events_dev.py draws
            truth = field_recording(wav, one_clip_a_class(fold, draw), draw)
            rec = json.loads(subprocess.run(
                [sys.executable, str(HERE / "audiotx.py"), "--predict", str(wav), "--run", str(run),
                 "--json", "--min-conf", "0"], capture_output=True, text=True, check=True).stdout)
            levels = events.Levels(RATE)
            for _, block in predict.model_rate_blocks(wav, RATE):  # what --predict's windows read
                levels.push(block)
            w, classes = rec["windows"], list(rec["probs"])
            probs = np.array([[x["probs"][c] for c in classes] for x in w])
            out.append(([round(x["start"] * RATE) for x in w], [round(x["end"] * RATE) for x in w],
                        probs, classes, levels.db(), truth))
    return out


def score(recs, min_db: float, share: float, onset: bool, min_conf: float = 0.5) -> tuple:
    """(clips found of 120, gap events in all, the most in one recording)."""
    hits, gaps = 0, []
    for starts, ends, probs, classes, db, truth in recs:
        audible = db >= min_db
        hit = events.detections(starts, ends, probs, np.full(len(classes), min_conf), audible,
                                RATE, share)
        found = events.find_events(starts, ends, probs, hit, classes, RATE,
                                   audible if onset else np.ones_like(audible))
        h, g = score_events(found, truth, 2.5)
        hits, gaps = hits + h, gaps + [g]
    return hits, sum(gaps), max(gaps)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        recs = read(Path(tmp))
    print(f"12 recordings of folds 2-5, 120 clips, read by the fold models of {MODEL.name}")
    print("min-db  edge share  onset  | clips found  gap events (most in one recording)")
    for min_db in (-np.inf, -60, -57, -50, -45, -40):
        for share in (0.0, 0.2, 0.25, 0.3, 0.35, 0.4):
            for onset in (False, True):
                h, g, most = score(recs, min_db, share, onset)
                print(f"{min_db:6}  {share:10}  {onset!s:5}  | {h:3}/120 {h / 120:.3f}  "
                      f"{g:3} ({most})")
    for min_conf in (0.45, 0.55, 0.6):
        h, g, most = score(recs, -50, 0.3, True, min_conf)
        print(f"min-conf {min_conf}, min-db -50, share 0.3, onset: {h}/120, {g} gap events "
              f"({most})")


if __name__ == "__main__":
    main()
