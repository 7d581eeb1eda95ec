"""The header check's verdicts, remembered: a later scan of the same unchanged files reads no header.

Every run, `tltool eval`, `predict` and each trial of a sweep checks the header of every image before it trains
(`folders.check_images`), which at 10^5 files takes seconds even from the page cache. A verdict depends on
the file's bytes only, so once a list of files has been checked its result is kept, keyed by each file's
identity: absolute path, size, modification time (ns) and inode, with Pillow's version and this module's
`VERSION` (a new reader may judge a file differently). A later check of the same list stats every file,
finds the key and reuses the verdicts; one changed, added or removed file changes the key and the whole list
is read again. What it cannot see is a file rewritten in place to the same size within the filesystem's
timestamp granularity (the feature store's keys share that limit).

Where: `$TLTOOL_CACHE_DIR/checked`, else `$XDG_CACHE_HOME/tltool/checked`, else `~/.cache/tltool/checked`: one
small JSON file per checked list of at least MIN_FILES files (the paths found bad and why; usually empty), the
newest MAX_RECORDS kept. It is a cache: a folder that
cannot be read or written only means the headers are read, never an error. `TLTOOL_NO_CHECK_MEMO=1` turns it
off; `tltool doctor` never uses it (reading every header is its job).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import PIL

from tltool import files

VERSION = 1
OFF_ENV = "TLTOOL_NO_CHECK_MEMO"
MIN_FILES = 256  # shorter lists are read again each time (0.1 s at most): no record for every small eval or predict
MAX_RECORDS = 1000  # the newest kept; older records are removed when a new one is written
Verdicts = list[tuple[str, str]]  # (path, why) of the files found unusable


def memo_root() -> Path | None:
    """The memo's folder, or None when `TLTOOL_NO_CHECK_MEMO` is set."""
    if os.environ.get(OFF_ENV, "").strip() not in ("", "0"):
        return None
    if os.environ.get("TLTOOL_CACHE_DIR"):
        return Path(os.environ["TLTOOL_CACHE_DIR"]).expanduser() / "checked"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tltool" / "checked"


def _identities(paths: Sequence[str]) -> list[str]:
    rows = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            rows.append(f"{os.path.abspath(path)}\0missing")
            continue
        rows.append(f"{os.path.abspath(path)}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_ino}\0{info.st_mode}")
    return rows


def list_key(paths: Sequence[str]) -> str:
    """The key of checking `paths`, in their order: every file's identity (one stat each, in this thread: 0.1 s
    per 20,000 cached files here, and no faster on a thread pool)."""
    digest = hashlib.sha256(f"tltool-header-check {VERSION} pillow {PIL.__version__}\n".encode())
    for row in _identities(paths):
        digest.update(row.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()[:40]


def recall(key: str) -> Verdicts | None:
    """The verdicts remembered under `key`, or None (never checked, unreadable, or from another format)."""
    root = memo_root()
    if root is None:
        return None
    try:
        record = json.loads((root / f"{key}.json").read_text())
        if record.get("version") != VERSION:
            return None
        return [(str(path), str(why)) for path, why in record["bad"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember(key: str, bad: Verdicts) -> None:
    """Keep `bad` under `key` (atomically; a failure to write is ignored: the next check reads the headers)."""
    root = memo_root()
    if root is None:
        return
    text = json.dumps({"version": VERSION, "bad": [list(item) for item in bad]}).encode()
    with contextlib.suppress(Exception):
        files.write_atomic(root / f"{key}.json", lambda handle: handle.write(text))
        _prune(root)


def _prune(root: Path) -> None:
    """Remove the oldest records past MAX_RECORDS (by modification time: a record is written once)."""
    records = [entry for entry in os.scandir(root) if entry.name.endswith(".json")]
    if len(records) <= MAX_RECORDS:
        return
    records.sort(key=lambda entry: entry.stat().st_mtime_ns)
    for entry in records[: len(records) - MAX_RECORDS]:
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
