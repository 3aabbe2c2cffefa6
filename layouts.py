"""
Dataset layouts: which recordings a dataset holds, their classes, official folds, source
recordings and annotated segments, read from ESC-50's table (meta/esc50.csv, or its file names),
UrbanSound8K's (metadata/UrbanSound8K.csv), a folder of class folders, a labels table of your
own, or recordings with Audacity label tracks beside them. No audio is read here.

Every layout gives rows {filename (under the audio folder), fold (None: none given), category,
src_file (the source recording: its clips never straddle a split), start and end (seconds of
the file; None: its start or its end)}. Tables are read the same after a spreadsheet saved them;
a wrong cell is named by file, row and column.

A leaf: it imports nothing of audiotx's, which reads a dataset through read_layout. Every problem
is a LayoutError whose text is the whole message. Not run on its own.
"""

import csv
import glob
import io
import re
from pathlib import Path

AUDIO_SUFFIXES = {".wav", ".wave", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".mp4",
                  ".aac", ".aif", ".aiff", ".aifc", ".webm", ".wma", ".caf"}
ESC_NAME = re.compile(r"^(\d+)-(\w+)-([A-Za-z]+)-(\d+)\.wav$")  # {fold}-{src}-{take}-{target}.wav
ESC10 = {0: "dog", 1: "rooster", 10: "rain", 11: "sea_waves", 12: "crackling_fire",  # target: name
         20: "crying_baby", 21: "sneezing", 38: "clock_tick", 40: "helicopter", 41: "chainsaw"}


class LayoutError(Exception):
    """A dataset whose files or tables cannot be used; the text is the whole message."""


def is_audio(path: Path) -> bool:
    """An audio file by its name (any case), not hidden."""
    return path.suffix.lower() in AUDIO_SUFFIXES and not path.name.startswith(".")


def clip_name(row: dict) -> str:
    """A row's name in predictions.csv: its file, and the segment when it is one."""
    if row.get("start") is None and row.get("end") is None:
        return row["filename"]
    end = "end" if row.get("end") is None else f"{row['end']:g}"
    return f"{row['filename']}@{row.get('start') or 0:g}-{end}s"


# ---- tables ----

def read_meta(path: Path) -> list:
    """A metadata table as (line number, {column: value}), names and values stripped, read the same
    after a spreadsheet saved it: a byte-order mark, Windows line ends, quoted fields, ';' or a tab
    as the separator, empty rows, columns in another order or added."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:  # a spreadsheet's own 8-bit encoding
        text = raw.decode("cp1252", errors="replace")
    first = text.split("\n", 1)[0]
    separator = max(",;\t", key=first.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator)
    header = [h.strip() for h in next(reader, [])]
    return [(reader.line_num, dict(zip(header, [c.strip() for c in cells] + [""] * len(header))))
            for cells in reader if any(c.strip() for c in cells)]


def check_columns(meta: Path, numbered: list, needed: set):
    missing = needed - set(numbered[0][1] if numbered else {})
    if missing:
        raise LayoutError(f"{meta}: missing column(s) {', '.join(sorted(missing))}")


def table_row(audio_dir: Path, meta: Path, line: int, filename: str, fold: str, category: str,
              src: str, columns=("filename", "category")) -> dict:
    """One clip of ESC-50's or UrbanSound8K's table; columns name the file's and the class's
    columns for the errors."""
    if not (audio_dir / filename).is_file():
        where = f"{audio_dir.name}/{filename}"
        raise LayoutError(f"{meta} row {line}, column {columns[0]}: {where} does not exist")
    if not category:
        raise LayoutError(f"{meta} row {line}, column {columns[1]}: empty")
    if not fold.isdigit() or int(fold) < 1:
        raise LayoutError(f"{meta} row {line}, column fold: {fold!r} is not a positive whole "
                          "number")
    return {"filename": filename, "fold": int(fold), "category": category, "src_file": src}


def checked_table(meta: Path, table: list, what: str) -> list:
    """The rows by file (and segment), once they hold two classes or more."""
    classes = sorted({r["category"] for r in table})
    if len(classes) < 2:
        named = f" (only '{classes[0]}', {len(table)} recordings)" if classes else ""
        raise LayoutError(f"{meta}: fewer than two classes in the {what} rows{named}; a classifier "
                          "needs two or more (a class of other, background sounds counts)")
    return sorted(table, key=lambda r: (r["filename"], r.get("start") or 0))


# ---- ESC-50 and UrbanSound8K ----

def rows_from_names(data_dir: Path, meta: Path) -> list:
    """Without meta/esc50.csv, the table from ESC-50 names, {fold}-{src}-{take}-{target}.wav."""
    names = sorted(p.name for p in (data_dir / "audio").glob("*.wav"))
    bad = [n for n in names if not ESC_NAME.match(n)]
    if not names or bad:
        what = "audio/" + bad[0] if bad else "audio/ holds no .wav file and"
        raise LayoutError(f"{meta}: missing, and {what} does not follow ESC-50's "
                          "{fold}-{src}-{take}-{target}.wav names to stand in for it")
    print(f"warning: {meta} is missing; folds, sources and classes come from the file names")
    parts = [ESC_NAME.match(n).groups() for n in names]  # (fold, src, take, target)
    rows = [{"filename": n, "fold": p[0], "src_file": p[1],
             "category": ESC10.get(int(p[3]), f"target{int(p[3]):02d}")}
            for n, p in zip(names, parts)]
    if len({p[3] for p in parts}) > len(ESC10):  # a full ESC-50 folder: mark its ESC-10 rows
        for row, p in zip(rows, parts):
            row["esc10"] = str(int(p[3]) in ESC10)
    return rows


def read_esc(data_dir: Path, subset: str) -> list:
    """Rows of meta/esc50.csv (or ESC-50 file names without it): audio/<filename>."""
    meta = data_dir / "meta" / "esc50.csv"
    if meta.is_file():
        numbered = read_meta(meta)
    else:
        numbered = list(enumerate(rows_from_names(data_dir, meta), 2))
    check_columns(meta, numbered, {"filename", "fold", "category"})
    if subset == "esc10" and "esc10" in numbered[0][1]:
        numbered = [(line, r) for line, r in numbered if r["esc10"].lower() == "true"]
    table = []
    for line, r in numbered:
        match = ESC_NAME.match(r["filename"])
        src = r.get("src_file") or (match.group(2) if match else r["filename"])
        table.append(table_row(data_dir / "audio", meta, line, r["filename"], r["fold"],
                               r["category"], src))
    return checked_table(meta, table, subset)


def read_urbansound(data_dir: Path, meta: Path) -> list:
    """Rows of metadata/UrbanSound8K.csv: audio/fold<k>/<slice_file_name>, with the freesound
    recording (fsID) a slice was cut from as its source, so no recording crosses a split."""
    if not meta.is_file():
        raise LayoutError(f"{meta}: missing (--dataset urbansound8k expects it and "
                          "audio/fold<k>/)")
    numbered = read_meta(meta)
    check_columns(meta, numbered, {"slice_file_name", "fsID", "fold", "class"})
    table = [table_row(data_dir / "audio", meta, line, f"fold{r['fold']}/{r['slice_file_name']}",
                       r["fold"], r["class"], r["fsID"], ("slice_file_name", "class"))
             for line, r in numbered]
    return checked_table(meta, table, "UrbanSound8K")


# ---- your own: a folder of class folders, a labels table ----

def class_folder_rows(root: Path) -> list:
    """A folder with one subfolder per class: every audio file at any depth below a class folder
    is a recording of that class; hidden files and folders are skipped, and other files are
    skipped and counted in one warning."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise LayoutError(f"{root}: no class folders (one folder per class holding its "
                          "recordings), no audio/ folder (ESC-50's layout) and no "
                          "metadata/UrbanSound8K.csv; or pass a labels table (--data labels.csv)")
    rows, skipped = [], [p.name for p in root.iterdir() if p.is_file()]
    for c in classes:
        files = sorted(p.relative_to(root) for p in (root / c).rglob("*") if p.is_file())
        files = [f for f in files if not any(part.startswith(".") for part in f.parts[1:-1])]
        audio = [f for f in files if is_audio(f)]
        skipped += [f.name for f in files if not is_audio(f)]
        if not audio:
            raise LayoutError(f"{root / c}: the class folder '{c}' holds no audio file "
                              f"({', '.join(sorted(AUDIO_SUFFIXES))}); add some, or move it out")
        rows += [{"filename": f.as_posix(), "fold": None, "category": c, "src_file": f.as_posix()}
                 for f in audio]
    if skipped:
        shown = ", ".join(sorted(set(skipped))[:5]) + (", ..." if len(set(skipped)) > 5 else "")
        print(f"warning: skipped {len(skipped)} file(s) that are not audio ({shown})")
    return checked_table(root, rows, "class folder")


def seconds_cell(meta: Path, line: int, column: str, text: str):
    """A start or end cell: seconds >= 0, or None where it is empty."""
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise LayoutError(f"{meta} row {line}, column {column}: {text!r} is not a time in seconds")
    return value


def labels_table_rows(meta: Path) -> list:
    """A table of your own: a file column (filename or path, relative to the table's folder), a
    label column (label or category), and optional fold, group (the source recording) and
    start, end (seconds); an empty optional cell means the file itself, the whole of it."""
    numbered = read_meta(meta)
    columns = set(numbered[0][1]) if numbered else set()
    file_col = next((c for c in ("filename", "path") if c in columns), None)
    label_col = next((c for c in ("label", "category") if c in columns), None)
    if not file_col or not label_col:
        raise LayoutError(f"{meta}: needs a file column (filename or path) and a label column "
                          f"(label or category); it has {', '.join(sorted(columns)) or 'none'}")
    rows = []
    for line, r in numbered:
        name = r[file_col].replace("\\", "/")
        if not (meta.parent / name).is_file():
            raise LayoutError(f"{meta} row {line}, column {file_col}: {name} does not exist")
        if not r[label_col]:
            raise LayoutError(f"{meta} row {line}, column {label_col}: empty")
        fold = r.get("fold")
        if fold is not None and (not fold.isdigit() or int(fold) < 1):
            raise LayoutError(f"{meta} row {line}, column fold: {fold!r} is not a positive whole "
                              "number")
        start, end = (seconds_cell(meta, line, c, r.get(c, "")) for c in ("start", "end"))
        if start is not None and end is not None and end <= start:
            raise LayoutError(f"{meta} row {line}, column end: {end:g} is not after start "
                              f"{start:g}")
        rows.append({"filename": name, "fold": None if fold is None else int(fold),
                     "category": r[label_col], "src_file": r.get("group") or name,
                     "start": start, "end": end})
    return checked_table(meta, rows, "table")


def read_label_track(path: Path) -> list:
    """An Audacity label track (start, end, label per line, tab-separated; the lines of spectral
    selections, which begin with a backslash, skipped) -> [(start, end, label)] of the
    labels with a length; a confidence after the class name, as --predict writes it, dropped."""
    labels = []
    for line, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        cells = text.split("\t")
        if len(cells) < 3 or text.startswith("\\"):
            continue
        try:
            start, end = float(cells[0]), float(cells[1])
        except ValueError:
            raise LayoutError(f"{path} line {line}: {cells[0]!r}, {cells[1]!r} are not times in "
                              "seconds (expected Audacity's start, end, label)") from None
        label = re.sub(r" \d*\.?\d+$", "", cells[2].strip())  # "dog 0.87" -> "dog"
        if end > start and label:
            labels.append((start, end, label))
    return labels


def label_track_rows(root: Path, tracks: list) -> list:
    """Recordings with an Audacity label track beside each (rec.wav, rec.txt): every label a
    segment of its class; the labels of one recording never straddle a split."""
    rows = []
    for audio, track in tracks:
        name = audio.relative_to(root).as_posix()
        rows += [{"filename": name, "fold": None, "category": label, "src_file": name,
                  "start": start, "end": end} for start, end, label in read_label_track(track)]
    return checked_table(root, rows, "label track")


def beside_tracks(root: Path) -> list:
    """(recording, its label track) pairs below root: audio files with a .txt of the same name."""
    audio = sorted(p for p in root.rglob("*") if is_audio(p) and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return [(a, a.with_suffix(".txt")) for a in audio if a.with_suffix(".txt").is_file()]


def read_layout(path: Path, subset: str = "esc10", dataset: str = "auto") -> tuple:
    """(the folder the rows' filenames are under, the rows sorted by file, the layout's name) of
    a dataset folder or a labels table. An ESC-50 folder is known by audio/ or meta/esc50.csv,
    UrbanSound8K by its metadata table; a folder with label tracks beside its recordings by them;
    another folder is a folder of class folders. A .txt file is one label track."""
    if path.is_file() and path.suffix.lower() == ".txt":
        audio = sorted(p for p in path.parent.glob(glob.escape(path.stem) + ".*") if is_audio(p))
        if not audio:
            raise LayoutError(f"{path}: a label track, but no recording of the same name beside it")
        return path.parent, label_track_rows(path.parent, [(audio[0], path)]), "label track"
    if path.is_file():
        return path.parent, labels_table_rows(path), "labels table"
    if not path.is_dir():
        raise LayoutError(f"{path}: no such folder or table")
    us8k = path / "metadata" / "UrbanSound8K.csv"
    if dataset == "urbansound8k" or (dataset == "auto" and us8k.is_file()):
        return path / "audio", read_urbansound(path, us8k), "UrbanSound8K"
    if dataset == "esc" or (path / "audio").is_dir() or (path / "meta" / "esc50.csv").is_file():
        return path / "audio", read_esc(path, subset), "ESC-50"
    tracks = beside_tracks(path)
    if tracks:
        return path, label_track_rows(path, tracks), "label tracks"
    return path, class_folder_rows(path), "class folders"
