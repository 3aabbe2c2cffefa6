"""
The tools beside training: the LR range test behind --lr-find and --lr auto, hyperparameter
tuning by successive halving on the validation folds (--tune), and the speed benchmark (--bench).
Each trains with audiotx's own pieces and reads no test fold.

    python audiotx.py --lr-find                       # runs/<name>/lr_find.csv, .svg: the peak lr
    python audiotx.py --lr auto                       # train with the LR range test's suggestion
    python audiotx.py --arch cnn --tune 12 --out results   # results/tune-cnn/best.json
    python audiotx.py --bench                         # time every architecture here

audiotx.py's main imports this module for those flags; `python tools.py FLAGS` is the same.
"""

import dataclasses
import math
import resource
import sys
import time
from pathlib import Path

import audiotx  # before torch: it sets OpenMP's spin count, which torch reads once

import numpy as np
import torch
import torch.nn.functional as F

from audiotx import (Config, Dataset, build_model, count_params, evaluate, make_optimizer,
                     train_epoch, train_fold, train_step, versions, write_json,
                     write_rows, write_text)
from files import read_csv
from clips import Clips, to_int16
from plot import svg_lines
from processes import WORKER, broadcast_from_rank0, to_device

# ----------------------------------------------------------------------------------------
# the LR range test
# ----------------------------------------------------------------------------------------

def lr_range_test(cfg, clips: Clips, labels, train_idx, n_classes, steps: int = 200,
                  lo: float = 1e-6, hi: float = 1.0):
    """LR range test (Smith 2017): from a fresh model, training steps on the augmented batches
    of train_idx while the learning rate grows exponentially from lo to hi, until the smoothed
    loss passes 4x its lowest. Returns the rows (step, lr, loss, smoothed); suggest_lr reads the
    peak from them. One process: the batches are whole, not shares."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, n_classes).to(WORKER.device)
    opt, order = make_optimizer(cfg, model), torch.Generator().manual_seed(cfg.seed)
    model.train()

    def stream():  # pass after pass over the training clips, each in a new order
        while True:
            yield from audiotx.augmented_batches(clips, labels, train_idx, cfg, n_classes, order,
                                                 part=(0, 1))

    rows, avg, lowest = [], 0.0, math.inf
    for step, (_, wave, target, n) in zip(range(steps), stream()):
        lr = lo * (hi / lo) ** (step / (steps - 1))
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
    The steepest descent, the other common rule, moves between runs that differ only in their
    thread count, so it is not used."""
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
        clips = audiotx.load_clips(ds.audio_dir, ds.table, cfg)
        clips = Clips(to_device(clips.store), clips.lengths, clips.n)
        rows = lr_range_test(dataclasses.replace(cfg, lr=1.0), clips, ds.labels, ds.splits[0][0],
                             len(ds.classes))
        write_rows(path, rows)
        write_text(run_dir / "lr_find.svg", lr_find_svg(rows, run_dir.name))
    lr = suggest_lr(rows)
    print(f"LR range test ({path}, {len(rows)} steps): suggested peak learning rate {lr:.3g} "
          "(the learning rate at the smoothed loss's minimum)")
    return lr


def with_lr(cfg: Config, ds: Dataset, run_dir: Path) -> Config:
    """cfg with --lr auto (or --lr-find) replaced by the LR range test's number, which rank 0
    measures and every process takes; config.json then records the number."""
    if not (cfg.lr_find or cfg.lr == "auto"):
        return cfg
    lr = broadcast_from_rank0(find_lr(cfg, ds, run_dir) if WORKER.main else None)
    return dataclasses.replace(cfg, lr=lr)


# ----------------------------------------------------------------------------------------
# tuning: successive halving over random settings, scored on validation folds only
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


def score_trial(cfg: Config, ds: Dataset, clips: Clips, trial_dir: Path, n_folds: int) -> float:
    """Mean over the first n_folds validation folds of the last 10% of epochs' accuracy."""
    tracker = audiotx.make_tracker(cfg, trial_dir, {}, mode="disabled")  # trials are many
    accs = []
    for fold in range(1, n_folds + 1):
        fold_dir = trial_dir / f"fold{fold}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        _, _, history, _ = train_fold(cfg, clips, ds.labels, ds.splits[fold - 1], fold, fold_dir,
                                      len(ds.classes), tracker, lambda *_: None)
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


def tune(cfg: Config, ds: Dataset, clips: Clips, out: Path) -> dict:
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
            write_rows(out / "trials.csv", rows)
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
# benchmark, against this machine's own matrix-product speed
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
    torch.manual_seed(cfg.seed)
    waves = torch.randn(n_train + n_val, cfg.n_samples) * 0.1
    clips = Clips(torch.from_numpy(to_int16(waves.flatten().numpy())),
                  torch.full((n_train + n_val,), cfg.n_samples), cfg.n_samples)
    labels = torch.arange(n_train + n_val) % n_classes
    model = build_model(cfg, n_classes).to(WORKER.device)
    opt, order = make_optimizer(cfg, model), torch.Generator().manual_seed(cfg.seed)
    batch = waves[:cfg.batch_size].to(WORKER.device), labels[:cfg.batch_size].to(WORKER.device)
    fwd_flops, train_flops = step_flops(model, *batch, n_classes)
    seconds = []
    for step in (0, 1):  # the first epoch warms up
        t0 = time.perf_counter()
        train_epoch(model, opt, clips, labels, np.arange(n_train), cfg, n_classes, step, 100, order)
        seconds.append(time.perf_counter() - t0)
    t_train, t0 = seconds[1], time.perf_counter()
    evaluate(model, clips, np.arange(n_train, n_train + n_val), labels, cfg.precision)
    t_eval = time.perf_counter() - t0
    return {"arch": cfg.arch, "heads": cfg.heads if cfg.arch == "transformer" else None,
            "params": count_params(model)["trainable"], "fwd_mflops_per_clip": fwd_flops / 1e6,
            "train_clips_per_s": n_train / t_train, "eval_clips_per_s": n_val / t_eval,
            "s_per_epoch": t_train + t_eval, "train_gflops": train_flops * n_train / t_train / 1e9,
            "default_command_min": cfg.kfold * cfg.epochs * (t_train + t_eval) / 60}


def bench(cfg: Config) -> dict:
    """--bench: one row per architecture, the projected default command and grid, and how close
    the training step comes to the matrix product's GFLOP/s; written to out/bench.json too."""
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
    Path(cfg.out or "runs").mkdir(parents=True, exist_ok=True)
    write_json(Path(cfg.out or "runs") / "bench.json", result)
    return result


# ----------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------

def command(cfg: Config):
    """--bench; else the run folder opened, its learning rate found (--lr-find stops there), and
    --tune, or training with that learning rate (--lr auto)."""
    if cfg.bench:
        bench(audiotx.prepare(cfg))
        return
    with audiotx.open_run(cfg) as (cfg, ds, run_dir):
        cfg = with_lr(cfg, ds, run_dir)
        if cfg.lr_find:
            return
        config = audiotx.claim_run_dir(cfg, ds, run_dir)
        if cfg.tune:
            tune(cfg, ds, audiotx.load_clips_once(ds, cfg), run_dir)
        else:
            audiotx.train_folds(cfg, run_dir, config, ds)


if __name__ == "__main__":
    sys.exit(audiotx.run_command(audiotx.parse_args(), command))
