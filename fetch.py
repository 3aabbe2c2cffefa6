"""
Fetching a dataset: download an archive with resume and retries, check it, unpack it into place.

A leaf: it imports nothing of audiotx's. audiotx.py calls it when no dataset is found (ESC-50's
public archive into the cache) and for `--data some.zip`; the check of what an archive holds is
audiotx's, passed in as a function. Every problem is a FetchError whose text names the archive
or the address and says what to do. Not run on its own: audiotx.py fetches when it needs to.
"""

import fcntl
import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

# where a first run fetches the data from, unless $AUDIOTX_ESC50_URL says otherwise
ESC50_URL = "https://github.com/karolpiczak/ESC-50/archive/refs/heads/master.zip"
ESC50_MB = 600  # the archive's size, for the line that says what a first run fetches
MANUAL_DOWNLOAD_HINT = ("download ESC-50 yourself (the README says how) and pass --data DIR or "
                        "ZIP, or set AUDIOTX_DATA")


class FetchError(Exception):
    """A download or an archive that cannot be used; the text is the whole message."""


# ---- downloading ----

def copy_with_progress(source, sink, done: int, total: int):
    """Copy in 1 MB blocks with a progress line: in place on a terminal, every 5 s in a log."""
    t0 = last = time.time()
    start, every = done, 0.2 if sys.stdout.isatty() else 5.0
    while block := source.read1(1 << 20):  # what has arrived; b"" when the server hangs up early
        sink.write(block)
        done += len(block)
        if time.time() - last >= every or done == total:
            last, rate = time.time(), (done - start) / max(time.time() - t0, 1e-9)
            left = f", {(total - done) / max(rate, 1) / 60:.1f} min left" if total else ""
            shown = f" of {total / 1e6:.0f} MB ({done / total:.0%})" if total else " MB"
            end = "\r" if sys.stdout.isatty() else "\n"
            print(f"fetched {done / 1e6:.0f}{shown} at {rate / 1e6:.1f} MB/s{left}   ", end=end,
                  flush=True)
    if sys.stdout.isatty():
        print()


def download(url: str, path: Path, tries: int = 4):
    """url -> path through path.part, resuming a cut transfer with an HTTP Range request where the
    server allows it (else from the start), tries times at most."""
    part, why = path.with_name(path.name + ".part"), ""
    for attempt in range(1, tries + 1):
        have = part.stat().st_size if part.is_file() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                resumed = response.status == 206
                total = int(response.headers.get("Content-Length") or 0) + (have if resumed else 0)
                with open(part, "ab" if resumed else "wb") as f:
                    copy_with_progress(response, f, have if resumed else 0, total)
            if not total or part.stat().st_size == total:
                os.replace(part, path)
                return
            why = f"the connection closed at {part.stat().st_size:,} of {total:,} bytes"
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the saved part is no prefix of what the server holds now
                part.unlink()
                continue
            raise FetchError(f"could not fetch {url}: HTTP {e.code} {e.reason}; "
                             f"{MANUAL_DOWNLOAD_HINT}") from None
        except (OSError, http.client.HTTPException) as e:  # no network, DNS, a dropped connection
            why = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        again = "; trying again" if attempt < tries else ""
        print(f"\nfetch {attempt}/{tries} failed ({why}){again}")
        time.sleep(attempt if attempt < tries else 0)
    raise FetchError(f"could not fetch {url} ({why}); run again to resume, or "
                     f"{MANUAL_DOWNLOAD_HINT}")


# ---- unpacking ----

def extract_checked(archive: Path, into: Path) -> Path:
    """Every member's path and CRC checked, then unpacked into a new temporary folder in `into`."""
    try:
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if name.startswith(("/", "\\")) or ".." in Path(name).parts or ":" in name:
                    raise FetchError(f"{archive}: member {name!r} would land outside the folder")
            bad = z.testzip()
            if bad:
                raise FetchError(f"{archive}: member {bad} fails its CRC check "
                                 "(a damaged download)")
            into.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=into))
            z.extractall(tmp)
            return tmp
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise FetchError(f"{archive}: not a whole zip archive ({e})") from None


def unpack_checked(archive: Path, dest: Path, check):
    """Unpack, find the dataset's folder (the shallowest holding audio/), check(folder) that it is
    whole (raising on anything wrong), then rename it to dest: dest, when it exists, is whole."""
    tmp = extract_checked(archive, dest.parent)
    try:
        root = min((p.parent for p in tmp.rglob("audio") if p.is_dir()), key=lambda p: len(p.parts),
                   default=None)
        if root is None:
            raise FetchError(f"{archive}: holds no audio/ folder (expected ESC-50's layout)")
        check(root)
        os.replace(root, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_esc50(dest: Path, check) -> Path:
    """Download ESC-50's archive beside dest and unpack it to dest; one process at a time."""
    url = os.environ.get("AUDIOTX_ESC50_URL") or ESC50_URL
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / "fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits here, then finds the folder
        if (dest / "audio").is_dir():
            return dest
        print(f"no dataset found: fetching ESC-50 (about {ESC50_MB} MB) from {url} into {dest}; "
              "to use a copy you have, pass --data DIR or ZIP or set AUDIOTX_DATA", flush=True)
        archive = dest.parent / "ESC-50.zip"
        download(url, archive)
        try:
            unpack_checked(archive, dest, check)
        except Exception as e:  # FetchError, or whatever check() raised about the contents
            archive.unlink()  # never trusted again
            raise FetchError(f"{e}; deleted it, so the next run fetches it again") from None
        archive.unlink()  # the folder is the dataset now
    return dest


def unpack_once(archive: Path, cache: Path, check) -> Path:
    """--data some.zip: unpacked once into the cache folder, keyed by the zip's name, size and
    time."""
    st = archive.stat()
    key = hashlib.sha1(f"{archive.name} {st.st_size} {st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = cache / f"{archive.stem}-{key}"
    if not (dest / "audio").is_dir():
        print(f"unpacking {archive} into {dest}", flush=True)
        unpack_checked(archive, dest, check)
    return dest
