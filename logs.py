"""
What a training run shows and logs: the line per epoch, the closing summary, and Weights & Biases,
with one W&B run per fold (loss, accuracy, learning rate per epoch) and one for the whole
configuration (confusion matrix, ROC curves, a per-class table).

A leaf: it imports nothing of audiotx's, and wandb only when a run logs. Offline runs keep every
W&B file inside the run folder; any W&B failure prints one warning and turns logging off, since
the run's own files are the record. Not run on its own.
"""

import importlib
import os
import time
from pathlib import Path


# ---- lines on the terminal ----

def print_progress_factory(epochs: int, k: int):
    """Per-epoch line with the fold, the epoch and the time left for the whole run."""
    t0, done = time.time(), [0]

    def progress(fold, row):
        done[0] += 1
        to_go = k * epochs - (fold - 1) * epochs - row["epoch"]
        left = (time.time() - t0) / done[0] * to_go
        print(f"fold {fold}/{k} epoch {row['epoch']:3d}/{epochs} lr {row['lr']:.2e} "
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


# ---- Weights & Biases ----


def wandb_mode(choice: str) -> str:
    """--wandb auto|online|offline|disabled -> the mode; $WANDB_MODE wins; auto is online only
    where W&B credentials are configured."""
    mode = os.environ.get("WANDB_MODE") or choice
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode != "auto":
        return mode
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    return "online" if os.environ.get("WANDB_API_KEY") or logged_in else "offline"


class Tracker:
    """W&B runs of one configuration, grouped under the run folder's name."""

    def __init__(self, run_dir: Path, config: dict, mode: str, project: str, entity: str = ""):
        self.mode, self.project, self.entity = mode, project, entity
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
        self.run = w.init(project=self.project, entity=self.entity or None, group=name,
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

    def summary(self, title: str, metrics: dict, labels: list, preds: list, classes: list,
                curves: list):
        """Summary numbers, confusion matrix, ROC curves (one (fpr, tpr) per class) and a
        per-class table for one set of predictions; curves are lists of floats."""
        if self.run:
            self._guard(self._summary, title, metrics, labels, preds, classes, curves)

    def _summary(self, title, metrics, labels, preds, classes, curves):
        w, keys = self.wandb, ("precision", "recall", "f1", "auc")
        self.run.summary.update({f"{title}/{k}": metrics[k]
                                 for k in ("accuracy", "macro_f1", "macro_auc")})
        self.run.summary.update({f"params/{k}": v for k, v in self.config["params"].items()})
        self.run.log({
            f"{title}/confusion": w.plot.confusion_matrix(y_true=labels, preds=preds,
                                                          class_names=classes),
            f"{title}/roc": w.plot.line_series(
                xs=[fpr for fpr, _ in curves], ys=[tpr for _, tpr in curves],
                keys=classes, title=f"ROC ({title})", xname="false positive rate"),
            f"{title}/per_class": w.Table(columns=["class", *keys], data=[
                [c] + [m[k] for k in keys] for c, m in metrics["per_class"].items()])})

    def finish(self):
        if self.run:
            self._guard(self.run.finish)
        self.run = None
