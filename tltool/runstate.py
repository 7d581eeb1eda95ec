"""What a run carries and resumes from: the loop's state, the run directory, the resume checks.

train.py runs the loop and session.py holds what it trains with; this module knows what a run directory
holds (config.yaml, classes.json, metrics.jsonl, checkpoints/) and what a checkpoint must match for a run
to continue from it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from tltool import distributed, files
from tltool.checkpoint import Checkpoint, load_checkpoint
from tltool.config import Config, ModelNames, build_config
from tltool.data import DataSplit
from tltool.data.fingerprint import compare, keep_val_split
from tltool.errors import CheckpointError, ConfigError, DataError, TrainingError
from tltool.files import clean_stale_temps
from tltool.runlog import say

METRICS_FILE = "metrics.jsonl"
RUN_WRITE_FIX = "free disk space or fix the permissions of the run directory; files already written are untouched"
# Config keys that may change when a run is resumed (everything else must match the checkpoint).
# run.output_dir is where the run is now (a copied or moved run directory, a relative path given absolute).
RESUMABLE_CHANGES = (
    "run.output_dir",
    "train.epochs",
    "run.device",
    "run.dist_timeout_s",
    "run.time_limit",
    "run.compile",
    "train.optimizer_impl",
    "data.num_workers",
    "checkpoint.max_save_overhead",  # (when last.pt is written, not what it holds)
    "train.feature_cache_dir",  # (where features are kept, not what they are: a moved cache extracts again)
    "train.feature_cache_max_mb",
    "log.progress",
    "log.tensorboard",
    "log.report",
    "log.mlflow",
    "log.mlflow_experiment",
    "log.mlflow_checkpoints",
)


@dataclass
class EpochProgress:
    """Running sums of the epoch in progress; saved in mid-epoch checkpoints so a resumed epoch reports the same."""

    batches_done: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    data_seconds: float = 0.0
    seconds: float = 0.0
    term_sums: dict[str, float] = field(default_factory=dict)  # each loss term's sum over the images seen
    skipped: int = 0  # images drawn but not trained on: undecodable (or the rest of their batch was)

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "term_sums": dict(self.term_sums)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpochProgress:
        return cls(**data)  # (checkpoints older than the loss terms have no term_sums: the default)


@dataclass
class TrainState:
    """What the loop carries from epoch to epoch (and into the checkpoint)."""

    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimizer steps taken
    best_metric: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0  # epochs since the monitored metric last improved
    history: list[dict[str, Any]] = field(default_factory=list)
    in_epoch: EpochProgress | None = None  # the unfinished epoch of a mid-epoch checkpoint

    def checkpoint_fields(self) -> dict[str, Any]:
        """The Checkpoint keys this state fills (rank 0's epoch sums; every rank's go into rank_states)."""
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "early_stopping": {"bad_epochs": self.bad_epochs},
            "epoch_progress": self.in_epoch.to_dict() if self.in_epoch is not None else None,
            "metrics": self.history[-1] if self.history else {},
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> TrainState:
        return cls(
            epoch=checkpoint.epoch,
            global_step=checkpoint.global_step,
            best_metric=checkpoint.best_metric,
            best_epoch=checkpoint.best_epoch,
            bad_epochs=checkpoint.early_stopping["bad_epochs"],
        )

    def end_epoch(self, record: dict[str, Any], monitor: str) -> bool:
        """Add the epoch's record; keep the best value of `monitor` (lower for losses). True: a new best."""
        value = record[monitor]
        best = self.best_metric is None or (
            value < self.best_metric if "loss" in monitor else value > self.best_metric  # (val_loss, val_loss_ema)
        )
        if best:
            self.best_metric, self.best_epoch, self.bad_epochs = value, self.epoch, 0
        else:
            self.bad_epochs += 1
        self.history.append(record)
        return best


def with_absolute_paths(cfg: Config, names: ModelNames | None = None) -> Config:
    """Data paths made absolute, so the checkpoint's config still finds them from another directory.

    With `names`, the backbone and weights names are checked too (a run built from the Python API gets
    the same one-line error as the CLI's).
    """
    data = cfg.to_dict()
    for section, key in (
        ("data", "train"),
        ("data", "val"),
        ("adapt", "unlabeled"),
        ("source", "train"),
        ("distill", "teacher"),
    ):
        if data[section][key]:
            data[section][key] = os.path.abspath(data[section][key])
    return build_config(data, names=names)


def run_directory(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) if cfg.run.output_dir else Path("runs") / cfg.run.name


def resume_location(cfg: Config, resume: str | None, quiet: bool = False) -> Config:
    """The config with the run directory a `--resume PATH` continues in.

    A checkpoint inside a run directory (`DIR/checkpoints/last.pt`) whose run was moved or copied still
    carries the old place in its config.yaml: when the config names the same place as DIR's config.yaml
    (the config travelled with the run), the run continues in DIR, where the checkpoint is, not at the old
    path. A config that names another place (a deliberate new run.output_dir or run.name) is followed.
    """
    if resume in (None, "auto"):
        return cfg
    run_dir = Path(resume).parent.parent
    if Path(resume).parent.name != "checkpoints" or not (run_dir / "config.yaml").is_file():
        return cfg
    if os.path.realpath(run_directory(cfg)) == os.path.realpath(run_dir):
        return cfg
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["run"]
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError):
        return cfg
    if (saved.get("output_dir"), saved.get("name")) != (cfg.run.output_dir, cfg.run.name):
        return cfg
    say(quiet, f"the run directory moved: continuing in {run_dir} (its config names {run_directory(cfg)})")
    data = cfg.to_dict()
    data["run"]["output_dir"] = str(run_dir)
    return build_config(data)


def _config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, dotted + ".")
        elif a != b and dotted not in RESUMABLE_CHANGES:
            out.append(f"{dotted}: {a!r} in the checkpoint, {b!r} now")
    return out


def write_text_atomic(path: Path, text: str) -> None:
    """Write a run file (config.yaml, summary.json, ...) atomically; a full disk or a read-only run directory is
    one line (exit 2) and leaves no temp file (`tltool.files.write_text_atomic`)."""
    files.write_text_atomic(path, text, TrainingError, RUN_WRITE_FIX)


def check_run_directory(run_dir: Path, checkpoint_bytes: int, copies: int = 2) -> None:
    """A write check and a free-space check of the run directory: one line now instead of a failed save later.

    `checkpoint_bytes` is a checkpoint's size (the last one's on disk, or an estimate: the model's and the
    optimizer's tensors). `copies`: 2 before the run starts (during a save the temp file and the old
    checkpoint coexist), 1 before a save whose old file is already on disk. Creates `run_dir`.
    """
    files.make_folder(run_dir, TrainingError, RUN_WRITE_FIX)
    files.check_writable(run_dir / "config.yaml", TrainingError, RUN_WRITE_FIX)
    files.check_free_space(run_dir, copies * checkpoint_bytes, "saving a checkpoint", TrainingError, RUN_WRITE_FIX)


def tensor_bytes(tensors: Any) -> int:
    """The bytes of every tensor in a nested dict/list (a state_dict, an optimizer state): a checkpoint's size."""
    if hasattr(tensors, "element_size") and hasattr(tensors, "numel"):
        return int(tensors.element_size() * tensors.numel())
    if isinstance(tensors, dict):
        return sum(tensor_bytes(value) for value in tensors.values())
    if isinstance(tensors, list | tuple):
        return sum(tensor_bytes(value) for value in tensors)
    return 0


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one epoch's record to `run_dir/metrics.jsonl`, flushed and fsynced before the checkpoint is saved.

    Written first, then the checkpoint: a crash in between re-runs the epoch and rewrites its line. A failed
    append (a full disk) leaves the file as it was and is one line (exit 2); a kill in the middle of the
    write can leave a torn last line, which `read_metrics` drops on resume.
    """
    files.append_durable(run_dir / METRICS_FILE, json.dumps(record) + "\n", TrainingError, RUN_WRITE_FIX)


def read_metrics(path: Path, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (a crash mid-append) is dropped with a warning.

    A damaged line before the last is not a crash's trace but a changed file: a one-line CheckpointError.
    """
    warn = warn or _warn
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}", "check its permissions") from None
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise ValueError("not an epoch record")
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if position == len(numbered) - 1:
                warn(f"warning: {path} line {number} is torn (a crash while writing it): dropped, its epoch runs again")
                break
            raise CheckpointError(
                f"{path} line {number} is not an epoch record (the file was changed or damaged)",
                "restore the file, or remove the line and every line after it (those epochs run again)",
            ) from None
        records.append(record)
    return records


def _warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


NEW_RUN_HINT = "set run.name (or run.output_dir) for a new run"


def _holds_a_run(run_dir: Path) -> bool:
    """True when `run_dir` has a run's traces: a checkpoint or a metrics line (a new run must not mix with it)."""
    return any((run_dir / name).exists() for name in ("checkpoints/last.pt", "checkpoints/best.pt", METRICS_FILE))


def _how_to_continue(run_dir: Path) -> str:
    """The advice that works for the run in `run_dir`: never one that the next command refuses in turn."""
    checkpoints = run_dir / "checkpoints"
    if (checkpoints / "last.pt").exists():
        return "continue it with --resume auto"
    if (checkpoints / "best.pt").exists():
        return f"continue it from its best epoch with --resume {checkpoints / 'best.pt'}"
    return f"it saved no checkpoint, so nothing can be resumed: remove {run_dir} to start it over, or {NEW_RUN_HINT}"


def open_resume(
    cfg: Config,
    resume: str | None,
    class_names: list[str],
    world: distributed.World,
    dry_run: bool = False,
    quiet: bool = False,
) -> Checkpoint | None:
    """The checkpoint a run continues from (None: a new run), checked against the config and the data.

    `resume`: None, "auto" (the run's checkpoints/last.pt) or a path. A new run refuses a run directory that
    already holds one. After a torchrun restart (--max-restarts) the workers continue from last.pt without
    being asked, or start over when the first attempt saved nothing.
    """
    run_dir = run_directory(cfg)
    checkpoint_dir = run_dir / "checkpoints"
    restarted = distributed.restart_count() > 0
    if restarted and not resume:
        resume = "auto" if (checkpoint_dir / "last.pt").exists() else None
        say(quiet, f"torchrun restart {distributed.restart_count()}: " + (
            "resuming from checkpoints/last.pt" if resume else "no checkpoint yet, starting over"))  # fmt: skip
    if not resume:
        if not (dry_run or restarted) and _holds_a_run(run_dir):
            raise ConfigError(f"{run_dir} already holds a run", f"{_how_to_continue(run_dir)}, or {NEW_RUN_HINT}")
        return None
    path = checkpoint_dir / "last.pt" if resume == "auto" else Path(resume)
    if resume == "auto" and not path.exists():
        if _holds_a_run(run_dir):
            raise CheckpointError(
                f"--resume auto: {run_dir} holds a run but no checkpoints/last.pt", f"{_how_to_continue(run_dir)}"
            )
        raise CheckpointError(
            f"--resume auto: no checkpoint in {run_dir} (it holds no run)", "start the run without --resume"
        )
    resumed = load_checkpoint(path)
    # (through the config model: keys added to tltool since the checkpoint was written take their defaults)
    try:
        saved_config = build_config(resumed.config).to_dict()
    except ConfigError as exc:
        raise CheckpointError(
            f"{path}: its config no longer validates ({exc.what})", "resume with its tltool version"
        ) from None
    differences = _config_differences(saved_config, cfg.to_dict())
    if differences:
        raise ConfigError(
            f"the config differs from the checkpoint's in {len(differences)} key(s); only "
            f"{', '.join(RESUMABLE_CHANGES)} may change on resume",
            "resume with the original config, or start a new run (run.name)",
            details=differences,
        )
    saved_world = resumed.world_size
    if saved_world != world.world_size and resumed.mid_epoch:
        raise CheckpointError(
            f"{path} was saved mid-epoch by {saved_world} process(es); this run has {world.world_size}",
            f"resume it with {saved_world} process(es) (each epoch's shards depend on the number), "
            "or from an end-of-epoch checkpoint",
        )
    if saved_world != world.world_size:
        say(quiet, f"resuming a {saved_world}-process run with {world.world_size}: the global batch changes")
    if list(resumed.class_names) != class_names:
        raise CheckpointError(
            f"the dataset's classes {class_names} differ from the checkpoint's {resumed.class_names}",
            "resume with the same dataset",
        )
    return resumed


CHANGED_DATA_FIX = (
    "restore the data the run trained on, or continue anyway with --resume-changed-data (the checkpoint's val "
    "split is kept: new images only train), or start a new run (run.name)"
)


def resume_data(
    checkpoint: Checkpoint,
    split: DataSplit,
    changed_ok: bool = False,
    where: str = "the checkpoint",
    quiet: bool = False,
) -> DataSplit:
    """The samples a resumed run goes on with: the data now, checked against the checkpoint's fingerprint.

    Unchanged data: the same samples, split as the checkpoint's val split says. Changed data (images added,
    removed or resized; a val split that would change) is refused in one line naming what changed, unless
    `changed_ok` (--resume-changed-data): then the run keeps the checkpoint's val split where the images are
    still there (a val image is never trained on, a trained one never scored), and every new image trains.
    A checkpoint without a fingerprint (older tltool) resumes unchecked, with a note.
    """
    saved = checkpoint.data_fingerprint
    if saved is None:
        say(quiet, f"note: {where} has no data fingerprint (an older tltool): the data cannot be checked against it")
        return split
    now = split.fingerprint()
    if now["digest"] == saved["digest"]:
        return split
    change = compare(saved, now, {"train": "data.train", "val": "data.val"})
    keep = split.split_from_train and saved.get("val_split") is not None
    if change.folders_changed and not changed_ok:
        raise DataError(f"the data changed since {where}: {change.text()}", CHANGED_DATA_FIX)
    if keep:  # (unchanged folders whose fresh split differs: a run continued earlier with changed data)
        train, val, gone = keep_val_split(split.train, split.val, saved["val_split"], split.root)
        split = replace(split, train=train, val=val)
        if not val:
            raise DataError(f"none of the val images of {where} is left", CHANGED_DATA_FIX.split(", or continue")[0])
    if change.folders_changed:
        say(
            quiet,
            f"--resume-changed-data: {change.text()}; "
            + (
                f"keeping the checkpoint's val split ({len(split.val)} val images, {gone} of its images gone), "
                f"{len(split.train)} train images"
                if keep
                else f"data.val as it is now ({len(split.val)} images), {len(split.train)} train images"
            ),
        )
    return split


def prepare_run_directory(
    cfg: Config, class_names: list[str], epoch: int, writes: bool, warn: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Write config.yaml and classes.json, drop stale temp files, and return the metrics of epochs <= `epoch`.

    Lines of later epochs (written before a crash, or by a first torchrun attempt that saved no checkpoint)
    and a torn last line are dropped from metrics.jsonl (`warn` says so): those epochs are run again. Only
    the rank that `writes` changes files; a run directory that cannot be written is one line (exit 2).
    """
    run_dir = run_directory(cfg)
    metrics_path = run_dir / METRICS_FILE
    if writes:
        files.make_folder(run_dir, TrainingError, RUN_WRITE_FIX)
        clean_stale_temps(run_dir)
        clean_stale_temps(run_dir / "checkpoints")
        write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())
        write_text_atomic(run_dir / "classes.json", json.dumps(class_names, indent=2) + "\n")
    if not metrics_path.exists():
        return []
    records = read_metrics(metrics_path, warn)
    kept = [record for record in records if record["epoch"] <= epoch]
    if writes:
        write_text_atomic(metrics_path, "".join(json.dumps(record) + "\n" for record in kept))
    return kept
