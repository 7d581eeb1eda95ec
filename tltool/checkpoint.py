"""Checkpoints: one `.pt` file that `torch.load(weights_only=True)` reads, written atomically.

Only tensors, lists, dicts, str/int/float/bool/None go in, so loading never runs code; every file that
tltool reads with torch.load (checkpoints, weights files, the torch hub cache) goes through `safe_load`.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from tltool import __version__
from tltool.distributed import current
from tltool.errors import CheckpointError

FORMAT_VERSION = 1
TEMP_MARKER = ".tmp-"


def is_tltool_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and {"format_version", "model", "arch", "class_names"} <= set(obj)


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # an unreadable file has no list to give; the caller reports it as invalid
        return []


def safe_load(path: str | Path, what: str = "checkpoint") -> Any:
    """torch.load with weights_only=True, turning every failure into a one-line CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist", "check the path")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a file", "give the path of a .pt file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is not a valid {what}: the file is empty", "use an intact copy")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"reading {path} needs the safetensors package", "pip install safetensors") from None
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a valid safetensors file: {exc}", "use an intact copy") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = _unsafe_globals(path)
        if names or "global" in str(exc).lower():
            listed = ", ".join(names) if names else str(exc).splitlines()[0]
            raise CheckpointError(
                f"{path} refused: its pickle needs globals that could run code ({listed})",
                "only load files from people you trust, and re-save them as plain tensors (state_dict)",
            ) from None
        raise CheckpointError(f"{path} is not a valid {what} ({exc})", "use an intact copy") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, KeyError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} is not a valid {what} (truncated or not a PyTorch file: {first})", "use an intact copy"
        ) from None


@dataclass
class Checkpoint:
    """The keys of a tltool checkpoint, defined once (format 1). The file is `to_dict()`, a plain dict.

    What eval, predict and export need comes first; the rest is what a run resumes from (see
    session.py: each stateful part of the training session fills its own keys). Old checkpoints of
    format 1 that lack a later-added key load with its default.
    """

    config: dict[str, Any]  # the resolved run config (Config.to_dict())
    class_names: list[str]
    preprocess: dict[str, Any]  # Preprocess.to_dict(): size, resize, mean, std, interpolation
    arch: dict[str, Any]  # how models.model_from_arch rebuilds the network (backbone, kwargs, head)
    model: dict[str, Any]  # state_dict of the unwrapped, uncompiled TransferModel (CPU tensors)
    weights_source: str = "checkpoint"  # where the starting weights came from (for messages)
    format_version: int = FORMAT_VERSION
    tltool_version: str = ""
    torch_version: str = ""
    # --- the run's state, for resume ---
    trainable: list[str] = field(default_factory=list)  # parameters that trained when it was saved
    frozen_modules: list[str] = field(default_factory=list)  # modules kept in eval mode
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimizer steps taken
    best_metric: float | None = None
    best_epoch: int | None = None
    early_stopping: dict[str, Any] = field(default_factory=lambda: {"bad_epochs": 0})
    epoch_progress: dict[str, Any] | None = None  # rank 0's sums of an unfinished epoch (mid-epoch save)
    metrics: dict[str, Any] = field(default_factory=dict)  # the last metrics.jsonl record
    rng: dict[str, Any] | None = None  # rank 0's random states
    world_size: int = 1
    rank_states: list[dict[str, Any]] | None = None  # every rank's {rng, epoch_progress} under torchrun
    transfer: dict[str, Any] | None = None  # the unfreeze plan: which parts opened at which step
    l2sp_reference: dict[str, Any] | None = None  # L2-SP's w0 (the backbone at the start of training)
    loss_terms: dict[str, Any] | None = None  # the state of loss terms other than L2-SP, by term name
    bn_stats: dict[str, Any] | None = None  # AdaBN: the backbone's batch-norm statistics {"source", "target"}
    initial_model: dict[str, Any] | None = None  # WiSE-FT's theta0: the model at the start of fine-tuning

    def to_dict(self) -> dict[str, Any]:
        """The dict that goes into the file (`torch.save`); read back by `from_dict`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def required(cls) -> list[str]:
        """The keys without a default: a file that lacks one cannot be read."""
        return [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Checkpoint:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    @property
    def mid_epoch(self) -> bool:
        return bool(self.epoch_progress)

    def rank_state(self, rank: int) -> dict[str, Any]:
        """Rank `rank`'s random states and epoch sums (rank 0's are the top-level keys)."""
        if self.rank_states:
            return self.rank_states[rank]
        return {"rng": self.rng, "epoch_progress": self.epoch_progress}


def load_checkpoint(path: str | Path) -> Checkpoint:
    """A tltool checkpoint, safely loaded and checked for the keys eval/export/predict need."""
    return as_checkpoint(safe_load(path, "tltool checkpoint"), path)


def as_checkpoint(obj: Any, path: str | Path) -> Checkpoint:
    """The Checkpoint of a safely loaded file, or a one-line CheckpointError naming what it lacks."""
    if not is_tltool_checkpoint(obj):
        raise CheckpointError(
            f"{path} is not a valid tltool checkpoint (no format_version/arch/model/class_names)",
            "give a checkpoints/last.pt or best.pt written by tltool finetune",
        )
    if obj["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {obj['format_version']}, newer than this tltool reads ({FORMAT_VERSION})",
            "upgrade tltool",
        )
    missing = [name for name in Checkpoint.required() if name not in obj]
    if missing:
        raise CheckpointError(
            f"{path} is not a valid tltool checkpoint (missing {', '.join(missing)})", "use an intact copy"
        )
    return Checkpoint.from_dict(obj)


def _fsync_dir(directory: Path) -> None:
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


def _write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write` into a temp file beside `path`, fsync it, rename it over `path`, fsync the directory.

    A crash at any point leaves either the old file or the new one, never a torn file; a failed write
    (a full disk) leaves the old file and no temp file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}")
    try:
        with open(temp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise CheckpointError(
            f"cannot write {path}: {exc.strerror or exc}",
            "free disk space or fix permissions; the previous checkpoint is untouched",
        ) from None


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save `obj` to `path` atomically (see `_write_atomic`)."""
    _write_atomic(Path(path), lambda handle: torch.save(obj, handle))


def copy_atomic(source: str | Path, target: str | Path) -> None:
    """Give a written checkpoint a second name with the same guarantees as `save_atomic`.

    A hard link where the filesystem has them: no bytes are copied (a resnet50 checkpoint is ~100 MB per
    epoch), and it stays a snapshot because checkpoints are never written in place, only replaced by
    `save_atomic` (the link keeps the old file). Elsewhere a copy.
    """
    source, target = Path(source), Path(target)
    temp = target.with_name(f".{target.name}{TEMP_MARKER}{os.getpid()}")
    temp.unlink(missing_ok=True)
    try:
        os.link(source, temp)
    except OSError:  # no hard links here (another filesystem, FAT, some network mounts): copy the bytes

        def copy(handle: BinaryIO) -> None:
            with open(source, "rb") as reader:
                shutil.copyfileobj(reader, handle, length=16 * 2**20)

        _write_atomic(target, copy)
        return
    try:
        os.replace(temp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise CheckpointError(
            f"cannot write {target}: {exc.strerror or exc}",
            "free disk space or fix permissions; the previous checkpoint is untouched",
        ) from None


def clean_stale_temps(directory: str | Path) -> list[Path]:
    """Remove temp files that a killed save left behind."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.name.startswith(".") and TEMP_MARKER in entry.name:
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


# --- RNG state, as plain tensors and lists ----------------------------------------------------------


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": _cuda_rng_states(),
    }


def _cuda_rng_states() -> list[torch.Tensor]:
    """Every visible GPU's generator; under torchrun only this rank's own (not a context on every GPU)."""
    if not torch.cuda.is_available():
        return []
    if current().enabled:
        return [torch.cuda.get_rng_state()]
    return torch.cuda.get_rng_state_all()


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if current().enabled:
            torch.cuda.set_rng_state(state["cuda"][0])  # this rank's GPU (see _cuda_rng_states)
        else:
            torch.cuda.set_rng_state_all(state["cuda"])


def versions() -> dict[str, str]:
    return {"tltool_version": __version__, "torch_version": str(torch.__version__)}
