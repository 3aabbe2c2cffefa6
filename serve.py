"""
A local web page for trying a model: choose or drop files, or record from the microphone, and see
the top classes, the log-mel spectrogram with what the model attended to (Grad-CAM for the cnn,
the <cls> attention for the transformer), and for a longer recording its timeline and events. The
standard library serves it; the page (page.html) loads nothing from outside the server.

    python serve.py                        # http://127.0.0.1:8000: the shipped model and runs/
    python serve.py --port 8080 --runs results --max-mb 100
    curl --data-binary @dog.wav 'http://127.0.0.1:8000/api/predict?model=shipped&name=dog.wav'

The API: GET /api/models lists the models ({id, arch, classes}); POST /api/predict?model=ID&name=
FILE with the audio as the body answers what --predict --json prints for it (with views=1, the
page's SVG views beside). A model is chosen by its listed id, never by a path; an upload lives in a
temporary file for as long as its answer takes.
"""

import argparse
import json
import sys
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import audiotx  # before torch: it sets OpenMP's spin count, which torch reads once

import torch

import predict
import report
from audiotx import UserError
from layouts import AUDIO_SUFFIXES

PAGE = Path(__file__).resolve().with_name("page.html")


# ----------------------------------------------------------------------------------------
# models: the shipped one and the finished runs, loaded once each
# ----------------------------------------------------------------------------------------

def finished_runs(runs: Path) -> dict:
    """{id: run folder}: the shipped model, and every run under runs with its fold models."""
    found = {"shipped": predict.SHIPPED_MODEL}
    if runs.is_dir():
        found |= {d.name: d for d in sorted(runs.iterdir())
                  if (d / "config.json").is_file() and any(d.glob("fold*/model.pt"))}
    return found


class Models:
    """The listed models, each loaded at its first use; one prediction at a time, since every
    request's fold models would share the same two cores anyway."""

    def __init__(self, runs: Path):
        self.runs, self.loaded, self.lock = runs, {}, threading.Lock()

    def listing(self) -> list:
        out = []
        for model_id, run_dir in finished_runs(self.runs).items():
            saved = json.loads((run_dir / "config.json").read_text())
            out.append({"id": model_id, "arch": saved["arch"], "classes": saved["classes"]})
        return out

    def get(self, model_id: str) -> predict.Model:
        runs = finished_runs(self.runs)
        if model_id not in runs:
            raise KeyError(model_id)
        if model_id not in self.loaded:
            run = "" if model_id == "shipped" else str(runs[model_id])
            self.loaded[model_id] = predict.load_model(audiotx.Config(run=run))
        return self.loaded[model_id]


# ----------------------------------------------------------------------------------------
# one upload: its record, and the page's views of it
# ----------------------------------------------------------------------------------------

def attention_view(model: predict.Model, path: Path, rec: dict) -> str:
    """The surest window's log-mel spectrogram under fold model 1's Grad-CAM of the top class
    (cnn) or its <cls> attention rolled out over the blocks (transformer)."""
    wave, rate = audiotx.load_audio(path)
    wave = torch.from_numpy(audiotx.to_rate(wave, rate, model.rate))
    top = model.classes.index(rec["pred"])
    best = max(rec["windows"], key=lambda w: w["probs"][rec["pred"]])
    start = round(best["start"] * model.rate)
    window = torch.nn.functional.pad(wave[start:start + model.n], (0, max(0, start + model.n
                                                                          - len(wave))))
    net = model.models[0]
    title = f"{rec['file']}, {best['start']:g}-{best['start'] + model.n / model.rate:g} s"
    if isinstance(net, audiotx.AudioTransformer):
        _, rollout = report.cls_attention(net, window)
        return report.svg_spectrogram(window, model.rate, model.n / model.rate, title=title,
                                      rows=[("attention", rollout.numpy())])
    with torch.enable_grad():
        cam = report.grad_cam(net, window, top).numpy()
    return report.svg_spectrogram(window, model.rate, model.n / model.rate, title=title,
                                  curve=(f"Grad-CAM ({rec['pred']})", cam))


def answer(model: predict.Model, body: bytes, name: str, views: bool) -> dict:
    """What --predict --json prints for the audio in body, named name; with views, the SVGs."""
    suffix = Path(name).suffix.lower()
    if suffix not in AUDIO_SUFFIXES:
        raise UserError(f"{name}: not an audio file name ({', '.join(sorted(AUDIO_SUFFIXES))})")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(body)
        try:
            found = predict.classify(path, model, plot=views)
            rec = predict.record(Path(name).stem, Path(name), found, model)
            if views:
                rec["views"] = {"attention": attention_view(model, path, rec)}
                if len(rec["windows"]) > 1:
                    rec["views"]["timeline"] = predict.timeline_svg(rec, found, model)
        except predict.READ_ERRORS as e:
            raise UserError(predict.unreadable(name, e).replace(str(path), name)) from None
    return rec


# ----------------------------------------------------------------------------------------
# the server
# ----------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    server_version = "audiotx"
    models: Models
    max_bytes: int

    def reply(self, code: int, body: bytes, kind: str = "application/json"):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def reply_json(self, code: int, obj):
        self.reply(code, (json.dumps(obj) + "\n").encode())

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path in ("/", "/index.html"):
            self.reply(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif url.path == "/api/models":
            self.reply_json(200, self.models.listing())
        else:
            self.reply_json(404, {"error": f"{url.path}: no such page"})

    def do_POST(self):
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        try:
            size = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self.reply_json(411, {"error": "the audio must come with its Content-Length"})
        if url.path != "/api/predict":
            return self.reply_json(404, {"error": f"{url.path}: no such endpoint"})
        if size > self.max_bytes:
            self.close_connection = True
            if size <= 16 * self.max_bytes:  # read and dropped, so that the client hears the 413
                for first in range(0, size, 2 ** 20):
                    self.rfile.read(min(2 ** 20, size - first))
            return self.reply_json(413, {"error": f"{size:,} bytes: over --max-mb "
                                                  f"({self.max_bytes / 2 ** 20:g} MB)"})
        body = self.rfile.read(size)
        try:
            with self.models.lock:
                model = self.models.get(query.get("model", "shipped"))
                views = query.get("views") == "1"
                rec = answer(model, body, query.get("name", "upload.wav"), views)
        except KeyError as e:
            return self.reply_json(404, {"error": f"no model {e}: GET /api/models lists them"})
        except UserError as e:
            return self.reply_json(400, {"error": str(e)})
        except Exception as e:  # a request must never stop the server
            return self.reply_json(500, {"error": f"{type(e).__name__}: {e}".splitlines()[0]})
        self.reply_json(200, rec)

    def log_message(self, form, *args):  # one line a request on stderr, as http.server does
        sys.stderr.write(f"{self.address_string()} {form % args}\n")


def make_server(host: str, port: int, runs: Path, max_mb: float) -> ThreadingHTTPServer:
    settings = {"models": Models(runs), "max_bytes": int(max_mb * 2 ** 20)}
    handler = type("Bound", (Handler,), settings)  # the handler class, with this server's settings
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: "
                   "loopback: this machine alone)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--runs", default="runs", help="finished runs to list beside the shipped model")
    p.add_argument("--max-mb", type=float, default=50, help="the largest upload, in MB")
    a = p.parse_args(argv)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {a.host}: anyone who reaches this machine can use the page",
              file=sys.stderr)
    server = make_server(a.host, a.port, Path(a.runs), a.max_mb)
    print(f"audiotx: serving http://{a.host}:{server.server_address[1]}/ (Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
