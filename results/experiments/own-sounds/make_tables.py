"""The ESC-10 tables of the own-sounds experiments, written into the folder given (scratch):
A.csv and B.csv (classes split in two, official folds, source recordings as groups) for the
transfer runs; uneven.csv (5 classes whole, 5 cut to 4 clips, one from each of folds 1-4) for the
class-weight runs. Paths are absolute, so the tables can live anywhere.
    python results/experiments/own-sounds/make_tables.py SCRATCH   # from the checkout"""
import csv
import sys
from pathlib import Path

data = Path("../shared/data/ESC-10").resolve()
rows = [r for r in csv.DictReader(open(data / "meta" / "esc50.csv")) if r["esc10"] == "True"]
A = {"chainsaw", "crackling_fire", "dog", "rain", "sea_waves"}
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)


def write(name, keep):
    with open(out / name, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "fold", "group"])
        for r in sorted(rows, key=lambda r: r["filename"]):
            if keep(r):
                w.writerow([data / "audio" / r["filename"], r["category"], r["fold"], r["src_file"]])


write("A.csv", lambda r: r["category"] in A)
write("B.csv", lambda r: r["category"] not in A)
first = {}  # the first clip of each minority class in each of folds 1-4
for r in sorted(rows, key=lambda r: r["filename"]):
    if r["category"] not in A and r["fold"] != "5":
        first.setdefault((r["category"], r["fold"]), r["filename"])
write("uneven.csv", lambda r: r["category"] in A or r["filename"] in first.values())
