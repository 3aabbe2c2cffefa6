"""Tests for audiotx: layers against references, metrics against hand-worked cases and scipy,
data and splits on the real ESC-10 csv, and the command end to end on real and synthetic data.

    pytest test_audiotx.py
"""

import ast
import base64
import csv
import dataclasses
import fcntl
import http.server
import io
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io.wavfile
import scipy.signal
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F

import audiotx
import clips
import decode
import events
import fetch
import layouts
import plot
import predict
import processes
import report
import serve
import tools

HERE = Path(__file__).resolve().parent
REAL_DATA = HERE.parent / "shared" / "data" / "ESC-10"
needs_real_data = pytest.mark.skipif(
    not (REAL_DATA / "meta" / "esc50.csv").is_file() and not os.environ.get("CI"),
    reason="../shared/data/ESC-10 is absent (under CI these tests must run, so they fail instead)")
needs_ffmpeg = pytest.mark.skipif(
    not shutil.which("ffmpeg") and not os.environ.get("CI"),
    reason="ffmpeg is not installed (.ci/run installs it; under CI these tests must run)")


# ---- helpers ----

def write_dataset(root: Path, n_classes=3, clips_per_fold=2, folds=5, rate=8000, seconds=1.0, odd=False):
    """A tiny ESC-50-layout dataset: class c is a tone at 300 * (c + 1) Hz plus noise."""
    rng = np.random.default_rng(0)
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    rows = []
    for fold in range(1, folds + 1):
        for c in range(n_classes):
            for j in range(clips_per_fold):
                src = f"{fold}{c}{j}0"
                name = f"{fold}-{src}-A-{c}.wav"
                r = rate * 2 if odd and j == 0 else rate  # some clips at another rate, stereo, shorter
                t = np.arange(int(r * seconds * (0.7 if odd and j == 0 else 1))) / r
                wave = 0.5 * np.sin(2 * np.pi * 300 * (c + 1) * t) + 0.05 * rng.standard_normal(len(t))
                if odd and j == 0:
                    wave = np.stack([wave, wave], axis=1)
                scipy.io.wavfile.write(root / "audio" / name, r, (wave * 32767).astype(np.int16))
                rows.append([name, fold, c, f"class{c}", "True", src, "A"])
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        w.writerows(rows)
    return root


def run_cli(args, env_extra=None, cwd=HERE, timeout=600):
    """The real command in a subprocess; env_extra's None values remove a variable."""
    env = {k: v for k, v in {**os.environ, "WANDB_MODE": "disabled", **(env_extra or {})}.items()
           if v is not None}
    return subprocess.run([sys.executable, str(HERE / "audiotx.py"), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def cli(args, capsys):
    """audiotx.main in this process: (exit status, stdout, stderr); argparse's exit counts too."""
    try:
        code = audiotx.main(args)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, culprit):
    assert code == 2, err
    assert culprit in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def predict_cli(args, capsys):
    """--predict in this process: (exit status, its lines on stdout but the settings line the text form
    begins with, stderr)."""
    code, out, err = cli(["--predict", *args], capsys)
    return code, [line for line in out.splitlines() if not line.startswith("# audiotx: ")], err


SAVES = ["bom", "crlf", "quoted", "blank rows", "reordered", "extra column", "semicolons"]


def as_spreadsheet_saves(meta: Path, saves, edit=None):
    """Rewrite meta as a spreadsheet would, with the given habits; edit(rows) may change cells."""
    header, *rows = list(csv.reader(meta.read_text().splitlines()))
    if edit:
        edit(header, rows)
    if "extra column" in saves:
        header, rows = header + ["notes"], [r + ["seen, twice"] for r in rows]
    if "reordered" in saves:
        header, rows = header[::-1], [r[::-1] for r in rows]
    buf, sep = io.StringIO(), ";" if "semicolons" in saves else ","
    csv.writer(buf, delimiter=sep, lineterminator="\r\n" if "crlf" in saves else "\n",
               quoting=csv.QUOTE_ALL if "quoted" in saves else csv.QUOTE_MINIMAL).writerows([header] + rows)
    text = buf.getvalue() + (f"\n{sep * 7}\n\n" if "blank rows" in saves else "")  # an emptied row, blank lines
    meta.write_bytes(("\ufeff" if "bom" in saves else "").encode() + text.encode())


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def round_step(ticks) -> bool:
    """Evenly spaced ticks whose step is 1, 2, 2.5 or 5 times a power of ten, each a whole multiple of it."""
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    return (any(abs(mantissa - m) < 1e-9 for m in (1, 2, 2.5, 5)) and np.allclose(np.diff(ticks), step)
            and all(abs(t / step - round(t / step)) < 1e-6 for t in ticks))


@pytest.fixture
def quick(tmp_path, monkeypatch):
    """A tiny dataset and the flags for a fast run on it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = write_dataset(tmp_path / "data", folds=3, clips_per_fold=1)
    return root, ["--data", str(root), "--out", str(tmp_path / "runs"), "--sample-rate", "8000",
                  "--clip-seconds", "1", "--kfold", "2", "--epochs", "1", "--dim", "16"]


def independent_metrics(labels, probs, n_classes):
    """Metrics recomputed without audiotx: loops for the confusion matrix, scipy for the AUC."""
    preds = probs.argmax(1)
    cm = np.zeros((n_classes, n_classes), dtype=int)
    for y, p in zip(labels, preds):
        cm[y, p] += 1
    f1s, aucs = [], []
    for c in range(n_classes):
        tp, fp, fn = cm[c, c], cm[:, c].sum() - cm[c, c], cm[c].sum() - cm[c, c]
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
        pos, neg = probs[labels == c, c], probs[labels != c, c]
        aucs.append(scipy.stats.mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))
    return {"accuracy": float((preds == labels).mean()), "macro_f1": float(np.mean(f1s)),
            "macro_auc": float(np.mean(aucs)), "confusion": cm.tolist(), "f1": f1s, "auc": aucs}


def check_run_files(run_dir: Path, k: int, has_test: bool):
    """Every file the issue lists, and metrics.json against an independent computation."""
    config = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    classes = config["classes"]
    assert metrics["classes"] == classes and config["versions"]["torch"] == torch.__version__
    for i in range(1, k + 1):
        with open(run_dir / f"fold{i}" / "history.csv") as f:
            hist = list(csv.DictReader(f))
        assert len(hist) == config["epochs"]
        assert set(hist[0]) >= {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"}
    with open(run_dir / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:5] == ["fold", "split", "filename", "label", "pred"]
    probs = {s: np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows if r["split"] == s])
             for s in ("val", "test")}
    labels = {s: np.array([int(r["label"]) for r in rows if r["split"] == s]) for s in ("val", "test")}
    assert len(set(r["filename"] for r in rows if r["split"] == "val")) == len(labels["val"])  # each clip once
    assert sorted(r["filename"] for r in rows if r["split"] == "val_final") == sorted(
        r["filename"] for r in rows if r["split"] == "val")
    sets = [("val", labels["val"], probs["val"])]
    if has_test:
        test_rows = [r for r in rows if r["split"] == "test"]
        names = sorted(set(r["filename"] for r in test_rows))
        ens = np.array([np.mean([probs["test"][i] for i, r in enumerate(test_rows) if r["filename"] == n], axis=0)
                        for n in names])
        ens_labels = np.array([next(int(r["label"]) for r in test_rows if r["filename"] == n) for n in names])
        sets += [("test", labels["test"], probs["test"]), ("ensemble_test", ens_labels, ens)]
        accs = [m["test"]["accuracy"] for m in metrics["folds"]]
        assert metrics["test_mean"] == pytest.approx(np.mean(accs), abs=1e-9)
        assert metrics["test_std"] == pytest.approx(np.std(accs), abs=1e-9)
    else:
        assert metrics["test"] is None and metrics["ensemble_test"] is None and labels["test"].size == 0
    for key, y, p in sets:
        ref, got = independent_metrics(y, p, len(classes)), metrics[key]
        for m in ("accuracy", "macro_f1", "macro_auc"):
            assert got[m] == pytest.approx(ref[m], abs=1e-6), (key, m)
        assert got["confusion"] == ref["confusion"]
        assert [got["per_class"][c]["f1"] for c in classes] == pytest.approx(ref["f1"], abs=1e-6)
    with open(run_dir / "roc.csv") as f:
        roc = list(csv.DictReader(f))
    assert list(roc[0]) == ["class", "fpr", "tpr"] and {r["class"] for r in roc} == set(classes)
    assert set(metrics["params"]) == {"trainable", "non_trainable", "buffers"}
    n = round(config["sample_rate"] * config["clip_seconds"])  # the hop evaluation windows at, recorded
    assert round(config["window_hop_seconds"] * config["sample_rate"]) == n // 2
    # the last epoch's validation, predicted after training, scores what training logged for that epoch
    n_val = [m["val"]["n"] for m in metrics["folds"]]
    last = [float(read_rows(run_dir / f"fold{i}" / "history.csv")[-1]["val_acc"]) for i in range(1, k + 1)]
    assert [m["val_final"]["accuracy"] for m in metrics["folds"]] == pytest.approx(last, abs=1e-6)
    assert metrics["val_final"]["accuracy"] == pytest.approx(np.dot(last, n_val) / sum(n_val), abs=1e-6)
    return config, metrics


# ---- layout ----

OURS = {"audiotx", "clips", "decode", "events", "fetch", "files", "layouts", "logs", "plot", "predict",
        "processes", "report", "serve", "tools"}
LEAVES = {"clips", "decode", "events", "fetch", "files", "layouts", "logs", "plot", "processes"}


def module_imports(name: str) -> set:
    """Our modules that a module imports at its top level (not inside a function)."""
    tree = ast.parse((HERE / f"{name}.py").read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


def test_imports_go_one_way_and_every_file_is_accounted_for():
    """Leaves import nothing of ours, audiotx only leaves, the tools audiotx and leaves (serve.py, the page,
    the tools whose answers it shows too); every module of the checkout is one of these, and the README's
    file list names each."""
    assert {p.stem for p in HERE.glob("*.py")} == OURS | {"test_audiotx"}
    for leaf in LEAVES:
        assert module_imports(leaf) == set(), leaf
    assert module_imports("audiotx") <= LEAVES
    for tool in OURS - LEAVES - {"audiotx"}:
        front = {"predict", "report"} if tool == "serve" else set()  # the page serves their answers
        assert "audiotx" in module_imports(tool) and module_imports(tool) <= LEAVES | {"audiotx"} | front, tool
    assert "sys.modules" not in (HERE / "audiotx.py").read_text()
    readme = (HERE / "README.md").read_text()
    assert all(f"`{name}.py`" in readme for name in OURS)


def used_before_defined(path: Path) -> list:
    """(name, line, line defined): top-level code that uses a name of its own module defined
    further down, or gives that name to a variable or an argument of its own, so that a reader
    would have to jump forward (a dataclass's fields are attributes, not variables)."""
    tree = ast.parse(path.read_text())
    defined = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.setdefault(node.name, node.lineno)
        elif isinstance(node, ast.Assign):
            defined.update({t.id: node.lineno for t in node.targets if isinstance(t, ast.Name)})
    found = []
    for node in tree.body:
        walked = list(ast.walk(node))
        fields = {id(f.target) for c in walked if isinstance(c, ast.ClassDef) for f in c.body
                  if isinstance(f, ast.AnnAssign)}
        local = [(n.id, n.lineno) for n in walked
                 if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store) and id(n) not in fields]
        local += [(a.arg, a.lineno) for n in walked if isinstance(n, ast.arguments) for a in n.args + n.kwonlyargs]
        found += [(name, line, defined[name]) for name, line in local if defined.get(name, 0) > node.lineno]
        found += [(n.id, n.lineno, defined[n.id]) for n in walked
                  if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in dict(local)
                  and defined.get(n.id, 0) > node.lineno]
    return found


def test_every_file_reads_top_to_bottom_with_its_entry_point_last(tmp_path):
    for path in sorted(HERE.glob("*.py")):
        assert used_before_defined(path) == [], path.name
        last = ast.parse(path.read_text()).body[-1]
        if isinstance(last, ast.If):  # if __name__ == "__main__": the entry point closes the file
            assert "__main__" in ast.unparse(last.test), path.name
    broken = "def f():\n    return g()\n\n\ndef g():\n    return 1\n"  # the check itself can fail
    (tmp_path / "probe.py").write_text(broken)
    assert used_before_defined(tmp_path / "probe.py") == [("g", 2, 5)]
    (tmp_path / "probe.py").write_text(broken.replace("return g()", "g = 2"))  # a variable named for it
    assert used_before_defined(tmp_path / "probe.py") == [("g", 2, 5)]


@pytest.mark.parametrize("flags,tool", [([], ""), (["--predict", "a.wav"], "predict"), (["--report", "r"], "report"),
                                        (["--bench"], "tools"), (["--tune", "3"], "tools"), (["--lr-find"], "tools"),
                                        (["--lr", "auto"], "tools"), (["--lr", "0.01"], "")])
def test_main_hands_each_command_to_its_module(flags, tool):
    assert audiotx.tool_for(audiotx.parse_args(flags)) == tool
    assert tool == "" or callable(getattr(__import__(tool), "command"))


def test_help_lists_every_flag_with_its_text(capsys):
    code, out, _ = cli(["--help"], capsys)
    text = "".join(out.split())  # argparse wraps the lines, at spaces and hyphens
    assert code == 0
    for f in dataclasses.fields(audiotx.Config):
        assert "--" + f.name.replace("_", "-") in text and "".join(f.metadata["help"].split()) in text, f.name


# ---- model ----

@pytest.mark.parametrize("heads", [1, 2, 4])
def test_attention_matches_scaled_dot_product_attention(heads):
    torch.manual_seed(heads)
    attn = audiotx.SelfAttention(dim=32, heads=heads).eval()
    x = torch.randn(3, 7, 32)
    q, k, v = attn.qkv(x).split(32, dim=2)
    q, k, v = (t.view(3, 7, heads, 32 // heads).transpose(1, 2) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 7, 32)
    torch.testing.assert_close(attn(x), attn.proj(ref), rtol=1e-5, atol=1e-6)


def tiny_transformer(heads=2, n_classes=3):
    torch.manual_seed(0)
    return audiotx.AudioTransformer(dim=16, heads=heads, depth=2, n_classes=n_classes, n_samples=8192,
                                    dropout=0.1).eval()


def test_cls_token_is_position_zero_and_reaches_the_head():
    model = tiny_transformer()
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        model.cls.normal_()
        wave = torch.randn(2, 8192)
        out = model(wave)
    assert seen["x"].shape == (2, 1 + model.front.out_len(8192), 16)
    torch.testing.assert_close(seen["x"][:, 0], (model.cls[0, 0] + model.pos[0, 0]).expand(2, -1))
    with torch.no_grad():  # the logits are read from <cls>: changing it changes them
        model.cls.add_(torch.randn_like(model.cls))  # not a constant: LayerNorm removes that
        assert not torch.allclose(out, model(wave))


@pytest.mark.parametrize("arch", ["cnn", "transformer"])
def test_output_does_not_depend_on_batch_order(arch):
    torch.manual_seed(0)
    model = (tiny_transformer() if arch == "transformer"
             else audiotx.CNNClassifier(dim=16, n_classes=3, dropout=0.1).eval())
    wave = torch.randn(5, 8192)
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        out = model(wave)
        assert out.shape == (5, 3) and torch.isfinite(out).all()
        torch.testing.assert_close(model(wave[perm]), out[perm], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["cnn", "transformer"])
def test_tiny_model_overfits_one_batch(arch):
    cfg = audiotx.Config(arch=arch, dim=16, heads=2, dropout=0.0, sample_rate=8192, clip_seconds=1.0)
    torch.manual_seed(0)
    model = audiotx.build_model(cfg, 4)
    wave, labels = torch.randn(8, 8192), torch.arange(8) % 4
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = F.cross_entropy(model(wave), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert (model(wave).argmax(1) == labels).all() and loss.item() < 0.1


def test_param_counts_split_trainable_frozen_and_buffers():
    model = audiotx.CNNClassifier(dim=16, n_classes=3, dropout=0.0)
    total = sum(p.numel() for p in model.parameters())
    model.head.net[0].weight.requires_grad_(False)
    counts = audiotx.count_params(model)
    assert counts["non_trainable"] == 16 * 32 and counts["trainable"] == total - 16 * 32
    assert counts["buffers"] == sum(2 * c + 1 for c in (4, 8, 16, 16))  # BN mean, var, count per layer


def test_mel_filterbank_and_log_mel_find_a_tone():
    fb = plot.mel_filterbank(16000, 1024, 64)  # (513, 64)
    freqs = np.linspace(0, 8000, 513)
    mel = 2595 * np.log10(1 + freqs / 700)
    centres = freqs[fb.argmax(0)]
    assert fb.shape == (513, 64) and fb.min() >= 0 and fb.max() <= 1
    assert (np.diff(centres) >= 0).all()  # filters in rising order
    spacing = np.diff(2595 * np.log10(1 + centres[8:] / 700))  # evenly spaced in mel, away from the coarse bottom
    assert spacing.std() < 0.25 * spacing.mean() and mel[-1] / 64 * 0.7 < spacing.mean() < mel[-1] / 64 * 1.3
    t = torch.arange(16000) / 16000
    out = report.log_mel(torch.stack([torch.sin(2 * math.pi * 1000 * t), torch.sin(2 * math.pi * 3000 * t)]),
                          16000)
    assert out.shape == (2, 64, 16000 // 256 + 1)
    for row, f in zip(out, (1000, 3000)):  # the loudest band is the one whose filter peaks nearest the tone
        assert abs(int(row.mean(1).argmax()) - int(np.abs(centres - f).argmin())) <= 1


def test_logwave_stem_turns_a_gain_into_a_shift():
    """--features logwave: the stem's output is the log of its bands' magnitudes, so 40 dB more
    gain adds log(100) to every value reaching the first BatchNorm, where the plain stem scales."""
    torch.manual_seed(0)
    wave = 0.1 * torch.randn(2, 16000)

    def shifted(a, b):
        torch.testing.assert_close(b - a, torch.full_like(a, math.log(100)), rtol=0, atol=0.05)

    for features, expect in [("logwave", shifted),
                             ("wave", lambda a, b: torch.testing.assert_close(b, 100 * a))]:
        front, seen = audiotx.ConvFrontEnd(dim=16, features=features).eval(), []
        front.norms[0].register_forward_hook(lambda module, inputs, out: seen.append(inputs[0]))
        with torch.no_grad():
            front(wave), front(100 * wave)
        expect(*seen)


def conv1d_front(front, wave, training: bool):
    """The front end's layers as plain (B, C, L) conv1d, max_pool1d and batch_norm, sharing its weights."""
    x = wave[:, None]
    for i, (conv, norm, (*_, pool)) in enumerate(zip(front.convs, front.norms, front.plan)):
        x = F.conv1d(x, conv.weight, stride=conv.stride, padding=conv.padding)
        x = x.abs() if front.log_stem and i == 0 else x
        x = F.max_pool1d(x, pool) if pool > 1 else x
        x = torch.log(x + 1e-4) if front.log_stem and i == 0 else x
        stats = (norm.running_mean.clone(), norm.running_var.clone())  # batch_norm updates what it is given
        x = F.relu(F.batch_norm(x, *stats, norm.weight, norm.bias, training=training, eps=norm.eps))
    return x.transpose(1, 2)  # (B, T, C)


@pytest.mark.parametrize("features", ["wave", "logwave"])
def test_front_end_computes_what_plain_conv1d_layers_do(features):
    """The front end runs its layers as 2-D ops on channels-last (B, C, 1, L) and its stem as a
    product of frames, for speed: outputs and weight gradients must match conv1d, max_pool1d and
    batch_norm over (B, C, L), in training (batch statistics) and in evaluation (running ones)."""
    torch.manual_seed(0)
    front = audiotx.ConvFrontEnd(dim=16, features=features)
    with torch.no_grad():
        for norm in front.norms:
            norm.running_mean.uniform_(-0.5, 0.5), norm.running_var.uniform_(0.5, 2.0)
    wave = 0.1 * torch.randn(3, 16000 + 123)  # a length no layer divides
    for training in (True, False):
        front.train(training)
        mine, _ = front(wave)
        grads = torch.autograd.grad(mine.square().sum(), [c.weight for c in front.convs])
        ref = conv1d_front(front, wave, training)
        ref_grads = torch.autograd.grad(ref.square().sum(), [c.weight for c in front.convs])
        assert mine.shape == ref.shape == (3, front.out_len(16123), 16)
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)
        for g, r in zip(grads, ref_grads):  # sums over 48k positions in float32: to 1e-4 of their scale
            torch.testing.assert_close(g, r, rtol=0, atol=1e-4 * float(r.abs().max()))


def burst_clip(generator, freq, start, n_samples=32000, rate=16000, length=4000):
    """Noise with a 0.25 s tone burst at sample `start`."""
    wave = 0.05 * torch.randn(n_samples, generator=generator)
    wave[start:start + length] += 0.5 * torch.sin(2 * math.pi * freq * torch.arange(length) / rate)
    return wave


@pytest.mark.slow
def test_grad_cam_peaks_where_the_class_evidence_is():
    # A small cnn learns "a 1 kHz burst" against "a 3 kHz burst", each anywhere in 2 s of noise;
    # on a clip with the 1 kHz burst at 1.0-1.25 s, Grad-CAM for that class must peak there.
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2
    waves = torch.stack([burst_clip(g, 1000 if y else 3000, int(torch.randint(0, 28000, (1,), generator=g)))
                         for y in labels])
    torch.manual_seed(0)
    model = audiotx.CNNClassifier(dim=32, n_classes=2, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(60):
        loss = F.cross_entropy(model(waves), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2  # it learned the task, so the check below is about localisation
    cam = report.grad_cam(model, burst_clip(g, 1000, 16000), target=1)
    frame = 2.0 / len(cam)  # seconds per front-end frame
    peak = (cam.argmax().item() + 0.5) * frame
    assert cam.max() == 1 and cam.min() >= 0
    assert 1.0 - frame <= peak <= 1.25 + frame, (peak, cam)


def test_cls_attention_per_head_and_rollout():
    torch.manual_seed(0)
    model = audiotx.AudioTransformer(dim=16, heads=4, depth=3, n_classes=3, n_samples=16384, dropout=0.0)
    inputs = []  # what each block's attention reads, to recompute its weights by hand
    for b in model.blocks:
        b.attn.register_forward_hook(lambda m, args, out: inputs.append((m, args[0])))
    per_head, rollout = report.cls_attention(model, torch.randn(16384))
    T = model.front.out_len(16384)
    assert per_head.shape == (3, 4, T) and rollout.shape == (T,)
    assert (per_head.sum(-1) <= 1 + 1e-6).all() and (per_head >= 0).all()
    atts = []  # softmax(q k^T / sqrt(head size)) per head from the block's own projections
    for attn, x in inputs:
        q, k, _ = attn.qkv(x[0]).split(16, dim=1)  # (1 + T, 16) each
        q, k = (t.view(T + 1, 4, 4).transpose(0, 1) for t in (q, k))  # (heads, 1 + T, 4)
        atts.append((q @ k.transpose(1, 2) / 2).softmax(-1))  # (heads, 1 + T, 1 + T)
    torch.testing.assert_close(per_head, torch.stack([a[:, 0, 1:] for a in atts]), rtol=1e-5, atol=1e-6)
    # by hand: each block's head-mean attention, half residual, multiplied from the first block up
    atts = [a.mean(0) for a in atts]
    eye = torch.eye(T + 1)
    manual = (0.5 * atts[2] + 0.5 * eye) @ (0.5 * atts[1] + 0.5 * eye) @ (0.5 * atts[0] + 0.5 * eye)
    assert torch.allclose(rollout, manual[0, 1:], atol=1e-6)


# ---- metrics ----

def test_metrics_on_a_hand_worked_case():
    # true:  0 0 0 1 1 2 ; pred: 0 0 1 1 2 2
    labels = np.array([0, 0, 0, 1, 1, 2])
    probs = np.eye(3)[[0, 0, 1, 1, 2, 2]] * 0.8 + 0.1
    m = audiotx.summarize(labels, probs, ["a", "b", "c"])
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # class a: P=1, R=2/3, F1=0.8; b: P=1/2, R=1/2, F1=1/2; c: P=1/2, R=1, F1=2/3
    assert [m["per_class"][c]["f1"] for c in "abc"] == pytest.approx([0.8, 0.5, 2 / 3])
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # class a scores: positives 0.9 0.9 0.1, negatives 0.1 0.1 0.1 -> pairs won 6 of 9, ties 3 -> 7.5 / 9
    assert m["per_class"]["a"]["auc"] == pytest.approx(7.5 / 9)


def test_auc_matches_mann_whitney_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(20):
        scores = rng.integers(0, 6, size=40) / 5.0  # many ties
        positive = rng.random(40) < 0.4
        fpr, tpr = audiotx.roc_curve(scores, positive)
        u = scipy.stats.mannwhitneyu(scores[positive], scores[~positive]).statistic
        assert audiotx.auc(fpr, tpr) == pytest.approx(u / (positive.sum() * (~positive).sum()), abs=1e-12)
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_auc_undefined_for_a_class_absent_from_the_set():
    m = audiotx.summarize(np.array([0, 1, 0, 1]), np.full((4, 3), 1 / 3), ["a", "b", "c"])
    assert m["per_class"]["c"]["auc"] is None and m["macro_auc"] == pytest.approx(0.5)


# ---- data ----

@pytest.mark.parametrize("dtype,scale,offset", [(np.uint8, 128, 128), (np.int16, 32768, 0),
                                                (np.int32, 2 ** 31, 0), (np.float32, 1, 0), (np.float64, 1, 0)])
@pytest.mark.parametrize("channels", [1, 2])
def test_load_wav_round_trips(tmp_path, dtype, scale, offset, channels):
    wave = np.sin(np.linspace(0, 20, 1000)) * 0.9
    stored = np.round(wave * scale + offset) if scale > 1 else wave
    data = stored.astype(dtype)
    if channels == 2:  # left = wave, right = -wave/2: the mix-down is wave/4
        right = (np.round(-wave / 2 * scale + offset) if scale > 1 else -wave / 2).astype(dtype)
        data = np.stack([data, right], axis=1)
    path = tmp_path / "x.wav"
    scipy.io.wavfile.write(path, 22050, data)
    got, rate = audiotx.load_audio(path)
    assert rate == 22050 and got.dtype == np.float32 and got.shape == (1000,)
    expect = wave if channels == 1 else wave / 4
    np.testing.assert_allclose(got, expect, atol=2.5 / scale + 1e-6)


def test_big_endian_and_64_bit_samples_read_as_their_values():
    """RIFX files give big-endian samples, and 36- to 64-bit files left-justified int64 ones."""
    values = np.array([0.5, -0.25, 0.0])
    expect = values.astype(np.float32)
    for dtype, full in ((">i2", 2 ** 15), (">i4", 2 ** 31), (">f4", 1), ("<i8", 2 ** 63), (">i8", 2 ** 63)):
        samples = (values * full).astype(dtype) if full > 1 else values.astype(dtype)
        assert np.array_equal(audiotx.to_mono_float("x.wav", samples), expect), dtype


def test_resampling_keeps_the_tone_and_16_bit_storage_round_trips():
    sine = np.sin(2 * np.pi * 440 * np.arange(44100) / 44100).astype(np.float32)
    out = audiotx.to_rate(sine, 44100, 16000)
    assert out.shape == (16000,) and out.dtype == np.float32
    assert abs(np.argmax(np.abs(np.fft.rfft(out))) - 440) <= 1  # the tone is still at 440 Hz
    assert audiotx.to_rate(sine, 44100, 44100) is sine
    samples = np.array([-32768, -1, 0, 1, 32767], dtype=np.int16)
    assert np.array_equal(clips.to_int16(samples / 32768.0), samples)  # a 16-bit file is stored as it is
    assert clips.to_int16(np.array([1.5, -2.0])).tolist() == [32767, -32768]  # the loudest clipped


def test_clips_pad_the_short_crop_the_long_anew_and_window_them_as_prediction_does():
    n, hop = 8000, 4000
    lengths = torch.tensor([3000, 8000, 20500])
    store = torch.arange(int(lengths.sum()), dtype=torch.int64).remainder(30000).to(torch.int16)
    held = clips.Clips(store, lengths, n)
    assert held.starts.tolist() == [0, 3000, 11000]
    wave, got = held.read([(0, 0), (1, 0)])
    assert wave.shape == (2, n) and got.tolist() == [3000, 8000] and wave[0, 3000:].abs().sum() == 0
    torch.testing.assert_close(wave[1], store[3000:11000].float() / 32768)
    torch.manual_seed(0)
    offsets = set()
    for _ in range(20):  # the long clip: a window at a random place inside it, a new one each time
        wave, got = held.crops(torch.tensor([2]))
        first = int(round(float(wave[0, 0]) * 32768)) - int(store[11000])
        offsets.add(first)
        assert got is None and 0 <= first <= 20500 - n
        torch.testing.assert_close(wave[0], store[11000 + first:11000 + first + n].float() / 32768)
    assert len(offsets) > 10
    rows, owner = held.windows(torch.tensor([2, 0]), hop)
    assert rows == [(2, 0), (2, 4000), (2, 8000), (2, 12000), (2, 12500), (0, 0)]  # the last ends at the end
    assert owner.tolist() == [0, 0, 0, 0, 0, 1]
    assert [s for _, s in rows[:5]] == clips.window_starts(20500, n, hop)  # what --predict cuts
    torch.manual_seed(0)
    model = audiotx.CNNClassifier(dim=16, n_classes=3, dropout=0.0).eval()
    by_window = audiotx.predict(model, *held.read(rows))
    mean = audiotx.predict_clips(model, held, np.array([2, 0]))  # each clip: the mean of its windows
    torch.testing.assert_close(mean, torch.stack([by_window[:5].mean(0), by_window[5]]))


@needs_real_data
@pytest.mark.parametrize("test_fold,k", [(1, 4), (0, 4), (0, 5), (3, 2)])
def test_splits_on_the_real_csv(test_fold, k):
    table = layouts.read_esc(REAL_DATA, "esc10")
    assert len(table) == 400
    folds = np.array([r["fold"] for r in table])
    groups = np.array([r["src_file"] for r in table])
    labels = np.array([sorted({r["category"] for r in table}).index(r["category"]) for r in table])
    test, splits = audiotx.split_folds(folds, groups, labels, test_fold, k)
    assert len(splits) == k
    assert set(test.tolist()) == set(np.flatnonzero(folds == test_fold).tolist())
    vals = np.concatenate([v for _, v in splits])
    assert sorted(vals.tolist()) == sorted(np.flatnonzero(folds != test_fold).tolist())  # each clip once
    for train, val in splits:
        assert not set(train.tolist()) & set(val.tolist())
        assert not set(train.tolist()) & set(test.tolist())
        assert not set(groups[train]) & set(groups[val])
        assert len(train) + len(val) + len(test) == 400
        counts = np.bincount(labels[val], minlength=10)
        assert counts.max() - counts.min() <= 4  # classes stay balanced
    if test_fold == 1 and k == 4:  # the course's configuration: official folds 2..5 in turn
        assert [sorted(set(folds[v].tolist())) for _, v in splits] == [[2], [3], [4], [5]]


@pytest.fixture
def cached(tmp_path, monkeypatch):
    """A tiny dataset decoded once: (root, table, cfg, the clips, the cache file)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = write_dataset(tmp_path / "data", folds=2, clips_per_fold=1)
    cfg = audiotx.Config(sample_rate=8000, clip_seconds=1.0)
    table = layouts.read_esc(root, "esc10")
    audio = root / "audio"
    return root, table, cfg, audiotx.load_clips(audio, table, cfg), audiotx.cache_path(audio, table, cfg)


def test_esc50_layout_gives_esc10_by_default_and_50_classes_with_subset_esc50(tmp_path):
    (tmp_path / "audio").mkdir()
    (tmp_path / "meta").mkdir()
    esc10 = set(layouts.ESC10)
    rows = []
    for fold in range(1, 6):
        for target in range(50):
            name = f"{fold}-{100 + target}{fold}-A-{target}.wav"
            scipy.io.wavfile.write(tmp_path / "audio" / name, 8000, np.zeros(80, dtype=np.int16))
            rows.append([name, fold, target, f"class{target:02d}", str(target in esc10), f"{100 + target}{fold}", "A"])
    with open(tmp_path / "meta" / "esc50.csv", "w", newline="") as f:
        csv.writer(f).writerows([["filename", "fold", "target", "category", "esc10", "src_file", "take"]] + rows)
    ten = audiotx.load_dataset(audiotx.Config(data=str(tmp_path)))
    fifty = audiotx.load_dataset(audiotx.Config(data=str(tmp_path), subset="esc50"))
    assert ten.classes == sorted(f"class{t:02d}" for t in esc10) and len(ten.table) == 50
    assert len(fifty.classes) == 50 and len(fifty.table) == 250 and int(fifty.labels.max()) == 49
    assert len(fifty.test_idx) == 50 and all(fifty.table[i]["fold"] == 1 for i in fifty.test_idx)


def test_replace_with_writes_the_exact_name_and_a_failed_write_keeps_the_old_file(tmp_path):
    a = np.arange(3, dtype=np.float32)
    audiotx.replace_with(tmp_path / "a.npy", lambda tmp: np.save(tmp, a))  # no second ".npy"
    audiotx.write_text(tmp_path / "b.txt", "whole")

    def half(tmp):
        tmp.write_text("ha")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        audiotx.replace_with(tmp_path / "b.txt", half)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.txt"]
    assert np.array_equal(np.load(tmp_path / "a.npy"), a)
    assert (tmp_path / "b.txt").read_text() == "whole"


def test_cache_is_reused_and_invalidated_by_a_changed_file(cached):
    root, table, cfg, first, path = cached
    assert path.is_file() and first.store.shape == (6 * 8000,) and first.lengths.tolist() == [8000] * 6
    np.zeros(6 * 8000, dtype=np.int16).tofile(path)  # a reused cache is read, not rebuilt
    assert audiotx.load_clips(root / "audio", table, cfg).store.abs().sum() == 0
    name = root / "audio" / table[0]["filename"]
    scipy.io.wavfile.write(name, 8000, np.zeros(8000, dtype=np.int16) + 100)
    assert audiotx.cache_path(root / "audio", table, cfg) != path  # changed size or mtime -> new key
    assert audiotx.load_clips(root / "audio", table, cfg).store.abs().max() > 0


# ---- your own sounds: layouts, formats, splits ----

def tone(path: Path, freq: float, seconds=1.0, rate=8000, channels=1, seed=0):
    """A noisy tone as a 16-bit WAV, converted by ffmpeg when path is not .wav. -> the WAV's samples."""
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t) + 0.05 * np.random.default_rng(seed).standard_normal(len(t))
    data = (np.stack([wave, -0.5 * wave], axis=1) if channels == 2 else wave) * 32767
    path.parent.mkdir(parents=True, exist_ok=True)
    wav = path if path.suffix.lower() == ".wav" else path.with_name(path.name + ".tmp.wav")
    scipy.io.wavfile.write(wav, rate, data.astype(np.int16))
    if wav != path:
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(wav), str(path)], check=True)
        wav.unlink()
    return data.astype(np.int16)


def class_folders(root: Path, per_class=5, suffixes=(".wav",), classes=("chien qui aboie", "pluie", "ça coule")):
    """A folder of class folders: per_class tones of each class, one folder down, suffixes in turn."""
    for c, name in enumerate(classes):
        for j in range(per_class):
            tone(root / name / "day 1" / f"take {j}{suffixes[j % len(suffixes)]}", 300 * (c + 1), seed=10 * c + j)
    return root


def test_a_folder_of_class_folders_is_read_as_a_user_would_expect(tmp_path, capsys):
    root = class_folders(tmp_path / "mine", per_class=2)
    tone(root / "pluie" / "deeper" / "still" / "LOUD.WAV", 600)  # any depth, any case
    for junk in ("README.md", "pluie/.DS_Store", "pluie/cover.jpg", ".ipynb_checkpoints/x.wav",
                 "pluie/.hidden/y.wav", "pluie/._z.wav"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes(b"x")
    audio_dir, rows, layout = layouts.read_layout(root)
    assert audio_dir == root and layout == "class folders"
    assert [r["category"] for r in rows] == ["chien qui aboie"] * 2 + ["pluie"] * 3 + ["ça coule"] * 2
    assert "pluie/deeper/still/LOUD.WAV" in [r["filename"] for r in rows]
    assert all(r["fold"] is None and r["src_file"] == r["filename"] for r in rows)
    warning = capsys.readouterr().out.strip()
    assert warning.startswith("warning: skipped 4 file(s)") and "README.md" in warning and "cover.jpg" in warning
    cfg = audiotx.Config(data=str(root), test_fold=0, kfold=2, sample_rate=8000, clip_seconds=1.0)
    ds = audiotx.load_dataset(cfg)
    assert ds.classes == ["chien qui aboie", "pluie", "ça coule"] and ds.layout == "class folders, folds dealt"
    held = audiotx.load_clips(ds.audio_dir, ds.table, cfg)
    assert held.lengths.tolist() == [8000] * 7 and held.store.abs().max() > 0.3 * 32768


def test_a_labels_table_reads_paths_groups_and_segments_and_names_a_wrong_cell(tmp_path, capsys):
    (tmp_path / "rec").mkdir()
    long = tone(tmp_path / "rec" / "night.wav", 500, seconds=6.0)
    for i in range(4):
        tone(tmp_path / "rec" / f"c{i}.wav", 900, seed=i)
    lines = ["path,label,group,start,end", "rec/night.wav,owl,night,1.5,2.5", "rec/night.wav,owl,night,4,",
             "rec/night.wav,owl,night,,0.5"] + [f"rec/c{i}.wav,cricket,,," for i in range(4)]
    table = tmp_path / "labels.csv"
    table.write_text("\n".join(lines) + "\n")
    audio_dir, rows, layout = layouts.read_layout(table)
    assert audio_dir == tmp_path and layout == "labels table"
    owl = [r for r in rows if r["category"] == "owl"]
    assert [(r["start"], r["end"]) for r in owl] == [(None, 0.5), (1.5, 2.5), (4.0, None)]
    assert {r["src_file"] for r in owl} == {"night"} and rows[0]["src_file"] == "rec/c0.wav"
    assert [layouts.clip_name(r) for r in owl] == ["rec/night.wav@0-0.5s", "rec/night.wav@1.5-2.5s",
                                                   "rec/night.wav@4-ends"]
    cfg = audiotx.Config(sample_rate=8000, clip_seconds=1.0)
    held = audiotx.load_clips(audio_dir, rows, cfg)  # each segment is its own clip
    i = [layouts.clip_name(r) for r in rows].index("rec/night.wav@1.5-2.5s")
    wave, _ = held.read([(i, 0)])
    np.testing.assert_allclose(wave[0].numpy(), long[12000:20000] / 32768, atol=1e-6)
    assert held.lengths[i] == 8000 and held.lengths.tolist()[i + 1] == 6 * 8000 - 4 * 8000  # 4 s to the end
    as_spreadsheet_saves(table, ["bom", "crlf", "quoted", "reordered", "semicolons", "blank rows"])
    assert layouts.read_layout(table)[1] == rows  # a spreadsheet's save reads the same
    for column, value, why in [("start", "soon", "is not a time"), ("end", "1", "is not after start"),
                               ("path", "rec/gone.wav", "does not exist"), ("label", "", "empty")]:
        def edit(header, body):
            body[0][header.index(column)] = value
        table.write_text("\n".join(lines) + "\n")
        as_spreadsheet_saves(table, ["crlf"], edit)
        with pytest.raises(layouts.LayoutError, match=f"labels.csv row 2, column {column}: .*{why}"):
            layouts.read_layout(table)


def test_folds_are_dealt_by_recording_stratified_and_the_same_on_every_run(tmp_path):
    root = tmp_path / "mine"
    rows = ["filename,label,group"]
    for c in range(3):
        for g in range(7):  # 7 recordings a class, 3 clips each
            for j in range(3):
                name = f"c{c}-r{g}-{j}.wav"
                scipy.io.wavfile.write((root.mkdir(exist_ok=True), root / name)[1], 8000, np.zeros(800, np.int16))
                rows.append(f"{name},class{c},c{c}-r{g}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = audiotx.Config(data=str(root / "labels.csv"))
    ds = audiotx.load_dataset(cfg)
    folds = {}
    for fold, idx in enumerate([ds.test_idx] + [v for _, v in ds.splits], start=1):
        for i in idx:
            folds[ds.table[i]["src_file"]] = folds.get(ds.table[i]["src_file"], set()) | {fold}
    assert all(len(f) == 1 for f in folds.values())  # a recording's clips are in one fold
    per_fold = [np.bincount(ds.labels[idx].numpy(), minlength=3) for idx in [ds.test_idx] + [v for _, v in ds.splits]]
    assert all(counts.min() >= 3 for counts in per_fold)  # every class in every fold
    again = audiotx.load_dataset(cfg)
    assert np.array_equal(again.test_idx, ds.test_idx)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(again.splits, ds.splits))


def test_too_few_recordings_one_class_or_an_empty_class_folder_is_one_line(tmp_path, capsys):
    root = class_folders(tmp_path / "mine", per_class=3)
    flags = ["--data", str(root), "--out", str(tmp_path / "runs"), "--sample-rate", "8000", "--clip-seconds", "1"]
    code, _, err = cli(flags, capsys)
    assert_one_line_error(code, err, "class 'chien qui aboie' has 3 recording(s)")
    assert "--test-fold 0 --kfold 3" in err
    for name in ("pluie", "ça coule"):
        shutil.rmtree(root / name)
    assert_one_line_error(*cli(flags, capsys)[::2], "only 'chien qui aboie', 3 recordings")
    (root / "vent").mkdir()
    (root / "vent" / "notes.txt").write_text("to record")
    assert_one_line_error(*cli(flags, capsys)[::2], "the class folder 'vent' holds no audio file")


@pytest.mark.slow
def test_long_recordings_train_on_crops_and_are_scored_over_their_windows(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = tmp_path / "long"
    for c, freq in enumerate((400, 1200)):
        for j in range(5):
            tone(root / f"class{c}" / f"r{j}.wav", freq, seconds=2.5 + 0.5 * j, seed=10 * c + j)
    out = tmp_path / "runs"
    code, stdout, err = cli(["--data", str(root), "--arch", "cnn", "--sample-rate", "8000", "--clip-seconds", "1",
                             "--dim", "16", "--epochs", "3", "--test-fold", "0", "--kfold", "5", "--out", str(out)],
                            capsys)
    assert code == 0, err
    assert "10 of 10 clips had a length other than 1 s (padded, or read as windows)" in stdout
    config, metrics = check_run_files(out / "cnn-test0-k5", 5, has_test=False)
    assert metrics["val"]["n"] == 10  # a row per recording, however many windows it has


@needs_ffmpeg
def test_other_formats_decode_through_ffmpeg_as_a_wav_does(tmp_path):
    wav = tone(tmp_path / "x.wav", 440, seconds=1.5, rate=22050, channels=2)
    tone(tmp_path / "x.flac", 440, seconds=1.5, rate=22050, channels=2)
    a, rate_a = audiotx.load_audio(tmp_path / "x.wav")
    b, rate_b = audiotx.load_audio(tmp_path / "x.flac")
    assert rate_a == rate_b == 22050 and b.dtype == np.float32
    np.testing.assert_allclose(b, a, atol=1e-4)  # lossless: the same samples, mixed down alike
    np.testing.assert_allclose(a, wav.mean(1) / 32768, atol=1e-6)
    for suffix in (".mp3", ".ogg", ".m4a"):  # lossy: the tone, at its rate, about as long
        tone(tmp_path / f"x{suffix}", 440, seconds=1.5, rate=22050)
        c, rate_c = audiotx.load_audio(tmp_path / f"x{suffix}")
        assert rate_c == 22050 and abs(len(c) / 22050 - 1.5) < 0.1, suffix
        peak = np.fft.rfftfreq(len(c), 1 / 22050)[np.abs(np.fft.rfft(c)).argmax()]
        assert abs(peak - 440) < 3, suffix


def test_without_ffmpeg_a_non_wav_file_is_one_line_saying_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(decode.shutil, "which", lambda name: None)
    (tmp_path / "dog.flac").write_bytes(b"fLaC not really")
    with pytest.raises(audiotx.UserError, match="dog.flac: not a WAV file, and reading it needs ffmpeg"):
        audiotx.load_audio(tmp_path / "dog.flac")
    code, _, err = cli(["--predict", str(tmp_path / "dog.flac")], capsys)
    assert_one_line_error(code, err, "apt install ffmpeg")


@pytest.mark.parametrize("rate", [0, 1, 999])
def test_a_header_rate_that_cannot_be_sound_is_refused_in_prediction_and_training(tmp_path, capsys, rate):
    root = class_folders(tmp_path / "mine", per_class=5)
    bad = root / "pluie" / "day 1" / "take 0.wav"
    raw = bytearray(bad.read_bytes())
    raw[24:32] = rate.to_bytes(4, "little") + (2 * rate).to_bytes(4, "little")  # the rate, bytes a second
    bad.write_bytes(bytes(raw))
    code, _, err = cli(["--predict", str(bad)], capsys)
    assert_one_line_error(code, err, f"a sample rate of {rate} Hz")
    flags = ["--data", str(root), "--out", str(tmp_path / "runs"), "--sample-rate", "8000", "--clip-seconds", "1",
             "--epochs", "1", "--dim", "16"]
    assert_one_line_error(*cli(flags, capsys)[::2], str(bad))


@pytest.mark.slow
@needs_ffmpeg
def test_train_report_and_predict_on_a_folder_of_flac_mp3_and_ogg(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = class_folders(tmp_path / "mine", per_class=5, suffixes=(".flac", ".mp3", ".ogg", ".WAV", ".m4a"))
    out = tmp_path / "runs"
    code, stdout, err = cli(["--data", str(root), "--arch", "cnn", "--out", str(out), "--sample-rate", "8000",
                             "--clip-seconds", "1", "--epochs", "2", "--dim", "16"], capsys)
    assert code == 0, err
    assert "class folders, folds dealt), 15 clips, 3 classes: chien qui aboie 5, pluie 5, ça coule 5" in stdout
    assert "splits: test fold 1 3 clips; validation folds of 3, 3, 3, 3 clips" in stdout
    run = out / "cnn-test1-k4"
    config, _ = check_run_files(run, 4, has_test=True)
    assert config["classes"] == ["chien qui aboie", "pluie", "ça coule"]
    assert cli(["--report", str(out)], capsys)[0] == 0
    assert "ça coule" in (out / "REPORT.md").read_text()
    new = tmp_path / "new" / "rain.opus"
    tone(new, 600, seconds=2.7)
    code, lines, err = predict_cli([str(new), "--run", str(run), "--json"], capsys)
    answer = json.loads(lines[0])
    assert code == 0 and set(answer["probs"]) == set(config["classes"]) and len(answer["windows"]) == 5  # 0, 0.5, ..., 1.5, 1.7 s


# ---- fetching the data ----

def esc50_zip(tmp_path, top="ESC-50-master", compression=zipfile.ZIP_DEFLATED, extra=()) -> bytes:
    """A tiny dataset zipped in ESC-50's archive layout: top/audio/*.wav, top/meta/esc50.csv."""
    data = write_dataset(tmp_path / f"zipped-{top}", folds=3, clips_per_fold=1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for p in sorted(data.rglob("*")):
            if p.is_file():
                z.write(p, f"{top}/{p.relative_to(data)}")
        for name in extra:
            z.writestr(name, b"x")
    return buf.getvalue()


class Server:
    """One payload over HTTP on 127.0.0.1. cut: how many of the next responses stop halfway and
    hang up; ranges: whether Range requests are honoured (206) or ignored (200, whole body).
    requests: each request's Range header (None without one)."""

    def __init__(self, payload: bytes, cut=0, ranges=True, status=200):
        self.payload, self.cut, self.ranges, self.status, self.requests = payload, cut, ranges, status, []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                asked = self.headers.get("Range")
                owner.requests.append(asked)
                if owner.status != 200:
                    return self.send_error(owner.status)
                start = int(asked[6:].split("-")[0]) if asked and owner.ranges else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(owner.payload) - start))
                self.end_headers()
                body = owner.payload[start:]
                if owner.cut > 0:
                    owner.cut, body, self.close_connection = owner.cut - 1, body[:len(body) // 2], True
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/ESC-50-master.zip"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fetching(tmp_path, monkeypatch):
    """No dataset anywhere and an empty cache: serve(payload) puts ESC-50's archive on a local
    server and points AUDIOTX_ESC50_URL at it. Yields (serve, flags for a fast run, the cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("AUDIOTX_DATA", raising=False)
    monkeypatch.setattr(audiotx, "DEFAULT_DATA", [])
    monkeypatch.setattr(fetch.time, "sleep", lambda seconds: None)  # retries without waiting
    servers = []

    def serve(payload, **kw):
        servers.append(Server(payload, **kw))
        monkeypatch.setenv("AUDIOTX_ESC50_URL", servers[-1].url)
        return servers[-1]
    yield serve, ["--out", str(tmp_path / "runs"), "--sample-rate", "8000", "--clip-seconds", "1",
                  "--kfold", "2", "--epochs", "1", "--dim", "16"], tmp_path / "cache" / "audiotx"
    for server in servers:
        server.close()


@pytest.mark.slow
def test_a_first_run_fetches_checks_and_trains_and_a_second_fetches_nothing(fetching, tmp_path, capsys):
    serve, args, cache = fetching
    server = serve(esc50_zip(tmp_path))
    code, out, err = cli(args, capsys)
    assert code == 0, err
    assert "fetching ESC-50" in out and server.url in out and "--data" in out
    assert server.requests == [None] and (cache / "ESC-50" / "meta" / "esc50.csv").is_file()
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith("waves-")) == ["ESC-50", "fetch.lock"]
    assert (tmp_path / "runs" / "transformer-h2-test1-k2" / "metrics.json").is_file()
    code, out, err = cli(args + ["--name", "again"], capsys)
    assert code == 0 and "fetching" not in out and server.requests == [None]


def test_a_corrupt_archive_stops_every_time_and_is_never_used(fetching, tmp_path, capsys):
    serve, args, cache = fetching
    payload = bytearray(esc50_zip(tmp_path, compression=zipfile.ZIP_STORED))
    payload[len(payload) // 2] ^= 0xFF  # one byte inside a stored WAV: its CRC no longer matches
    server = serve(bytes(payload))
    for attempt in (1, 2):
        code, _, err = cli(args, capsys)
        assert_one_line_error(code, err, str(cache / "ESC-50.zip"))
        assert "CRC" in err and "deleted" in err and len(server.requests) == attempt
        assert not (cache / "ESC-50").exists() and not (cache / "ESC-50.zip").exists()
    serve(b"<html>please log in to the proxy</html>")  # a page that is not a zip
    code, _, err = cli(args, capsys)
    assert_one_line_error(code, err, "not a whole zip archive")


@pytest.mark.slow
@pytest.mark.parametrize("ranges", [True, False])
def test_a_cut_transfer_is_never_unpacked_and_a_rerun_completes_it(fetching, tmp_path, capsys, ranges):
    serve, args, cache = fetching
    server = serve(esc50_zip(tmp_path), cut=4, ranges=ranges)  # every try of the first run cut
    code, _, err = cli(args, capsys)
    assert_one_line_error(code, err, "could not fetch")
    assert "run again to resume" in err and not (cache / "ESC-50").exists()
    assert (cache / "ESC-50.zip.part").is_file() and not (cache / "ESC-50.zip").exists()
    assert len(server.requests) == 4 and all(r and r.startswith("bytes=") for r in server.requests[1:])
    server.cut = 1  # the rerun's first try is cut too, its second gets the rest
    code, out, err = cli(args, capsys)
    assert code == 0, err
    assert (cache / "ESC-50" / "audio").is_dir() and not (cache / "ESC-50.zip.part").exists()


def test_a_failed_fetch_says_how_to_give_the_data_by_hand(fetching, tmp_path, capsys):
    serve, args, _ = fetching
    serve(b"", status=404)
    code, _, err = cli(args, capsys)
    assert_one_line_error(code, err, "HTTP 404")
    assert "--data" in err
    with socket.socket() as s:  # a port nothing listens on: connection refused, as without a network
        s.bind(("127.0.0.1", 0))
        os.environ["AUDIOTX_ESC50_URL"] = f"http://127.0.0.1:{s.getsockname()[1]}/ESC-50.zip"
    code, _, err = cli(args, capsys)
    assert_one_line_error(code, err, "could not fetch")
    assert "AUDIOTX_DATA" in err


@pytest.mark.parametrize("bad", ["../x.wav", "/tmp/abs.wav"])
def test_zip_members_that_would_land_outside_are_refused(fetching, tmp_path, capsys, bad):
    _, args, cache = fetching
    archive = tmp_path / "evil.zip"
    archive.write_bytes(esc50_zip(tmp_path, extra=[bad]))
    code, _, err = cli(args + ["--data", str(archive)], capsys)
    assert_one_line_error(code, err, repr(bad))
    assert not (tmp_path / "x.wav").exists() and not Path("/tmp/abs.wav").exists()
    assert not any(p.is_dir() for p in cache.glob("evil*"))


@pytest.mark.slow
def test_data_zip_trains_and_is_unpacked_once(fetching, tmp_path, capsys):
    _, args, cache = fetching
    archive = tmp_path / "Archive.zip"
    archive.write_bytes(esc50_zip(tmp_path, top="ESC-10"))
    code, out, err = cli(args + ["--data", str(archive)], capsys)
    assert code == 0, err
    assert f"unpacking {archive}" in out and len(list(cache.glob("Archive-*/audio"))) == 1
    code, out, err = cli(args + ["--data", str(archive), "--name", "again"], capsys)
    assert code == 0 and "unpacking" not in out


# ---- prediction on a user's recordings ----

def one_clip_a_class(fold: int, seed: int) -> list:
    """The names of ten ESC-10 clips of an official fold, one of each class, in a random order, drawn with
    the seed: what a field recording of the long-recordings tests and experiments holds."""
    by_class = {}
    for r in read_rows(REAL_DATA / "meta" / "esc50.csv"):
        if r["esc10"] == "True" and int(r["fold"]) == fold:
            by_class.setdefault(r["category"], []).append(r["filename"])
    rng = np.random.default_rng(seed)
    return [by_class[c][rng.integers(len(by_class[c]))] for c in rng.permutation(sorted(by_class))]


def field_recording(path: Path, names: list, seed: int, noise_db=-50.0) -> list:
    """A 48 kHz stereo 16-bit WAV of ESC-10 clips (names, in order), each after 3-8 s of quiet noise, and
    noise after the last. -> the truth: [(start s, end s, category)]."""
    table = {r["filename"]: r["category"] for r in read_rows(REAL_DATA / "meta" / "esc50.csv")}
    rng, parts, truth, at = np.random.default_rng(seed), [], [], 0
    for name in names + [None]:
        gap = rng.normal(0, 10 ** (noise_db / 20), (round(rng.uniform(3, 8) * 48000), 2))
        parts.append(gap)
        at += len(gap)
        if name is not None:
            rate, clip = scipy.io.wavfile.read(REAL_DATA / "audio" / name)
            clip = scipy.signal.resample_poly(clip / 32768, 48000 // math.gcd(rate, 48000), rate // math.gcd(rate, 48000))
            parts.append(np.repeat(clip[:, None], 2, axis=1))
            truth.append((at / 48000, (at + len(clip)) / 48000, table[name]))
            at += len(clip)
    wave = np.clip(np.round(np.concatenate(parts) * 32768), -32768, 32767).astype(np.int16)
    scipy.io.wavfile.write(path, 48000, wave)
    return truth


def score_events(found: list, truth: list, hop: float) -> tuple:
    """(the clips that came back as an event of their class starting and ending within hop of theirs, the
    events lying mostly in the gaps between clips)."""
    hits = sum(any(e["label"] == label and abs(e["start"] - start) <= hop and abs(e["end"] - end) <= hop
                   for e in found) for start, end, label in truth)
    on_clips = lambda e: sum(max(0, min(e["end"], b) - max(e["start"], a)) for a, b, _ in truth)  # noqa: E731
    return hits, sum(on_clips(e) < (e["end"] - e["start"]) / 2 for e in found)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny finished run (fold 1 held out) and its dataset, shared by the --predict tests."""
    tmp = tmp_path_factory.mktemp("trained")
    root = write_dataset(tmp / "data", folds=3, clips_per_fold=2)
    res = run_cli(["--data", str(root), "--out", str(tmp / "runs"), "--sample-rate", "8000", "--clip-seconds", "1",
                   "--kfold", "2", "--epochs", "2", "--dim", "16"], env_extra={"XDG_CACHE_HOME": str(tmp / "cache")})
    assert res.returncode == 0, res.stderr
    return root, tmp / "runs" / "transformer-h2-test1-k2"


@pytest.mark.slow
def test_predict_reproduces_the_runs_averaged_fold_models(trained, capsys):
    root, run = trained
    rows = [r for r in read_rows(run / "predictions.csv") if r["split"] == "test"]
    classes = json.loads((run / "config.json").read_text())["classes"]
    expect = {}
    for r in rows:  # the test rows hold each fold model's probabilities: their mean is the ensemble
        expect.setdefault(r["filename"], []).append([float(r[f"p_{c}"]) for c in classes])
    files = sorted(expect)
    code, lines, err = predict_cli([str(root / "audio" / f) for f in files] + ["--run", str(run), "--json"], capsys)
    assert code == 0, err
    got = [json.loads(line) for line in lines]
    assert [Path(g["file"]).name for g in got] == files and len(got[0]["windows"]) == 1  # a clip: one window
    for g, f in zip(got, files):
        mean = np.mean(expect[f], axis=0)
        assert [g["probs"][c] for c in classes] == pytest.approx(mean, abs=1e-3)
        assert g["pred"] == classes[int(mean.argmax())] and sum(g["probs"].values()) == pytest.approx(1, abs=1e-4)
    code, lines, _ = predict_cli([str(root / "audio" / files[0]), "--run", str(run)], capsys)  # the text form
    top = lines[0].split()
    assert code == 0 and len(lines) == 1 and top[0].endswith(files[0]) and len(top) == 7
    assert top[1] == got[0]["pred"] and float(top[2]) >= float(top[4]) >= float(top[6])


@pytest.mark.slow
def test_predict_cuts_a_long_stereo_48k_file_into_windows_that_tile_it(trained, tmp_path, capsys):
    _, run = trained  # clips of 1 s: a 3.3 s file gives windows at 0, 0.5, ..., 2.0 and 2.3 s
    t = np.arange(int(3.3 * 48000)) / 48000
    stereo = np.stack([np.sin(2 * np.pi * 600 * t), np.sin(2 * np.pi * 900 * t)], axis=1) * 0.3
    scipy.io.wavfile.write(tmp_path / "long.wav", 48000, (stereo * 32767).astype(np.int16))
    scipy.io.wavfile.write(tmp_path / "short.wav", 22050, (stereo[:9600, 0] * 32767).astype(np.int16))
    code, lines, err = predict_cli([str(tmp_path / "long.wav"), str(tmp_path / "short.wav"), "--run", str(run),
                                    "--json"], capsys)
    assert code == 0, err
    long, short = map(json.loads, lines)
    spans = [(w["start"], w["end"]) for w in long["windows"]]
    assert spans[0][0] == 0 and spans[-1][1] == pytest.approx(3.3, abs=1e-3) and len(spans) == 6
    assert all(e - s == pytest.approx(1.0, abs=1e-3) for s, e in spans)
    assert all(b[0] <= a[1] for a, b in zip(spans, spans[1:]))  # no gap between windows
    mean = np.mean([[w["probs"][c] for c in long["probs"]] for w in long["windows"]], axis=0)
    assert list(long["probs"].values()) == pytest.approx(mean, abs=1e-5)  # the file's answer is their mean
    assert [(w["start"], w["end"]) for w in short["windows"]] == [(0.0, 0.435)]  # shorter than a window: padded


@pytest.mark.slow
def test_predict_walks_a_folder_and_names_a_bad_file_among_good_ones(trained, tmp_path, capsys):
    root, run = trained
    (tmp_path / "in" / "sub").mkdir(parents=True)
    good = sorted((root / "audio").glob("*.wav"))[:2]
    (tmp_path / "in" / "a.wav").write_bytes(good[0].read_bytes())
    (tmp_path / "in" / "bad.wav").write_text("this is a text file")
    (tmp_path / "in" / "cut.wav").write_bytes(good[0].read_bytes()[:5000])  # the header says more
    (tmp_path / "in" / "sub" / "c.WAV").write_bytes(good[1].read_bytes())
    code, lines, err = predict_cli([str(tmp_path / "in"), "--run", str(run)], capsys)
    assert code == 2 and [Path(line.split()[0]).name for line in lines] == ["a.wav", "c.WAV"]
    assert err.count("\n") == 3 and "bad.wav" in err and "Traceback" not in err
    assert f"{tmp_path / 'in' / 'cut.wav'}: truncated" in err
    assert err.splitlines()[-1] == "audiotx: 2 of 4 files could not be read (named above)"
    (tmp_path / "empty").mkdir()
    code, lines, err = predict_cli([str(tmp_path / "empty"), "--run", str(run)], capsys)
    assert_one_line_error(code, err, f"no audio file in {tmp_path / 'empty'}")


@pytest.mark.slow
def test_predict_refuses_a_run_without_models_or_with_damaged_ones(trained, tmp_path, capsys):
    root, run = trained
    clip = str(next((root / "audio").glob("*.wav")))
    assert_one_line_error(*predict_cli([clip, "--run", str(tmp_path)], capsys)[::2], str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("wandb"))
    (broken / "fold2" / "model.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(*predict_cli([clip, "--run", str(broken)], capsys)[::2], "model.pt")


@pytest.mark.slow
def test_predict_py_and_report_py_run_as_commands_of_their_own(trained, tmp_path, capsys):
    root, run = trained
    clip = str(sorted((root / "audio").glob("1-*.wav"))[0])
    code, lines, _ = predict_cli([clip, "--run", str(run), "--json"], capsys)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    alone = subprocess.run([sys.executable, str(HERE / "predict.py"), clip, "--run", str(run), "--json"],
                           capture_output=True, text=True, env=env)
    assert code == 0 and alone.returncode == 0 and alone.stdout.splitlines() == lines, alone.stderr
    runs = tmp_path / "runs"
    shutil.copytree(run, runs / run.name)
    made = subprocess.run([sys.executable, str(HERE / "report.py"), str(runs)], capture_output=True, text=True,
                          env={**env, "XDG_CACHE_HOME": str(tmp_path / "cache"), "AUDIOTX_DATA": str(root)})
    assert made.returncode == 0, made.stderr
    assert "## Every configuration" in (runs / "REPORT.md").read_text()


@pytest.mark.slow
def test_init_starts_from_a_runs_front_end_and_encoder_and_freeze_keeps_them(trained, tmp_path, monkeypatch, capsys):
    """The own-sounds table is new to the model: 3 other classes; the trained run's fold 1 is the source."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    _, source = trained
    root = class_folders(tmp_path / "mine", per_class=5, classes=("a", "b", "c", "d"))
    flags = ["--data", str(root), "--sample-rate", "8000", "--clip-seconds", "1", "--dim", "16", "--epochs", "2",
             "--init", str(source), "--out", str(tmp_path / "runs")]
    before = torch.load(source / "fold1" / "model.pt")
    for freeze in (False, True):
        code, out, err = cli(flags + (["--freeze"] if freeze else []) + ["--name", f"freeze{freeze}"], capsys)
        assert code == 0, err
        assert f"--init {source}: the front end and encoder of its fold-1 transformer" in out
        run = tmp_path / "runs" / f"freeze{freeze}"
        after = torch.load(run / "fold2" / "model.pt")
        assert after["head.net.3.weight"].shape == (4, 16)  # a new head for 4 classes
        encoder = [k for k in before if not k.startswith("head.")]
        same = [torch.equal(before[k].float(), after[k].float()) for k in encoder]
        assert all(same) if freeze else not all(same)  # frozen: the front end and encoder as loaded
        params = json.loads((run / "config.json").read_text())["params"]
        frozen = sum(v.numel() for k, v in before.items() if not k.startswith("head.") and "running" not in k
                     and "num_batches" not in k)
        assert params["non_trainable"] == (frozen if freeze else 0)
    code, _, err = cli(flags + ["--sample-rate", "16000", "--name", "other"], capsys)
    assert_one_line_error(code, err, "its model was trained with --sample-rate 8000")


def test_init_from_a_deeper_transformer_takes_the_blocks_that_fit(tmp_path):
    """A source with 3 blocks into a model with 2: the front end and the first 2 blocks carried,
    the third left out, the head new; no fold folder needs training for it."""
    torch.manual_seed(0)
    source_cfg = audiotx.Config(dim=16, depth=3, sample_rate=8000, clip_seconds=1.0)
    source = audiotx.build_model(source_cfg, 5)
    (tmp_path / "src" / "fold1").mkdir(parents=True)
    torch.save(source.state_dict(), tmp_path / "src" / "fold1" / "model.pt")
    (tmp_path / "src" / "config.json").write_text(json.dumps({**dataclasses.asdict(source_cfg),
                                                             "classes": list("abcde")}))
    cfg = dataclasses.replace(source_cfg, depth=2, init=str(tmp_path / "src"), freeze=True)
    model = audiotx.build_model(cfg, 3)
    audiotx.init_from(model, cfg)
    mine, theirs = model.state_dict(), source.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if k.startswith(("front.", "blocks.", "cls", "pos")))
    assert mine["head.net.3.weight"].shape == (3, 16) and not any(k.startswith("blocks.2") for k in mine)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in mine if n.startswith("head.")}


def test_class_weights_and_per_class_limits():
    cfg = audiotx.Config()
    assert audiotx.class_weights(np.array([0] * 10 + [1] * 6), 2, cfg) is None  # within 2:1
    labels = np.array([0] * 40 + [1] * 4 + [2] * 20)
    w = audiotx.class_weights(labels, 3, cfg)
    assert float(w[labels].mean()) == pytest.approx(1.0)  # the loss keeps its scale
    assert float(w[1] / w[0]) == pytest.approx(math.sqrt(10)) and float(w[2] / w[0]) == pytest.approx(math.sqrt(2))
    assert audiotx.class_weights(labels, 3, dataclasses.replace(cfg, balance=False)) is None
    idx = np.arange(64)
    kept = audiotx.limit_per_class(idx, labels, 5, seed=3)
    assert np.bincount(labels[kept]).tolist() == [5, 4, 5] and set(kept) <= set(idx)
    assert np.array_equal(kept, audiotx.limit_per_class(idx, labels, 5, seed=3))
    assert np.array_equal(audiotx.limit_per_class(idx, labels, 0, seed=3), idx)


def test_an_uneven_dataset_says_its_loss_is_weighted(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = class_folders(tmp_path / "mine", per_class=5, classes=("few", "many"))
    for j in range(5, 12):
        tone(root / "many" / f"more {j}.wav", 600, seed=j)
    flags = ["--data", str(root), "--sample-rate", "8000", "--clip-seconds", "1", "--dim", "16", "--epochs", "1",
             "--out", str(tmp_path / "runs")]
    code, out, err = cli(flags, capsys)
    assert code == 0 and "uneven classes, 12 clips against 5: the loss is weighted by class" in out, err


@pytest.mark.slow
@needs_real_data
def test_the_shipped_model_classifies_official_fold_1(capsys):
    """The model in the repository was never trained on fold 1: it must still classify it well."""
    clips = sorted((REAL_DATA / "audio").glob("1-*.wav"))
    code, lines, err = predict_cli([str(c) for c in clips] + ["--json"], capsys)
    assert code == 0, err
    table = {r["filename"]: r["category"] for r in read_rows(REAL_DATA / "meta" / "esc50.csv")}
    answers = [json.loads(line) for line in lines]
    right = sum(a["pred"] == table[Path(a["file"]).name] for a in answers)
    assert len(answers) == 80 and right / 80 >= 0.8


# ---- long recordings: streaming, events, tables, timelines ----

@pytest.mark.parametrize("rate,target", [(48000, 16000), (44100, 16000), (22050, 16000), (8000, 16000), (1000, 16000),
                                         (16000, 16000)])
def test_resampling_block_by_block_gives_what_resample_poly_gives_on_the_whole(rate, target):
    rng = np.random.default_rng(rate)
    wave = rng.standard_normal(rate * 7 + 123).astype(np.float32)
    g = math.gcd(rate, target)
    whole = scipy.signal.resample_poly(wave, target // g, rate // g).astype(np.float32)
    resampler, parts, at = decode.Resampler(rate, target), [], 0
    while at < len(wave):  # blocks of random sizes, a few samples to seconds
        size = int(rng.integers(1, 3 * rate))
        parts.append(resampler.push(wave[at:at + size], final=at + size >= len(wave)))
        at += size
    assert np.array_equal(np.concatenate(parts), whole)


def test_windows_of_a_stream_are_the_windows_of_the_whole():
    rng = np.random.default_rng(0)
    for length in [1, 799, 800, 801, 1200, 3333, 10000]:
        x = rng.integers(-9, 9, length).astype(np.int16)
        for n, hop in [(800, 400), (800, 800), (800, 123)]:
            cuts = np.sort(rng.integers(0, length, 5))
            got = list(clips.stream_windows(iter(np.split(x, cuts)), n, hop))
            assert [s for s, _ in got] == clips.window_starts(length, n, hop)
            assert all(np.array_equal(w, x[s:s + n]) for s, w in got)


def test_a_wav_is_read_a_block_at_a_time_as_scipy_reads_it_whole(tmp_path):
    data = (np.random.default_rng(1).standard_normal((48000 * 3 + 17, 2)) * 3000).astype(np.int16)
    scipy.io.wavfile.write(tmp_path / "a.wav", 48000, data)
    blocks = list(decode.blocks(tmp_path / "a.wav", block_seconds=0.5))
    assert len(blocks) == 7 and {r for r, _ in blocks} == {48000}
    assert all(len(b) == 24000 for _, b in blocks[:-1]) and np.array_equal(np.concatenate([b for _, b in blocks]), data)


@needs_ffmpeg
def test_a_24_bit_wav_and_a_flac_stream_through_ffmpeg_with_the_samples_scipy_reads(tmp_path):
    tone(tmp_path / "a.wav", 440, seconds=2.5, rate=22050, channels=2)
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(tmp_path / "a.wav"), "-c:a", "pcm_s24le", str(tmp_path / "b.wav")],
                   check=True)
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(tmp_path / "a.wav"), str(tmp_path / "c.flac")], check=True)
    expect = audiotx.load_audio(tmp_path / "a.wav")[0]
    for name in ("b.wav", "c.flac"):  # scipy cannot map 24-bit samples: ffmpeg streams them
        blocks = list(decode.blocks(tmp_path / name, block_seconds=1))
        assert len(blocks) == 3 and blocks[0][0] == 22050
        got = np.concatenate([audiotx.to_mono_float(name, b) for _, b in blocks])
        assert np.abs(got - expect).max() < 1e-4


def test_thresholds_reach_the_precision_target_with_the_most_predictions():
    probs = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.4])
    right = np.array([1, 1, 0, 1, 1, 1, 0], bool)
    # precision of the top 1..7: 1, 1, .67, .75, .8, .83, .71: the lowest threshold reaching 0.8 is 0.5
    assert events.precision_threshold(probs, right, 0.8) == 0.5
    assert events.precision_threshold(probs, right, 0.9) == 0.8 and events.precision_threshold(probs, right, 0.7) == 0.4
    assert events.precision_threshold(probs[2:3], right[2:3], 0.5) == math.inf  # never right: never an event
    ties = np.array([0.9, 0.6, 0.6]), np.array([1, 1, 0], bool)  # a threshold keeps both ties or neither
    assert events.precision_threshold(*ties, 0.7) == 0.9
    labels = np.array([0, 0, 1, 1, 1])
    p = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    # class 0 is predicted for rows 0 (right) and 3 (wrong); class 1 for rows 1 (wrong), 2, 4 (right)
    assert events.class_thresholds(labels, p, 0.9).tolist() == [0.9, 0.8]


def events_of(starts, ends, probs, threshold, rate, audible=None):
    """find_events on the detections of windows whose every frame is audible (unless audible says)."""
    audible = np.ones(-(-max(ends) // events.frame_length(rate)), bool) if audible is None else audible
    hit = events.detections(starts, ends, probs, np.full(probs.shape[1], threshold), audible, rate)
    return events.find_events(starts, ends, probs, hit, ["a", "b"], rate, audible)


def test_windows_merge_into_events_at_whole_milliseconds():
    rate, n, hop = 1000, 4000, 2000  # windows of 4 s every 2 s
    starts = [k * hop for k in range(8)]
    ends = [s + n for s in starts]
    top = [None, "a", "a", "a", None, "b", None, "a"]
    sure = [0.0, 0.6, 0.95, 0.9, 0.0, 0.7, 0.0, 0.8]
    probs = np.array([[0.5, 0.5] if c is None else [q, 1 - q] if c == "a" else [1 - q, q] for c, q in zip(top, sure)])
    found = events_of(starts, ends, probs, 0.55, rate)
    # windows 1-3 say a; window 1 is less sure than window 2 (0.6 < 0.9 * 0.95), so it is left out; the run of
    # windows 2-3 gives half its overlaps with windows 1 and 4 away; lone windows 5 and 7 are events as they are
    assert found == [{"start": 5.0, "end": 9.0, "label": "a", "max": 0.95, "mean": 0.925},
                     {"start": 10.0, "end": 14.0, "label": "b", "max": 0.7, "mean": 0.7},
                     {"start": 14.0, "end": 18.0, "label": "a", "max": 0.8, "mean": 0.8}]
    probs[4], probs[5] = [0.8, 0.2], [0.4, 0.6]  # b, less sure than the a window that overlaps it, gives way
    assert [e["label"] for e in events_of(starts, ends, probs, 0.55, rate)] == ["a", "a"]
    assert events_of([0], [6067], np.array([[0.9, 0.1]]), 0.5, 10)[0]["end"] == 606.7  # not 606.7000000000001
    assert events_of(starts, ends, probs, 0.99, rate) == []


def test_quiet_windows_and_windows_holding_only_a_sounds_edge_are_no_events():
    rate, n, hop = 1000, 4000, 2000  # windows of 4 s every 2 s: 40 frames of 100 ms each
    starts = list(range(0, 10000, hop))  # 0, 2, 4, 6, 8 s
    ends = [s + n for s in starts]
    probs = np.tile([0.9, 0.1], (5, 1))  # every window says a, surely
    audible = np.zeros(120, bool)
    assert events_of(starts, ends, probs, 0.5, rate, audible) == []  # quiet throughout: nothing
    audible[51:53] = True  # a sound at 5.1-5.3 s: in windows 4-8 s (middle) and 2-6 s (its last 0.9 s)
    assert [(e["start"], e["end"]) for e in events_of(starts, ends, probs, 0.5, rate, audible)] == [(5.1, 8.0)]
    # 2-6 s holds it in its last 30% (1.2 s), so leaves it to 4-8 s; 4-8 s starts at the sound's onset
    audible[51:53], audible[37:39] = False, True  # at 3.7-3.9 s: the end of 0-4 s, the middle of 2-6 s
    assert [(e["start"], e["end"]) for e in events_of(starts, ends, probs, 0.5, rate, audible)] == [(3.7, 6.0)]
    audible[37:39], audible[1:3] = False, True  # at the first window's start, with no window before it
    assert [(e["start"], e["end"]) for e in events_of(starts, ends, probs, 0.5, rate, audible)] == [(0.1, 4.0)]


def test_levels_of_a_stream_are_those_of_the_whole_recording():
    rng = np.random.default_rng(0)
    wave = (rng.normal(0, 3000, 16000 * 3 + 700)).astype(np.int16)
    wave[16000:32000] = 0  # a second of digital silence
    levels = events.Levels(16000)
    at = 0
    for size in rng.integers(1, 9000, 100):
        levels.push(wave[at:at + size])
        at += size
    x = wave / 32768.0
    expect = [10 * math.log10(np.mean(x[i:i + 1600] ** 2) + 1e-10) for i in range(0, len(x), 1600)]
    assert at >= len(wave) and levels.db() == pytest.approx(expect, abs=1e-9)  # 31 frames, the last 700 samples
    assert len(expect) == 31 and levels.db()[10:20].max() == -100 and abs(levels.db()[0] - 20 * math.log10(3000 / 32768)) < 0.3


def test_time_axes_tick_in_round_seconds_minutes_or_hours():
    assert plot.time_ticks(110.0)[1:] == ("s", 1) and round_step(plot.time_ticks(110.0)[0])
    ticks, unit, scale = plot.time_ticks(3600.0)
    assert unit == "min" and ticks[-1] == 3600 and round_step([t / 60 for t in ticks])
    ticks, unit, _ = plot.time_ticks(10 * 3600.0)
    assert unit == "h" and ticks[-1] <= 36000 and all(t % 3600 == 0 for t in ticks)


def test_the_timeline_holds_hours_in_bounded_columns():
    mel = plot.MelColumns(8000, most=64)
    for _ in range(40):  # 40 blocks of 2 s
        mel.push(np.random.default_rng(0).standard_normal(16000).astype(np.float32))
    assert 32 <= len(mel.columns) < 64 and mel.per == 32  # 1250 frames, merged in pairs past 64 columns
    image = mel.image(20)
    assert image.shape[0] == 48 and image.shape[1] <= 20 and image.min() == 0 and image.max() == 1


@pytest.mark.slow
def test_a_streamed_recording_gives_the_windows_and_probabilities_of_the_whole_file(trained, tmp_path, capsys):
    _, run = trained  # 1 s windows at 8 kHz: a 7.3 s 48 kHz stereo file, read in blocks, every 0.3 s
    t = np.arange(int(7.3 * 48000)) / 48000
    stereo = np.stack([np.sin(2 * np.pi * 600 * t), np.sin(2 * np.pi * 300 * t)], axis=1) * 0.3
    scipy.io.wavfile.write(tmp_path / "long.wav", 48000, (stereo * 32767).astype(np.int16))
    code, lines, err = predict_cli([str(tmp_path / "long.wav"), "--run", str(run), "--json", "--hop", "0.3"], capsys)
    assert code == 0, err
    rec = json.loads(lines[0])
    cfg, _, models = audiotx.load_fold_models(run)
    wave, rate = audiotx.load_audio(tmp_path / "long.wav")  # the whole file, as training reads it
    held = clips.Clips(torch.from_numpy(clips.to_int16(audiotx.to_rate(wave, rate, 8000))), torch.tensor([58400]), 8000)
    rows, _ = held.windows(torch.tensor([0]), 2400)
    precision = audiotx.resolve_precision(dataclasses.replace(cfg, precision="auto")).precision  # as --predict's
    expect = sum(audiotx.predict_windows(m, held, rows, precision) for m in models) / len(models)
    assert [w["start"] for w in rec["windows"]] == [round(s / 8000, 3) for _, s in rows]
    assert rec["windows"][-1]["end"] == 7.3 and rec["settings"]["hop_seconds"] == 0.3
    got = [[w["probs"][c] for c in rec["probs"]] for w in rec["windows"]]
    assert np.abs(np.array(got) - expect.numpy()).max() < 1e-5


@pytest.mark.slow
def test_tables_per_recording_and_combined_and_a_rerun_skips_what_is_done(trained, tmp_path, capsys, monkeypatch):
    _, run = trained
    tone(tmp_path / "in" / "one.wav", 300, seconds=3.5, rate=16000, channels=2)
    tone(tmp_path / "in" / "sub" / "two.wav", 900, seconds=2.25, rate=8000)
    flags = [str(tmp_path / "in"), "--run", str(run), "--min-conf", "0", "--out", str(tmp_path / "out")]
    code, _, err = predict_cli(flags + ["--format", "raven", "--plot"], capsys)
    assert code == 0, err
    recs = [json.loads((tmp_path / "out" / f"{n}.json").read_text()) for n in ("one", "sub/two")]
    table = [line.split("\t") for line in (tmp_path / "out" / "combined.selections.txt").read_text().splitlines()]
    assert table[0] == events.RAVEN_COLUMNS and len(table) == 1 + sum(len(r["events"]) for r in recs)
    for row, e in zip(table[1:], recs[0]["events"] + recs[1]["events"]):
        offset = 0 if row[9] == "one.wav" else 3.5  # the second recording's times run on from the first's end
        assert row[1:3] == ["Spectrogram 1", "1"] and float(row[3]) == pytest.approx(e["start"] + offset)
        assert float(row[10]) == e["start"] and row[7] == e["label"] and int(row[6]) == 4000  # half of 8 kHz
    assert (tmp_path / "out" / "sub" / "two.selections.txt").is_file()
    svg = (tmp_path / "out" / "one.svg").read_text()
    ET.fromstring(svg)  # well-formed
    assert all(c in svg for c in recs[0]["probs"]) and ">3 s<" in svg
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}
    monkeypatch.setattr(predict, "classify", lambda *a: pytest.fail("a finished recording was read again"))
    code, _, err = predict_cli(flags + ["--format", "raven", "--plot"], capsys)
    assert code == 0 and {p: p.stat().st_mtime_ns for p in kept if p.name != "combined.selections.txt"} == \
        {p: t for p, t in kept.items() if p.name != "combined.selections.txt"}
    assert (tmp_path / "out" / "combined.selections.txt").read_text().splitlines() == ["\t".join(r) for r in table]
    monkeypatch.undo()
    code, lines, err = predict_cli(flags[:-2] + ["--format", "audacity", "--shard", "2/2"], capsys)
    assert code == 0 and lines[0] == f"0.000\t0.000\taudiotx: {audiotx.shown_path(run)}, hop 0.5 s, min-conf 0, " \
        "min-db -50"
    assert lines[1:] == [f"{e['start']:.3f}\t{e['end']:.3f}\t{e['label']} {e['max']:.2f}" for e in recs[1]["events"]]
    code, lines, err = predict_cli(flags[:-2] + ["--format", "csv"], capsys)
    rows = list(csv.DictReader(lines))
    assert len(rows) == len(recs[0]["windows"]) + len(recs[1]["windows"])
    assert list(rows[0])[:4] == ["file", "start", "end", "detected at min-conf 0, min-db -50"] and len(rows[0]) == 4 + 3


def test_blocks_read_ahead_arrive_in_order_raise_where_used_and_stop_with_their_reader():
    assert list(predict.read_ahead(iter(range(100)))) == list(range(100))

    def broken():
        yield 1
        raise ValueError("a bad block")
    got = predict.read_ahead(broken())
    assert next(got) == 1
    with pytest.raises(ValueError, match="a bad block"):
        next(got)
    threads = threading.active_count()
    endless = predict.read_ahead(iter(range(10 ** 9)))
    assert next(endless) == 0 and threading.active_count() == threads + 1
    endless.close()  # the reader stops early: the thread making them stops too
    deadline = time.time() + 5
    while threading.active_count() > threads and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == threads


def test_the_progress_line_counts_files_hours_of_audio_speed_and_time_left(tmp_path, monkeypatch, capsys):
    found = [(tmp_path / f"{k}.wav", str(k)) for k in range(4)]
    for path, _ in found:
        path.write_bytes(bytes(1000))
    clock = iter([0.0, 60.0, 90.0])
    monkeypatch.setattr(predict.time, "time", lambda: next(clock))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    progress = predict.Progress(found)
    progress.update(1800.0)  # half an hour of audio in the first minute, a quarter of the bytes read
    progress.update(1800.0)
    err = capsys.readouterr().err
    assert err.split("\r")[1:] == ["files 1/4, 0.50 h of audio, 0.5 audio-h/min, 3:00 left",
                                    "files 2/4, 1.00 h of audio, 0.7 audio-h/min, 1:30 left"]


def test_predict_flags_that_cannot_work_are_one_line(tmp_path, capsys):
    for flags, culprit in [(["--format", "text", "--out", "x"], "--out writes files"), (["--plot"], "--plot"),
                           (["--shard", "3/2"], "--shard 3/2"), (["--min-conf", "1.5"], "--min-conf"),
                           (["--hop", "-1"], "--hop")]:
        assert_one_line_error(*predict_cli([str(tmp_path)] + flags, capsys)[::2], culprit)


@pytest.mark.slow
def test_min_conf_auto_takes_thresholds_from_the_runs_validation_alone(trained, tmp_path, capsys):
    root, run = trained
    clip = str(sorted((root / "audio").glob("1-*.wav"))[0])
    code, lines, err = predict_cli([clip, "--run", str(run), "--json", "--min-conf", "auto"], capsys)
    assert code == 0, err
    rows = read_rows(run / "predictions.csv")
    classes = json.loads((run / "config.json").read_text())["classes"]
    for k, c in enumerate(classes):  # by brute force: the lowest validation probability that keeps 90% right
        preds = [(float(r[f"p_{c}"]), int(r["label"]) == k) for r in rows if r["split"] == "val"
                 and max(classes, key=lambda d: float(r[f"p_{d}"])) == c]
        ok = [t for t, _ in preds if np.mean([right for q, right in preds if q >= t]) >= 0.9]
        assert json.loads(lines[0])["settings"]["thresholds"][c] == pytest.approx(min(ok) if ok else math.inf, abs=1e-4)
    shutil.copytree(run, tmp_path / "bare")
    (tmp_path / "bare" / "predictions.csv").unlink()
    assert_one_line_error(*predict_cli([clip, "--run", str(tmp_path / "bare"), "--min-conf", "auto"], capsys)[::2],
                          "predictions.csv")


def test_an_audacity_label_track_corrected_by_hand_is_training_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    (tmp_path / "field").mkdir()
    for k in range(10):  # ten recordings, each 2 s of a 300 Hz tone and then 2 s of a 900 Hz one
        a, b = tone(tmp_path / "x.wav", 300, seconds=2, seed=k), tone(tmp_path / "x.wav", 900, seconds=2, seed=k + 50)
        scipy.io.wavfile.write(tmp_path / "field" / f"rec {k}.wav", 8000, np.concatenate([a, b]))
        found = [{"start": 0.0, "end": 2.5, "label": "low", "max": 0.71, "mean": 0.7},
                 {"start": 1.5, "end": 4.0, "label": "low", "max": 0.52, "mean": 0.5}]  # as --predict wrote it
        lines = events.audacity_lines(found, "audiotx: the shipped model, hop 2.5 s, min-conf 0.5")
        lines[2] = "2.000\t4.000\thigh"  # corrected by hand in Audacity
        (tmp_path / "field" / f"rec {k}.txt").write_text("\n".join(lines + ["\\\t100.0\t2000.0"]) + "\n")
    (tmp_path / "x.wav").unlink()
    audio_dir, rows, layout = layouts.read_layout(tmp_path / "field")
    assert layout == "label tracks" and len(rows) == 20 and audio_dir == tmp_path / "field"
    assert rows[:2] == [{"filename": "rec 0.wav", "fold": None, "category": "low", "src_file": "rec 0.wav",
                         "start": 0.0, "end": 2.5},
                        {"filename": "rec 0.wav", "fold": None, "category": "high", "src_file": "rec 0.wav",
                         "start": 2.0, "end": 4.0}]
    flags = ["--data", str(tmp_path / "field"), "--sample-rate", "8000", "--clip-seconds", "1", "--dim", "16",
             "--epochs", "1", "--out", str(tmp_path / "runs"), "--kfold", "2"]
    code, out, err = cli(flags, capsys)
    assert code == 0 and "high" in out and "low" in out, err


@pytest.mark.slow
@needs_real_data
def test_the_shipped_model_finds_fold_1_clips_in_field_recordings_as_events(tmp_path, capsys):
    """Three 48 kHz stereo recordings of ten fold-1 clips each (one of every class, drawn with fixed seeds; the
    shipped model never trained on fold 1), 3-8 s of quiet noise between them, with the defaults: how many clips
    come back as an event of their class within a hop of their start and end, and how many events fall in the
    gaps. The issue's target is 70% with at most one gap event a recording; this holds the measured level (NOTES),
    23 of 30 with none, so that a change can only move it up."""
    hits, most_gaps = 0, 0
    for seed in range(3):
        truth = field_recording(tmp_path / f"field {seed}.wav", one_clip_a_class(1, seed), seed)
        code, lines, err = predict_cli([str(tmp_path / f"field {seed}.wav"), "--json"], capsys)
        assert code == 0, err
        rec = json.loads(lines[0])
        found, gaps = score_events(rec["events"], truth, rec["settings"]["hop_seconds"])
        hits, most_gaps = hits + found, max(most_gaps, gaps)
    assert hits >= 23 and most_gaps == 0, (hits, most_gaps)


# ---- the page and its API (serve.py) ----

@pytest.fixture
def served(trained, tmp_path, monkeypatch):
    """serve.py on a free loopback port, listing the shipped model and the tiny trained run, uploads
    capped at 1 MB, its temporary files in a folder of the test's own: (address, that folder)."""
    shutil.copytree(trained[1], tmp_path / "runs" / "tiny", ignore=shutil.ignore_patterns("wandb"))
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(uploads))
    server = serve.make_server("127.0.0.1", 0, tmp_path / "runs", 1)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", uploads
    server.shutdown()
    server.server_close()


def api(url: str, body: bytes = None, headers=None) -> tuple:
    """(status, the JSON answer) of a GET, or of a POST with body."""
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_the_api_answers_what_predict_json_prints_and_refuses_what_it_cannot_use(served, trained, capsys):
    url, uploads = served
    with urllib.request.urlopen(url + "/") as r:  # the page asks nothing of any other server
        page = r.read().decode()
    assert "<title>audiotx</title>" in page
    assert not any(w in page for w in ("http://", "https://", "src=\"//", "href=\"//", "@import"))
    status, models = api(url + "/api/models")
    assert status == 200 and [m["id"] for m in models] == ["shipped", "tiny"] and models[1]["arch"] == "transformer"
    clip = sorted((trained[0] / "audio").glob("1-*.wav"))[0]
    status, rec = api(url + "/api/predict?model=tiny&name=clip.wav", clip.read_bytes())
    code, lines, _ = predict_cli([str(clip), "--run", str(trained[1]), "--json"], capsys)
    expect = json.loads(lines[0])
    assert status == 200 and rec["file"] == "clip.wav" and rec["probs"] == expect["probs"]
    assert rec["windows"] == expect["windows"] and rec["events"] == expect["events"]
    status, rec = api(url + "/api/predict?model=tiny&name=clip.wav&views=1", clip.read_bytes())
    ET.fromstring(rec["views"]["attention"])  # the transformer's <cls> attention over the spectrogram
    assert "attention" in rec["views"]["attention"]
    for query, body, want, says in [
            ("model=tiny&name=notes.txt", b"hello", 400, "notes.txt: not an audio file name"),
            ("model=tiny&name=broken.wav", b"RIFF" + bytes(100), 400, "broken.wav: not a readable audio file"),
            ("model=../runs/tiny&name=clip.wav", clip.read_bytes(), 404, "no model '../runs/tiny'"),
            ("model=tiny&name=big.wav", bytes(5 * 2 ** 19 + 3), 413, "over --max-mb (1 MB)")]:
        status, out = api(f"{url}/api/predict?{query}", body)
        assert status == want and says in out["error"] and len(out["error"].splitlines()) == 1, out
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:  # not even HTTP
        s.sendall(b"\x00\xff garbage\r\n\r\n")
        s.recv(1000)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(api(url + "/api/predict?model=tiny&name=c.wav",
                                                                   clip.read_bytes())[0])) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [200] * 8 and list(uploads.iterdir()) == []  # all answered; no upload kept


@pytest.mark.slow
def test_serve_py_prints_its_address_serves_and_warns_off_loopback(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    for host, warned in [("127.0.0.1", False), ("0.0.0.0", True)]:
        proc = subprocess.Popen([sys.executable, str(HERE / "serve.py"), "--host", host, "--port", "0", "--runs",
                                 str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            line = proc.stdout.readline()
            assert line.startswith(f"audiotx: serving http://{host}:"), line
            port = int(line.split(":")[-1].split("/")[0])
            status, models = api(f"http://127.0.0.1:{port}/api/models")
            assert status == 200 and [m["id"] for m in models] == ["shipped"]
        finally:
            proc.terminate()
            err = proc.communicate(timeout=30)[1]
        assert ("warning: listening on 0.0.0.0" in err) == warned, err


def webdriver(base: str, method: str, path: str, body=None):
    """One W3C WebDriver command to chromedriver: its value."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())["value"]


def shown_answers(base: str, count: int, deadline: float) -> list:
    """The top classes the page shows once count answers are in (newest first)."""
    while time.time() < deadline:
        found = webdriver(base, "POST", "/elements", {"using": "css selector", "value": ".result[data-done]"})
        if len(found) >= count:
            script = "return [...document.querySelectorAll('.result')].map(d => " \
                     "(d.querySelector('.top') || d.querySelector('.error')).textContent)"
            return webdriver(base, "POST", "/execute/sync", {"script": script, "args": []})
        time.sleep(0.5)
    pytest.fail(f"the page showed fewer than {count} answers")


needs_browser = pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")) and not os.environ.get("CI"),
    reason="Chromium and chromedriver are not installed (.ci/run installs them; under CI these tests must run)")


@pytest.mark.slow
@needs_real_data
@needs_browser
def test_the_page_in_chromium_classifies_an_upload_and_a_recording(served, tmp_path):
    """A fold-1 chainsaw (the shipped model never trained on fold 1) chosen in the file picker, then
    the same sound recorded through Chromium's fake microphone for about 6 s."""
    url, _ = served
    clip = REAL_DATA / "audio" / "1-64398-A-41.wav"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    driver = subprocess.Popen([shutil.which("chromedriver"), f"--port={port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if webdriver(base, "GET", "/status")["ready"]:
                    break
            except OSError:
                time.sleep(0.1)
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-quic",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,840",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={clip}", "--autoplay-policy=no-user-gesture-required"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": shutil.which("chromium"), "args": args}}}}
        browser = webdriver(base, "POST", "/session", caps)["sessionId"]  # W3C WebDriver's word
        base += f"/session/{browser}"
        webdriver(base, "POST", "/url", {"url": url})
        picker = webdriver(base, "POST", "/element", {"using": "css selector", "value": "#file"})
        picker = next(iter(picker.values()))
        webdriver(base, "POST", f"/element/{picker}/value", {"text": str(clip)})
        assert shown_answers(base, 1, time.time() + 120) == ["chainsaw"]
        button = next(iter(webdriver(base, "POST", "/element", {"using": "css selector", "value": "#record"}).values()))
        webdriver(base, "POST", f"/element/{button}/click", {})
        time.sleep(6)
        webdriver(base, "POST", f"/element/{button}/click", {})
        assert shown_answers(base, 2, time.time() + 120) == ["chainsaw", "chainsaw"]
        picture = base64.b64decode(webdriver(base, "GET", "/screenshot"))
        assert picture.startswith(b"\x89PNG")
        if os.environ.get("AUDIOTX_SCREENSHOT"):  # the README's picture
            Path(os.environ["AUDIOTX_SCREENSHOT"]).write_bytes(picture)
        webdriver(base, "DELETE", "", None)
    finally:
        driver.kill()
        driver.wait()


# ---- training ----

def test_a_fold_seeds_itself_from_the_config_and_the_schedule_has_its_shape(tmp_path):
    """train_fold seeds with seed + fold: whatever torch's random state was before, the same
    settings give the same numbers, and another --seed other ones."""
    cfg = audiotx.Config(dim=16, sample_rate=8192, clip_seconds=1.0, batch_size=4, epochs=2, precision="fp32")
    held = clips.Clips(torch.randint(-8000, 8000, (12 * 8192,), dtype=torch.int16), torch.full((12,), 8192), 8192)
    labels = torch.arange(12) % 3
    split = (np.arange(9), np.arange(9, 12))

    def history(seed, state_before):
        torch.manual_seed(state_before)
        fold_dir = tmp_path / f"seed{seed}-{state_before}"  # a new folder: nothing to resume
        fold_dir.mkdir()
        tracker = audiotx.make_tracker(cfg, fold_dir, {}, mode="disabled")
        _, _, rows, probs = audiotx.train_fold(dataclasses.replace(cfg, seed=seed), held, labels, split, 1,
                                               fold_dir, 3, tracker, lambda *_: None)
        return [(r["train_loss"], r["val_loss"]) for r in rows], probs

    (a, pa), (b, pb), (c, _) = history(0, 1), history(0, 2), history(5, 1)
    assert a == b and torch.equal(pa, pb) and a != c
    lrs = [audiotx.lr_at(cfg, s, 100) for s in range(100)]
    assert max(lrs) == pytest.approx(cfg.lr, rel=1e-3) and lrs[0] == pytest.approx(cfg.lr / 25)
    assert 25 <= int(np.argmax(lrs)) <= 35 and lrs[-1] < cfg.lr * 1e-3


def test_augment_keeps_shapes_and_mixes_targets():
    torch.manual_seed(0)
    cfg = audiotx.Config(mixup=0.4)
    wave, target, _ = audiotx.augment(torch.randn(6, 100), torch.tensor([0, 1, 2, 0, 1, 2]), 3, cfg)
    assert wave.shape == (6, 100) and target.shape == (6, 3)
    torch.testing.assert_close(target.sum(1), torch.ones(6))
    silent, _, _ = audiotx.augment(torch.zeros(4, 100), torch.zeros(4, dtype=torch.long), 3, cfg)
    assert torch.isfinite(silent).all() and silent.abs().max() == 0
    # shift alone: each row is its clip rotated by some amount, and the amounts differ
    wave = torch.arange(6 * 100.0).view(6, 100)
    alone = audiotx.Config(mixup=0, gain_db=0, stretch=0)
    shifted, _, _ = audiotx.augment(wave, torch.zeros(6, dtype=torch.long), 3, alone)
    amounts = [int(row[0] - start) % 100 for row, start in zip(shifted, wave[:, 0])]
    for row, clip, k in zip(shifted, wave, amounts):
        assert torch.equal(row, clip.roll(-k))
    assert len(set(amounts)) > 1
    # clips of their own lengths: each is rotated within its length, the padding after it stays put
    lengths = torch.tensor([100, 60, 30, 1, 100, 45])
    padded = wave * (torch.arange(100) < lengths[:, None])
    shifted, _, n = audiotx.augment(padded, torch.zeros(6, dtype=torch.long), 3, alone, lengths)
    assert torch.equal(n, lengths)
    for row, clip, m in zip(shifted, padded, lengths.tolist()):
        k = int(row[0] - clip[0]) % m
        assert torch.equal(row[:m], clip[:m].roll(-k)) and row[m:].abs().sum() == 0
    _, _, n = audiotx.augment(padded, torch.zeros(6, dtype=torch.long), 3, audiotx.Config(mixup=0.4, stretch=0), lengths)
    assert (n >= lengths).all() and set(n.tolist()) <= set(lengths.tolist())  # a mixed pair fills the longer's


def test_mixup_mixes_each_wave_and_its_target_with_the_same_weight_and_partner():
    """Clip i is the constant i + 1 and has label i, so target row i holds the share of each clip in
    mix i: the mixed wave must be exactly that mix of the constants."""
    torch.manual_seed(3)
    consts = torch.arange(1.0, 9.0)  # (8,)
    mix_only = audiotx.Config(mixup=0.4, shift=False, gain_db=0, stretch=0)
    for _ in range(5):
        wave, target, _ = audiotx.augment(consts[:, None].repeat(1, 50), torch.arange(8), 8, mix_only)
        torch.testing.assert_close(target.sum(1), torch.ones(8))
        torch.testing.assert_close(wave, (target @ consts)[:, None].expand(8, 50))
        assert ((target > 0).sum(1) == 2).sum() >= 4  # most rows are mixes of two clips


def test_resample_scales_every_frequency_and_duration_by_the_speed():
    """--stretch: a tone played 1.1x as fast peaks at 1.1x its frequency (numpy's FFT as the
    reference), a burst ends 1/1.1 as late, the clip keeps its sample count, and lengths follow."""
    rate, n = 16000, 16000
    t = torch.arange(n) / rate
    tone = torch.sin(2 * math.pi * 1000 * t) * (t < 0.5)  # 0.5 s of 1 kHz, then silence
    for speed in (0.9, 1.1):
        out, lengths = audiotx.resample(tone[None], speed, torch.tensor([8000]))
        assert out.shape == (1, n)
        peak = np.fft.rfftfreq(n, 1 / rate)[np.abs(np.fft.rfft(out[0].numpy())).argmax()]
        assert peak == pytest.approx(1000 * speed, abs=2)
        end = int(torch.nonzero(out[0].abs() > 1e-3).max())  # where the burst now ends
        assert end == pytest.approx(8000 / speed, abs=3) and int(lengths) == int(8000 / speed)
    torch.testing.assert_close(audiotx.resample(tone[None], 1.0)[0], tone[None])
    # through augment, one speed per batch, shapes kept; a batch played slower never outgrows its clips
    torch.manual_seed(0)
    cfg = audiotx.Config(mixup=0, gain_db=0, shift=False, stretch=0.2)
    lengths = torch.tensor([16000, 4000])
    wave, _, m = audiotx.augment(torch.stack([tone, tone]), torch.zeros(2, dtype=torch.long), 3, cfg, lengths)
    assert wave.shape == (2, n) and (m <= n).all() and not torch.equal(m, lengths)


def test_dropout_zeroes_a_share_p_and_keeps_the_mean():
    torch.manual_seed(0)
    drop, x = audiotx.Dropout(0.25), torch.ones(200_000)
    y = drop(x)
    assert (y == 0).float().mean().item() == pytest.approx(0.25, abs=0.005)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01) and y.unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    assert torch.equal(drop.eval()(x), x) and torch.equal(audiotx.Dropout(0.0)(x), x)
    # a shape whose size is not a multiple of the four masks one random integer gives, and a new mask per call
    x = torch.ones(7, 13, 1001)
    a, b = audiotx.Dropout(0.1)(x), audiotx.Dropout(0.1)(x)
    assert a.shape == x.shape and (a == 0).float().mean().item() == pytest.approx(0.1, abs=0.005)
    assert not torch.equal(a, b) and ((a == 0) & (b == 0)).float().mean().item() == pytest.approx(0.01, abs=0.002)


def test_suggested_lr_is_at_the_smoothed_minimum():
    rows = [{"lr": lr, "smoothed": s} for lr, s in [(1e-4, 2.3), (1e-3, 2.0), (1e-2, 1.2), (1e-1, 1.5), (1, 9.0)]]
    assert tools.suggest_lr(rows) == pytest.approx(1e-2)


# ---- end to end ----

@pytest.mark.slow
@needs_real_data
def test_main_command_on_real_esc10(tmp_path):
    res = run_cli(["--arch", "transformer", "--heads", "2", "--kfold", "4", "--epochs", "1", "--dim", "32",
                   "--sample-rate", "8000", "--out", str(tmp_path / "runs")],
                  env_extra={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / "runs" / "transformer-h2-test1-k4"
    config, metrics = check_run_files(run_dir, 4, has_test=True)
    assert config["n_clips"] == 400 and len(config["classes"]) == 10
    assert metrics["test"]["n"] == 4 * 80 and metrics["ensemble_test"]["n"] == 80 and metrics["val"]["n"] == 320
    assert "fold 4/4 epoch   1/1" in res.stdout and "test (ensemble)" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("arch,heads,test_fold", [("cnn", 2, 1), ("transformer", 1, 0), ("transformer", 4, 1)])
def test_every_architecture_and_split_on_synthetic_data(tmp_path, monkeypatch, arch, heads, test_fold):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = write_dataset(tmp_path / "data", odd=True)
    out = tmp_path / "runs"
    args = ["--data", str(root), "--arch", arch, "--heads", str(heads), "--test-fold", str(test_fold),
            "--kfold", "4", "--epochs", "2", "--dim", "16", "--sample-rate", "8000", "--clip-seconds", "1",
            "--batch-size", "8", "--out", str(out)]
    assert audiotx.main(args) == 0
    name = f"{arch}{'-h%d' % heads if arch == 'transformer' else ''}-test{test_fold}-k4"
    config, metrics = check_run_files(out / name, 4, has_test=bool(test_fold))
    assert config["classes"] == ["class0", "class1", "class2"]
    assert (metrics["test"] or metrics["val"])["n"] == (4 * 6 if test_fold else 30)
    assert not list(out.rglob("wandb"))  # --wandb disabled by the environment: no W&B files at all


@pytest.mark.slow
def test_select_final_tests_and_saves_the_last_epoch(quick, capsys):
    """--select final: no fold chooses an epoch, so the validation it reports is the final epoch's."""
    _, args = quick
    code, out, err = cli(args + ["--epochs", "3", "--select", "final"], capsys)
    assert code == 0, err
    metrics = json.loads(next(Path(args[args.index("--out") + 1]).glob("*/metrics.json")).read_text())
    for fold in metrics["folds"]:
        assert fold["chosen_epoch"] == 3 and fold["val"] == fold["val_final"]
    assert "optimistic" not in out and "validation, final epoch" in out
    code, out, _ = cli(args + ["--epochs", "3", "--name", "best"], capsys)
    assert code == 0 and "validation, best epoch (optimistic)" in out


@pytest.mark.slow
def test_wandb_offline_stays_inside_the_run_folder(tmp_path):
    root = write_dataset(tmp_path / "data", folds=3, clips_per_fold=1)
    home = tmp_path / "home"
    home.mkdir()
    # no W&B folder given: the tracker must keep W&B's cache, data and settings in the run folder
    env = {k: None for k in os.environ if k.startswith(("WANDB_", "XDG_"))}
    env.update(WANDB_MODE="offline", HOME=str(home), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    res = run_cli(["--data", str(root), "--test-fold", "1", "--kfold", "2", "--epochs", "1", "--dim", "16",
                   "--sample-rate", "8000", "--clip-seconds", "1", "--out", str(tmp_path / "runs")], env_extra=env)
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / "runs" / "transformer-h2-test1-k2"
    files = sorted(p.parent.name for p in (run_dir / "wandb").rglob("*.wandb"))
    assert len(files) == 3  # fold1, fold2 and the configuration's summary run
    assert list(home.rglob("*")) == []
    outside = [p for p in tmp_path.rglob("*wandb*") if not p.is_relative_to(run_dir / "wandb")]
    assert outside == [] and (run_dir / "wandb" / "cache").is_dir()


@pytest.mark.slow
def test_wandb_disabled_writes_no_wandb_files(tmp_path):
    root = write_dataset(tmp_path / "data", folds=3, clips_per_fold=1)
    res = run_cli(["--data", str(root), "--kfold", "2", "--epochs", "1", "--dim", "16", "--sample-rate", "8000",
                   "--clip-seconds", "1", "--wandb", "disabled", "--out", str(tmp_path / "runs")],
                  env_extra={"WANDB_MODE": "", "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert [p for p in tmp_path.rglob("*") if "wandb" in p.name.lower()] == []


# ---- bad input ----

@pytest.mark.slow
def test_missing_or_empty_data_folder(tmp_path, quick, capsys):
    """From the real command and in process alike: one line naming the folder, exit status 2;
    the same for an error raised in a tool that the real command hands the flags to."""
    _, args = quick
    res = run_cli(args + ["--data", str(tmp_path / "absent")])
    assert_one_line_error(res.returncode, res.stderr, str(tmp_path / "absent"))
    res = run_cli(args + ["--lr", "auto", "--data", str(tmp_path / "absent")])
    assert_one_line_error(res.returncode, res.stderr, str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    assert_one_line_error(*cli(args + ["--data", str(tmp_path / "empty")], capsys)[::2], str(tmp_path / "empty"))


def test_csv_problems_name_the_file_row_or_column(quick, capsys):
    root, args = quick
    meta = root / "meta" / "esc50.csv"
    text = meta.read_text()
    meta.write_text(text.replace("category", "label"))
    assert_one_line_error(*cli(args, capsys)[::2], "category")
    lines = text.splitlines()
    victim = lines[3].split(",")[0]
    meta.write_text(text)
    (root / "audio" / victim).unlink()
    assert_one_line_error(*cli(args, capsys)[::2], f"row 4, column filename: audio/{victim}")
    meta.write_text("\n".join(l for l in lines if ",class0," in l or l.startswith("filename")) + "\n")
    assert_one_line_error(*cli(args, capsys)[::2], "fewer than two classes")


@pytest.mark.slow
@pytest.mark.parametrize("saves", [[s] for s in SAVES] + [SAVES])
def test_metadata_saved_by_a_spreadsheet_reads_the_same(quick, capsys, saves):
    root, args = quick
    expect = [layouts.read_esc(root, subset) for subset in ("esc10", "esc50")]  # esc50: every row
    as_spreadsheet_saves(root / "meta" / "esc50.csv", saves)
    assert [layouts.read_esc(root, subset) for subset in ("esc10", "esc50")] == expect
    if saves == SAVES:  # and it trains
        code, _, err = cli(args, capsys)
        assert code == 0, err


@pytest.mark.parametrize("column,value", [("fold", "x"), ("category", " "), ("filename", "nope.wav")])
def test_a_wrong_cell_of_a_spreadsheet_saved_table_is_named_by_row_and_column(quick, capsys, column, value):
    root, args = quick

    def edit(header, rows):
        rows[2][header.index(column)] = value  # the third clip: line 4 of the file
    as_spreadsheet_saves(root / "meta" / "esc50.csv", ["bom", "crlf", "quoted", "blank rows"], edit)
    assert_one_line_error(*cli(args, capsys)[::2], f"esc50.csv row 4, column {column}:")


@pytest.mark.slow
def test_missing_csv_falls_back_to_esc50_file_names(quick, capsys):
    root, args = quick
    (root / "meta" / "esc50.csv").unlink()
    code, out, err = cli(args, capsys)
    assert code == 0, err
    assert "esc50.csv is missing" in out
    config = json.loads(next((Path(args[3])).rglob("config.json")).read_text())
    assert config["classes"] == ["dog", "rooster", "target02"] and config["n_clips"] == 9
    scipy.io.wavfile.write(root / "audio" / "stray.wav", 8000, np.zeros(8000, dtype=np.int16))
    assert_one_line_error(*cli(args + ["--restart"], capsys)[::2], "audio/stray.wav")


def broken_wavs(path: Path):
    """Writers of each kind of unreadable file, by name."""
    good = path.read_bytes()
    compressed = bytearray(good)
    compressed[20:22] = (2).to_bytes(2, "little")  # format tag 2 = ADPCM
    return {"empty": b"", "truncated": good[:len(good) // 2], "not RIFF": b"OggS" + good[4:],
            "compressed": bytes(compressed)}


@pytest.mark.parametrize("kind", ["empty", "truncated", "not RIFF", "compressed", "NaN", "inf"])
def test_unreadable_wav_stops_the_run_naming_the_file(quick, capsys, kind):
    root, args = quick
    victim = sorted((root / "audio").glob("*.wav"))[4]
    if kind in ("NaN", "inf"):
        wave = np.zeros(8000, dtype=np.float32)
        wave[100] = np.nan if kind == "NaN" else np.inf
        scipy.io.wavfile.write(victim, 8000, wave)
    else:
        victim.write_bytes(broken_wavs(victim)[kind])
    code, _, err = cli(args, capsys)
    assert_one_line_error(code, err, str(victim))


def test_24_bit_pcm_is_read(tmp_path):
    wave = np.sin(np.arange(4000) / 7) * 0.8
    ints = np.round(wave * 2 ** 23).astype(np.int64)
    raw = b"".join(int(v).to_bytes(4, "little", signed=True)[:3] for v in ints)
    header = (b"RIFF" + (36 + len(raw)).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
              + (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + (8000).to_bytes(4, "little")
              + (24000).to_bytes(4, "little") + (3).to_bytes(2, "little") + (24).to_bytes(2, "little")
              + b"data" + len(raw).to_bytes(4, "little"))
    (tmp_path / "x.wav").write_bytes(header + raw)
    got, rate = audiotx.load_audio(tmp_path / "x.wav")
    assert rate == 8000
    np.testing.assert_allclose(got, wave, atol=1e-6)


@pytest.mark.slow
def test_odd_clips_are_fixed_and_counted_and_silence_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = write_dataset(tmp_path / "data", odd=True, clips_per_fold=3)  # 15 of 45 clips at 16 kHz, stereo, 0.7 s
    for p in sorted((root / "audio").glob("*.wav"))[1::3]:
        scipy.io.wavfile.write(p, 8000, np.zeros(8000, dtype=np.int16))  # silent clips
    code, out, err = cli(["--data", str(root), "--out", str(tmp_path / "runs"), "--sample-rate", "8000",
                          "--clip-seconds", "1", "--epochs", "2", "--dim", "16", "--batch-size", "8"], capsys)
    assert code == 0, err
    assert "15 of 45 clips had a sample rate other than 8000 Hz" in out
    assert "15 of 45 clips had a length other than 1 s" in out and "15 of 45 clips had more than one channel" in out
    for hist in (tmp_path / "runs").rglob("history.csv"):
        rows = list(csv.DictReader(open(hist)))
        assert all(math.isfinite(float(r[k])) for r in rows for k in ("train_loss", "val_loss"))


def test_a_class_missing_from_a_training_fold_is_refused(quick, capsys):
    root, args = quick
    meta = root / "meta" / "esc50.csv"
    lines = meta.read_text().splitlines()
    # every class2 clip moves to fold 2, so validating on fold 2 leaves no class2 clip to train on
    meta.write_text("\n".join(l.replace(",3,2,", ",2,2,") for l in lines) + "\n")
    assert_one_line_error(*cli(args + ["--test-fold", "1"], capsys)[::2], "class2")


@pytest.mark.parametrize("flags,culprit", [
    (["--heads", "3"], "--heads 3"), (["--kfold", "1"], "--kfold"), (["--kfold", "50"], "--kfold 50"),
    (["--test-fold", "9"], "--test-fold 9"), (["--epochs", "0"], "--epochs"), (["--batch-size", "-4"], "--batch-size"),
    (["--dim", "0"], "--dim"), (["--arch", "rnn"], "--arch"), (["--depth", "1"], "--depth"),
    (["--features", "mfcc"], "--features"), (["--precision", "fp16"], "--precision"), (["--lr", "-1"], "--lr"),
    (["--stretch", "0.7"], "--stretch"),
    (["--bench", "--lr", "auto"], "--lr auto"),
])
def test_impossible_flags_are_refused(quick, capsys, flags, culprit):
    _, args = quick
    assert_one_line_error(*cli(args + flags, capsys)[::2], culprit)


def test_debug_shows_the_traceback(quick):
    _, args = quick
    with pytest.raises(audiotx.UserError):
        audiotx.main(args + ["--heads", "3", "--debug"])


# ---- interruptions ----

@pytest.mark.slow
def test_killed_run_resumes_to_identical_metrics(tmp_path):
    root = write_dataset(tmp_path / "data", folds=3, clips_per_fold=2)
    args = ["--data", str(root), "--kfold", "2", "--epochs", "40", "--dim", "16", "--sample-rate", "8000",
            "--clip-seconds", "1", "--batch-size", "4", "--threads", "1"]
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    ref = run_cli(args + ["--out", str(tmp_path / "ref")], env_extra=env)
    assert ref.returncode == 0, ref.stderr
    cut_dir = tmp_path / "cut" / "transformer-h2-test1-k2"
    proc = subprocess.Popen([sys.executable, str(HERE / "audiotx.py"), *args, "--out", str(tmp_path / "cut")],
                            env={**os.environ, "WANDB_MODE": "disabled", **env}, stdout=subprocess.DEVNULL)
    hist, deadline = cut_dir / "fold1" / "history.csv", time.monotonic() + 300
    while proc.poll() is None and not (hist.is_file() and len(hist.read_text().splitlines()) > 10):
        assert time.monotonic() < deadline, "the run never passed epoch 10"
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no handler runs, whatever was on disk is all there is
    proc.wait()
    assert (cut_dir / "fold1" / "state.pt").is_file() and not (cut_dir / "metrics.json").exists()
    res = run_cli(args + ["--out", str(tmp_path / "cut")], env_extra=env)
    assert res.returncode == 0, res.stderr
    assert "fold 1: resuming after epoch" in res.stdout
    a = json.loads((tmp_path / "ref" / "transformer-h2-test1-k2" / "metrics.json").read_text())
    b = json.loads((cut_dir / "metrics.json").read_text())

    def numbers(d, path=""):
        if isinstance(d, dict):
            return {k: v for key, val in d.items() if key != "seconds" for k, v in numbers(val, f"{path}/{key}").items()}
        if isinstance(d, list):
            return {k: v for i, val in enumerate(d) for k, v in numbers(val, f"{path}/{i}").items()}
        return {path: d}
    na, nb = numbers(a), numbers(b)
    assert na.keys() == nb.keys() and len(na) > 100
    for key in na:
        assert nb[key] == pytest.approx(na[key], abs=1e-6), key


def test_damaged_cache_is_rebuilt(cached, capsys):
    root, table, cfg, first, path = cached
    path.write_bytes(path.read_bytes()[:1000])
    again = audiotx.load_clips(root / "audio", table, cfg)
    assert "is damaged; rebuilding it" in capsys.readouterr().out
    assert torch.equal(again.store, first.store) and torch.equal(again.lengths, first.lengths)


@pytest.mark.slow
def test_damaged_checkpoint_and_result_are_reported(quick, capsys):
    _, args = quick
    assert cli(args + ["--epochs", "2"], capsys)[0] == 0
    run_dir = next(Path(args[3]).glob("*"))
    (run_dir / "metrics.json").unlink()
    result = run_dir / "fold2" / "result.pt"
    result.write_bytes(result.read_bytes()[:100])
    assert_one_line_error(*cli(args + ["--epochs", "2"], capsys)[::2], str(result))
    result.unlink()
    state = run_dir / "fold2" / "state.pt"
    state.write_bytes((run_dir / "fold2" / "model.pt").read_bytes()[:300])
    assert_one_line_error(*cli(args + ["--epochs", "2"], capsys)[::2], str(state))
    assert cli(args + ["--epochs", "2", "--restart"], capsys)[0] == 0


@pytest.mark.slow
def test_another_configuration_or_a_live_lock_is_refused(quick, capsys):
    _, args = quick
    assert cli(args, capsys)[0] == 0
    assert_one_line_error(*cli(args + ["--lr", "0.01"], capsys)[::2], "different configuration")
    run_dir = next(Path(args[3]).glob("*"))
    code, out, _ = cli(args, capsys)
    assert code == 0 and "complete; nothing to do" in out
    with open(run_dir / ".lock", "a") as held:  # a live run holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        assert_one_line_error(*cli(args + ["--restart"], capsys)[::2], "another run")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); os._exit(9)", str(run_dir / ".lock")])
    assert holder.wait() == 9  # a run killed while holding it leaves no lock behind
    assert cli(args + ["--restart"], capsys)[0] == 0


# ---- every configuration, and the report ----

@pytest.mark.slow
def test_run_sh_trains_every_configuration_resumes_and_reports(tmp_path):
    import xml.etree.ElementTree as ET
    root = write_dataset(tmp_path / "data", folds=5, clips_per_fold=1)
    env = {**os.environ, "WANDB_MODE": "disabled", "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "PYTHON": sys.executable, "OUT": str(tmp_path / "runs")}
    args = ["--data", str(root), "--epochs", "1", "--dim", "16", "--sample-rate", "8000", "--clip-seconds", "1"]
    res = subprocess.run(["bash", str(HERE / "run.sh"), *args], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    names = sorted(p.parent.name for p in (tmp_path / "runs").glob("*/metrics.json"))
    assert names == sorted([f"{a}-test{t}-k4" for a in ("cnn", "transformer-h1", "transformer-h2",
                                                        "transformer-h4") for t in (0, 1)])
    assert "== configuration 8/8" in res.stdout
    text = (tmp_path / "runs" / "REPORT.md").read_text()
    for section in ("## Every configuration", "## Analysis", "Per-class F1", "Heads, by final-epoch validation accuracy",
                    "## Curves, ROC and confusion matrices", "test fold 1, k=4: best is", "no test fold, k=4: best is",
                    "## Misclassified clips", "Most confused", "## What the models attend to"):
        assert section in text
    figures = list((tmp_path / "runs" / "figures").glob("*.svg"))
    kinds = [svg.name.split("-")[0] for svg in figures]
    assert len(figures) - kinds.count("gradcam") - kinds.count("attention") == 8 * 4  # curves, ROC, confusion
    # one Grad-CAM per test clip of fold model 1 (a class has one clip here), two clips' attention per transformer
    assert kinds.count("gradcam") == 3 and kinds.count("attention") == 3 * 2
    for svg in figures:
        assert ET.parse(svg).getroot().tag.endswith("svg")
        assert f"figures/{svg.name}" in text
        if svg.stem.endswith(("-acc", "-loss")):  # each axis's numeric labels: a round step, whole epochs
            ticks = {axis: [float(t.text) for t in ET.parse(svg).getroot().iter() if t.get("class") == axis]
                     for axis in ("x", "y")}
            assert round_step(ticks["x"]) and all(e == int(e) for e in ticks["x"]) and round_step(ticks["y"])
    # An interrupted grid: one configuration lost its results; a rerun trains only that one.
    (tmp_path / "runs" / "cnn-test0-k4" / "metrics.json").unlink()
    again = subprocess.run(["bash", str(HERE / "run.sh"), *args], env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("complete; nothing to do") == 7
    # CONFIG=i: one configuration (a Slurm array task), no report; CONFIG outside 1..8 is refused
    stamp = (tmp_path / "runs" / "REPORT.md").stat().st_mtime_ns
    one = subprocess.run(["bash", str(HERE / "run.sh"), *args], env={**env, "CONFIG": "2"}, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0 and one.stdout.count("== configuration") == 1, one.stdout + one.stderr
    assert "== configuration 2/8: --arch transformer --heads 1 --test-fold 1" in one.stdout
    assert (tmp_path / "runs" / "REPORT.md").stat().st_mtime_ns == stamp
    bad = subprocess.run(["bash", str(HERE / "run.sh")], env={**env, "CONFIG": "9"}, capture_output=True, text=True)
    assert bad.returncode == 2 and "CONFIG=9 is not one of 1..8" in bad.stderr


@pytest.mark.parametrize("lo,hi", [(1, 100), (0.37, 0.93), (0.0012, 0.0049), (-3.2, -1.1), (0.8, 0.8), (2, 7)])
def test_axis_ticks_are_round_and_cover_the_data(lo, hi):
    for integer in (False, True):
        ticks = plot.nice_ticks(lo, hi, integer=integer)
        assert round_step(ticks) and ticks[0] <= lo and ticks[-1] >= hi and 2 <= len(ticks) <= 7
        assert not integer or all(t == int(t) for t in ticks)  # epochs: whole numbers only


def test_spectrogram_view_embeds_the_picture_it_was_given():
    """The PNG inside an SVG view decodes (zlib, by the PNG layout) back to the exact pixels."""
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    data = plot.png(rgb)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat_len = struct.unpack(">I", data[33:37])[0]
    rows = zlib.decompress(data[41:41 + idat_len])
    assert (width, height) == (7, 5) and rows[::22] == b"\x00" * 5  # one filter byte before each row
    assert np.array_equal(np.frombuffer(rows, np.uint8).reshape(5, 22)[:, 1:].reshape(5, 7, 3), rgb)
    svg = report.svg_spectrogram(torch.randn(16000), 16000, 1.0, title="t", curve=("c", np.ones(8)),
                                  rows=[("head 1", np.arange(8.0))])
    assert svg.count("data:image/png;base64,") == 1 and svg.count("<rect") == 1 + 8  # background + 8 cells


def test_paired_comparison_matches_scipy():
    a, b = [0.80, 0.75, 0.85, 0.78], [0.70, 0.74, 0.80, 0.71]
    mean, lo, hi, p = report.paired(a, b)
    d = np.subtract(a, b)
    assert mean == pytest.approx(d.mean())
    assert p == pytest.approx(scipy.stats.ttest_rel(a, b).pvalue)
    ci = scipy.stats.t.interval(0.95, 3, loc=d.mean(), scale=scipy.stats.sem(d))
    assert (lo, hi) == pytest.approx(ci)


@pytest.mark.slow
def test_tuning_never_reads_the_test_fold(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = write_dataset(tmp_path / "data", folds=5, clips_per_fold=1)
    args = ["--data", str(root), "--arch", "transformer", "--tune", "4", "--epochs", "4", "--kfold", "4",
            "--sample-rate", "8000", "--clip-seconds", "1", "--batch-size", "4"]
    assert cli(args + ["--out", str(tmp_path / "a")], capsys)[0] == 0
    rng = np.random.default_rng(7)
    for wav in (root / "audio").glob("1-*.wav"):  # the test fold becomes noise
        scipy.io.wavfile.write(wav, 8000, (rng.standard_normal(8000) * 3000).astype(np.int16))
    assert cli(args + ["--out", str(tmp_path / "b")], capsys)[0] == 0
    a, b = (read_rows(tmp_path / d / "tune-transformer" / "trials.csv") for d in ("a", "b"))
    assert [r["score"] for r in a] == [r["score"] for r in b] and len(a) == 4 + 2  # 4 trials, then the best 2
    best = json.loads((tmp_path / "a" / "tune-transformer" / "best.json").read_text())
    assert set(best["hparams"]) >= {"lr", "weight_decay", "dropout", "dim", "depth", "mixup"}
    assert float(best["score"]) == max(float(r["score"]) for r in a if r["rung"] == "1")  # one left: stop
    assert float(a[0]["lr"]) == audiotx.Config().lr and a[0]["trial"] == "0"  # trial 0 is the default recipe
    code, out, err = cli(args[:5] + ["2"] + args[6:] + ["--out", str(tmp_path / "a")], capsys)  # fewer trials
    assert code == 0, err
    again = read_rows(tmp_path / "a" / "tune-transformer" / "trials.csv")
    assert [r["score"] for r in again if r["rung"] == "0"] == [r["score"] for r in a if r["rung"] == "0"][:2]
    (tmp_path / "best.json").write_text(json.dumps({**best, "hparams": {"lr": 0.00123, "dim": 64, "dropout": 0.3}}))
    cfg = audiotx.parse_args(["--hparams", str(tmp_path / "best.json"), "--dim", "32"])
    assert (cfg.lr, cfg.dropout, cfg.dim) == (0.00123, 0.3, 32)  # the file sets defaults; flags still win


# ---- benchmark ----

@pytest.mark.slow
def test_lr_find_writes_the_curve_and_lr_auto_uses_its_suggestion(quick, capsys):
    import xml.etree.ElementTree as ET
    _, args = quick
    code, out, err = cli(args + ["--lr-find", "--name", "probe"], capsys)
    assert code == 0, err
    run_dir = Path(args[3]) / "probe"
    rows = list(csv.DictReader(open(run_dir / "lr_find.csv")))
    lrs = [float(r["lr"]) for r in rows]
    assert len(rows) >= 10 and lrs == sorted(lrs) and lrs[0] == pytest.approx(1e-6)
    suggested = tools.suggest_lr([{k: float(v) for k, v in r.items()} for r in rows])
    assert f"suggested peak learning rate {suggested:.3g}" in out
    assert ET.parse(run_dir / "lr_find.svg").getroot().tag.endswith("svg")
    assert not (run_dir / "metrics.json").exists()  # --lr-find trains nothing further
    code, out, err = cli(args + ["--lr", "auto", "--name", "probe"], capsys)  # reuses the folder's lr_find.csv
    assert code == 0, err
    assert json.loads((run_dir / "config.json").read_text())["lr"] == pytest.approx(suggested)
    assert (run_dir / "metrics.json").is_file()
    assert_one_line_error(*cli(args + ["--lr", "fast"], capsys)[::2], "--lr")


def test_flop_count_matches_the_layers_worked_by_hand():
    model = audiotx.CNNClassifier(dim=16, n_classes=3, dropout=0.0)
    wave, labels = torch.randn(2, 8192), torch.tensor([0, 1])
    fwd, train = tools.step_flops(model, wave, labels, 3)
    # conv: 2 * frames * out * in * kernel; 8192 samples -> 512 frames (stride 16) -> pools of 4, 4, 4, 2
    convs = 2 * (512 * 4 * 1 * 64 + 128 * 8 * 4 * 3 + 32 * 16 * 8 * 3 + 8 * 16 * 16 * 3)
    head = 2 * (32 * 16 + 16 * 3)  # Linear(2 * dim, dim), Linear(dim, classes)
    assert fwd == convs + head
    assert 2 * fwd < train < 4 * fwd  # backward costs about twice the forward


@pytest.mark.slow
def test_bench_writes_a_row_per_architecture(tmp_path, capsys):
    code, out, err = cli(["--bench", "--epochs", "1", "--dim", "16", "--sample-rate", "8000", "--clip-seconds", "1",
                          "--out", str(tmp_path)], capsys)
    assert code == 0, err
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["arch"], r["heads"]) for r in bench["rows"]] == [("cnn", None), ("transformer", 1),
                                                                ("transformer", 2), ("transformer", 4)]
    assert all(r["train_clips_per_s"] > 0 and r["fwd_mflops_per_clip"] > 0 for r in bench["rows"])
    assert bench["matmul_gflops"] > 0 and "matrix product" in out
    # the grid: each row's default command with fold 1 held out, plus 5/4 of it over all 400 clips
    each = sum(r["s_per_epoch"] for r in bench["rows"]) * 4 * 1 / 60  # --kfold 4, --epochs 1, in minutes
    assert bench["grid_min"] == pytest.approx(each * (1 + 400 / 320))


@pytest.mark.slow
def test_a_wandb_failure_is_one_warning_and_training_goes_on(quick, capsys, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def refuse(*args, **kwargs):
        raise ConnectionError("api.wandb.ai unreachable\nsecond line of detail")
    monkeypatch.setattr(wandb, "init", refuse)
    monkeypatch.setenv("WANDB_MODE", "offline")
    root, args = quick
    code, out, err = cli(args, capsys)
    assert code == 0, err
    warnings_ = [l for l in out.splitlines() if l.startswith("warning: W&B")]
    assert warnings_ == ["warning: W&B turned off after an error: ConnectionError: api.wandb.ai unreachable"]
    assert (Path(args[3]) / "transformer-h2-test1-k2" / "metrics.json").is_file()


# ---- devices, processes and other datasets ----

def write_urbansound(root: Path, rate=8000):
    """A tiny UrbanSound8K-layout dataset: 3 folds x 2 classes x 2 slices of 0.3-1.0 s, some at 2x the rate."""
    rng = np.random.default_rng(0)
    rows, lengths = [], {}
    for fold in range(1, 4):
        (root / "audio" / f"fold{fold}").mkdir(parents=True)
        for c, name in enumerate(["dog_bark", "siren"]):
            for j in range(2):
                r, seconds = (2 * rate if j else rate), [0.3, 0.55, 0.8, 1.0][(fold + c + j) % 4]
                t = np.arange(int(r * seconds)) / r
                wave = 0.5 * np.sin(2 * np.pi * 400 * (c + 1) * t) + 0.05 * rng.standard_normal(len(t))
                file = f"{100 + fold}{c}-{c}-0-{j}.wav"
                scipy.io.wavfile.write(root / "audio" / f"fold{fold}" / file, r, (wave * 32767).astype(np.int16))
                rows.append([file, f"{100 + fold}{c}", 0, seconds, 1, fold, c, name])
                lengths[f"fold{fold}/{file}"] = int(rate * seconds)
    (root / "metadata").mkdir()
    with open(root / "metadata" / "UrbanSound8K.csv", "w", newline="") as f:
        csv.writer(f).writerows([["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"]]
                                + rows)
    return root, lengths


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["cnn", "transformer"])
def test_urbansound8k_layout_clips_of_many_lengths_train(tmp_path, monkeypatch, arch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root, lengths = write_urbansound(tmp_path / "us8k")
    cfg = audiotx.Config(data=str(root), sample_rate=8000, clip_seconds=1.0, kfold=2)
    ds = audiotx.load_dataset(cfg)
    assert ds.classes == ["dog_bark", "siren"] and len(ds.table) == 12 and len(ds.test_idx) == 4
    assert all(r["filename"].startswith(f"fold{r['fold']}/") for r in ds.table)
    held = audiotx.load_clips(ds.audio_dir, ds.table, cfg)
    assert held.lengths.tolist() == [lengths[r["filename"]] for r in ds.table]  # resampled lengths
    waves, n = held.read([(i, 0) for i in range(len(held))])
    assert all(w[k:].abs().sum() == 0 and w[k - 10:k].abs().sum() > 0 for w, k in zip(waves, n.tolist()))
    out = tmp_path / "runs"
    assert audiotx.main(["--data", str(root), "--arch", arch, "--sample-rate", "8000", "--clip-seconds", "1",
                         "--kfold", "2", "--epochs", "1", "--dim", "16", "--out", str(out), "--wandb", "disabled"]) == 0
    metrics = json.loads(next(out.glob("*/metrics.json")).read_text())
    assert metrics["classes"] == ds.classes and metrics["test"]["n"] == 2 * 4 and metrics["val"]["n"] == 8
    # an explicit --dataset that does not match the folder names the missing file
    assert audiotx.main(["--data", str(write_dataset(tmp_path / "esc")), "--dataset", "urbansound8k"]) == 2


@pytest.mark.parametrize("features", ["wave", "logwave"])
@pytest.mark.parametrize("arch", ["cnn", "transformer"])
def test_padding_never_changes_the_logits(arch, features):
    torch.manual_seed(0)
    cfg = audiotx.Config(arch=arch, dim=16, sample_rate=8000, clip_seconds=2.0, features=features)
    model = audiotx.build_model(cfg, 3).eval()
    with torch.no_grad():  # running statistics far from (0, 1), so padding that leaked would show
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    lengths = torch.tensor([16000, 9000, 5000, 2100])
    after = torch.arange(16000) >= lengths[:, None]  # (4, S) the padded samples
    wave = torch.randn(4, 16000).masked_fill(after, 0)
    with torch.no_grad():
        logits = model(wave, lengths)
        # other padded samples: bit for bit the same logits
        assert torch.equal(model(wave + 5 * torch.randn(4, 16000) * after, lengths), logits)
        # a full-length clip is unchanged by its lengths; a short clip in a shorter buffer gives its logits
        torch.testing.assert_close(model(wave[:1]), logits[:1], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(wave[2:3, :12000], lengths[2:3]), logits[2:3], rtol=0, atol=1e-6)
        # and the lengths matter: the same buffers read as full clips give other logits
        assert (model(wave) - logits)[1:].abs().max() > 1e-3


@pytest.mark.slow
def test_openmp_spin_is_set_before_torch_loads_and_the_users_value_wins():
    """GOMP_SPINCOUNT keeps libgomp's idle threads from spinning long (two runs at once would
    otherwise slow each other many times over). libgomp reads it when torch loads it, so it must be
    in the environment at torch's first import: a finder records it there."""
    probe = ("import os, sys\n"
             "class Probe:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'torch':\n"
             "            print('at torch import:', os.environ.get('GOMP_SPINCOUNT'))\n"
             "            sys.meta_path.remove(self)\n"
             "sys.meta_path.insert(0, Probe())\n"
             "import audiotx\n")
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=HERE, env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "at torch import: 1000", out.stderr
    out = subprocess.run([sys.executable, "-c", probe], cwd=HERE, env={**env, "GOMP_SPINCOUNT": "7"},
                         capture_output=True, text=True)
    assert out.stdout.strip() == "at torch import: 7", out.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.slow
def test_freed_activations_stay_in_the_heap_unless_the_user_set_the_allocator():
    """Training steps touch fresh pages (minor page faults) when glibc gives freed activations back
    to the kernel each step; once the processes start, the blocks stay. A MALLOC_ variable of the
    user's leaves glibc's own behaviour: many times the faults."""
    probe = ("import resource, torch, processes\n"
             "processes.start_processes('cpu')\n"
             "torch.set_num_threads(1)\n"
             "conv = torch.nn.Sequential(torch.nn.Conv1d(1, 32, 64, 16), torch.nn.ReLU(),\n"
             "                           torch.nn.Conv1d(32, 64, 3))  # activations of two sizes\n"
             "wave = torch.randn(32, 1, 80000)\n"
             "conv(wave).sum().backward()\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
             "for _ in range(5):\n"
             "    conv(wave).sum().backward()\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    faults = []
    for extra in ({}, {"MALLOC_ARENA_MAX": "8"}):
        out = subprocess.run([sys.executable, "-c", probe], cwd=HERE, env={**env, **extra},
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        faults.append(int(out.stdout))
    assert faults[0] * 10 < faults[1], faults


@pytest.mark.slow
def test_device_flag(quick, capsys):
    root, flags = quick
    assert processes.pick_device("cpu") == torch.device("cpu")
    assert processes.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else
                                                "mps" if torch.backends.mps.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert audiotx.main(flags + ["--device", "cuda"]) == 2
        assert "--device cuda: no such device" in capsys.readouterr().err
    assert audiotx.main(flags + ["--device", "cpu", "--amp"]) == 0
    config = json.loads(next(Path(flags[flags.index("--out") + 1]).glob("*/config.json")).read_text())
    assert config["precision"] == "bf16" and config["device_used"] == "cpu" and config["processes"] == 1


@pytest.mark.slow
def test_torchrun_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """Every clip the same noise (labels differ), so each process's BatchNorm statistics equal
    the whole batch's (CPU BatchNorm is per process) and no augmentation: two processes must
    then give one process's numbers, up to the order of float sums."""
    root = write_dataset(tmp_path / "data", clips_per_fold=4)
    noise = (np.random.default_rng(1).standard_normal(8000) * 8000).astype(np.int16)
    for f in (root / "audio").glob("*.wav"):
        scipy.io.wavfile.write(f, 8000, noise)
    flags = ["--data", str(root), "--sample-rate", "8000", "--clip-seconds", "1", "--kfold", "2", "--epochs", "2",
             "--dim", "16", "--batch-size", "8", "--mixup", "0", "--no-shift", "--gain-db", "0", "--stretch", "0", "--dropout", "0",
             "--precision", "fp32", "--threads", "1"]
    env = {**os.environ, "WANDB_MODE": "disabled", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run(torchrun + [str(HERE / "audiotx.py"), *flags, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli(flags + ["--out", str(tmp_path / "one")], env_extra={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = tmp_path / "one" / "transformer-h2-test1-k2", tmp_path / "two" / "transformer-h2-test1-k2"
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert files(a) == files(b) and "metrics.json" in files(b)  # rank 0 wrote each file once, nothing more
    assert two.stdout.count("fold 1/2 epoch") == 2  # one copy of the progress, from rank 0
    assert json.loads((b / "config.json").read_text())["processes"] == 2
    for fold in (1, 2):
        h1, h2 = (read_rows(d / f"fold{fold}" / "history.csv") for d in (a, b))
        for r1, r2 in zip(h1, h2, strict=True):
            assert r1["train_acc"] == r2["train_acc"] and r1["val_acc"] == r2["val_acc"]
            for key in ("train_loss", "val_loss"):
                assert float(r2[key]) == pytest.approx(float(r1[key]), rel=1e-4)
    p1, p2 = read_rows(a / "predictions.csv"), read_rows(b / "predictions.csv")
    assert [r["filename"] for r in p1] == [r["filename"] for r in p2]
    for r1, r2 in zip(p1, p2):
        assert [float(r1[k]) for k in r1 if k.startswith("p_")] == pytest.approx(
            [float(r2[k]) for k in r2 if k.startswith("p_")], abs=1e-4)
