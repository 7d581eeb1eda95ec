"""Checkpoints: one `.pt` file that `torch.load(weights_only=True)` reads, written atomically.

Only tensors, lists, dicts, str/int/float/bool/None go in, so loading never runs code; every file that
tltool reads with torch.load (checkpoints, weights files, the torch hub cache) goes through `safe_load`.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import random
import re
import shutil
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from tltool import __version__
from tltool.distributed import barrier, current
from tltool.errors import CheckpointError
from tltool.files import TEMP_MARKER as TEMP_MARKER  # re-exported: where checkpoint temp files are recognised
from tltool.files import clean_stale_temps as clean_stale_temps
from tltool.files import fsync_dir, path_problem, reported_writes, temp_path, write_atomic

FORMAT_VERSION = 1


def is_tltool_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and {"format_version", "model", "arch", "class_names"} <= set(obj)


ZIP_MAGIC = b"PK\x03\x04"
# The start of a torch.save file of the old (pre-1.6, non-zip) format: pickle protocol 2, torch's magic number.
LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"
INTACT_COPY = "use an intact copy"
NOT_PYTORCH_FIX = "give a .pt file written by tltool finetune or torch.save"
REFUSED_FIX = (
    "only open files from people you trust, and have them re-saved as plain tensors "
    "(torch.save(model.state_dict(), path))"
)
# The pickle opcodes that push a string (the module and name a STACK_GLOBAL takes from the stack).
_STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _pickle_globals(path: Path, limit: int = 1 << 20) -> list[str]:
    """The globals (module.name) a plain pickle would import, read from its opcodes; nothing is executed."""
    names: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as handle:
            for opcode, arg, _ in pickletools.genops(io.BytesIO(handle.read(limit))):
                if opcode.name in _STRING_OPCODES:
                    strings.append(str(arg))
                elif opcode.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # a damaged or cut pickle: the names read so far are what can be told
        pass
    return list(dict.fromkeys(names))


def _first_pickled_value(head: bytes) -> Any:
    """The argument of the first value-pushing opcode of a pickle's first bytes (torch's magic number in an
    old-format torch.save file), or None; read from the opcodes, nothing is executed."""
    try:
        for opcode, arg, _ in pickletools.genops(io.BytesIO(head)):
            if opcode.name not in ("PROTO", "FRAME"):
                return arg
    except Exception:  # the first bytes only: a cut opcode ends the look
        return None
    return None


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a torch.save file needs that weights_only refuses (they could run code)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # a file torch cannot list: the caller reports it as damaged
        return []


def _torch_cause(exc: BaseException) -> str:
    """A few words of torch's reason for a failed load: its first sentence, never its weights_only advice."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)
    text = re.sub(r"^PytorchStreamReader failed\s*", "", text).split(". ")[0].rstrip(".")
    if "weights_only" in text or not text:
        return type(exc).__name__
    return text[:120]


def _what_it_is(head: bytes) -> str:
    """What a file that is not a PyTorch file looks like, from its first bytes."""
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "a JSON file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text[:-4]):
        return "a text file"
    return "not a PyTorch file (unknown bytes)"


TORCH_SAVE = "torch.save"


def archive_entries(path: Path) -> list[str] | None:
    """The names inside a zip file, or None when it is not one (or a damaged one)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def archive_kind(entries: list[str]) -> str:
    """What a zip of these entries is: "exported-program", "torchscript", "torch.save" (a checkpoint) or "other".

    TorchScript archives and checkpoints both hold `data.pkl`; TorchScript also `code/` and `constants.pkl`,
    an ExportedProgram `archive_format`.
    """
    if any(name.endswith("/archive_format") for name in entries):
        return "exported-program"
    if any(name.endswith("/constants.pkl") or "/code/" in name for name in entries):
        return "torchscript"
    if any(name.endswith("data.pkl") for name in entries):
        return TORCH_SAVE
    return "other"


ARCHIVE_NAMES = {
    "exported-program": "an ExportedProgram (.pt2) export, not a checkpoint (tltool predict runs it)",
    "torchscript": "a TorchScript export, not a checkpoint (tltool predict runs it)",
    "other": "a zip archive that is not a PyTorch file",
}


def safe_load(path: str | Path, what: str = "checkpoint") -> Any:
    """torch.load with weights_only=True; every failure is one CheckpointError line that says which it is.

    Not a PyTorch file (text, JSON, a plain pickle, another archive), truncated or damaged, or refused
    (its pickle names globals that could run code: they are listed). Never is the user told to retry
    with weights_only=False, and the file is only sniffed and parsed, never executed.
    """
    path = Path(path)
    problem = path_problem(path)
    if problem is not None:
        raise CheckpointError(f"{what} {path} {problem}", "check the path" if "exist" in problem else "give a .pt file")
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc.strerror or exc}", "check its permissions") from None
    if not head:
        raise CheckpointError(f"{path} is not a valid {what}: the file is empty", INTACT_COPY)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if head.startswith(ZIP_MAGIC):
        entries = archive_entries(path)
        kind = archive_kind(entries) if entries is not None else TORCH_SAVE  # damaged: torch.load names how
        if kind != TORCH_SAVE:
            raise CheckpointError(f"{path} is not a valid {what}: it is {ARCHIVE_NAMES[kind]}", NOT_PYTORCH_FIX)
    elif head.startswith(b"\x80") and not head.startswith(LEGACY_MAGIC):
        if _first_pickled_value(head) == torch.serialization.MAGIC_NUMBER:
            raise CheckpointError(
                f"{path} is not a valid {what}: an old-format torch.save file with pickle protocol {head[1]}, "
                "which safe loading cannot read",
                "have it re-saved with torch.save in the default format (from a source you trust)",
            )
        names = _pickle_globals(path)
        called = f"; it would import {', '.join(names[:5])}" if names else ""
        raise CheckpointError(f"{path} refused: a plain Python pickle, not a PyTorch checkpoint{called}", REFUSED_FIX)
    elif not head.startswith(LEGACY_MAGIC):
        raise CheckpointError(f"{path} is not a valid {what}: it is {_what_it_is(head)}", NOT_PYTORCH_FIX)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = _unsafe_globals(path) or _named_global(exc)
        if names:
            raise CheckpointError(
                f"{path} refused: its pickle needs globals that could run code ({', '.join(names[:5])})", REFUSED_FIX
            ) from None
        raise CheckpointError(f"{path} is not a valid {what}: damaged ({_torch_cause(exc)})", INTACT_COPY) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError, ...: all mean a damaged file
        raise CheckpointError(
            f"{path} is not a valid {what}: truncated or damaged ({_torch_cause(exc)})", INTACT_COPY
        ) from None


def _named_global(exc: BaseException) -> list[str]:
    """The global a weights_only refusal names in its message (`Unsupported global: GLOBAL os.system`)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return [found.group(1)] if found else []


def _load_safetensors(path: Path) -> Any:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"reading {path} needs the safetensors package", "pip install safetensors") from None
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a valid safetensors file ({_torch_cause(exc)})", INTACT_COPY) from None


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
    # train.ema_decay: the EMA's state {"model": its full state_dict, "n_averaged": steps averaged, "decay"}
    ema: dict[str, Any] | None = None
    weights: str = "raw"  # what `model` holds: "raw" (the optimizer's weights) or "ema" (monitor is an EMA metric)
    raw_model: dict[str, Any] | None = None  # with weights "ema": the optimizer's weights (what a resume trains on)
    # The images trained and validated on (tltool.data.fingerprint): checked on resume. None: older checkpoints.
    data_fingerprint: dict[str, Any] | None = None
    # Temperature scaling (tltool.calibration): inference divides `model`'s logits by it. None: not calibrated.
    temperature: float | None = None
    # A multilabel run's per-class decision thresholds for `model`, chosen on its val split at the end of training
    # (multilabel.threshold_run). None: a multiclass model, or one saved before the run ended (chosen when needed).
    thresholds: list[float] | None = None

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

    def resumable(self) -> Checkpoint:
        """This checkpoint with `model` = the weights the optimizer trained (what a resume continues from)."""
        if self.weights != "ema":
            return self
        if self.raw_model is None:
            raise CheckpointError(
                "the checkpoint holds EMA weights but not the trained ones a resume continues from",
                "resume from the run's checkpoints/last.pt as tltool wrote it",
            )
        return replace(self, model=self.raw_model, weights="raw", raw_model=None)

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


def _shape(value: Any) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], given: Any, source: str = "the file") -> str | None:
    """How weights `given` for a model differ from its `expected` state_dict, in words, or None when they fit.

    The first differing key in the model's own order, with both shapes ("head.weight is [5, 512] in the
    file, [3, 512] in the model"), and how many keys differ in all: enough to see which run or backbone
    the weights belong to.
    """
    if not isinstance(given, Mapping):
        return f"{source} holds a {type(given).__name__}, not a state_dict of tensors"
    problems: list[str] = []
    for key, value in expected.items():
        if key not in given:
            problems.append(f"{key} is missing from {source}")
        elif not isinstance(given[key], torch.Tensor) or tuple(given[key].shape) != tuple(value.shape):
            problems.append(f"{key} is {_shape(given[key])} in {source}, {_shape(value)} in the model")
    problems += [f"{key} is in {source} but not in the model" for key in given if key not in expected]
    if not problems:
        return None
    more = f" ({len(problems)} keys differ)" if len(problems) > 1 else ""
    return problems[0] + more


CHECKPOINT_WRITE_FIX = "free disk space or fix permissions; the previous checkpoint is untouched"


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save `obj` to `path` atomically: the old file or the new one survives a crash, never a torn one.

    A filesystem failure (a full disk: an OSError, or torch's RuntimeError around one) is one CheckpointError
    line, and the temp file is removed (`tltool.files.write_atomic`).
    """
    write_atomic(Path(path), lambda handle: torch.save(obj, handle), CheckpointError, CHECKPOINT_WRITE_FIX)


def copy_atomic(source: str | Path, target: str | Path) -> None:
    """Give a written checkpoint a second name with the same guarantees as `save_atomic`.

    A hard link where the filesystem has them: no bytes are copied (a resnet50 checkpoint is ~100 MB per
    epoch), and it stays a snapshot because checkpoints are never written in place, only replaced by
    `save_atomic` (the link keeps the old file). Elsewhere a copy.
    """
    source, target = Path(source), Path(target)
    temp = temp_path(target)
    temp.unlink(missing_ok=True)
    try:
        os.link(source, temp)
    except OSError:  # no hard links here (another filesystem, FAT, some network mounts): copy the bytes

        def copy(handle: BinaryIO) -> None:
            with open(source, "rb") as reader:
                shutil.copyfileobj(reader, handle, length=16 * 2**20)

        write_atomic(target, copy, CheckpointError, CHECKPOINT_WRITE_FIX)
        return
    with reported_writes(target, CheckpointError, CHECKPOINT_WRITE_FIX):
        try:
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)


def map_tensors(value: Any, change: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`value` (a checkpoint's dict or a part of it) with `change` applied to every tensor: dicts, lists and
    tuples rebuilt around them, everything else shared."""
    if isinstance(value, torch.Tensor):
        return change(value)
    if isinstance(value, dict):
        return {key: map_tensors(item, change) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(map_tensors(item, change) for item in value)
    return value


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


def rewrite_checkpoints(
    paths: Sequence[Path], fit: Callable[[Path], tuple[Checkpoint, dict[str, Any]]], write: bool
) -> dict[str, Any]:
    """Rewrite each checkpoint file of `paths` that exists with what `fit(path)` gives: (the updated Checkpoint,
    its summary entry). A file that is a hard link of an earlier one (best.pt of last.pt) is fitted once and
    linked again to the rewritten file (entry `same_as`). Under torchrun every rank calls `fit` (its evaluation
    is sharded) and only the rank with `write` writes, atomically. Returns {file name: entry}."""
    groups: dict[tuple[int, int], list[Path]] = {}  # (decided by every rank before anything is rewritten)
    for path in paths:
        if path.is_file():
            info = path.stat()
            groups.setdefault((info.st_dev, info.st_ino), []).append(path)
    barrier()
    entries: dict[str, Any] = {}
    for first, *links in groups.values():
        checkpoint, entry = fit(first)
        if write:
            save_atomic(checkpoint.to_dict(), first)
        entries[first.name] = entry
        for link in links:
            if write:
                copy_atomic(first, link)
            entries[link.name] = {**entry, "same_as": first.name}
    barrier()
    return entries
