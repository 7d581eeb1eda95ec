"""The training session: everything a run trains with, built once from (config, resume).

`build_session(cfg, resume)` is a sequence of builders, each deciding one thing, in a fixed order (each may
draw from torch's random state): `_open_run` (the data split, scanned before any weights are read; the
torchrun job; the checkpoint it resumes), `_build_model`, `_what_trains` (freeze, unfreeze plan, precision,
placement), the weights' starting points (LP-FT's head, WiSE-FT's theta0, the EMA), `_data_streams`,
`_build_objective` (the loss terms) and `_make_optimizer`; a resumed session then restores each stateful part.
`TrainingSession` then holds them side by side, and each part saves and restores itself in one place:
`checkpoint()` gathers what every part saves, `restore()` gives each its own (the way torchtitan's
CheckpointManager gathers model, optimizers, schedulers and train state).

The loop (train.py) asks the session for an epoch (`enter_epoch`: the epoch's seeds, what the unfreeze
plan opens, feature cache on or off, each stream positioned), trains on its named `streams`, then
`evaluate()` and `save_last()` (or `defer_save()`: checkpoint.max_save_overhead, epochsaves.py). (Past 700
lines: the session and the builders of its parts belong together; what a method adds lives in its own module:
adapt, source, distill, lpft, wise_run, epochsaves.)
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from tltool import distributed, multilabel
from tltool.adapt import TrainForward, adabn_stats, batch_norms, bn_stats, check_adaptation, scan_unlabeled
from tltool.catalog import BACKBONE_NAMES
from tltool.checkpoint import Checkpoint, copy_atomic, map_tensors, restore_rng, rng_state, save_atomic, versions
from tltool.config import Config
from tltool.cotuning import check_cotuning, estimate_relation
from tltool.data import (
    BalancedSampler,
    DataSplit,
    Sample,
    Stream,
    epoch_draws,
    epoch_seed,
    eval_transform,
    make_loader,
    scan_data,
    train_transform,
)
from tltool.data.fingerprint import stream_change, stream_listing, with_streams
from tltool.data.mixing import BatchMixer, make_mixer
from tltool.device import autocast, configure_backends, resolve_precision, use_channels_last
from tltool.distill import open_teacher
from tltool.ema import WeightEMA, build_ema
from tltool.epochsaves import EpochSaves
from tltool.errors import CheckpointError, ConfigError, DataError
from tltool.evaluate import evaluate
from tltool.features import FeatureCache, build_cache, cache_applies, cache_reuse, mixing_turns_cache_off
from tltool.gradckpt import enable_grad_checkpointing
from tltool.lpft import init_head_from_probe
from tltool.models import BuiltModel, build_model, built_from_checkpoint
from tltool.objective import Objective, build_objective
from tltool.optim import make_optimizer, make_scheduler
from tltool.runlog import say
from tltool.runstate import (
    CHANGED_DATA_FIX,
    EpochProgress,
    TrainState,
    check_run_directory,
    open_resume,
    prepare_run_directory,
    resume_data,
    resume_location,
    run_directory,
    tensor_bytes,
    with_absolute_paths,
)
from tltool.source import SourceData, open_source, target_prior
from tltool.transfer import UnfreezePlan, freeze_modules
from tltool.wise_run import WiseStart, start_wise, wise_holdout


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RunFinished(Exception):
    """The checkpoint a run resumes already trained every epoch of the config: nothing to do."""

    def __init__(self, message: str, epochs: int, run_dir: Path) -> None:
        super().__init__(message)
        self.epochs, self.run_dir = epochs, run_dir


@dataclass
class Inputs:
    """What the epochs train and evaluate on: image streams through the whole model, or cached features
    through its head. `forward` is the training forward (DDP-wrapped under torchrun, compiled with
    run.compile); `module` the same, unwrapped, for evaluation."""

    streams: dict[str, Stream]
    val: Iterable[Any]
    module: nn.Module
    forward: nn.Module
    cached: bool


@dataclass
class TrainingSession:
    """What a run trains with, and its state. Built by `build_session`."""

    cfg: Config
    world: distributed.World
    device: torch.device
    precision: str
    quiet: bool
    split: DataSplit
    built: BuiltModel
    plan: UnfreezePlan
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    objective: Objective
    state: TrainState
    steps_per_epoch: int
    image_streams: dict[str, Stream]
    image_val: Iterable[Any]
    unlabeled: list[Sample] | None = None  # adapt.unlabeled's images (label -1)
    source: SourceData | None = None  # source.train's images (after source.select) and classes
    bn_stats: dict[str, dict[str, torch.Tensor]] | None = None  # AdaBN: {"source": ..., "target": ...}
    resumed: Checkpoint | None = None
    wise: WiseStart | None = None  # train.wise_alpha: theta0 and the train images held out to choose alpha
    ema: WeightEMA | None = None  # train.ema_decay: the moving average of the weights (ema.py)
    cache: FeatureCache | None = None
    inputs: Inputs | None = None
    mixer: BatchMixer | None = None  # data.mixup_alpha / cutmix_alpha: mixes each labelled training batch
    compile_pending: bool = False  # the next epoch's first step compiles (its time is reported)
    drops_single: bool = False  # batch norm trains: a batch of one image is never trained on (it cannot be)
    data_fingerprint: dict[str, Any] | None = None  # the samples' fingerprint (split.fingerprint()), saved
    compile_seconds: float = 0.0
    wall_start: float = field(default_factory=time.perf_counter)
    saves: EpochSaves = field(default_factory=lambda: EpochSaves(None))  # checkpoint.max_save_overhead's state

    # --- what it holds ---

    @property
    def model(self) -> nn.Module:
        return self.built.model

    @property
    def run_dir(self) -> Path:
        return run_directory(self.cfg)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def streams(self) -> dict[str, Stream]:
        return self.inputs.streams

    @property
    def forward(self) -> nn.Module:
        return self.inputs.forward

    @property
    def multi_stream(self) -> bool:
        """A run with unlabelled target or labelled source images, or with Co-Tuning (its source head needs the
        backbone's features): steps go through `adapt.TrainForward`."""
        return self.unlabeled is not None or self.source is not None or self.cfg.train.cotuning_weight > 0

    def set_streams(self, streams: dict[str, Stream]) -> None:
        """Train on these batches instead (the benchmark's prepared batches), through the same forward."""
        self.inputs.streams = streams

    # --- the run ---

    def start(self) -> None:
        """Write the run directory (config.yaml, classes.json, metrics.jsonl of the epochs kept) and pick the
        first epoch's inputs: cached backbone features when the backbone is frozen then, else images."""
        cfg, split = self.cfg, self.split
        # (checkpoint.every_n_steps: the user chose how often to save, and every epoch's end saves too)
        self.saves = EpochSaves(None if cfg.checkpoint.every_n_steps else cfg.checkpoint.max_save_overhead)
        if self.world.is_main:  # one line now, not a failed save hours later
            check_run_directory(self.run_dir, self.checkpoint_bytes(), copies=2)
        self.state.history = prepare_run_directory(cfg, split.class_names, self.state.epoch, self.world.is_main)
        self.prepare_inputs(self.run_dir / "feature_cache")
        in_epoch = self.state.in_epoch
        say(
            self.quiet,
            f"run {self.run_dir}: {cfg.model.backbone} ({self.built.weights_source}), {len(split.class_names)} "
            f"classes, {len(split.train)} train / {len(split.val)} val images, {self.device} {self.precision}"
            + (f", resumed at epoch {self.state.epoch + 1}" if self.resumed is not None else "")
            + (f" batch {in_epoch.batches_done + 1}" if in_epoch is not None else "")
            + (
                f"; {self.world.world_size} processes x batch {cfg.data.batch_size} = global batch "
                f"{self.world.world_size * cfg.data.batch_size}"
                if self.world.enabled
                else ""
            ),
        )

    def prepare_inputs(self, cache_dir: Path) -> None:
        """The first epoch's inputs (cached backbone features when the backbone is frozen then, stored under
        `cache_dir` past train.feature_cache_memory_mb, else images) and Co-Tuning's relation. Writes nothing
        else: `start()` calls it for a run, `tltool lr-find` (lrfind.py) with a folder of its own."""
        cfg, split = self.cfg, self.split
        if cache_applies(cfg) and self.plan.head_only(self.state.epoch):
            built = self.built
            extras = {}
            # AdaBN alone reads nothing of the unlabelled images once the frozen backbone's target statistics
            # are estimated: no second pass over them, and no unlabelled stream while the cache serves.
            if self.unlabeled is not None and (cfg.adapt.method != "none" or cfg.distill.teacher):
                target = self.bn_stats["target"] if self.bn_stats else None
                extras["unlabeled"] = (self.unlabeled, self.image_streams["unlabeled"].seed, target)
            if self.source is not None:
                extras["source"] = (self.source.samples, self.image_streams["source"].seed, None)
            self.cache = build_cache(
                cfg, self.model, built.weights_source, built.preprocess, split.train, split.val, self.device,
                self.precision, cache_dir, extras,
            )  # fmt: skip
            if cfg.data.sampler == "balanced":  # the same class-balanced draw over the cached features
                sampler = BalancedSampler(self.cache.train.labels.tolist(), cfg.run.seed, shard=self.world.shard)
                self.cache.train_loader = DataLoader(self.cache.train, cfg.data.batch_size, sampler=sampler,
                                                     collate_fn=self.cache.train_loader.collate_fn)  # fmt: skip
            if self.drops_single:  # (the backbone opens later: cached epochs draw as many batches as image ones)
                for loader in (self.cache.train_loader, *self.cache.extra_loaders.values()):
                    loader.sampler.drop_single = cfg.data.batch_size
            say(
                self.quiet,
                f"feature cache: {len(self.cache.train)} train x {self.cache.train.features.shape[0]} view(s) + "
                f"{len(self.cache.val)} val backbone outputs in {self.cache.extract_seconds:.1f} s "
                f"({self.cache.location}{cache_reuse(self.cache)}); epochs train the head only",
            )
        elif mixing_turns_cache_off(cfg) and self.plan.head_only(self.state.epoch):
            say(self.quiet, "feature cache: off, MixUp/CutMix mix the images (the frozen backbone runs every step)")
        cotuning = self.objective.term("cotuning")
        if cotuning is not None and cotuning.state["relation"] is None:  # a new run: estimated once, then saved
            cotuning.state["relation"] = estimate_relation(
                cfg, self.built, cotuning.module, split.train, len(split.class_names), self.device, self.precision,
                self.cache.train if self.cache is not None else None,
            ).to(self.device)  # fmt: skip
            say(self.quiet, f"co-tuning: p(source class | target class) from {len(split.train)} train images, "
                f"{cotuning.state['relation'].shape[1]} source classes")  # fmt: skip
        self._select_inputs(cached=self.cache is not None)
        train_sampler = epoch_draws(self.image_streams["train"].loader)
        if self.drops_single and getattr(train_sampler, "dropped", lambda: 0)():
            say(
                self.quiet,
                f"note: {train_sampler.full_shard_size()} training images per epoch"
                + (" per process" if self.world.enabled else "")
                + f" in batches of {cfg.data.batch_size} would end in a batch of one, which batch norm cannot "
                "train on: each epoch leaves its last drawn image out (another one each epoch)",
            )

    def _select_inputs(self, cached: bool) -> None:
        if cached:
            cache = self.cache
            streams = {"train": Stream("train", cache.train_loader, self.cfg.data.batch_size)}
            for name, loader in cache.extra_loaders.items():
                streams[name] = Stream(name, loader, self.cfg.data.batch_size, self.image_streams[name].seed)
            inputs = (streams, cache.val_loader, self.model.head)
        else:
            inputs = (dict(self.image_streams), self.image_val, self.model)
        step_module = inputs[2]
        if self.multi_stream:  # every stream in one module (DDP wraps it whole); AdaBN's target statistics inside
            target = self.bn_stats["target"] if self.bn_stats and not cached else None
            shares = self.source is None or self.source.shares_head
            step_module = TrainForward(self.model, head_only=cached, target_stats=target, source_shares_head=shares)
        forward = distributed.wrap(step_module, self.device)
        if self.cfg.run.compile:
            # Checkpoints save the uncompiled model's state_dict, and evaluation runs uncompiled (ranks may see
            # different batch sizes there, and a compile per size would cost more than it saves).
            forward = torch.compile(forward)
        self.inputs = Inputs(*inputs, forward=forward, cached=cached)
        self.compile_pending = self.cfg.run.compile

    def enter_epoch(self, epoch: int) -> None:
        """Make (0-based) `epoch` ready: its seeds, what the unfreeze plan opens, the inputs, each stream's order.

        A resumed epoch continues from its checkpoint's batch, with the random state saved there.
        """
        cfg, state = self.cfg, self.state
        if state.in_epoch is None:
            # This epoch's randomness (order, augmentation, dropout) depends on (seed, epoch, rank) only.
            torch.manual_seed(epoch_seed(cfg.run.seed, epoch, self.world.rank))
            state.in_epoch = EpochProgress()
            if cfg.source.class_weights == "target_prior" and epoch > 0:  # (epoch 1: the untrained head's is noise)
                self.objective.term("source").state["class_weights"] = self._source_prior()
        opening = self.plan.due(epoch)
        if opening:  # the unfreeze plan opens parts of the backbone from this epoch on
            self.plan.open(opening, self.optimizer, state.global_step, epoch + 1)
            self.scheduler = make_scheduler(
                self.optimizer, cfg.train, self.steps_per_epoch, self.plan.opened_steps(), state.global_step
            )
            say(self.quiet, f"epoch {epoch + 1}: " + ", ".join(f"{p.name} opens (lr {p.lr:.2e})" for p in opening))
            # From now on the images go through the whole model: the feature cache no longer applies.
            # (Under torchrun the model is wrapped again: DDP hooks the parameters that train when it is built.)
            self._select_inputs(cached=False)
        if self.inputs.cached:
            self.cache.set_epoch(epoch)
        for stream in self.streams.values():
            stream.set_epoch(cfg.run.seed, epoch, state.in_epoch.batches_done, self.world.rank)

    @torch.no_grad()
    def _source_prior(self) -> torch.Tensor:
        """PADA's source class weights from the model's predictions on the target training images (eval mode;
        every rank on all of them: the same weights everywhere)."""
        head = self.model.head if self.source.shares_head else self.objective.term("source").module
        self.model.eval()
        head.eval()
        if self.inputs.cached:
            batches = [self.cache.train.features[0]]
        else:
            loader = make_loader(self.split.train, eval_transform(self.built.preprocess), self.cfg.data.batch_size,
                                 self.cfg.data.num_workers, self.cfg.run.seed, shuffle=False)  # fmt: skip
            batches = [self.model.features(b[0].to(self.device)) for b in loader if b is not None]
        with autocast(self.device, self.precision):
            probabilities = torch.cat([head(f.to(self.device)).float().softmax(dim=1) for f in batches])
        return target_prior(probabilities)

    def evaluate(self) -> dict[str, Any]:
        return evaluate(self.inputs.module, self.inputs.val, self.device, self.precision, len(self.split.class_names))

    def evaluate_ema(self) -> dict[str, Any]:
        """`evaluate()` of the EMA weights (train.ema_decay), on the same inputs (cached features or images)."""
        module = self.ema.module(self.inputs.cached)
        return evaluate(module, self.inputs.val, self.device, self.precision, len(self.split.class_names))

    def head_lr(self) -> float:
        """The head's current LR (the LR of metrics.jsonl); the last group's when the head is frozen."""
        groups = self.optimizer.param_groups
        return next((g["lr"] for g in groups if g.get("name") == "head"), groups[-1]["lr"])

    # --- saving and restoring: each part its own keys ---

    def checkpoint(self, rank_states: list[dict[str, Any]]) -> Checkpoint:
        """Everything a resume needs. `rank_states`: each rank's RNG and epoch sums (one entry outside torchrun)."""
        model, state = self.model, self.state
        terms = {name: value for name, value in self.objective.state_dict().items() if name != "l2sp"}
        l2sp = self.objective.state_dict().get("l2sp")
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        bn = None
        if self.bn_stats:  # AdaBN: the saved model carries the target's statistics (the source's are kept aside)
            bn = {"source": bn_stats(model.backbone), "target": self.bn_stats["target"]}  # (the live source's)
            weights.update({f"backbone.{k}": v.detach().cpu() for k, v in bn["target"].items()})
        # train.ema_decay: the EMA's state; monitored, the EMA is the checkpoint's model (the trained weights aside)
        ema = self.ema.checkpoint_state(weights) if self.ema is not None else None
        ema_model = ema is not None and self.cfg.checkpoint.monitor.endswith("_ema")
        return Checkpoint(
            **versions(),
            config=self.cfg.to_dict(),
            class_names=list(self.split.class_names),
            preprocess=self.built.preprocess.to_dict(),
            arch=self.built.arch,
            weights_source=self.built.weights_source,
            model=ema["model"] if ema_model else weights,
            weights="ema" if ema_model else "raw",
            raw_model=weights if ema_model else None,
            ema=ema,
            bn_stats=_to_cpu(bn),
            trainable=[name for name, p in model.named_parameters() if p.requires_grad],
            frozen_modules=list(self.plan.frozen_modules()),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            transfer=self.plan.state_dict(),  # which parts of the backbone opened, at which step
            l2sp_reference={k: v.detach().cpu() for k, v in l2sp["reference"].items()} if l2sp else None,
            loss_terms=_to_cpu(terms) if terms else None,
            initial_model=self.wise.initial if self.wise is not None else None,
            data_fingerprint=self.data_fingerprint,
            **state.checkpoint_fields(),
            rng=rank_states[0]["rng"],
            world_size=len(rank_states),
            rank_states=rank_states if len(rank_states) > 1 else None,
        )

    def restore(self, checkpoint: Checkpoint) -> None:
        """Load the optimizer, schedule, scaler, loop state and this rank's random streams of `checkpoint`."""
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scheduler.load_state_dict(checkpoint.scheduler)
        self.scaler.load_state_dict(checkpoint.scaler)
        self.state = TrainState.from_checkpoint(checkpoint)
        # Each rank goes on with its own random streams and epoch sums (rank 0's outside torchrun); an
        # end-of-epoch checkpoint of another world size gives every rank rank 0's.
        same_world = checkpoint.world_size == self.world.world_size
        mine = checkpoint.rank_state(self.world.rank if same_world else 0)
        if mine.get("epoch_progress"):
            self.state.in_epoch = EpochProgress.from_dict(mine["epoch_progress"])
        restore_rng(mine["rng"])
        if self.ema is not None:
            self.ema.restore(checkpoint.ema)

    def _rank_states(self) -> list[dict[str, Any]]:
        """Each rank's RNG and epoch sums, gathered (a collective: every rank calls it at the same step)."""
        state = self.state
        mine = {"rng": rng_state(), "epoch_progress": state.in_epoch.to_dict() if state.in_epoch else None}
        return distributed.all_gather_objects(mine)

    def save_last(self) -> None:
        """checkpoints/last.pt, and best.pt when a deferred best epoch waits (epochsaves.py). Every rank calls
        this at the same step: the RNG and epoch sums of all ranks go into rank 0's file, and no rank runs ahead
        of the save (the barrier)."""
        started = self.saves.clock()
        rank_states = self._rank_states()
        if self.world.is_main:
            best = self.saves.best
            check_run_directory(self.run_dir, self.checkpoint_bytes(), copies=1 if best is None else 2)
            save_atomic(self.checkpoint(rank_states).to_dict(), self.checkpoint_dir / "last.pt")
            if best is not None and best[0] == self.state.epoch and self.state.in_epoch is None:
                copy_atomic(self.checkpoint_dir / "last.pt", self.checkpoint_dir / "best.pt")  # (that epoch's end)
            elif best is not None:
                save_atomic(best[1], self.checkpoint_dir / "best.pt")
        distributed.barrier()
        self.saves.saved(started)

    def defer_save(self, is_best: bool) -> None:
        """The epoch that just ended is not saved now (epochsaves.py); a best one is kept for best.pt."""
        keep = is_best and self.cfg.checkpoint.save_best
        rank_states = self._rank_states() if keep else None
        best = self.checkpoint(rank_states).to_dict() if keep and self.world.is_main else None
        self.saves.defer(self.state.epoch, best)

    def checkpoint_bytes(self) -> int:
        """A checkpoint's size: the last one's on disk, or before any, the model's tensors three times (the
        weights, and an optimizer state of up to two tensors per trainable weight)."""
        last = self.checkpoint_dir / "last.pt"
        if last.is_file():
            return last.stat().st_size
        ema = tensor_bytes(self.ema.averaged.state_dict()) if self.ema is not None else 0
        return 3 * tensor_bytes(self.model.state_dict()) + ema

    def save_best(self) -> None:
        """checkpoints/best.pt: the last.pt just written, under a second name (rank 0)."""
        if self.cfg.checkpoint.save_best and self.world.is_main:
            copy_atomic(self.checkpoint_dir / "last.pt", self.checkpoint_dir / "best.pt")


def _to_cpu(value: Any) -> Any:
    return map_tensors(value, lambda tensor: tensor.detach().cpu())


def build_session(
    cfg: Config,
    resume: str | None = None,
    quiet: bool = False,
    dry_run: bool = False,
    changed_data: bool = False,
    read_only: bool = False,
) -> TrainingSession:
    """The session of a run: a new one, or the one `resume` ("auto" or a checkpoint path) continues.

    `changed_data` (--resume-changed-data): resume even though the data differs from the checkpoint's
    fingerprint (runstate.resume_data says what changed and which split the run keeps). `read_only`: the
    caller trains but never calls `start()` nor writes the run directory (`tltool lr-find`), so a run already
    there is no obstacle.

    Raises RunFinished when the checkpoint already trained every epoch. Writes nothing: `start()` does.
    The parts are built in a fixed order (each may draw from torch's random state): the run and its data,
    the model and what trains, the weights' starting points (LP-FT's head, WiSE-FT's theta0, the EMA), the
    data streams, the loss terms, the optimizer and schedule; a resumed run then restores their state.
    """
    wall_start = time.perf_counter()
    run = _open_run(cfg, resume, quiet, dry_run, changed_data, read_only)
    cfg, split, resumed, device = run.cfg, run.split, run.resumed, run.device
    built = _build_model(run)
    plan, groups, precision = _what_trains(cfg, built, device, run.quiet)
    model = built.model
    init_head_from_probe(
        cfg, built, split, device, precision, resumed=resumed is not None, dry_run=dry_run, quiet=run.quiet
    )
    wise = start_wise(cfg, model, resumed, run.wise_held)  # theta0: after the head is set, before the first step
    ema = build_ema(cfg, model, plan.backbone_ever_trains(), cfg.adapt.bn_stats == "target")
    data = _data_streams(run, built, plan, precision)
    objective = _build_objective(run, built, data.source)
    optimizer = _make_optimizer(run, plan, groups + _term_groups(cfg, objective, device), model)
    steps = math.ceil(len(data.streams["train"].loader) / cfg.train.accumulate_steps)
    session = TrainingSession(
        cfg=cfg,
        world=run.world,
        device=device,
        precision=precision,
        quiet=run.quiet,
        split=split,
        built=built,
        plan=plan,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, cfg.train, steps, plan.opened_steps()),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        objective=objective,
        state=TrainState(),
        steps_per_epoch=steps,
        image_streams=data.streams,
        image_val=data.val,
        unlabeled=data.unlabeled,
        source=data.source,
        bn_stats=data.bn_stats,
        resumed=resumed,
        wise=wise,
        mixer=make_mixer(cfg.data, len(split.class_names), cfg.run.seed),
        ema=ema,
        wall_start=wall_start,
        drops_single=data.drops_single,
        data_fingerprint=data.fingerprint,
    )
    if resumed is not None and not dry_run:
        session.restore(resumed)
    return session


@dataclass
class _Run:
    """What `build_session` settles before any weights are read (`_open_run`)."""

    cfg: Config  # paths absolute; a moved run directory: where its checkpoint is now
    world: distributed.World
    device: torch.device
    quiet: bool  # (every rank but 0 is quiet)
    split: DataSplit  # the data this run trains and evaluates on (a resumed run's: its checkpoint's)
    resumed: Checkpoint | None
    wise_held: list[Sample]  # train.wise_alpha=auto: train images kept out to choose alpha
    where: str = ""  # the resumed checkpoint, in messages
    changed_data: bool = False  # --resume-changed-data

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"


def _open_run(cfg: Config, resume: str | None, quiet: bool, dry_run: bool, changed_data: bool, read_only: bool) -> _Run:
    """Which run this is, on which data: the config with absolute paths and the run directory its checkpoint is
    in, the data split, the torchrun world and device, the checkpoint it resumes (config, classes and data must
    match it) and WiSE-FT's held-out train images. Raises RunFinished when that checkpoint trained every epoch."""
    cfg = with_absolute_paths(cfg, BACKBONE_NAMES)
    cfg = resume_location(cfg, resume, quiet)  # a moved run directory: continue where the checkpoint is
    if cfg.data.task == "multilabel":
        multilabel.functional()  # (its metrics are torchmetrics': missing, one line with the pip command)
    world, device, split = _scan_and_join(cfg)
    quiet = quiet or not world.is_main  # only rank 0 prints and writes
    configure_backends(device)
    resumed = open_resume(cfg, resume, split.class_names, world, dry_run or read_only, quiet)
    where = run_directory(cfg) / "checkpoints" / "last.pt" if resume in (None, "auto") else resume
    if resumed is not None:  # the data the checkpoint trained on, or a one-line refusal saying what changed
        split = resume_data(resumed, split, changed_data, str(where), quiet)
    split, wise_held = wise_holdout(cfg, split)  # train.wise_alpha=auto: train images that only choose alpha
    if resumed is not None and resumed.epoch >= cfg.train.epochs:
        raise RunFinished(
            f"{where}: the run already finished {resumed.epoch} of {cfg.train.epochs} epochs; nothing to do — "
            "raise train.epochs to train longer",
            resumed.epoch,
            run_directory(cfg),
        )
    return _Run(cfg, world, device, quiet, split, resumed, wise_held, str(where), changed_data)


def _scan_and_join(cfg: Config) -> tuple[distributed.World, torch.device, DataSplit]:
    """The world, the device and the data split. Data first: a wrong path or class layout fails before any
    weights are read. Under torchrun: join the job (gloo on CPU, nccl on CUDA) and take this rank's GPU, then
    rank 0 scans and every rank gets its split (one walk and header check of the dataset, not one per process;
    a data error is every rank's one line)."""
    if distributed.launched():
        world, device = distributed.setup(cfg.run.device, cfg.run.dist_timeout_s)
        split = distributed.main_computes(lambda: scan_data(cfg.data, cfg.run.seed))
    else:
        split = scan_data(cfg.data, cfg.run.seed)
        world, device = distributed.setup(cfg.run.device, cfg.run.dist_timeout_s)
    return world, device, split


def _build_model(run: _Run) -> BuiltModel:
    """The network: the resumed checkpoint's (its trained weights, not an EMA saved as the model), or a new one
    from model.* with its initialisation seeded by run.seed (Co-Tuning keeps the pretrained classifier); with
    train.sync_batchnorm under torchrun, batch statistics over the global batch (CUDA only)."""
    cfg = run.cfg
    seed_everything(cfg.run.seed)
    if run.resumed is not None:
        built = built_from_checkpoint(run.resumed.resumable())
    else:
        built = build_model(cfg.model, cfg.data, len(run.split.class_names), run.split.class_names,
                            keep_source_head=cfg.train.cotuning_weight > 0)  # fmt: skip
    if cfg.train.sync_batchnorm and run.world.enabled:
        if run.device.type != "cuda":
            raise ConfigError(
                "train.sync_batchnorm needs CUDA: torch's SyncBatchNorm does not run on CPU",
                "set train.sync_batchnorm=false for CPU runs",
            )
        # Same parameters, batch statistics over the global batch (its state_dict keys are BatchNorm's).
        built.model = nn.SyncBatchNorm.convert_sync_batchnorm(built.model)
    return built


def _what_trains(
    cfg: Config, built: BuiltModel, device: torch.device, quiet: bool
) -> tuple[UnfreezePlan, list[dict[str, Any]], str]:
    """What trains, and in which precision and layout: train.freeze, then the plan that opens parts of the
    backbone as optimizer groups (its first groups; nothing to train, or a method that needs a training
    backbone without one, is refused); the precision; the model on the device, in channels_last when it helps,
    each backbone stage checkpointed with train.grad_checkpointing (before the EMA's copy, DDP and compile)."""
    model = built.model
    plan = UnfreezePlan(cfg.train, model, freeze_modules(model, cfg.train.freeze), cfg.model.backbone)
    groups = plan.initial_groups()
    if not groups:
        raise ConfigError("train.freeze leaves no parameter to train", "freeze less (e.g. train.freeze=backbone)")
    check_adaptation(cfg, plan)
    check_cotuning(cfg, plan)
    # (auto on CPU depends on the model and on whether its backbone ever trains: device.py)
    precision = resolve_precision(cfg.train.precision, device, model, plan.backbone_ever_trains())
    model.to(device)
    if use_channels_last(cfg.train.channels_last, model):
        # Weights in NHWC; convolutions then run NHWC (the input is converted by the first one).
        model.to(memory_format=torch.channels_last)
    if cfg.train.grad_checkpointing:
        if plan.backbone_ever_trains():
            enable_grad_checkpointing(model.backbone)
        else:
            say(quiet, "train.grad_checkpointing: the backbone never trains (frozen), nothing to checkpoint")
    return plan, groups, precision


@dataclass
class _Data:
    """The image streams and the val loader (`_data_streams`)."""

    streams: dict[str, Stream]
    val: DataLoader
    drops_single: bool
    unlabeled: list[Sample] | None = None
    bn_stats: dict[str, dict[str, torch.Tensor]] | None = None
    source: SourceData | None = None
    fingerprint: dict[str, Any] | None = None  # the split's and the other streams' (checked against a resumed run's)


def _data_streams(run: _Run, built: BuiltModel, plan: UnfreezePlan, precision: str) -> _Data:
    """The image streams and the val loader: `train` (each draw's augmentation seeded, sharded over the ranks,
    class-balanced with data.sampler=balanced), `unlabeled` (adapt.unlabeled, with AdaBN's target statistics)
    and `source` (source.train after source.select), which draw one batch per train batch. Decides
    `drops_single`: whether an epoch that would end in a batch of one image leaves it out."""
    cfg, split, model = run.cfg, run.split, built.model
    augmented = train_transform(built.preprocess, cfg.data.augment, cfg.data.random_erasing)  # (every image stream)
    # Batch norm that trains (some epoch) cannot train on a batch of one image: an epoch that would end in one
    # leaves that image out, the same cut in every stream, epoch, rank and resume (EpochSampler.drop_single).
    drops_single = bool(batch_norms(model)) and plan.backbone_ever_trains() and cfg.train.bn_policy != "frozen"
    train_loader = make_loader(
        split.train,
        augmented,
        cfg.data.batch_size,
        cfg.data.num_workers,
        cfg.run.seed,
        shuffle=True,
        pin_memory=run.pin_memory,
        balanced=cfg.data.sampler == "balanced",
        shard=run.world.shard,
        seeded=True,  # each draw's augmentation: a function of (seed, epoch, position), whatever the workers
        drop_single=drops_single,
        buffer=cfg.data.shuffle_buffer,
    )
    if drops_single and epoch_draws(train_loader).full_shard_size() == 1:
        raise DataError(
            "a single training image per process: batch norm cannot train on a batch of one",
            "add training images (or use fewer processes, or train.bn_policy=frozen)",
        )
    val_loader = make_loader(
        split.val,
        eval_transform(built.preprocess),
        cfg.data.batch_size,
        cfg.data.num_workers,
        cfg.run.seed,
        shuffle=False,
        pin_memory=run.pin_memory,
        shard=run.world.shard,
    )
    data = _Data({"train": Stream("train", train_loader, cfg.data.batch_size)}, val_loader, drops_single)
    if cfg.adapt.unlabeled:
        data.unlabeled = scan_unlabeled(cfg.adapt.unlabeled)
        seed = cfg.run.seed * 1_000_033 + 17  # (its own order, not the labelled stream's)
        data.streams["unlabeled"] = _paired_stream(run, "unlabeled", data.unlabeled, seed, augmented, drops_single)
        if cfg.adapt.bn_stats == "target":
            data.bn_stats = adabn_stats(cfg, model, built, data.unlabeled, run.resumed, run.device, precision)
    if cfg.source.train:
        saved = run.resumed.data_fingerprint if run.resumed is not None else None
        kept = saved.get("source_selection") if saved else None  # (a resumed run: the images it chose at start)
        data.source = open_source(cfg, split, built, run.device, precision, kept)
        seed = cfg.run.seed * 1_000_033 + 29
        data.streams["source"] = _paired_stream(run, "source", data.source.samples, seed, augmented, drops_single)
    data.fingerprint = _streams_fingerprint(run, data)
    return data


def _streams_fingerprint(run: _Run, data: _Data) -> dict[str, Any]:
    """The checkpoint's data fingerprint: the split's, with the folders of adapt.unlabeled and source.train. A
    resumed run whose checkpoint recorded them refuses, in one line, folders that changed since (as it does for
    data.train and data.val; --resume-changed-data goes on with them as they are now)."""
    streams = {}
    if data.unlabeled is not None:
        streams["adapt.unlabeled"] = stream_listing(run.cfg.adapt.unlabeled, data.unlabeled)
    if data.source is not None:
        streams["source.train"] = data.source.listing
    fingerprint = with_streams(run.split.fingerprint(), streams)
    if data.source is not None and data.source.selection is not None:
        fingerprint["source_selection"] = data.source.selection  # (source.select=nearest: kept for a resume)
    change = stream_change(run.resumed.data_fingerprint, fingerprint) if run.resumed is not None else None
    if change is not None and change.changed:
        if not run.changed_data:
            raise DataError(f"the data changed since {run.where}: {change.text()}", CHANGED_DATA_FIX)
        say(run.quiet, f"--resume-changed-data: {change.text()}; going on with those folders as they are now")
    return fingerprint


def _paired_stream(
    run: _Run, name: str, samples: list[Sample], seed: int, transform: Any, drops_single: bool
) -> Stream:
    """A stream drawn beside `train`, one batch per train batch: its own seed (its own order), as many draws
    as the train set has images (CyclingSampler), sharded and cut like `train`."""
    data = run.cfg.data
    loader = make_loader(samples, transform, data.batch_size, data.num_workers, seed, shuffle=True,
                         pin_memory=run.pin_memory, shard=run.world.shard, seeded=True, draws=len(run.split.train),
                         drop_single=drops_single)  # fmt: skip
    return Stream(name, loader, data.batch_size, seed)


def _build_objective(run: _Run, built: BuiltModel, source: SourceData | None) -> Objective:
    """The loss terms (objective.build_objective decides which), given the state a resumed run saved for them
    (L2-SP's reference weights, each term's own) and distill.teacher's model."""
    cfg, split, resumed, device = run.cfg, run.split, run.resumed, run.device
    saved_terms = None
    if resumed is not None:
        saved_terms = dict(resumed.loss_terms or {})
        if resumed.l2sp_reference:
            saved_terms["l2sp"] = {"reference": resumed.l2sp_reference}
    labels = [label for _, label in split.train]
    teacher = (
        open_teacher(cfg.distill.teacher, split.class_names, built.preprocess, device) if cfg.distill.teacher else None
    )
    return build_objective(
        cfg,
        built.model,
        split.class_names,
        labels,
        device,
        saved_terms,
        built.arch["in_features"],
        teacher,
        source,
        built.source_head,
    )


def _term_groups(cfg: Config, objective: Objective, device: torch.device) -> list[dict[str, Any]]:
    """An optimizer group for each loss term with parameters of its own (DANN's discriminator, a source head,
    Co-Tuning's classifier), named after the term, at train.lr x its lr_scale (no weight decay under L2-SP);
    each such term's module gets its DDP wrapper (`Term.forward`). They follow the plan's groups, before any
    group the plan opens later."""
    groups = []
    for name, module in objective.modules().items():
        decay = 0.0 if cfg.train.regularization == "l2sp" else cfg.train.weight_decay
        lr = cfg.train.lr * objective.term(name).lr_scale
        groups.append({"params": list(module.parameters()), "name": name, "lr": lr,
                       "initial_lr": lr, "weight_decay": decay})  # fmt: skip
        objective.term(name).forward = distributed.wrap(module, device)
    return groups


def _make_optimizer(
    run: _Run, plan: UnfreezePlan, groups: list[dict[str, Any]], model: nn.Module
) -> torch.optim.Optimizer:
    """The optimizer over `groups`. A resumed run's plan first reopens what had opened, so the groups are those,
    in that order, of when the checkpoint was written (its state loads in `restore`), and the parameters that
    train must be the checkpoint's."""
    optimizer = make_optimizer(run.cfg.train, groups)
    if run.resumed is not None:
        plan.restore(run.resumed.transfer, optimizer)
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        if trainable != list(run.resumed.trainable):
            raise CheckpointError(
                "the checkpoint's trainable parameters differ from what its config and unfreeze record give",
                "resume with the original config and tltool version",
            )
    return optimizer
