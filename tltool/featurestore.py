"""The feature store: frozen-backbone features kept on disk across runs, under a size budget.

A second run on the same images with the same backbone (another head LR, method or seed), `tltool
baseline` and LP-FT's probe reuse the features an earlier run extracted instead of running the backbone
again. Entries are keyed by `features.cache_key` (everything the features depend on).

Where: `train.feature_cache_dir`, else `$TLTOOL_CACHE_DIR/features`, else `$XDG_CACHE_HOME/tltool/features`,
else `~/.cache/tltool/features`. Budget: `train.feature_cache_max_mb`, else `$TLTOOL_CACHE_MAX_MB`, else
10240 MB; after each new entry the least recently used ones (last used = the `.pt` file's mtime, set on
every reuse: atime is unreliable under relatime/noatime) are removed until the store fits. An entry larger
than the whole budget is not kept (the run keeps its features for itself, as without the store); 0 keeps
nothing between runs.

An entry is `<key>.pt` (`{"features": (views, N, D) float32, "labels": (N,) int64}`, torch.save) and
`<key>.json` (what it holds: shapes, file size, backbone, images; for `tltool cache list`).

Concurrency: a run takes `locks/<key>.lock` (fcntl.flock, as runlock.py) before it looks an entry up and
holds it while it extracts and publishes, so a second run of the same key waits and then reuses the entry
instead of extracting it again. Publishing writes the json, then the `.pt` to a temp file that is renamed
into place (files.write_atomic): a reader never sees a half-written `.pt`. Eviction and `cache clear` take
`locks/store.lock`. A reader that finds an entry whose file size or tensor shapes disagree with its json, or
that torch cannot load (a truncated file), warns in one line and extracts it again. Under torchrun rank 0
takes the lock and publishes; every rank reuses an entry only when all of them can read it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tltool import files
from tltool.errors import ConfigError, TltoolError

try:
    import fcntl
except ImportError:  # (Windows: no lock; concurrent runs of one key may both extract, publishing stays atomic)
    fcntl = None  # type: ignore[assignment]

DEFAULT_MAX_MB = 10240
STALE_TEMP_SECONDS = 3600  # a temp file not written to for an hour belongs to a writer that died
STORE_FIX = "set train.feature_cache_dir (or TLTOOL_CACHE_DIR) to a writable folder, or free disk space"
Warn = Callable[[str], None]


class StoreError(TltoolError):
    """The feature store's folder or settings are unusable."""


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def store_root(configured: str | None = None) -> tuple[Path, bool]:
    """The store's folder and whether the user chose it (the key or TLTOOL_CACHE_DIR) rather than the default."""
    if configured:
        return Path(configured).expanduser(), True
    if os.environ.get("TLTOOL_CACHE_DIR"):
        return Path(os.environ["TLTOOL_CACHE_DIR"]).expanduser() / "features", True
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tltool" / "features", False


def budget_mb(configured: int | None = None) -> int:
    """The store's size budget in MB: the key, else TLTOOL_CACHE_MAX_MB, else DEFAULT_MAX_MB."""
    if configured is not None:
        return configured
    text = os.environ.get("TLTOOL_CACHE_MAX_MB", "").strip()
    if not text:
        return DEFAULT_MAX_MB
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(
            f"TLTOOL_CACHE_MAX_MB={text!r} is not a size in MB", "set it to a whole number >= 0, or unset it"
        )
    return value


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors: names, dtypes, shapes and bytes (the backbone's state: weights and buffers).

    This is the weights' identity, whatever they came from (a torchvision or timm download, a state_dict file,
    a checkpoint, AdaBN's statistics): measured on a loaded 2-core machine, 30-45 ms for MobileNetV2 (14 MB),
    0.2-0.35 s for ResNet-50 (98 MB), paid once per run that uses the cache.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def module_digest(module: nn.Module) -> str:
    return tensor_digest(dict(module.state_dict()))


@dataclass(frozen=True)
class Entry:
    """One stored entry as `tltool cache list` shows it."""

    key: str
    size: int  # bytes of the .pt file
    last_used: float  # its mtime
    meta: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "bytes": self.size, "last_used": self.last_used, **self.meta}


@dataclass
class Fetched:
    """What `FeatureStore.fetch` found or built: the tensors, whether they were reused, and the file they map."""

    tensors: dict[str, torch.Tensor]
    reused: bool
    path: Path | None  # the entry's file when the tensors are memory-mapped from it, else None (in memory)
    stored: bool  # whether the store holds them now (False: larger than the whole budget)


def _flock(path: Path) -> int:
    """Open `path` and wait for its exclusive flock; the file the path names when we got it (see runlock.py)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # no flock on this file system
                return fd
            os.close(fd)
            raise
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # `cache clear` removed the file while we waited: lock the new one


def _busy(path: Path) -> bool:
    """Whether another process holds the flock of `path` now (without waiting)."""
    if fcntl is None or not path.exists():
        return False
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)
    return False


class FeatureStore:
    """The entries under `root`, at most `max_bytes` in all."""

    def __init__(self, root: Path, max_bytes: int, warn: Warn | None = None) -> None:
        self.root, self.max_bytes, self.warn = Path(root), max_bytes, warn or _stderr

    # --- paths and locks ---

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def meta_path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def _lock_path(self, name: str) -> Path:
        return self.root / "locks" / f"{name}.lock"

    @contextlib.contextmanager
    def locked(self, name: str, waiting: str | None = None) -> Iterator[None]:
        path = self._lock_path(name)
        files.make_folder(path.parent, StoreError, STORE_FIX)
        if waiting and _busy(path):
            self.warn(waiting)
        with files.reported_writes(path, StoreError, STORE_FIX):
            fd = _flock(path)
        try:
            yield
        finally:
            os.close(fd)  # (the flock goes with the descriptor)

    # --- reading ---

    def read(self, key: str, mmap: bool, warn: bool = True) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or None when there is none or it is damaged (then, with `warn`, one line)."""
        path, meta_path = self.path(key), self.meta_path(key)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            return self._damaged(key, f"its description cannot be read ({exc})", warn)
        if size != meta.get("bytes"):
            return self._damaged(key, f"{path} has {size} bytes, {meta.get('bytes')} were written", warn)
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except FileNotFoundError:  # (evicted between the stat and the load)
            return None
        except Exception as exc:  # noqa: BLE001  (a torn or foreign file: whatever torch raises)
            return self._damaged(key, f"torch cannot load {path} ({str(exc).splitlines()[0][:120]})", warn)
        problem = _shape_problem(tensors, meta)
        if problem is not None:
            return self._damaged(key, problem, warn)
        return tensors

    def _damaged(self, key: str, why: str, warn: bool) -> None:
        if warn:
            self.warn(f"warning: feature cache entry {key} is damaged ({why}): extracting its features again")
        return None

    def touch(self, key: str) -> None:
        """Record a reuse (the least recently used entries are evicted first)."""
        with contextlib.suppress(OSError):
            os.utime(self.path(key))

    # --- writing ---

    def publish(self, key: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bool:
        """Store `tensors` under `key` (atomically), then evict down to the budget; False when they alone exceed it."""
        files.make_folder(self.root, StoreError, STORE_FIX)
        size = _saved_size(tensors)
        if size > self.max_bytes:
            return False
        path = self.path(key)
        meta = {**meta, "key": key, "shape": list(tensors["features"].shape), "created": time.time()}
        temp = files.temp_path(path)
        with files.reported_writes(path, StoreError, STORE_FIX):
            try:
                with open(temp, "wb") as handle:
                    torch.save(tensors, handle)
                    handle.flush()
                    os.fsync(handle.fileno())
                meta["bytes"] = temp.stat().st_size
                # The json first: a .pt without its json is never read, a json without its .pt is no entry.
                files.write_text_atomic(self.meta_path(key), json.dumps(meta, indent=1), StoreError, STORE_FIX)
                os.replace(temp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    temp.unlink(missing_ok=True)
                raise
            files.fsync_dir(self.root)
        self.evict(keep=key)
        return True

    def fetch(
        self,
        key: str,
        meta: dict[str, Any],
        build: Callable[[], dict[str, torch.Tensor]],
        memory_bytes: int,
    ) -> Fetched:
        """The entry of `key` (memory-mapped when larger than `memory_bytes`), or `build()` it and store it.

        Collective under torchrun (`build` is: every rank extracts its shard); rank 0 locks and publishes.
        """
        from tltool.distributed import any_rank, barrier, current

        world = current()
        waiting = f"feature cache: another run is extracting these features ({key}); waiting for it to reuse them"
        lock = self.locked(key, waiting) if world.is_main else contextlib.nullcontext()
        with lock:
            size = _file_size(self.path(key))
            stored = self.read(key, mmap=size > memory_bytes, warn=world.is_main)
            missing = stored is None
            if world.enabled:
                missing = any_rank(missing)[0]
            if not missing:
                if world.is_main:
                    self.touch(key)
                return Fetched(stored, True, self.path(key) if size > memory_bytes else None, True)
            tensors = build()
            published = self.publish(key, meta, tensors) if world.is_main else False
            if world.enabled:
                barrier()
                published = any_rank(published)[0]
        if published and _saved_size(tensors) > memory_bytes:
            mapped = self.read(key, mmap=True)
            if mapped is not None:  # (under torchrun a rank that cannot see rank 0's folder keeps its copy)
                return Fetched(mapped, False, self.path(key), True)
        return Fetched(tensors, False, None, published)

    # --- listing, eviction, clearing ---

    def entries(self) -> list[Entry]:
        """Every complete entry, most recently used first."""
        out = []
        if not self.root.is_dir():
            return out
        for meta_path in self.root.glob("*.json"):
            key = meta_path.stem
            try:
                info = self.path(key).stat()
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            out.append(Entry(key, info.st_size, info.st_mtime, meta))
        return sorted(out, key=lambda e: e.last_used, reverse=True)

    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.entries())

    def _remove(self, key: str) -> None:
        for path in (self.path(key), self.meta_path(key)):  # (the .pt first: no moment with a .pt and no json)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove the least recently used entries (never `keep`) until the store fits its budget; stale temps."""
        removed = []
        with self.locked("store"):
            entries = self.entries()
            total = sum(e.size for e in entries)
            for entry in reversed(entries):  # oldest first
                if total <= self.max_bytes:
                    break
                if entry.key == keep:
                    continue
                self._remove(entry.key)
                total -= entry.size
                removed.append(entry.key)
            self._clean_leftovers()
        return removed

    def _clean_leftovers(self) -> None:
        """Temp files of writers that died, and json files whose .pt is gone (a removal cut short)."""
        now = time.time()
        for path in self.root.iterdir():
            with contextlib.suppress(OSError):
                age = now - path.stat().st_mtime
                dead_temp = files.TEMP_MARKER in path.name and age > STALE_TEMP_SECONDS
                if dead_temp or (path.suffix == ".json" and not self.path(path.stem).exists() and age > 60):
                    path.unlink()

    def clear(self, keys: list[str] | None = None) -> list[Entry]:
        """Remove the given entries (all when None), each under its key's lock (one being written is waited for)."""
        chosen = [e for e in self.entries() if keys is None or e.key in keys]
        for entry in chosen:
            with self.locked(entry.key), self.locked("store"):
                self._remove(entry.key)
                with contextlib.suppress(OSError):  # (removed while held: a waiter then locks a fresh file, _flock)
                    self._lock_path(entry.key).unlink()
        return chosen


def _shape_problem(tensors: Any, meta: dict[str, Any]) -> str | None:
    if not isinstance(tensors, dict) or not {"features", "labels"} <= set(tensors):
        return "it holds no features and labels"
    features, labels = tensors["features"], tensors["labels"]
    if features.dtype != torch.float32 or labels.dtype != torch.int64:
        return f"dtypes {features.dtype} / {labels.dtype}, not float32 / int64"
    if list(features.shape) != meta.get("shape") or features.dim() != 3:
        return f"features of shape {list(features.shape)}, {meta.get('shape')} were written"
    if labels.shape != (features.shape[1],):
        return f"{labels.numel()} labels for {features.shape[1]} feature rows"
    return None


def _saved_size(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def format_entries(store: FeatureStore) -> str:
    """`tltool cache list`: one line per entry, most recently used first, and the total against the budget."""
    entries = store.entries()
    header = f"{'key':24}  {'backbone':22} {'part':5} {'transform':14} {'images':>6} {'size':>9}  {'last used':16}"
    lines = [header + "  data"]
    for entry in entries:
        meta = entry.meta
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        lines.append(
            f"{entry.key:24}  {str(meta.get('backbone', '?')):22} {str(meta.get('kind', '?')):5} "
            f"{str(meta.get('transform', '?')):14} {meta.get('images', '?'):>6} {files.size_text(entry.size):>9}  "
            f"{used:16}  {meta.get('data', '')}"
        )
    total = sum(entry.size for entry in entries)
    count = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
    lines.append(f"{count}, {files.size_text(total)} of {files.size_text(store.max_bytes)} in {store.root}")
    return "\n".join(lines if entries else lines[-1:])


def open_store(feature_cache_dir: str | None, max_mb: int | None, warn: Warn | None = None) -> FeatureStore | None:
    """The store of these settings, or None when it cannot be used.

    A folder the user chose (`train.feature_cache_dir`, TLTOOL_CACHE_DIR) that cannot be created or written is
    one error line; the default one (a read-only home) is a warning, and the run keeps its features to itself.
    """
    warn = warn or _stderr
    root, chosen = store_root(feature_cache_dir)
    store = FeatureStore(root, budget_mb(max_mb) * 2**20, warn)
    try:
        # (the folders first: check_writable removes the folders it creates, under a concurrent run's feet)
        files.make_folder(root / "locks", StoreError, STORE_FIX)
        files.check_writable(root / "locks" / "store.lock", StoreError, STORE_FIX)
    except StoreError as exc:
        if chosen:
            raise StoreError(f"feature cache: {exc.what}", STORE_FIX) from None
        warn(f"warning: feature cache {root} is not usable ({exc.what}): features are kept for this run only")
        return None
    return store
