"""`tltool finetune`: the training loop, top to bottom.

finetune() sets up (data first, so a wrong path fails before any weights are read), then per epoch:
train_one_epoch(), evaluate(), one line of metrics.jsonl, checkpoints/last.pt (and best.pt). Every
epoch's randomness is a function of (run.seed, epoch), and the full state is in last.pt, so a resumed
run ends with the same weights as an uninterrupted one. What a run directory and a checkpoint hold, and
what a resume must match: runstate.py.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import sys
import threading
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from tltool import distributed
from tltool.checkpoint import (
    copy_atomic,
    restore_rng,
    rng_state,
    save_atomic,
)
from tltool.config import Config, TrainConfig
from tltool.data import (
    BalancedSampler,
    epoch_seed,
    eval_transform,
    make_loader,
    scan_data,
    set_loader_epoch,
    train_transform,
)
from tltool.device import (
    autocast,
    configure_backends,
    host_read_interval,
    resolve_precision,
    sum_dtype,
    use_channels_last,
)
from tltool.distributed import all_reduce_max, all_reduce_sum, any_rank, current, no_sync
from tltool.errors import CheckpointError, ConfigError, TrainingError
from tltool.evaluate import evaluate
from tltool.features import build_cache, cache_applies
from tltool.models import build_model, built_from_checkpoint, freeze_modules, set_train_mode
from tltool.optim import make_optimizer, make_scheduler, optimizer_impl
from tltool.runlog import describe, epoch_line, hparams, log_tensorboard, open_tensorboard, say
from tltool.runstate import (
    EpochProgress,
    TrainState,
    checkpoint_payload,
    open_resume,
    prepare_run_directory,
    run_directory,
    with_absolute_paths,
    write_text_atomic,
)
from tltool.transfer import (
    UnfreezePlan,
    class_weight_tensor,
    describe_method,
    l2sp_penalty,
    l2sp_reference,
    transfer_summary,
)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _head_lr(optimizer: torch.optim.Optimizer) -> float:
    """The head's current LR (the LR of metrics.jsonl); the last group's when the head is frozen."""
    return next((g["lr"] for g in optimizer.param_groups if g.get("name") == "head"), optimizer.param_groups[-1]["lr"])


def _improved(monitor: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if monitor.endswith("loss") else value > best


class StopRequest:
    """Set by the first Ctrl-C (SIGINT): the loop stops at the next optimizer step, saves, and exits 130."""

    def __init__(self) -> None:
        self.requested = False

    def handler(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to stop at once) ...", file=sys.stderr, flush=True)


class Interrupted(TrainingError):
    """Training stopped on request; the state is saved."""

    exit_code = 130


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    state: TrainState,
    frozen: list[str],
    device: torch.device,
    precision: str,
    progress: tqdm | None,
    epoch_progress: EpochProgress,
    num_batches: int,
    save_mid_epoch: Any = None,
    every_n_steps: int | None = None,
    stop: StopRequest | None = None,
    forward: nn.Module | None = None,
    class_weight: torch.Tensor | None = None,
    penalty: Any = None,
) -> dict[str, float]:
    """One pass over the training set: forward, loss, backward, (clip), step, schedule.

    `loader` yields the batches from `epoch_progress.batches_done` on (a resumed epoch starts mid-way);
    `save_mid_epoch()` is called every `every_n_steps` optimizer steps and when a stop is requested.
    `forward` is what the batches go through: the whole model, or only its head on cached features.
    `class_weight` weights the cross-entropy per class; `penalty()` (L2-SP) is added to the loss that is
    minimized, not to the reported one.
    """
    forward = forward if forward is not None else model
    distributed = current().enabled  # under torchrun: forward is DDP-wrapped and per-step flags are agreed on
    set_train_mode(model, frozen)  # frozen modules stay in eval mode: batch-norm statistics never move
    trainable = [p for p in model.parameters() if p.requires_grad]
    accumulate = cfg.accumulate_steps
    sums = epoch_progress
    start = tick = time.perf_counter() - sums.seconds
    # Per batch (objective, loss, top-1 hits) stay on the device until read: every batch on CPU, every
    # host_read_interval batches on an accelerator (a read is a sync), and before any save.
    read_every = host_read_interval(device)
    pending: list[tuple[int, int, torch.Tensor]] = []  # (batch index, images, [objective, loss, hits])

    def read_pending() -> None:
        """Fold the pending batches into the epoch sums; a non-finite loss raises (on every rank)."""
        rows = torch.stack([values for _, _, values in pending]).tolist() if pending else []
        bad = None
        for (index, count, _), (objective, loss_value, hits) in zip(pending, rows, strict=True):
            if not math.isfinite(objective):
                bad = (f", batch {index + 1}", objective)
                break
            sums.loss_sum += loss_value * count
            sums.correct += int(hits)
            sums.seen += count
        if distributed and any_rank(bad is not None)[0] and bad is None:
            bad = ("", "non-finite on another process")
        if bad is not None:
            raise TrainingError(
                f"the loss became {bad[1]} at epoch {state.epoch + 1}{bad[0]}",
                "lower train.lr or set train.grad_clip_norm (the last finite checkpoint is kept)",
            )
        pending.clear()

    # The gradients are dropped just before the first backward of each optimizer step, as in the textbook
    # loop, not right after the step: freed after the step, their memory goes to the next forward's
    # activations and the backward must fault in fresh pages (5-11% slower per step on CPU, BENCHMARKS.md).
    stale = True  # the gradients held belong to an earlier step (or to none)
    loop_start, first_step = time.perf_counter(), None
    for index, batch in enumerate(loader, start=sums.batches_done):
        sums.data_seconds += time.perf_counter() - tick
        # The last group of an epoch may hold fewer batches: divide by its real size.
        group_start = index - index % accumulate
        group_size = min(accumulate, num_batches - group_start)
        steps_now = index - group_start + 1 == group_size
        # None: every image of this batch failed to decode (each was reported); the batch is skipped.
        missing = batch is None
        if distributed:  # every rank takes the same branch: none waits alone in a collective
            # (before the forward: DDP broadcasts the batch-norm buffers in it)
            missing, stopping = any_rank(missing, stop is not None and stop.requested)
        read_now = (index + 1) % read_every == 0
        # Under DDP the gradients of a micro-batch that only accumulates are not all-reduced yet.
        with no_sync(forward, steps_now):
            if not missing:
                images, labels = batch
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                with autocast(device, precision):
                    logits = forward(images)
                    loss = F.cross_entropy(
                        logits.float(), labels, weight=class_weight, label_smoothing=cfg.label_smoothing
                    )
                objective = loss + penalty() if penalty is not None else loss
                hits = (logits.argmax(dim=1) == labels).sum()
                values = torch.stack([objective.detach(), loss.detach(), hits]).to(sum_dtype(device))
                pending.append((index, labels.numel(), values))
                if read_now:  # (on CPU: every batch, before its backward, so a non-finite loss never steps)
                    read_pending()
                if stale:
                    optimizer.zero_grad(set_to_none=True)
                    stale = False
                scaler.scale(objective / group_size).backward()
            elif read_now:
                read_pending()  # (under torchrun every rank reads at the same batches)
        sums.batches_done = index + 1
        if steps_now:
            if stale:  # every batch of this step was unreadable: step with no gradients, as torch skips them
                optimizer.zero_grad(set_to_none=True)
            stale = True
            if cfg.grad_clip_norm is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            state.global_step += 1
            if first_step is None:  # (with run.compile, the first step compiles the graph)
                first_step = time.perf_counter() - loop_start
            # Between optimizer steps the state is whole (no half-accumulated gradients): save here.
            last_batch = sums.batches_done == num_batches
            wants_save = every_n_steps is not None and state.global_step % every_n_steps == 0
            # Under torchrun, the stop request all ranks agreed on at this step (a signal may reach one first).
            if not distributed:
                stopping = stop is not None and stop.requested
            elif stopping:
                stop.requested = True
            if save_mid_epoch is not None and not last_batch and (wants_save or stopping):
                read_pending()  # the sums saved are whole, and no non-finite step is ever saved
                sums.seconds = time.perf_counter() - start
                save_mid_epoch()
            if stopping and not last_batch:
                raise Interrupted(f"stopped at epoch {state.epoch + 1}, batch {sums.batches_done}", "")
        if progress is not None:
            if not pending:  # (the figures are read: showing them costs no sync)
                elapsed = time.perf_counter() - start
                running = sums.loss_sum / max(sums.seen, 1)
                img_s = f"{sums.seen / max(elapsed, 1e-9):.0f}"
                progress.set_postfix(loss=f"{running:.4f}", img_s=img_s, refresh=False)
            progress.update(1)
        tick = time.perf_counter()
    read_pending()  # (every rank: the epoch's last batches)
    sums.seconds = time.perf_counter() - start
    # The epoch's figures over all ranks (sums of counts; the slowest rank's times).
    totals = torch.tensor([sums.loss_sum, sums.correct, sums.seen], dtype=torch.float64)
    loss_sum, correct, seen = all_reduce_sum(totals)
    seconds, data_seconds = all_reduce_max([sums.seconds, sums.data_seconds])
    if seen.item() == 0:
        raise TrainingError("no training image of this epoch could be read", "check the dataset")
    return {
        "train_loss": loss_sum.item() / seen.item(),
        "train_acc": correct.item() / seen.item(),
        "train_images": int(seen.item()),
        "train_seconds": seconds,
        "data_seconds": data_seconds,
        "images_per_second": seen.item() / max(seconds, 1e-9),
        "first_step_seconds": first_step,
    }


def compiled(module: nn.Module, enabled: bool) -> nn.Module:
    """`run.compile`: the training forward through torch.compile (inductor); `module` keeps the weights.

    Checkpoints save the uncompiled model's state_dict, and evaluation runs uncompiled (ranks may see
    different batch sizes there, and a compile per size would cost more than it saves).
    """
    return torch.compile(module) if enabled else module


def finetune(
    cfg: Config,
    resume: str | None = None,
    dry_run: bool = False,
    quiet: bool = False,
    config_path: str = "<config>",
) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `cfg.data`; returns the run summary (also written to summary.json).

    `config_path` only appears in messages (the command that resumes the run).
    """
    wall_start = time.perf_counter()
    cfg = with_absolute_paths(cfg)
    # Data first: a wrong path or class layout fails before any weights are read.
    split = scan_data(cfg.data, cfg.run.seed)
    # Under torchrun: join the job (gloo on CPU, nccl on CUDA) and take this rank's GPU.
    world, device = distributed.setup(cfg.run.device, cfg.run.dist_timeout_s)
    quiet = quiet or not world.is_main  # only rank 0 prints and writes
    configure_backends(device)
    run_dir = run_directory(cfg)
    checkpoint_dir = run_dir / "checkpoints"

    resumed = open_resume(cfg, resume, split.class_names, world, dry_run, quiet)
    if resumed is not None and resumed["epoch"] >= cfg.train.epochs:
        if world.is_main:
            print(
                f"{checkpoint_dir / 'last.pt' if resume in (None, 'auto') else resume}: the run already finished "
                f"{resumed['epoch']} of {cfg.train.epochs} epochs; nothing to do — raise train.epochs to train longer",
                flush=True,
            )
        distributed.teardown()
        return {"finished": True, "epochs_completed": resumed["epoch"], "run_dir": str(run_dir)}
    saved_world = int(resumed.get("world_size", 1)) if resumed is not None else world.world_size

    seed_everything(cfg.run.seed)
    if resumed is not None:
        built = built_from_checkpoint(resumed)
    else:
        built = build_model(cfg.model, cfg.data, len(split.class_names), split.class_names)
    model = built.model
    if cfg.train.sync_batchnorm and world.enabled:
        if device.type != "cuda":
            raise ConfigError(
                "train.sync_batchnorm needs CUDA: torch's SyncBatchNorm does not run on CPU",
                "set train.sync_batchnorm=false for CPU runs",
            )
        # Same parameters, batch statistics over the global batch (its state_dict keys are BatchNorm's).
        model = built.model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    frozen = freeze_modules(model, cfg.train.freeze)
    # The parts of the backbone as optimizer groups, and the plan that opens them (transfer.py).
    plan = UnfreezePlan(cfg.train, model, frozen, cfg.model.backbone)
    groups = plan.initial_groups()
    if not groups:
        raise ConfigError("train.freeze leaves no parameter to train", "freeze less (e.g. train.freeze=backbone)")
    # (auto on CPU depends on the model and on whether its backbone ever trains: device.py)
    backbone_trains = any(p.requires_grad for p in model.backbone.parameters()) or bool(plan.entries)
    precision = resolve_precision(cfg.train.precision, device, model, backbone_trains)
    model.to(device)
    if use_channels_last(cfg.train.channels_last, model):
        # Weights in NHWC; convolutions then run NHWC (the input is converted by the first one).
        model.to(memory_format=torch.channels_last)
    labels = [label for _, label in split.train]
    class_weight = class_weight_tensor(cfg.train.class_weights, split.class_names, labels)
    class_weight = class_weight.to(device) if class_weight is not None else None

    pin = device.type == "cuda"
    train_loader = make_loader(
        split.train,
        train_transform(built.preprocess, cfg.data.augment),
        cfg.data.batch_size,
        cfg.data.num_workers,
        cfg.run.seed,
        shuffle=True,
        pin_memory=pin,
        balanced=cfg.data.sampler == "balanced",
        shard=world.shard,
        seeded=True,  # each draw's augmentation: a function of (seed, epoch, position), whatever the workers
    )
    val_loader = make_loader(
        split.val,
        eval_transform(built.preprocess),
        cfg.data.batch_size,
        cfg.data.num_workers,
        cfg.run.seed,
        shuffle=False,
        pin_memory=pin,
        shard=world.shard,
    )
    steps = math.ceil(len(train_loader) / cfg.train.accumulate_steps)
    optimizer = make_optimizer(cfg.train, groups)
    if resumed is not None:
        # The same groups in the same order as when the checkpoint was written, before its state loads.
        plan.restore(resumed.get("transfer"), optimizer)
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        if trainable != list(resumed["trainable"]):
            raise CheckpointError(
                "the checkpoint's trainable parameters differ from what its config and unfreeze record give",
                "resume with the original config and tltool version",
            )
    scheduler = make_scheduler(optimizer, cfg.train, steps, plan.opened_steps())
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    frozen = plan.frozen_modules()
    reference, penalty = None, None  # L2-SP: w0 (the backbone at the start of training) and the loss term
    if cfg.train.regularization == "l2sp":
        saved = resumed.get("l2sp_reference") if resumed is not None else None
        reference = {k: v.to(device) for k, v in saved.items()} if saved else l2sp_reference(model)
        penalty = functools.partial(l2sp_penalty, model, reference, cfg.train.l2sp_alpha, cfg.train.l2sp_beta)

    if dry_run:
        if world.is_main:
            print(describe(built, split, cfg, device, precision, steps, plan, optimizer_impl(optimizer)))
            print("dry run: nothing trained, nothing written")
        distributed.teardown()
        return {"dry_run": True}

    state = TrainState()
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        state = TrainState(
            epoch=resumed["epoch"],
            global_step=resumed["global_step"],
            best_metric=resumed["best_metric"],
            best_epoch=resumed["best_epoch"],
            bad_epochs=resumed["early_stopping"]["bad_epochs"],
        )
        # Each rank goes on with its own random streams and epoch sums (rank 0's outside torchrun).
        mine = (resumed.get("rank_states") or [resumed])[world.rank] if saved_world == world.world_size else resumed
        if mine.get("epoch_progress"):
            state.in_epoch = EpochProgress(**mine["epoch_progress"])
        restore_rng(mine["rng"])

    metrics_path = run_dir / "metrics.jsonl"
    state.history = prepare_run_directory(cfg, split.class_names, state.epoch, world.is_main)

    cache = None
    if cache_applies(cfg) and plan.head_only(state.epoch):  # (not once an unfreeze plan opened the backbone)
        cache = build_cache(cfg, model, built.weights_source, built.preprocess, split.train, split.val, device,
                            precision, run_dir / "feature_cache")  # fmt: skip
        if cfg.data.sampler == "balanced":  # the same class-balanced draw over the cached features
            sampler = BalancedSampler(cache.train.labels.tolist(), cfg.run.seed, shard=world.shard)
            cache.train_loader = DataLoader(cache.train, cfg.data.batch_size, sampler=sampler,
                                            collate_fn=cache.train_loader.collate_fn)  # fmt: skip
        say(
            quiet,
            f"feature cache: {len(cache.train)} train x {cache.train.features.shape[0]} view(s) + {len(cache.val)} val "
            f"backbone outputs in {cache.extract_seconds:.1f} s ({cache.location}); epochs train the head only",
        )
    say(
        quiet,
        f"run {run_dir}: {cfg.model.backbone} ({built.weights_source}), {len(split.class_names)} classes, "
        f"{len(split.train)} train / {len(split.val)} val images, {device} {precision}"
        + (f", resumed at epoch {state.epoch + 1}" if resumed is not None else "")
        + (f" batch {state.in_epoch.batches_done + 1}" if state.in_epoch is not None else "")
        + (
            f"; {world.world_size} processes x batch {cfg.data.batch_size} = global batch "
            f"{world.world_size * cfg.data.batch_size}"
            if world.enabled
            else ""
        ),
    )
    show_bars = not quiet and cfg.log.progress
    stopped_early = False
    # With the cache, batches are backbone features and only the head runs; else images through it all.
    # `forward` is what the training batches go through (DDP-wrapped under torchrun); `module` the same,
    # unwrapped, for evaluation.
    cached = cache is not None
    loader, val_batches, module = (
        (cache.train_loader, cache.val_loader, model.head) if cached else (train_loader, val_loader, model)
    )
    forward = compiled(distributed.wrap(module, device), cfg.run.compile)
    compile_pending = cfg.run.compile  # the next epoch's first step compiles: its time is reported
    compile_seconds = 0.0
    num_batches = math.ceil(loader.sampler.shard_size() / cfg.data.batch_size)

    def save_last() -> None:
        # Every rank calls this at the same step: the RNG/epoch sums of all ranks go into rank 0's file,
        # and no rank runs ahead of the save (the barrier).
        mine = {"rng": rng_state(), "epoch_progress": state.in_epoch.to_dict() if state.in_epoch else None}
        rank_states = distributed.all_gather_objects(mine)
        if world.is_main:
            payload = checkpoint_payload(
                cfg, built, split.class_names, frozen, optimizer, scheduler, scaler, state, plan, reference,
                rank_states,
            )  # fmt: skip
            save_atomic(payload, checkpoint_dir / "last.pt")
        distributed.barrier()

    writer = open_tensorboard(cfg, run_dir, state.epoch) if cfg.log.tensorboard and world.is_main else None
    if cfg.log.report and world.is_main:
        from tltool.report import require_matplotlib

        require_matplotlib()  # fail now, not after hours of training
    stop = StopRequest()
    previous_handler = signal.signal(signal.SIGINT, stop.handler) if _main_thread() else None
    try:
        for epoch in range(state.epoch, cfg.train.epochs):
            epoch_start = time.perf_counter()
            if state.in_epoch is None:
                # This epoch's randomness (order, augmentation, dropout) depends on (seed, epoch, rank) only.
                torch.manual_seed(epoch_seed(cfg.run.seed, epoch, world.rank))
                state.in_epoch = EpochProgress()
            # (A resumed epoch continues from its checkpoint's batch, with the RNG state saved there.)
            opening = plan.due(epoch)
            if opening:  # the unfreeze plan opens parts of the backbone from this epoch on
                plan.open(opening, optimizer, state.global_step, epoch + 1)
                scheduler = make_scheduler(optimizer, cfg.train, steps, plan.opened_steps(), state.global_step)
                frozen = plan.frozen_modules()
                say(quiet, f"epoch {epoch + 1}: " + ", ".join(f"{p.name} opens (lr {p.lr:.2e})" for p in opening))
                # From now on the images go through the whole model: the feature cache no longer applies.
                # (Under torchrun the model is wrapped again: DDP hooks the parameters that train when it is built.)
                cached, loader, val_batches, module = False, train_loader, val_loader, model
                forward = compiled(distributed.wrap(module, device), cfg.run.compile)
                compile_pending = cfg.run.compile
                num_batches = math.ceil(loader.sampler.shard_size() / cfg.data.batch_size)
            if cached:
                cache.set_epoch(epoch)
            set_loader_epoch(loader, cfg.run.seed, epoch, skip_batches=state.in_epoch.batches_done, rank=world.rank)
            bar = tqdm(
                total=num_batches,
                initial=state.in_epoch.batches_done,
                desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                leave=False,
                disable=None if show_bars else True,
                file=sys.stderr,
            )
            try:
                train_stats = train_one_epoch(
                    model, loader, optimizer, scheduler, scaler, cfg.train, state, frozen, device, precision,
                    bar, state.in_epoch, num_batches, save_last, cfg.checkpoint.every_n_steps, stop, forward,
                    class_weight, penalty,
                )  # fmt: skip
            finally:
                bar.close()
            if compile_pending and train_stats["first_step_seconds"] is not None:
                compile_pending = False
                compile_seconds += train_stats["first_step_seconds"]
                say(quiet, f"torch.compile: the first step took {train_stats['first_step_seconds']:.1f} s (compiling)")
            val = evaluate(module, val_batches, device, precision, len(split.class_names))
            if not math.isfinite(val["loss"]):
                raise TrainingError(
                    f"the validation loss became {val['loss']} at epoch {epoch + 1}",
                    "lower train.lr or set train.grad_clip_norm (the last finite checkpoint is kept)",
                )
            state.epoch, state.in_epoch = epoch + 1, None
            record = {
                "epoch": state.epoch,
                "lr": _head_lr(optimizer),
                "lr_groups": {g["name"]: g["lr"] for g in optimizer.param_groups},
                "train_loss": train_stats["train_loss"],
                "train_acc": train_stats["train_acc"],
                "val_loss": val["loss"],
                "val_acc1": val["acc1"],
                "val_acc5": val["acc5"],
                "epoch_seconds": time.perf_counter() - epoch_start,
                "images_per_second": train_stats["images_per_second"],
                "data_seconds": train_stats["data_seconds"],
                "global_step": state.global_step,
            }
            value = record[cfg.checkpoint.monitor]
            is_best = _improved(cfg.checkpoint.monitor, value, state.best_metric)
            if is_best:
                state.best_metric, state.best_epoch, state.bad_epochs = value, state.epoch, 0
            else:
                state.bad_epochs += 1
            state.history.append(record)
            if writer is not None:
                log_tensorboard(writer, record)
            # metrics first, then the checkpoint: a crash in between re-runs this epoch and rewrites its line.
            if world.is_main:
                with open(metrics_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
            save_last()
            if is_best and cfg.checkpoint.save_best and world.is_main:
                copy_atomic(checkpoint_dir / "last.pt", checkpoint_dir / "best.pt")
            if world.enabled:  # a Ctrl-C that reached one rank during evaluation stops them all here
                stop.requested = distributed.any_rank(stop.requested)[0]
            say(quiet, epoch_line(record, cfg.train.epochs, is_best))
            patience = cfg.train.early_stopping_patience
            if patience is not None and state.bad_epochs >= patience and state.epoch < cfg.train.epochs:
                say(quiet, f"early stopping: {cfg.checkpoint.monitor} did not improve for {patience} epochs")
                stopped_early = True
                break
            if stop.requested and state.epoch < cfg.train.epochs:
                raise Interrupted(f"stopped after epoch {state.epoch}", "")
    except Interrupted as exc:
        raise Interrupted(
            f"{exc.what}; {checkpoint_dir / 'last.pt'} holds the state",
            f"continue with: tltool finetune {config_path} --resume auto",
        ) from None
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        if writer is not None:
            writer.close()

    last = state.history[-1] if state.history else {}
    summary = {
        "run_dir": str(run_dir),
        "backbone": cfg.model.backbone,
        "weights": built.weights_source,
        "method": describe_method(cfg, plan.base_frozen),
        "transfer": transfer_summary(cfg, plan, optimizer, class_weight),
        "epochs_completed": state.epoch,
        "stopped_early": stopped_early,
        "monitor": cfg.checkpoint.monitor,
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
        "final": last,
        "num_classes": len(split.class_names),
        "train_images": len(split.train),
        "val_images": len(split.val),
        "skipped_images": len(split.bad),
        "feature_cache": {"extract_seconds": cache.extract_seconds, "location": cache.location} if cache else None,
        "device": str(device),
        "precision": precision,
        "optimizer_impl": optimizer_impl(optimizer),
        "compile_seconds": compile_seconds if cfg.run.compile else None,
        "wall_seconds": time.perf_counter() - wall_start,
        "checkpoints": {
            "last": str(checkpoint_dir / "last.pt"),
            "best": str(checkpoint_dir / "best.pt") if cfg.checkpoint.save_best else None,
        },
    }
    if not world.is_main:
        distributed.teardown()
        return {**summary, "rank": world.rank}  # (the CLI prints rank 0's only)
    if world.enabled:
        summary["processes"] = world.world_size
        summary["global_batch"] = world.world_size * cfg.data.batch_size
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if writer is not None and last:
        with open_tensorboard(cfg, run_dir, 0) as hparams_writer:
            final = {f"hparam/{k}": last[k] for k in ("val_acc1", "val_acc5", "val_loss", "train_loss")}
            hparams_writer.add_hparams(hparams(cfg), final, run_name="hparams")
    if cfg.log.report:
        from tltool.report import write_report

        summary["report"] = str(write_report(run_dir, device=cfg.run.device))
        say(quiet, f"report written to {summary['report']}")
    distributed.teardown()
    return summary
