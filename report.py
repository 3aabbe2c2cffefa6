"""
The report of audiotx: REPORT.md and SVG figures from the files that finished runs wrote, and
Grad-CAM and attention views of fold models over the clips' log-mel spectrograms.

    python audiotx.py --report results     # every finished configuration under results/
    python report.py results               # the same

It reads what audiotx.py wrote (config.json, metrics.json, predictions.csv, roc.csv,
fold<i>/history.csv, and fold<i>/model.pt for the views) and trains nothing. audiotx.py's main
imports this module for --report.
"""

import base64
import dataclasses
import json
import math
import sys
from html import escape
from pathlib import Path

import audiotx  # before torch: it sets OpenMP's spin count, which torch reads once

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F

from audiotx import UserError, load_clips, load_dataset, load_fold_models, scored_split, write_text
from files import read_csv
from layouts import clip_name
from plot import heat_colors, mel_filterbank, nice_ticks, png, svg_lines, svg_open

# ----------------------------------------------------------------------------------------
# REPORT.md, its tables and figures
# ----------------------------------------------------------------------------------------


def paired(a, b):
    """Mean of a - b over paired folds, its 95% t interval and the paired t-test p-value."""
    d = np.asarray(a) - np.asarray(b)
    if len(d) < 2 or np.allclose(d, d[0]):
        return float(d.mean()), float(d.mean()), float(d.mean()), 1.0 if np.allclose(d, 0) else 0.0
    half = scipy.stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    p = float(scipy.stats.ttest_rel(a, b).pvalue)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half), p


def svg_confusion(cm, classes, title):
    """Confusion matrix heat map with counts; rows true, columns predicted."""
    cm = np.asarray(cm)
    label = 7 * max(len(str(c)) for c in classes) + 10  # room for the longest class name at 12 px
    cell, left, top = 34, label + 20, 40
    size = len(classes) * cell
    w, h = left + size + 20, top + size + label + 20
    out = svg_open(w, h, title, size=12) + [
        f'<text x="{left + size / 2}" y="{h - 6}" text-anchor="middle">predicted</text>',
        f'<text x="10" y="{top - 8}">true</text>']
    rows = np.maximum(cm.sum(1, keepdims=True), 1)
    for i, name in enumerate(classes):
        y, x = top + i * cell + cell / 2 + 4, left + i * cell + cell / 2 + 4  # row i, column i
        out += [f'<text x="{left - 4}" y="{y}" text-anchor="end">{escape(name)}</text>',
                f'<text x="{x}" y="{top + size + 6}" text-anchor="end" '
                f'transform="rotate(-90 {x} {top + size + 6})">{escape(name)}</text>']
        for j in range(len(classes)):
            share = cm[i, j] / rows[i, 0]  # colour by the row's share: classes of any size compare
            fill = f"rgb({int(255 - 225 * share)},{int(255 - 155 * share)},255)"
            out += [f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell}" '
                    f'height="{cell}" fill="{fill}" stroke="#fff"/>',
                    f'<text x="{left + j * cell + cell / 2}" y="{y}" text-anchor="middle" '
                    f'fill="{"white" if share > 0.6 else "black"}">{cm[i, j]}</text>']
    return "\n".join(out) + "\n</svg>\n"


def load_runs(root: Path) -> list:
    """Every finished configuration under root: config, metrics, fold histories, ROC points."""
    runs = []
    for m in sorted(root.glob("*/metrics.json")):
        d = m.parent
        config, metrics = json.loads((d / "config.json").read_text()), json.loads(m.read_text())
        histories = [read_csv(d / f"fold{i}" / "history.csv")
                     for i in range(1, config["kfold"] + 1)]
        runs.append({"name": d.name, "dir": d, "config": config, "metrics": metrics,
                     "histories": histories, "roc": read_csv(d / "roc.csv")})
    return runs


def headline(run) -> dict:
    """The numbers of one configuration that the tables compare: validation accuracy of each
    fold's last epoch (its history's last row), which nothing chose, and of its best
    (optimistic); F1 and AUC on the test fold, else on the final epoch's validation."""
    m, folds = run["metrics"], run["metrics"]["folds"]
    val = [float(h[-1]["val_acc"]) for h in run["histories"]]
    scored = m[scored_split(m["test"])]
    return {"val_mean": float(np.mean(val)), "val_std": float(np.std(val)), "val_folds": val,
            "best_mean": float(np.mean([f["val"]["accuracy"] for f in folds])),
            "test_folds": [f["test"]["accuracy"] for f in folds] if m["test"] else None,
            "f1": scored["macro_f1"], "auc": scored["macro_auc"],
            "scored_on": "test" if m["test"] else "val, final epoch"}


def split_label(config) -> str:
    held = f"test fold {config['test_fold']}" if config["test_fold"] else "no test fold"
    return f"{held}, k={config['kfold']}"


def config_table(runs) -> list:
    lines = ["| configuration | arch | heads | split | trainable | non-trainable | val acc, final "
             "epoch | val acc, best epoch (optimistic) | test acc (fold models) | ensemble test "
             "acc | macro F1 | macro AUC | F1/AUC on | minutes |", "|---" * 14 + "|"]
    for r in runs:
        c, m, h = r["config"], r["metrics"], headline(r)
        test = f"{m['test_mean']:.3f} ± {m['test_std']:.3f}" if m["test"] else "-"
        ens = f"{m['ensemble_test']['accuracy']:.3f}" if m["ensemble_test"] else "-"
        heads = c["heads"] if c["arch"] == "transformer" else "-"
        lines.append(f"| {r['name']} | {c['arch']} | {heads} | {split_label(c)} | "
                     f"{m['params']['trainable']:,} | {m['params']['non_trainable']:,} | "
                     f"{h['val_mean']:.3f} ± {h['val_std']:.3f} | {h['best_mean']:.3f} | {test} | "
                     f"{ens} | {h['f1']:.3f} | {h['auc']:.3f} | {h['scored_on']} | "
                     f"{m['seconds'] / 60:.1f} |")
    return lines


def best_per_split(runs) -> dict:
    """{split: its configuration with the highest mean final-epoch validation accuracy}; the
    test fold plays no part."""
    splits = sorted({split_label(r["config"]) for r in runs})
    return {s: max((r for r in runs if split_label(r["config"]) == s),
                   key=lambda r: headline(r)["val_mean"]) for s in splits}


def verdict(best, group) -> list:
    """The comparison in words: is the best configuration's lead beyond noise, which model is
    the better buy, and how the heads compare."""
    others = [r for r in group if r is not best]
    if not others:
        return []
    hb = headline(best)["val_folds"]
    beyond = [f"`{r['name']}`" for r in others if paired(hb, headline(r)["val_folds"])[1] > 0]
    params = {r["name"]: r["metrics"]["params"]["trainable"] for r in group}
    small = min(params, key=params.get)
    lead = (f"its lead is beyond noise over {', '.join(beyond)} and within noise over the rest"
            if beyond else "but every difference from it is within noise on these folds")
    tfs = sorted((r for r in group if r["config"]["arch"] == "transformer"),
                 key=lambda r: r["config"]["heads"])
    heads = ", ".join(f"{r['config']['heads']} head(s) {headline(r)['val_mean']:.3f} ± "
                      f"{headline(r)['val_std']:.3f}" for r in tfs)
    lines = [f"**Verdict.** `{best['name']}` has the highest final-epoch validation accuracy, "
             f"{lead}. The smallest model, `{small}` ({params[small]:,} parameters, "
             f"{max(params.values()) / params[small]:.1f}x fewer than the largest), is the better "
             "buy where accuracies are tied.", ""]
    if len(tfs) > 1:
        lines += [f"Heads, by final-epoch validation accuracy over folds: {heads}.", ""]
    return lines


def class_comparison(group) -> list:
    """Per-class F1 of the best transformer against the cnn, on the pooled validation
    predictions of the last epoch."""
    cnn = [r for r in group if r["config"]["arch"] == "cnn"]
    tfs = [r for r in group if r["config"]["arch"] == "transformer"]
    if not cnn or not tfs:
        return []
    tf = max(tfs, key=lambda r: headline(r)["val_mean"])
    a, b = cnn[0]["metrics"]["val_final"]["per_class"], tf["metrics"]["val_final"]["per_class"]
    lines = [f"Per-class F1 on the pooled validation predictions of the last epoch, `{tf['name']}` "
             f"against `{cnn[0]['name']}`:", "",
             "| class | cnn F1 | transformer F1 | transformer − cnn |", "|---|---|---|---|"]
    for c in sorted(a, key=lambda c: b[c]["f1"] - a[c]["f1"]):
        lines.append(f"| {c} | {a[c]['f1']:.3f} | {b[c]['f1']:.3f} | "
                     f"{b[c]['f1'] - a[c]['f1']:+.3f} |")
    return lines + [""]


def analysis(runs) -> list:
    """Which configuration is best, by validation accuracy, and whether each gap is beyond noise."""
    lines = ["## Analysis", "",
             "The best configuration of each split is the one with the highest mean final-epoch "
             "validation accuracy over its folds; the test fold plays no part in choosing it. Each "
             "other configuration of the same split is compared with it fold by fold (the folds "
             "are the same clips): the mean difference, its 95% t interval, and the paired t-test. "
             "With k folds there are only k pairs, so an interval that contains 0 means the "
             "difference is within noise.", ""]
    for split, best in best_per_split(runs).items():
        group = [r for r in runs if split_label(r["config"]) == split]
        hb, mb = headline(best), best["metrics"]
        test = (f"; fold-model test accuracy {mb['test_mean']:.3f}, k-fold ensemble "
                f"{mb['ensemble_test']['accuracy']:.3f}." if mb["test"] else ".")
        lines += [f"### {split}: best is `{best['name']}`", "",
                  f"Final-epoch validation accuracy {hb['val_mean']:.3f} ± {hb['val_std']:.3f} "
                  f"over folds{test}", "",
                  "| compared with | Δ final-epoch val acc (best − other) | 95% CI | p | "
                  "Δ test acc | 95% CI | p | accuracy per 100k params |", "|---" * 8 + "|"]
        for r in group:
            h, m = headline(r), r["metrics"]
            dv = paired(hb["val_folds"], h["val_folds"])
            dt = paired(hb["test_folds"], h["test_folds"]) if hb["test_folds"] else None
            acc = m["test_mean"] if m["test"] else h["val_mean"]
            per = acc / (m["params"]["trainable"] / 1e5)
            tests = "- | - | -" if not dt else \
                f"{dt[0]:+.3f} | [{dt[1]:+.3f}, {dt[2]:+.3f}] | {dt[3]:.2f}"
            noise = " (within noise)" if dv[1] <= 0 <= dv[2] and r is not best else ""
            name = f"`{r['name']}`" + (" (itself)" if r is best else "")
            lines.append(f"| {name} | {dv[0]:+.3f}{noise} | [{dv[1]:+.3f}, {dv[2]:+.3f}] | "
                         f"{dv[3]:.2f} | {tests} | {per:.3f} |")
        lines += [""] + verdict(best, group) + class_comparison(group)
    return lines


def scored_predictions(run):
    """(split, its rows of predictions.csv): the test fold's, else the last epoch's validation."""
    rows = read_csv(run["dir"] / "predictions.csv")
    split = scored_split(run["metrics"]["test"])
    return split, [r for r in rows if r["split"] == split]


def misclassified(run) -> list:
    """Every wrong prediction of the test fold (pooled validation where there is none), one row
    per clip and fold model, and the class pairs confused most often."""
    split, rows = scored_predictions(run)
    classes = run["metrics"]["classes"]
    wrong = [r for r in rows if r["label"] != r["pred"]]
    which = "test fold, every fold model" if split == "test" else "pooled validation, final epoch"
    lines = [f"### `{run['name']}`: {len(wrong)} of {len(rows)} predictions wrong ({which})", "",
             "| clip | true class | predicted | p(true) | p(predicted) | fold model |",
             "|---|---|---|---|---|---|"]
    pairs = {}
    for r in sorted(wrong, key=lambda r: (r["filename"], int(r["fold"]))):
        t, p = classes[int(r["label"])], classes[int(r["pred"])]
        lines.append(f"| {r['filename']} | {t} | {p} | {float(r['p_' + t]):.2f} | "
                     f"{float(r['p_' + p]):.2f} | {r['fold']} |")
        pairs[t, p] = pairs.get((t, p), 0) + 1
    top = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    return lines + ["", "Most confused (true → predicted): "
                    + "; ".join(f"{t} → {p} ({c})" for (t, p), c in top) + ".", ""]


def tuning_section(root: Path) -> list:
    """The best settings per architecture, with every trial behind them."""
    lines = ["## Hyperparameters", ""]
    tunings = sorted(root.glob("tune-*/best.json"))
    if not tunings:
        return lines + ["No tuning has run here: every configuration used the defaults in "
                        "`config.json`. `python audiotx.py --arch ARCH --tune N --out DIR` tunes "
                        "on the validation folds and `run.sh` then uses its `best.json`.", ""]
    for path in tunings:
        best, trials = json.loads(path.read_text())(path.parent / "trials.csv")
        lines += [f"### {best['arch']}: best validation score {best['score']:.3f} "
                  f"(trial {best['trial']})", "", "`" + json.dumps(best["hparams"]) + "`", "",
                  "| " + " | ".join(trials[0]) + " |", "|" + "---|" * len(trials[0])]
        lines += ["| " + " | ".join(f"{float(v):.4g}" if k == "score" else v for k, v in t.items())
                  + " |" for t in trials]
        lines.append("")
    return lines


def run_figures(run, fig_dir: Path) -> list:
    """Curves, ROC and confusion SVGs of one configuration; returns the Markdown that shows them."""
    name, m, classes = run["name"], run["metrics"], run["metrics"]["classes"]
    hist = {k: np.array([[float(row[k]) for row in h] for h in run["histories"]])  # (folds, epochs)
            for k in ("train_loss", "val_loss", "train_acc", "val_acc")}
    epochs = np.arange(1, hist["val_acc"].shape[1] + 1)
    for kind in ("loss", "acc"):
        series = [(f"{s} {kind}", epochs, h.mean(0), (h.min(0), h.max(0)))
                  for s, h in (("train", hist[f"train_{kind}"]), ("val", hist[f"val_{kind}"]))]
        write_text(fig_dir / f"{name}-{kind}.svg", svg_lines(
            series, title=f"{name}: {kind} per epoch (mean over folds, band = min-max)",
            xlabel="epoch", ylabel=kind, x_integer=True))
    scored = m[scored_split(m["test"])]
    scored_on = "test" if m["test"] else "validation, final epoch"
    roc = [(c, [float(r["fpr"]) for r in run["roc"] if r["class"] == c],
            [float(r["tpr"]) for r in run["roc"] if r["class"] == c], None) for c in classes]
    grid = np.linspace(0, 1, 101)  # macro average: each class's ROC interpolated on one fpr grid
    macro = np.mean([np.interp(grid, fpr, tpr) for _, fpr, tpr, _ in roc], axis=0)
    write_text(fig_dir / f"{name}-roc.svg", svg_lines(
        roc + [(f"macro (AUC {scored['macro_auc']:.3f})", grid, macro, None)],
        title=f"{name}: ROC on {scored_on}", xlabel="false positive rate",
        ylabel="true positive rate"))
    write_text(fig_dir / f"{name}-confusion.svg",
               svg_confusion(scored["confusion"], classes, f"{name}: {scored_on}"))
    return [f"### {name}", "",
            f"![loss](figures/{name}-loss.svg) ![accuracy](figures/{name}-acc.svg)", "",
            f"![ROC](figures/{name}-roc.svg) ![confusion matrix](figures/{name}-confusion.svg)", ""]


# ----------------------------------------------------------------------------------------
# Grad-CAM and attention over the clip's spectrogram
# ----------------------------------------------------------------------------------------

def log_mel(wave, sample_rate: int, n_fft: int = 1024, hop: int = 256, n_mels: int = 64):
    """Log mel spectrogram of wave (B, S): 64 ms Hann windows at 16 ms hops, 64 bands at 16 kHz.
    -> (B, n_mels, S // hop + 1)."""
    spec = torch.stft(wave.float(), n_fft, hop, window=torch.hann_window(n_fft),
                      return_complex=True)  # (B, F, frames)
    bank = torch.from_numpy(mel_filterbank(sample_rate, n_fft, n_mels))  # (F, n_mels)
    return torch.log(bank.t() @ spec.abs().square() + 1e-6)

def svg_spectrogram(wave, sample_rate: int, seconds: float, *, title: str, curve=None, rows=()):
    """The clip's log-mel spectrogram (low bands at the bottom) with a curve over time laid on it
    (curve = (label, values (T,))), and under it one heat-map row per (label, values (T,)) in rows.
    Curves and rows are each scaled to their own peak."""
    left, top, w, spec_h, row_h = 70, 30, 600, 160, 18
    mel = log_mel(wave[None], sample_rate)[0].numpy()  # (F, frames)
    mel = (mel - mel.min()) / max(np.ptp(mel), 1e-9)
    image = base64.b64encode(png(heat_colors(mel[::-1]))).decode()
    h = top + spec_h + row_h * len(rows) + 40
    out = svg_open(left + w + 20, h, title) + [
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
                f'{escape(curve[0])}</text>']
    for k, (label, values) in enumerate(rows):
        v = np.asarray(values, float) / max(float(np.max(values)), 1e-12)
        y, cell = top + spec_h + 4 + k * row_h, w / len(v)
        out.append(f'<text x="{left - 4}" y="{y + 13}" text-anchor="end">{escape(label)}</text>')
        out += [f'<rect x="{left + t * cell:.1f}" y="{y}" width="{cell + 0.5:.1f}" '
                f'height="{row_h - 2}" '
                f'fill="rgb({c[0]},{c[1]},{c[2]})"/>' for t, c in enumerate(heat_colors(v))]
    axis = top + spec_h + row_h * len(rows) + 20
    out += [f'<text x="{left + t / seconds * w:.1f}" y="{axis}" text-anchor="middle">{t:g} s</text>'
            for t in nice_ticks(0, seconds) if t <= seconds]
    return "\n".join(out) + "\n</svg>\n"


def grad_cam(model, wave, target: int):
    """Grad-CAM over time at the front end's output: wave (S,) -> (T,) scaled to [0, 1]. Each
    channel is weighted by its mean gradient of the target logit over time (Selvaraju et al.
    2017)."""
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
    out over the blocks (T,), the residual counted as half of each block (Abnar & Zuidema 2020)."""
    model.eval()
    _, atts = model(wave[None], attention=True)
    atts = [att[0] for att in atts]  # depth x (nh, 1 + T, 1 + T)
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
    """Fold model 1's predictions on two clips per class: its surest right and surest wrong."""
    rows = [r for r in scored_predictions(run)[1] if r["fold"] == "1"]
    surest = lambda r: max(float(v) for k, v in r.items() if k.startswith("p_"))  # noqa: E731
    picked = []
    for label in sorted({r["label"] for r in rows}, key=int):
        for right in (True, False):
            pool = [r for r in rows if r["label"] == label and (r["pred"] == label) == right]
            picked += sorted(pool, key=lambda r: (-surest(r), r["filename"]))[:1]
    return picked


def first_window(held, i: int):
    """Clip i of a Clips as its first window (the whole clip, padded, where it is shorter)."""
    return held.read([(i, 0)])[0][0]  # (S,)


def explain_section(best, runs, fig_dir: Path) -> list:
    """Grad-CAM of the best configuration's fold-1 model on two clips per class, and the <cls>
    attention of every transformer of the same split on two of those clips."""
    lines = ["## What the models attend to", ""]
    loaded = fold_model_1(best)
    if loaded is None:
        return lines + [f"No figures: {best['dir']}/fold1/model.pt is absent (checkpoints stay "
                        "out of git).", ""]
    cfg, model = loaded
    try:
        data = cfg.data if Path(cfg.data).expanduser().exists() else ""  # else found as usual
        ds = load_dataset(dataclasses.replace(cfg, data=data))
        held = load_clips(ds.audio_dir, ds.table, cfg)
    except UserError as e:
        return lines + [f"No figures: {e}", ""]
    index = {clip_name(r): i for i, r in enumerate(ds.table)}
    classes, clips = best["metrics"]["classes"], chosen_clips(best)
    draw = lambda name, wave, **kw: write_text(fig_dir / name, svg_spectrogram(  # noqa: E731
        wave, cfg.sample_rate, cfg.clip_seconds, **kw))
    lines += [f"Grad-CAM at the front end's last layer of `{best['name']}` (fold model 1) over "
              "time, on its surest right and surest wrong clip of each class, over the clip's "
              "log-mel spectrogram.", ""]
    for r in clips:
        wave, pred = first_window(held, index[r["filename"]]), int(r["pred"])
        name = f"gradcam-{best['name']}-{Path(r['filename']).stem}.svg"
        draw(name, wave, title=f"{r['filename']}: true {classes[int(r['label'])]}, predicted "
             f"{classes[pred]}", curve=(f"Grad-CAM ({classes[pred]})",
                                        grad_cam(model, wave, pred).numpy()))
        lines.append(f"![Grad-CAM {r['filename']}](figures/{name})")
    lines += ["", "The `<cls>` token's attention over time in the last block, one row per head, "
              "and rolled out over all blocks, for every transformer of the same split on the "
              "same two clips:", ""]
    for run in (r for r in runs if split_label(r["config"]) == split_label(best["config"])
                and r["config"]["arch"] == "transformer"):
        loaded = fold_model_1(run)
        for r in clips[:2] if loaded else []:
            wave = first_window(held, index[r["filename"]])
            per_head, rollout = cls_attention(loaded[1], wave)
            rows = [(f"head {h + 1}", a.numpy()) for h, a in enumerate(per_head[-1])]
            name = f"attention-{run['name']}-{Path(r['filename']).stem}.svg"
            draw(name, wave, title=f"{run['name']}: {r['filename']} (true "
                 f"{classes[int(r['label'])]})", rows=rows + [("rollout", rollout.numpy())])
            lines.append(f"![attention {run['name']} {r['filename']}](figures/{name})")
    return lines + [""]


def write_report(root: Path) -> Path:
    """REPORT.md and figures/*.svg in root, from every finished configuration below it."""
    runs = load_runs(root)
    if not runs:
        raise UserError(f"{root}: no finished configuration found (no */metrics.json); run "
                        "bash run.sh first")
    fig_dir = root / "figures"
    fig_dir.mkdir(exist_ok=True)
    lines = ["# audiotx report", "",
             f"Written by `python audiotx.py --report {root}` from the files of {len(runs)} "
             "finished configuration(s) in this folder. Accuracy is a fraction of clips; ± is the "
             "standard deviation over the fold models. Macro F1 and AUC are on the test fold "
             "(every fold model's predictions pooled), or on the pooled out-of-fold validation "
             "predictions of the last epoch where there is no test fold.", "",
             "## Every configuration", ""] + config_table(runs) + [""]
    lines += analysis(runs) + tuning_section(root)
    lines += ["## Misclassified clips of each split's best configuration", ""]
    bests = list(best_per_split(runs).values())
    for best in bests:
        lines += misclassified(best)
    # the views for the best configuration of the split with a test fold, else the first
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


def command(cfg: audiotx.Config):
    write_report(Path(cfg.report))


if __name__ == "__main__":
    sys.exit(audiotx.run_command(audiotx.parse_args(["--report", *sys.argv[1:]]), command))
