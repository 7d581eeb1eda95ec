"""What a run carries and resumes from: its state, its directory, its checkpoint payload, the resume checks.

train.py runs the loop; this module knows what a run directory holds (config.yaml, classes.json,
metrics.jsonl, checkpoints/) and what a checkpoint must match for a run to continue from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tltool import distributed
from tltool.checkpoint import FORMAT_VERSION, clean_stale_temps, load_checkpoint, versions
from tltool.config import Config, build_config
from tltool.errors import CheckpointError, ConfigError
from tltool.runlog import say
from tltool.transfer import UnfreezePlan

# Config keys that may change when a run is resumed (everything else must match the checkpoint).
RESUMABLE_CHANGES = (
    "train.epochs",
    "run.device",
    "run.dist_timeout_s",
    "run.compile",
    "train.optimizer_impl",
    "data.num_workers",
    "log.progress",
    "log.tensorboard",
    "log.report",
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

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


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


def with_absolute_paths(cfg: Config) -> Config:
    """Data paths made absolute, so the checkpoint's config still finds them from another directory."""
    data = cfg.to_dict()
    for key in ("train", "val"):
        if data["data"][key]:
            data["data"][key] = os.path.abspath(data["data"][key])
    return build_config(data)


def run_directory(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) if cfg.run.output_dir else Path("runs") / cfg.run.name


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
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def checkpoint_payload(
    cfg: Config,
    built: Any,
    class_names: list[str],
    frozen: list[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    plan: UnfreezePlan,
    reference: dict[str, torch.Tensor] | None,
    rank_states: list[dict[str, Any]],
) -> dict[str, Any]:
    """Everything a resume needs. `rank_states`: each rank's RNG and epoch sums (one entry outside torchrun)."""
    model = built.model
    return {
        "format_version": FORMAT_VERSION,
        **versions(),
        "config": cfg.to_dict(),
        "class_names": list(class_names),
        "preprocess": built.preprocess.to_dict(),
        "arch": built.arch,
        "weights_source": built.weights_source,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "trainable": [name for name, p in model.named_parameters() if p.requires_grad],
        "frozen_modules": list(frozen),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": state.epoch,
        "global_step": state.global_step,
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
        "early_stopping": {"bad_epochs": state.bad_epochs},
        "epoch_progress": state.in_epoch.to_dict() if state.in_epoch is not None else None,
        "metrics": state.history[-1] if state.history else {},
        "rng": rank_states[0]["rng"],
        "world_size": len(rank_states),
        "rank_states": rank_states if len(rank_states) > 1 else None,
        "transfer": plan.state_dict(),  # which parts of the backbone opened, at which step
        "l2sp_reference": {k: v.detach().cpu() for k, v in reference.items()} if reference is not None else None,
    }


def open_resume(
    cfg: Config,
    resume: str | None,
    class_names: list[str],
    world: distributed.World,
    dry_run: bool = False,
    quiet: bool = False,
) -> dict[str, Any] | None:
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
        if not (dry_run or restarted) and (
            (checkpoint_dir / "last.pt").exists() or (run_dir / "metrics.jsonl").exists()
        ):
            raise ConfigError(
                f"{run_dir} already holds a run",
                "continue it with --resume auto, or set run.name (or run.output_dir) for a new one",
            )
        return None
    path = checkpoint_dir / "last.pt" if resume == "auto" else Path(resume)
    if resume == "auto" and not path.exists():
        raise CheckpointError(f"--resume auto: no checkpoint at {path}", "start the run without --resume")
    resumed = load_checkpoint(path)
    differences = _config_differences(resumed["config"], cfg.to_dict())
    if differences:
        raise ConfigError(
            f"the config differs from the checkpoint's in {len(differences)} key(s); only "
            f"{', '.join(RESUMABLE_CHANGES)} may change on resume",
            "resume with the original config, or start a new run (run.name)",
            details=differences,
        )
    saved_world = int(resumed.get("world_size", 1))
    if saved_world != world.world_size and resumed.get("epoch_progress"):
        raise CheckpointError(
            f"{path} was saved mid-epoch by {saved_world} process(es); this run has {world.world_size}",
            f"resume it with {saved_world} process(es) (each epoch's shards depend on the number), "
            "or from an end-of-epoch checkpoint",
        )
    if saved_world != world.world_size:
        say(quiet, f"resuming a {saved_world}-process run with {world.world_size}: the global batch changes")
    if list(resumed["class_names"]) != class_names:
        raise CheckpointError(
            f"the dataset's classes {class_names} differ from the checkpoint's {resumed['class_names']}",
            "resume with the same dataset",
        )
    return resumed


def prepare_run_directory(cfg: Config, class_names: list[str], epoch: int, writes: bool) -> list[dict[str, Any]]:
    """Write config.yaml and classes.json, drop stale temp files, and return the metrics of epochs <= `epoch`.

    Lines of later epochs (written before a crash, or by a first torchrun attempt that saved no checkpoint)
    are dropped from metrics.jsonl: those epochs are run again. Only the rank that `writes` changes files.
    """
    run_dir = run_directory(cfg)
    metrics_path = run_dir / "metrics.jsonl"
    if writes:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(run_dir / "checkpoints")
        write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())
        write_text_atomic(run_dir / "classes.json", json.dumps(class_names, indent=2) + "\n")
    if not metrics_path.exists():
        return []
    kept = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    kept = [record for record in kept if record["epoch"] <= epoch]
    if writes:
        write_text_atomic(metrics_path, "".join(json.dumps(record) + "\n" for record in kept))
    return kept
