"""
Events on recordings built from the validation folds (2-5) of the shipped model, each read by the
one fold model that never trained on that fold: a development check of the event settings that
leaves fold 1, the test fold of the truth test, untouched.

    python results/experiments/long-recordings/events_dev.py [extra --predict flags]
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(HERE))
from test_audiotx import field_recording, one_clip_a_class, score_events  # noqa: E402

MODEL = HERE / "models" / "esc10-cnn-test1-k4"


def one_recording(tmp, run, fold, seed, hits, clips, gaps):
    """One recording of ten clips of the fold, one of each class, scored; the running totals."""
    wav = tmp / f"f{fold}s{seed}.wav"
    truth = field_recording(wav, one_clip_a_class(fold, 100 * fold + seed), seed=100 * fold + seed)
    flags = [a for a in sys.argv[1:] if a != "-v"]
    out = subprocess.run([sys.executable, str(HERE / "audiotx.py"), "--predict", str(wav), "--run",
                          str(run), "--json", *flags], capture_output=True, text=True, check=True)
    rec = json.loads(out.stdout)
    h, g = score_events(rec["events"], truth, rec["settings"]["hop_seconds"])
    print(f"fold {fold} seed {seed}: {h}/{len(truth)} clips as events, {g} in the gaps, "
          f"{len(rec['events'])} events", flush=True)
    if "-v" in sys.argv:
        print("  truth", [(round(a, 2), round(b, 2), c) for a, b, c in truth])
        print("  events", [(e["start"], e["end"], e["label"], e["max"]) for e in rec["events"]])
    return hits + h, clips + len(truth), gaps + g


def fold_run(tmp: Path, fold: int) -> Path:
    """A run folder in tmp holding the one fold model of MODEL that validated on this official
    fold alone, as its only fold model."""
    run = tmp / f"run{fold}"
    (run / "fold1").mkdir(parents=True)
    for f in ("config.json", "predictions.csv"):
        shutil.copy(MODEL / f, run / f)
    shutil.copy(MODEL / f"fold{fold - 1}" / "model.pt", run / "fold1" / "model.pt")
    return run


def main():
    hits = clips = gaps = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for fold in (2, 3, 4, 5):
            run = fold_run(tmp, fold)
            for seed in range(3):
                hits, clips, gaps = one_recording(tmp, run, fold, seed, hits, clips, gaps)
    print(f"all: {hits}/{clips} = {hits / clips:.3f} clips as events; {gaps} gap events over "
          f"{4 * 3} recordings")


if __name__ == "__main__":
    main()
