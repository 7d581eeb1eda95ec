"""Files written so that a failure is one line and leaves nothing half-written behind.

Every file tltool writes goes through here: checkpoints, config.yaml, classes.json, metrics.jsonl,
summary.json, exports, `eval --json`, `predict --csv`. A full disk, a read-only file system, a missing
permission or a path that runs through a file then gives the same one-line `TltoolError` (exit 2) naming
the file, the temp file of the write is removed, and the file that was there before is untouched.

torch does not always raise an OSError: when its zip writer hits a full disk it raises a RuntimeError
(`[enforce fail at inline_container.cc] unexpected pos`, `PytorchStreamWriter failed writing file`,
`basic_ios::clear: iostream error`), sometimes with the OSError only in the exception's context.
`failure_reason` recognises both, so no caller has to.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from tltool.errors import TltoolError

TEMP_MARKER = ".tmp-"  # a temp file is `.<name>.tmp-<pid>` beside its target
WRITE_FIX = "free disk space, fix the permissions or pick another path; files already written are untouched"
# What torch's own writer says when the file system fails under it (it does not keep the errno).
TORCH_WRITE_FAILURES = (
    "PytorchStreamWriter failed",
    "inline_container",
    "unexpected pos",
    "iostream error",
    "file write failed",
)
# Below this many free bytes a write failure that names no cause is reported as a full disk.
NEARLY_FULL_BYTES = 1 << 20


class FileWriteError(TltoolError):
    """A file cannot be written: a full disk, a read-only file system, permissions, a path through a file."""


def temp_path(path: Path, suffix: str = "") -> Path:
    """The hidden temp name beside `path` that an atomic write uses (`suffix` keeps an extension readers need)."""
    return path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}{suffix}")


def _free_bytes(path: Path | None) -> int | None:
    """Free bytes on the file system of `path` (its nearest existing ancestor), or None when unknown."""
    if path is None:
        return None
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _oserror_in_chain(exc: BaseException) -> OSError | None:
    """The first OSError among `exc`, its cause and its context (torch re-raises without `from`)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def failure_reason(exc: BaseException, path: Path | None = None) -> str | None:
    """Why a write failed, in a few words, when `exc` is a filesystem failure; None for anything else.

    A filesystem failure is an OSError, or a RuntimeError of torch's writer (around an OSError, or with
    its own wording). `path` lets a failure that names no cause be called a full disk when it is one.
    """
    if not isinstance(exc, OSError | RuntimeError):
        return None
    found = _oserror_in_chain(exc)
    if found is not None:
        if found.errno == errno.ENOSPC:
            return "no space left on device"
        reason = found.strerror or str(found) or type(found).__name__
        if found.filename and path is not None and Path(os.fsdecode(found.filename)) != path:
            reason += f" ({os.fsdecode(found.filename)})"
        return reason
    message = str(exc)
    if not any(marker in message for marker in TORCH_WRITE_FAILURES):
        return None
    free = _free_bytes(path)
    if free is not None and free < NEARLY_FULL_BYTES:
        return "no space left on device"
    return "the file system failed the write (full disk or a failing device?)"


@contextlib.contextmanager
def reported_writes(
    path: Path, error: type[TltoolError] = FileWriteError, fix: str = WRITE_FIX, what: str = ""
) -> Iterator[None]:
    """Turn a filesystem failure inside the block into one `error` line naming `path` (`what`, if given).

    Any other exception passes through unchanged: it is a bug, and its traceback is wanted.
    """
    try:
        yield
    except (OSError, RuntimeError) as exc:
        reason = failure_reason(exc, path)
        if reason is None:
            raise
        raise error(f"cannot write {what or path}: {reason}", fix) from None


def path_problem(path: Path, want: str = "file") -> str | None:
    """What is wrong with `path` for something that should be a `want` ("file" or "folder"), or None.

    The words say what is there: "does not exist", "is a folder", "is a FIFO (named pipe)", "is a
    symbolic link loop", ... (so that a FIFO is never reported as missing, nor opened and waited on).
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            return f"is a broken symbolic link (to {os.readlink(path)})"
        return "does not exist"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if exc.errno == errno.ENOTDIR:
            return "does not exist (a part of its path is a file)"
        return f"cannot be read ({exc.strerror or exc})"
    mode = info.st_mode
    if stat.S_ISDIR(mode):
        return None if want == "folder" else "is a folder"
    if stat.S_ISREG(mode):
        return None if want == "file" else "is a file, not a folder"
    if stat.S_ISFIFO(mode):
        kind = "a FIFO (named pipe)"
    elif stat.S_ISSOCK(mode):
        kind = "a socket"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "a device"
    else:
        kind = "not a regular file"
    return f"is {kind}, not a {want}"


def make_folder(directory: Path, error: type[TltoolError] = FileWriteError, fix: str = WRITE_FIX) -> None:
    """Create `directory` and its parents; one `error` line when it or an ancestor is a file (or unwritable)."""
    for candidate in (directory, *directory.parents):
        if candidate.exists() or candidate.is_symlink():
            problem = path_problem(candidate, "folder")
            if problem is not None:
                raise error(f"cannot create {directory}: {candidate} {problem}", "give a folder path")
            break
    with reported_writes(directory, error, fix):
        directory.mkdir(parents=True, exist_ok=True)


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (best effort: some file systems cannot open a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(
    path: str | Path,
    write: Callable[[BinaryIO], None],
    error: type[TltoolError] = FileWriteError,
    fix: str = WRITE_FIX,
) -> None:
    """`write` into a temp file beside `path`, fsync it, rename it over `path`, fsync the folder.

    A crash at any point leaves either the old file or the new one, never a torn one. A failure of the
    write (any exception) removes the temp file; a filesystem failure becomes one `error` line.
    """
    path = Path(path)
    make_folder(path.parent, error, fix)
    temp = temp_path(path)
    with reported_writes(path, error, fix):
        try:
            with open(temp, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)


def write_text_atomic(
    path: str | Path, text: str, error: type[TltoolError] = FileWriteError, fix: str = WRITE_FIX
) -> None:
    """Write `text` (UTF-8) to `path` atomically (see `write_atomic`)."""
    data = text.encode("utf-8")
    write_atomic(path, lambda handle: handle.write(data), error, fix)


def append_durable(
    path: str | Path, text: str, error: type[TltoolError] = FileWriteError, fix: str = WRITE_FIX
) -> None:
    """Append `text` (UTF-8) to `path` and fsync it: once this returns, the text survives a crash or power loss.

    A failed append (a full disk) is cut back off, so the file ends where it did; only a kill in the middle
    of the write can leave a torn tail, which readers of append-only files must tolerate.
    """
    path = Path(path)
    make_folder(path.parent, error, fix)
    data = memoryview(text.encode("utf-8"))
    with reported_writes(path, error, fix):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.fstat(fd).st_size
            try:
                while data:
                    data = data[os.write(fd, data) :]
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


def check_writable(path: str | Path, error: type[TltoolError] = FileWriteError, fix: str = WRITE_FIX) -> None:
    """Fail now, in one line, if `path` could not be written later (e.g. before a long evaluation).

    Creates the missing parent folders and a temp file beside `path`, then removes both again: nothing is
    left behind (a later failure of another input leaves no empty folder); the target is not touched.
    """
    path = Path(path)
    if path.exists() and path_problem(path) is not None:
        raise error(f"cannot write {path}: it {path_problem(path)}", "give a file path")
    missing = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    make_folder(path.parent, error, fix)
    temp = temp_path(path)
    try:
        with reported_writes(path, error, fix), open(temp, "wb"):
            pass
    finally:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        for folder in missing:  # (innermost first)
            with contextlib.suppress(OSError):
                folder.rmdir()


def size_text(num_bytes: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as file managers show them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"  # unreachable; keeps the type checker sure of a return


def check_free_space(
    directory: str | Path, needed: int, what: str, error: type[TltoolError] = FileWriteError, fix: str = WRITE_FIX
) -> None:
    """One `error` line when the file system of `directory` has fewer than `needed` bytes free for `what`.

    Asked before work that would fail at its end (a save after an epoch), not as a guarantee: other
    processes share the disk. Unknown free space (an odd file system) passes.
    """
    free = _free_bytes(Path(directory))
    if free is not None and free < needed:
        raise error(f"{directory} has {size_text(free)} free; {what} needs about {size_text(needed)}", fix)


def clean_stale_temps(directory: str | Path) -> list[Path]:
    """Remove the temp files that writes killed in the middle (kill -9, power loss) left in `directory`."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.name.startswith(".") and TEMP_MARKER in entry.name and entry.is_file():
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry)
    return removed
