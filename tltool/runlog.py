"""What a run shows: the --dry-run description, per-epoch lines, TensorBoard, the end-of-run summary."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tltool.config import Config
from tltool.data import resolve_num_workers
from tltool.distributed import current
from tltool.errors import ConfigError
from tltool.features import cache_applies, mixing_turns_cache_off
from tltool.models import count_parameters
from tltool.optim import optimizer_impl
from tltool.transfer import describe_method, transfer_summary

if TYPE_CHECKING:
    from tltool.session import TrainingSession


def open_tensorboard(cfg: Config, run_dir: Path, start_epoch: int) -> Any:
    """A SummaryWriter for `log.tensorboard` (events after `start_epoch` of an earlier try are purged)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "log.tensorboard needs the tensorboard package", "pip install 'tltool[tensorboard]'"
        ) from None
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_epoch + 1 if start_epoch else None)


def log_tensorboard(writer: Any, record: dict[str, Any]) -> None:
    """One epoch's scalars, grouped as TensorBoard shows them (loss/, accuracy/, lr, speed)."""
    epoch = record["epoch"]
    writer.add_scalar("loss/train", record["train_loss"], epoch)
    writer.add_scalar("loss/val", record["val_loss"], epoch)
    writer.add_scalar("accuracy/train", record["train_acc"], epoch)
    writer.add_scalar("accuracy/val_top1", record["val_acc1"], epoch)
    writer.add_scalar("accuracy/val_top5", record["val_acc5"], epoch)
    if "val_acc1_ema" in record:  # train.ema_decay
        writer.add_scalar("loss/val_ema", record["val_loss_ema"], epoch)
        writer.add_scalar("accuracy/val_top1_ema", record["val_acc1_ema"], epoch)
        writer.add_scalar("accuracy/val_top5_ema", record["val_acc5_ema"], epoch)
    for key in ("val_map", "val_f1_micro", "val_f1_macro", "val_map_ema", "val_f1_micro_ema", "val_f1_macro_ema"):
        if key in record:  # data.task: multilabel (with train.ema_decay: the EMA's too)
            writer.add_scalar(f"multilabel/{key}", record[key], epoch)
    writer.add_scalar("lr", record["lr"], epoch)
    writer.add_scalar("speed/images_per_second", record["images_per_second"], epoch)
    writer.flush()


def hparams(cfg: Config) -> dict[str, Any]:
    """The config as flat scalar hyper-parameters (TensorBoard's HPARAMS tab)."""
    flat = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            if isinstance(value, int | float | str | bool):
                flat[f"{section}.{key}"] = value
            elif value is not None:
                flat[f"{section}.{key}"] = str(value)
    return flat


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run table: best epoch and metric, time, speed, where the files are, what to run next."""
    wise = summary.get("wise")
    best = wise["checkpoint"] if wise else summary["checkpoints"]["best"] or summary["checkpoints"]["last"]
    final = {"val_acc1": float("nan"), "val_acc5": float("nan"), "val_loss": float("nan"), **(summary["final"] or {})}
    metric = f"{summary['best_metric']:.4f}" if summary["best_metric"] is not None else "n/a"
    cache = summary.get("feature_cache")
    wise_lines = (
        [f"wise-ft      alpha {wise['alpha']:g} ({wise['chosen_by']}), val top-1 {wise['val_acc1']:.1%}"]
        if wise
        else []
    )
    lines = [
        f"best epoch   {summary['best_epoch']} of {summary['epochs_completed']}"
        f" ({summary['monitor']} {metric})" + ("  [stopped early]" if summary["stopped_early"] else ""),
        f"last epoch   val mAP {final['val_map']:.4f}, F1 micro {final['val_f1_micro']:.3f}, exact match "
        f"{final['val_acc1']:.1%}, val loss {final['val_loss']:.4f}"  # (data.task: multilabel)
        if "val_map" in final
        else f"last epoch   val top-1 {final['val_acc1']:.1%}, top-5 {final['val_acc5']:.1%}, "
        f"val loss {final['val_loss']:.4f}",
        *(
            [
                f"last ema     val top-1 {final['val_acc1_ema']:.1%}, top-5 {final['val_acc5_ema']:.1%}, "
                f"val loss {final['val_loss_ema']:.4f}; checkpoints hold the {summary['checkpoint_weights']} weights"
            ]
            if "val_acc1_ema" in final
            else []
        ),
        f"time         {summary['wall_seconds']:.1f} s on {summary['device']} ({summary['precision']})"
        + (f", features extracted once in {cache['extract_seconds']:.1f} s" if cache else ""),
        f"speed        {final.get('images_per_second', 0):.0f} train images/s (last epoch)",
        *wise_lines,
        f"files        {summary['run_dir']}/  config.yaml metrics.jsonl summary.json checkpoints/",
        f"next         tltool eval {best}",
        f"             tltool export {best} --format onnx",
        f"             tltool report {summary['run_dir']}",
    ]
    return "\n".join(lines)


def resume_command(config_path: str, overrides: list[str] | None, world_size: int = 1) -> str:
    """The command that continues a stopped run: the same config and KEY=VALUE overrides, shell-quoted."""
    command = shlex.join(["tltool", "finetune", config_path, *(overrides or []), "--resume", "auto"])
    if world_size > 1:
        command += f" (with {world_size} processes again: --nproc {world_size}, or the same torchrun command)"
    return command


def say(quiet: bool, text: str) -> None:
    """Print a progress line of the run (flushed at once: it may go to a log file), unless `quiet`."""
    if not quiet:
        print(text, flush=True)


def epoch_line(record: dict[str, Any], epochs: int, is_best: bool) -> str:
    """The one line an epoch prints: train and val loss and accuracy, lr, speed, time, `*best`, and the loss
    terms when the objective has more than one."""
    return (
        f"epoch {record['epoch']:>{len(str(epochs))}}/{epochs}  "
        f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.1%}  "
        + (
            f"val loss {record['val_loss']:.4f} mAP {record['val_map']:.4f} F1 {record['val_f1_micro']:.3f} "
            f"exact {record['val_acc1']:.1%}  "  # (data.task: multilabel)
            if "val_map" in record
            else f"val loss {record['val_loss']:.4f} acc1 {record['val_acc1']:.1%} acc5 {record['val_acc5']:.1%}  "
        )
        + (
            f"ema loss {record['val_loss_ema']:.4f} mAP {record['val_map_ema']:.4f}  "
            if "val_map_ema" in record
            else f"ema loss {record['val_loss_ema']:.4f} acc1 {record['val_acc1_ema']:.1%}  "
            if "val_acc1_ema" in record
            else ""
        )
        + f"lr {record['lr']:.2e}  {record['images_per_second']:.0f} img/s  {record['epoch_seconds']:.1f} s"
        + ("  *best" if is_best else "")
        + (
            "  skipped (undecodable): " + ", ".join(f"{n} {part}" for part, n in record["skipped_images"].items() if n)
            if any((record.get("skipped_images") or {}).values())
            else ""
        )
        + (
            "  (" + " + ".join(f"{name} {value:.4f}" for name, value in record["loss_terms"].items()) + ")"
            if len(record.get("loss_terms") or {}) > 1
            else ""
        )
    )


def describe(session: TrainingSession) -> str:
    """The --dry-run summary: model, parameters per group, method and optimizer groups, data, steps."""
    built, split, cfg, plan = session.built, session.split, session.cfg, session.plan
    device, precision, steps = session.device, session.precision, session.steps_per_epoch
    counts = count_parameters(built.model)
    pre = built.preprocess
    world = current()
    workers = resolve_num_workers(cfg.data.num_workers)
    lines = [
        f"model      {cfg.model.backbone}  weights: {built.weights_source}",
        *(f"           {note}" for note in built.notes),
        f"parameters {'group':<9} {'total':>12} {'trainable':>12}",
    ]
    for group, c in counts.items():
        lines.append(f"           {group:<9} {c['total']:>12,} {c['trainable']:>12,}")
    total = sum(c["total"] for c in counts.values())
    trainable = sum(c["trainable"] for c in counts.values())
    lines.append(f"           {'all':<9} {total:>12,} {trainable:>12,}")
    lines += [
        f"freeze     {cfg.train.freeze}",
        f"method     {describe_method(cfg, plan.base_frozen)}",
        f"loss       {' + '.join(session.objective.names)}",
        *(
            [
                f"ema        decay {cfg.train.ema_decay:g} of the {'head' if session.ema.head_only else 'whole model'}"
                f" (checkpoints hold the {'EMA' if cfg.checkpoint.monitor.endswith('_ema') else 'trained'} weights)"
            ]
            if session.ema is not None
            else []
        ),
        *plan.group_table(),
        f"classes    {len(split.class_names)}: {', '.join(split.class_names[:10])}"
        + (" ..." if len(split.class_names) > 10 else ""),
        f"images     train {len(split.train)}, val {len(split.val)}"
        + (f", skipped {len(split.bad)} unreadable" if split.bad else ""),
        f"input      {pre.image_size}px crop of {pre.resize_size}px resize, {pre.interpolation}, "
        f"mean {list(pre.mean)}, std {list(pre.std)}",
        f"augment    {describe_augmentation(cfg)}",
        f"training   {cfg.train.epochs} epochs x {steps} steps (batch {cfg.data.batch_size}"
        + (f" x {cfg.train.accumulate_steps} accumulated" if cfg.train.accumulate_steps > 1 else "")
        + f"), {cfg.train.optimizer} ({optimizer_impl(session.optimizer)}) lr {cfg.train.lr:g}, "
        + f"scheduler {cfg.train.scheduler}",
        f"device     {device}  precision {precision}"
        + ("  compile on" if cfg.run.compile else "")
        + (
            f"  {world.world_size} processes (global batch {world.world_size * cfg.data.batch_size})"
            if world.enabled
            else ""
        ),
        f"loader     {f'{workers} persistent worker(s)' if workers else 'in the main process'}"
        + (" (data.num_workers auto)" if cfg.data.num_workers == "auto" else ""),
        "cache      "
        + (
            "frozen backbone features computed once, epochs train the head"
            + (f" (until the backbone opens at epoch {min(plan.opens_at().values())})" if plan.entries else "")
            if cache_applies(cfg) and plan.head_only(0)
            else "off (the backbone trains from epoch 1)"
            if cache_applies(cfg)
            else "off (MixUp/CutMix mix the images)"
            if mixing_turns_cache_off(cfg)
            else f"off (train.feature_cache={cfg.train.feature_cache})"
        ),
    ]
    return "\n".join(lines)


def describe_augmentation(cfg: Config) -> str:
    """data.augment, random erasing and batch mixing in words (the dry run's `augment` line)."""
    data = cfg.data
    parts = [data.augment]
    if data.random_erasing:
        parts.append(f"random erasing p={data.random_erasing:g}")
    if data.mixing:
        kinds = [f"{name} alpha={alpha:g}" for name, alpha in (("MixUp", data.mixup_alpha),
                                                               ("CutMix", data.cutmix_alpha)) if alpha > 0]  # fmt: skip
        parts.append(" or ".join(kinds) + f" on {data.mix_prob:.0%} of the train batches (soft-target ce)")
    return ", ".join(parts)


def run_summary(session: TrainingSession, stopped_early: bool) -> dict[str, Any]:
    """summary.json: the run's method, its best and last metrics, and how it ran."""
    cfg, state, cache = session.cfg, session.state, session.cache
    summary = {
        "run_dir": str(session.run_dir),
        "backbone": cfg.model.backbone,
        "weights": session.built.weights_source,
        "method": describe_method(cfg, session.plan.base_frozen),
        "transfer": transfer_summary(cfg, session.plan, session.optimizer, session.objective.class_weight),
        "loss_terms": session.objective.names,
        "adapt": {
            "unlabeled": cfg.adapt.unlabeled,
            "unlabeled_images": len(session.unlabeled),
            **cfg.adapt.model_dump(exclude={"unlabeled"}),
        }
        if session.unlabeled is not None
        else None,
        "source": {
            "train": cfg.source.train,
            "classes": len(session.source.class_names),
            "shares_head": session.source.shares_head,
            "images": len(session.source.samples),
            "scanned": session.source.scanned,
            "class_weights": session.objective.term("source").state.get("class_weights", torch.ones(0)).tolist(),
        }
        if session.source is not None
        else None,
        "epochs_completed": state.epoch,
        "stopped_early": stopped_early,
        "monitor": cfg.checkpoint.monitor,
        # which weights are the `model` of last.pt/best.pt: the EMA's when an EMA metric is monitored
        "checkpoint_weights": "ema" if cfg.checkpoint.monitor.endswith("_ema") else "raw",
        "ema": {
            "decay": cfg.train.ema_decay,
            "averages": "head" if session.ema.head_only else "model",
            "steps": session.ema.steps,
        }
        if session.ema is not None
        else None,
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
        "final": state.history[-1] if state.history else {},
        "num_classes": len(session.split.class_names),
        "train_images": len(session.split.train),
        "val_images": len(session.split.val),
        "skipped_images": len(session.split.bad),  # (found unreadable by the scan: never drawn)
        "skipped_in_epochs": {  # drawn, but undecodable: summed over the epochs (metrics.jsonl has each epoch's)
            part: sum((record.get("skipped_images") or {}).get(part, 0) for record in state.history)
            for part in ("train", "val")
        },
        "feature_cache": {
            "extract_seconds": cache.extract_seconds,
            "location": cache.location,
            "store": cache.store,
            "reused": cache.reused,
            "engine": cache.engine,
        }
        if cache
        else None,
        "device": str(session.device),
        "precision": session.precision,
        "optimizer_impl": optimizer_impl(session.optimizer),
        "compile_seconds": session.compile_seconds if cfg.run.compile else None,
        "wall_seconds": time.perf_counter() - session.wall_start,
        "checkpoints": {
            "last": str(session.checkpoint_dir / "last.pt"),
            "best": str(session.checkpoint_dir / "best.pt") if cfg.checkpoint.save_best else None,
            "deferred_epoch_saves": session.saves.deferred,  # (in this process; checkpoint.max_save_overhead)
        },
    }
    if session.world.enabled:
        summary["processes"] = session.world.world_size
        summary["global_batch"] = session.world.world_size * cfg.data.batch_size
    return summary
