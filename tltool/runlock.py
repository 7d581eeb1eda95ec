"""The run-directory lock: one `tltool finetune` at a time writes a run directory.

Two runs on one directory (a re-submitted job, a second terminal) would interleave metrics.jsonl and leave
best.pt and last.pt from different runs. `finetune` (rank 0 under torchrun) takes the lock before it
writes anything and holds it to the end; a second run is refused with one line naming the holder.

How: `run_dir/.tltool.lock` is opened and `fcntl.flock(LOCK_EX | LOCK_NB)`-ed. The kernel drops a flock
when its process dies in any way (kill -9, OOM killer, a torchrun restart), so a dead run never blocks
the next one. The file also holds the holder's pid, host, process start time and start date: for the
message, and as a second check where flock is not shared between hosts (NFS mounted with `nolock`,
some cluster filesystems): a record of another host is respected even when its flock is not seen here
(the message says how to remove it if that host is gone); a record of this host whose process is dead
(or whose pid now belongs to another process) is stale and taken over with a one-line warning. A clean
release removes the file (under the flock; a taker checks that the path still names the file it locked).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tltool import files
from tltool.errors import TltoolError, TrainingError

LOCK_NAME = ".tltool.lock"
LOCK_FIX = "fix the permissions of the run directory, free disk space, or set run.output_dir elsewhere"

try:
    import fcntl
except ImportError:  # (Windows: the pid/host record alone)
    fcntl = None  # type: ignore[assignment]


class RunLocked(TltoolError):
    """Another run holds the run directory."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: read from the lock file (fields are None when it is empty or torn)."""

    pid: int | None = None
    host: str | None = None
    since: str | None = None
    start_ticks: int | None = None  # the process's start time (/proc/<pid>/stat field 22): tells pid reuse

    @classmethod
    def read(cls, text: str) -> Holder:
        try:
            data = json.loads(text)
            return cls(int(data["pid"]), str(data["host"]), str(data["since"]), data.get("start_ticks"))
        except (ValueError, KeyError, TypeError):
            return cls()

    def describe(self) -> str:
        if self.pid is None:
            return "another process (it has not written its name yet)"
        return f"pid {self.pid} on host {self.host}, since {self.since}"


def _start_ticks(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of process `pid` from /proc; None when it does not exist or no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # (the command name may hold spaces and parentheses)
    return fields[0], int(fields[19])


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether process `pid` of this host is alive and (given its start time) still the same process."""
    if Path("/proc/self/stat").exists():
        found = _start_ticks(pid)
        if found is None or found[0] in ("Z", "X"):  # gone, or dead but not yet reaped by its parent
            return False
        return start_ticks is None or found[1] == start_ticks
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The held lock of one run directory; `release()` removes it (also after a failed start)."""

    def __init__(self, path: Path, fd: int, created: list[Path]) -> None:
        self.path, self.fd, self.created = path, fd, created

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # (while still holding the flock: a waiting taker sees the path is gone)
        os.close(self.fd)
        self.fd = -1
        for folder in reversed(self.created):  # folders this run created and left empty (a failed start)
            with contextlib.suppress(OSError):
                folder.rmdir()


def _open_and_flock(path: Path) -> tuple[int, bool]:
    """Open (create) `path` and try its flock: (fd, whether this process now holds it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is None:
        return fd, True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return fd, False
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # no flock here: the record alone
            return fd, True
        raise
    return fd, True


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _refusal(run_dir: Path, path: Path, holder: Holder, same_host: bool) -> RunLocked:
    if same_host or holder.pid is None:
        fix = (
            f"wait for it to finish, or stop it (kill -TERM {holder.pid} saves and stops it) and continue with "
            "--resume auto; for a new run set run.name (or run.output_dir)"
            if holder.pid is not None
            else "wait for it to finish, or set run.name (or run.output_dir) for a new run"
        )
    else:
        fix = (
            f"wait for it to finish, or stop it on {holder.host}; if that host is down and the run gone, remove {path}"
        )
    return RunLocked(f"{run_dir} is in use by another tltool run ({holder.describe()})", fix)


def acquire(run_dir: Path, warn: Callable[[str], None] | None = None) -> RunLock:
    """Take the lock of `run_dir` (created if missing) or raise RunLocked naming the holder; nothing is changed
    when refused. A stale lock of this host (its process dead) is taken over with a warning (`warn`)."""
    warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
    created = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()][::-1]
    files.make_folder(run_dir, TrainingError, LOCK_FIX)  # (a path through a file, a read-only disk: one line)
    path = run_dir / LOCK_NAME
    host = socket.gethostname()
    for _ in range(20):  # (retried only while a releasing holder removes the file under our feet)
        with files.reported_writes(path, TrainingError, LOCK_FIX):
            fd, locked = _open_and_flock(path)
        try:
            if not locked:
                time.sleep(0.05)  # (a holder writes its record right after its flock: read it whole)
                raise _refusal(run_dir, path, Holder.read(_read(fd)), same_host=True)
            try:
                same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the holder released it between our open and flock: try the new file
                os.close(fd)
                continue
            holder = Holder.read(_read(fd))
            if holder.pid is not None:
                if holder.host != host:
                    raise _refusal(run_dir, path, holder, same_host=False)
                if holder.pid != os.getpid() and process_alive(holder.pid, holder.start_ticks):
                    # its flock is not seen here (a filesystem without flock): the record decides
                    raise _refusal(run_dir, path, holder, same_host=True)
                warn(f"warning: {run_dir} was locked by a run that is gone ({holder.describe()}): taking it over")
            mine = _start_ticks(os.getpid())
            record = {
                "pid": os.getpid(),
                "host": host,
                "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "start_ticks": mine[1] if mine else None,
                "command": sys.argv,
            }
            with files.reported_writes(path, TrainingError, LOCK_FIX):
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, (json.dumps(record) + "\n").encode())
                os.fsync(fd)
            return RunLock(path, fd, created)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
    raise RunLocked(f"{run_dir}: its lock file keeps changing", "another run is starting there; try again")


def read_holder(run_dir: Path) -> Holder | None:
    """The holder recorded in `run_dir`'s lock file (None: no lock file)."""
    try:
        return Holder.read((run_dir / LOCK_NAME).read_text())
    except OSError:
        return None


@contextlib.contextmanager
def held(run_dir: Path | None, warn: Callable[[str], None] | None = None) -> Iterator[Any]:
    """The lock of `run_dir` for the duration of the block (None: no lock, e.g. a dry run or rank > 0)."""
    lock = acquire(run_dir, warn) if run_dir is not None else None
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
