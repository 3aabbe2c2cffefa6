"""The figures of the own-sounds experiments from their metrics.json files: each run's pooled
final-epoch validation accuracy and macro F1 over the 5 official folds, and paired differences
over the 10 (seed, fold) pairs with their 95% t intervals.
    python results/experiments/own-sounds/analyse.py results/experiments/own-sounds/runs"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from report import paired  # noqa: E402

runs = Path(sys.argv[1])


def folds(name, key):
    m = json.loads((runs / name / "metrics.json").read_text())
    return [f["val_final"][key] for f in m["folds"]], m["val_final"][key]


def line(label, names, key):
    per = [folds(n, key) for n in names]
    pooled = " ".join(f"{p:.4f}" for _, p in per)
    print(f"{label:<28} {key:<9} seeds {pooled}  mean {sum(p for _, p in per) / len(per):.4f}")
    return [x for f, _ in per for x in f]


def compare(label, a, b):
    d, lo, hi, p = paired(a, b)
    print(f"  {label}: {100 * d:+.2f} points [{100 * lo:+.2f}, {100 * hi:+.2f}], p = {p:.3f}")


for key in ("macro_f1", "accuracy"):
    on = line("uneven, inverse weights", [f"uneven-balance-seed{s}" for s in (0, 1)], key)
    off = line("uneven, not weighted", [f"uneven-nobalance-seed{s}" for s in (0, 1)], key)
    root = line("uneven, sqrt weights", [f"uneven-sqrt-seed{s}" for s in (0, 1)], key)
    compare("weighted - not", on, off)
    compare("sqrt weights - not", root, off)
for n in (4, 8, 0):
    base = line(f"B, {n or 'all'}/class, scratch", [f"B-n{n}-scratch-seed{s}" for s in (0, 1)], "accuracy")
    for how in ("init", "freeze") + (("init-lr0.0002", "init-e30") if n else ()):
        other = line(f"B, {n or 'all'}/class, {how}", [f"B-n{n}-{how}-seed{s}" for s in (0, 1)], "accuracy")
        compare(f"{how} - scratch", other, base)
