"""`tltool finetune`: the training loop, top to bottom.

finetune() builds the training session (session.py: model, plan, optimizer, loss terms, data streams,
each restored from the checkpoint it resumes), then per epoch: enter it, train_one_epoch(), evaluate,
one line of metrics.jsonl, checkpoints/last.pt (and best.pt), the stop checks. Every epoch's randomness
is a function of (run.seed, epoch), and the full state is in last.pt, so a resumed run ends with the
same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tltool import distributed
from tltool.config import Config
from tltool.data import epoch_draws
from tltool.device import autocast, host_read_interval, sum_dtype
from tltool.distributed import all_reduce_max, all_reduce_sum, any_rank, no_sync
from tltool.ema import ema_metrics
from tltool.epochsaves import SNAPSHOT_LIMIT
from tltool.errors import TrainingError
from tltool.multilabel import MULTILABEL_METRICS
from tltool.objective import StepOutputs
from tltool.runlock import acquire
from tltool.runlog import (
    describe,
    epoch_line,
    hparams,
    log_tensorboard,
    open_tensorboard,
    resume_command,
    run_summary,
    say,
)
from tltool.runstate import TrainState, append_metrics, resume_location, run_directory, write_text_atomic
from tltool.session import RunFinished, TrainingSession, build_session
from tltool.timelimit import TimeBudget
from tltool.tracking import MlflowTracker, require_mlflow
from tltool.transfer import set_train_mode
from tltool.wise_run import finish_wise

# The signals that stop a run as the first Ctrl-C does: at the next optimizer step, saved, exit 128 + N.
# SIGTERM: `kill`, Slurm/Kubernetes before their SIGKILL; SIGHUP: the terminal closed; SIGUSR1: Slurm's
# `--signal=USR1@<seconds>` warning before the time limit.
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1") if hasattr(signal, name)
)
TIME_LIMIT_EXIT = 75  # EX_TEMPFAIL (sysexits.h): not finished, saved, run the same command again (README)


class StopRequest:
    """Why the run stops before its last epoch: a signal (STOP_SIGNALS), or `run.time_limit` (`budget`).

    The first signal sets `requested`: the loop stops at the next optimizer step, saves, and exits 128 + N
    (130 for Ctrl-C, 143 for SIGTERM). A second Ctrl-C outside torchrun stops at once (KeyboardInterrupt; the
    atomic writer leaves last.pt whole). Any other second signal is only noted: schedulers and torchrun's
    agent repeat SIGTERM (the agent forwards to its workers the signal they may already have had), and
    SIGKILL is the way to stop at once.
    """

    def __init__(self, budget: TimeBudget | None = None) -> None:
        self.requested = False
        self.signum: int | None = None
        self.budget = budget
        self.reason: str | None = None  # "SIGTERM", ..., or "time_limit"

    def handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            if signum == signal.SIGINT and self.signum == signal.SIGINT and not distributed.launched():
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            print(f"\n{name}: already stopping after this step (SIGKILL stops at once)", file=sys.stderr, flush=True)
            return
        self.requested, self.signum, self.reason = True, signum, name
        again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT and not distributed.launched() else ""
        print(f"\n{name}: stopping after this step{again} ...", file=sys.stderr, flush=True)

    def out_of_time(self) -> None:
        """`run.time_limit` leaves no room for another step: stop at this one."""
        if not self.requested:
            self.requested, self.reason = True, "time_limit"

    def agree(self) -> None:
        """Under torchrun, once every rank knows a stop is agreed on: take the signal of the rank that had one."""
        code = int(all_reduce_max([float(self.signum or 0)])[0])
        self.requested = True
        if self.signum is None and code:
            self.signum, self.reason = code, signal.Signals(code).name

    def timed(self, what: str, action: Callable[[], Any]) -> Callable[[], Any]:
        """`action` (a save, an evaluation), its time measured for run.time_limit's estimates."""
        if self.budget is None:
            return action

        def measured() -> Any:
            with self.budget.measure(what):
                return action()

        return measured

    @property
    def exit_code(self) -> int:
        return TIME_LIMIT_EXIT if self.signum is None else 128 + self.signum

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """The handlers of STOP_SIGNALS for the duration of the loop (only the main thread may set them).

        A SIGHUP this process was started ignoring stays ignored: `nohup tltool finetune ...` asked to survive
        the terminal's hangup, so closing the terminal must not stop the run. (Only SIGHUP: a shell starts its
        background jobs with SIGINT ignored, and a kill -INT to such a run must still save and stop it.)
        """
        main = threading.current_thread() is threading.main_thread()
        hangup = getattr(signal, "SIGHUP", None)
        ignored = {hangup} if hangup is not None and signal.getsignal(hangup) is signal.SIG_IGN else set()
        wanted = [s for s in STOP_SIGNALS if s not in ignored] if main else []
        previous = {signum: signal.signal(signum, self.handler) for signum in wanted}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


class Interrupted(TrainingError):
    """Training stopped on request (a signal, or run.time_limit); the state is saved."""

    exit_code = 130

    def __init__(self, what: str, fix: str = "", exit_code: int = 130) -> None:
        super().__init__(what, fix)
        self.exit_code = exit_code


def train_one_epoch(
    session: TrainingSession,
    progress: tqdm | None = None,
    stop: StopRequest | None = None,
    save: Callable[[], None] | None = None,
    on_batch: Callable[[torch.Tensor, bool], bool] | None = None,
) -> dict[str, Any] | None:
    """One pass over the session's `train` stream: forward, loss terms, backward, (clip), step, schedule.

    The stream yields the batches from `state.in_epoch.batches_done` on (a resumed epoch starts mid-way);
    `save()` is called every `checkpoint.every_n_steps` optimizer steps and when a stop is requested.
    `on_batch(objective, ends_step)` sees each trained batch's objective before its backward; when it returns
    True the pass ends there, before that backward, and returns None (`tltool lr-find`'s range test, lrfind.py).
    Each batch is `EpochSteps.train`'s; this is the loop, the progress bar and the epoch's figures.
    """
    steps = EpochSteps(session, stop, save, on_batch)
    sums = session.state.in_epoch
    tick = time.perf_counter()  # (not steps.start: a resumed epoch's earlier seconds are no data wait)
    for index, batch in enumerate(steps.stream.loader, start=sums.batches_done):
        sums.data_seconds += time.perf_counter() - tick
        if not steps.train(index, batch):
            return None
        if progress is not None:
            steps.show(progress)
        tick = time.perf_counter()
    return steps.epoch_figures()


class EpochSteps:
    """The batches and optimizer steps of one pass over the session's `train` stream (`train_one_epoch`'s body).

    `train(index, batch)` trains one batch: the other streams' batches beside it, the flags every rank agrees
    on, the forward and loss terms, the batch's figures, the backward (accumulated under DDP's no_sync), and at
    the end of each group of train.accumulate_steps batches the optimizer step, the EMA's update, the schedule,
    and the mid-epoch save and stop checks. The figures (objective, terms, hits) stay on the device until
    `read_pending` folds them into the epoch sums (`state.in_epoch`); `epoch_figures()` sums them over ranks.
    """

    def __init__(
        self,
        session: TrainingSession,
        stop: StopRequest | None,
        save: Callable[[], None] | None,
        on_batch: Callable[[torch.Tensor, bool], bool] | None,
    ) -> None:
        self.session, self.stop, self.save, self.on_batch = session, stop, save, on_batch
        self.model, self.optimizer, self.scaler = session.model, session.optimizer, session.scaler
        self.state, self.sums = session.state, session.state.in_epoch
        self.scheduler, self.forward, self.objective = session.scheduler, session.forward, session.objective
        self.device, self.cfg = session.device, session.cfg.train
        self.stream = session.streams["train"]
        self.num_batches = self.stream.num_batches()
        sampler = epoch_draws(self.stream.loader)
        self.drawn = sampler.shard_size() if hasattr(sampler, "shard_size") else None  # (None: given batches)
        # adapt.unlabeled, source.train: one batch of each beside each labelled one (the loaders are positioned
        # alike). (Their iterators start before the train stream's: each start draws a seed from torch's state.)
        self.others = {name: iter(s.loader) for name, s in session.streams.items() if name != "train"}
        self.wrapped = [self.forward, *(term.forward for term in self.objective.terms if term.forward is not None)]
        for module in self.objective.modules().values():
            module.train()
        self.total_steps = max(1, session.cfg.train.epochs * session.steps_per_epoch)
        self.every_n_steps = session.cfg.checkpoint.every_n_steps
        self.distributed = session.world.enabled  # under torchrun: forward is DDP-wrapped, per-step flags agreed on
        set_train_mode(self.model, session.plan.frozen_modules())  # frozen modules stay in eval: BN statistics stay
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.accumulate = self.cfg.accumulate_steps
        self.start = time.perf_counter() - self.sums.seconds
        # Per batch (objective, each loss term, top-1 hits) stay on the device until read: every batch on CPU,
        # every host_read_interval batches on an accelerator (a read is a sync), and before any save.
        self.read_every = host_read_interval(self.device)
        self.pending: list[tuple[int, int, torch.Tensor]] = []  # (batch index, images, [objective, *terms, hits])
        # The gradients are dropped just before the first backward of each optimizer step, as in the textbook
        # loop, not right after the step: freed after the step, their memory goes to the next forward's
        # activations and the backward must fault in fresh pages (5-11% slower per step on CPU, BENCHMARKS.md).
        self.stale = True  # the gradients held belong to an earlier step (or to none)
        self.loop_start, self.first_step = time.perf_counter(), None
        self.budget = stop.budget if stop is not None else None
        if self.budget is not None:
            self.budget.epoch_started()

    def train(self, index: int, batch: Any) -> bool:
        """Train on the epoch's `index`th batch (None: every image of it failed to decode, each reported); the
        step when it ends a group of train.accumulate_steps. False: `on_batch` ended the pass before its backward."""
        sums = self.sums
        # The last group of an epoch may hold fewer batches: divide by its real size.
        group_start = index - index % self.accumulate
        group_size = min(self.accumulate, self.num_batches - group_start)
        steps_now = index - group_start + 1 == group_size
        missing = self.unusable(batch)
        extra = {name: next(loader) for name, loader in self.others.items()}
        absent = [name for name in self.others if self.unusable(extra[name])]
        stopping = False
        if self.distributed:  # every rank takes the same branch: none waits alone in a collective
            # (before the forward: DDP broadcasts the batch-norm buffers in it)
            missing, stopping, *flags = any_rank(missing, self.stop is not None and self.stop.requested,
                                                 *(name in absent for name in self.others))  # fmt: skip
            absent = [name for name, flag in zip(self.others, flags, strict=True) if flag]
            if stopping:
                self.stop.agree()  # (every rank: which signal, for the exit code)
        read_now = (index + 1) % self.read_every == 0
        if self.drawn is not None:  # the images this batch drew that are not trained on (decode failures)
            expected = min(self.stream.batch_size, self.drawn - index * self.stream.batch_size)
            sums.skipped += expected - (0 if missing else len(batch[1]))
        # Under DDP the gradients of a micro-batch that only accumulates are not all-reduced yet.
        with contextlib.ExitStack() as held:
            for module in self.wrapped:
                held.enter_context(no_sync(module, steps_now))
            if not missing:
                logits, labels, value, terms = self.outputs(index, batch, extra, absent)
                if self.on_batch is not None and self.on_batch(value.detach(), steps_now):
                    return False
                self.record(index, logits, labels, value, terms)
                if read_now:  # (on CPU: every batch, before its backward, so a non-finite loss never steps)
                    self.read_pending()
                self.backward(value, group_size)
            elif read_now:
                self.read_pending()  # (under torchrun every rank reads at the same batches)
        sums.batches_done = index + 1
        if steps_now:
            self.step()
            self.save_or_stop(stopping)
        return True

    def backward(self, value: torch.Tensor, group_size: int) -> None:
        """The batch's backward of its share of the step (`group_size` batches); the gradients of the previous
        step are dropped just before the first backward of a step."""
        if self.stale:
            self.optimizer.zero_grad(set_to_none=True)
            self.stale = False
        self.scaler.scale(value / group_size).backward()

    def unusable(self, batch: Any) -> bool:
        """None (every image of it failed to decode, each reported), or a batch that decode failures left with
        a single image while batch norm trains (it cannot train on one): skipped."""
        return batch is None or (self.session.drops_single and len(batch[1]) < 2)

    def outputs(
        self, index: int, batch: Any, extra: dict[str, Any], absent: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The forward of the named streams and the loss terms: (logits, labels, objective, terms). The labelled
        batch is mixed first (data.mixup_alpha / cutmix_alpha, seeded by (seed, epoch, index, rank)); `labels`
        are then its dominant ones. The other streams' batches go through the same forward (adapt.TrainForward)."""
        session, device, state = self.session, self.device, self.state
        images, labels = batch
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        targets = None  # data.mixup_alpha / cutmix_alpha: the batch mixed, seeded by (seed, epoch, index, rank)
        if session.mixer is not None and not session.inputs.cached:
            images, targets, labels = session.mixer(images, labels, state.epoch, index, session.world.rank)
        with autocast(device, session.precision):
            if session.multi_stream:
                inputs = {name: None if name in absent else [t.to(device, non_blocking=True) for t in b]
                          for name, b in extra.items()}  # fmt: skip
                unlabeled, source = inputs.get("unlabeled"), inputs.get("source")
                logits, features, u_logits, u_features, s_logits, s_features = self.forward(
                    images, unlabeled[0] if unlabeled else None, source[0] if source else None
                )
                outputs = StepOutputs(
                    logits.float(), labels, features, u_logits.float() if u_logits is not None else None,
                    u_features, progress=state.global_step / self.total_steps, images=images,
                    unlabeled_images=unlabeled[0] if unlabeled else None,
                    source_logits=s_logits, source_features=s_features,
                    source_labels=source[1] if source else None,
                )  # fmt: skip
            else:
                logits = self.forward(images)
                outputs = StepOutputs(logits.float(), labels, images=images)
            outputs.targets = targets
            value, terms = self.objective(outputs)
        return logits, labels, value, terms

    def record(
        self, index: int, logits: torch.Tensor, labels: torch.Tensor, value: torch.Tensor, terms: list[torch.Tensor]
    ) -> None:
        """The batch's objective, terms and hits, kept on the device until `read_pending`."""
        if labels.is_floating_point():  # multilabel: an exact match (every class right at p 0.5)
            hits = ((logits >= 0) == (labels > 0.5)).all(dim=1).sum()
        else:
            hits = (logits.argmax(dim=1) == labels).sum()
        values = torch.stack([value.detach(), *(term.detach() for term in terms), hits]).to(sum_dtype(self.device))
        self.pending.append((index, labels.shape[0], values))

    def read_pending(self) -> None:
        """Fold the pending batches into the epoch sums; a non-finite loss raises (on every rank)."""
        sums, pending = self.sums, self.pending
        rows = torch.stack([values for _, _, values in pending]).tolist() if pending else []
        bad = None
        for (index, count, _), (value, *terms, hits) in zip(pending, rows, strict=True):
            if not math.isfinite(value):
                bad = (f", batch {index + 1}", value)
                break
            sums.loss_sum += terms[0] * count  # (train_loss: the ce term, the labelled batch's loss)
            for name, term in zip(self.objective.names, terms, strict=True):
                sums.term_sums[name] = sums.term_sums.get(name, 0.0) + term * count
            sums.correct += int(hits)
            sums.seen += count
        if self.distributed and any_rank(bad is not None)[0] and bad is None:
            bad = ("", "non-finite on another process")
        if bad is not None:
            raise TrainingError(
                f"the loss became {bad[1]} at epoch {self.state.epoch + 1}{bad[0]}",
                "lower train.lr or set train.grad_clip_norm (the last finite checkpoint is kept)",
            )
        pending.clear()

    def step(self) -> None:
        """The optimizer step of the gradients accumulated: (unscale and clip to train.grad_clip_norm), the
        scaler's step and update, the schedule, the EMA's update (once per step, whatever accumulate_steps)."""
        optimizer, scaler = self.optimizer, self.scaler
        if self.stale:  # every batch of this step was unreadable: step with no gradients, as torch skips them
            optimizer.zero_grad(set_to_none=True)
        self.stale = True
        if self.cfg.grad_clip_norm is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        self.scheduler.step()
        self.state.global_step += 1
        if self.session.ema is not None:
            self.session.ema.update()
        if self.first_step is None:  # (with run.compile, the first step compiles the graph)
            self.first_step = time.perf_counter() - self.loop_start

    def save_or_stop(self, stopping: bool) -> None:
        """After a step (the state is whole: no half-accumulated gradients) and before the epoch's last one:
        save every checkpoint.every_n_steps steps, and save and stop (Interrupted) on a stop request or when
        run.time_limit leaves no room for another step. `stopping`: the request all ranks agreed on at this
        step under torchrun (a signal may reach one first)."""
        sums, state, stop, budget = self.sums, self.state, self.stop, self.budget
        last_batch = sums.batches_done == self.num_batches
        wants_save = self.every_n_steps is not None and state.global_step % self.every_n_steps == 0
        if not self.distributed:
            stopping = stop is not None and stop.requested
        if budget is not None:
            budget.step_done()
        if budget is not None and not last_batch:  # run.time_limit: room for one more step and its save?
            next_ends_epoch = sums.batches_done + self.accumulate >= self.num_batches
            if any_rank(budget.exhausted(next_ends_epoch))[0]:
                stop.out_of_time()
                stopping = True
        if self.save is not None and not last_batch and (wants_save or stopping):
            self.read_pending()  # the sums saved are whole, and no non-finite step is ever saved
            sums.seconds = time.perf_counter() - self.start
            self.save()
        if stopping and not last_batch:
            raise Interrupted(f"stopped at epoch {state.epoch + 1}, batch {sums.batches_done}", "")

    def show(self, progress: tqdm) -> None:
        """Advance the progress bar; the running loss and speed when the figures are read (no sync)."""
        sums = self.sums
        if not self.pending:
            elapsed = time.perf_counter() - self.start
            running = sums.loss_sum / max(sums.seen, 1)
            img_s = f"{sums.seen / max(elapsed, 1e-9):.0f}"
            progress.set_postfix(loss=f"{running:.4f}", img_s=img_s, refresh=False)
        progress.update(1)

    def epoch_figures(self) -> dict[str, Any]:
        """The epoch's figures over all ranks (sums of counts; the slowest rank's times), after the last read."""
        self.read_pending()  # (every rank: the epoch's last batches)
        sums, names = self.sums, self.objective.names
        sums.seconds = time.perf_counter() - self.start
        term_sums = [sums.term_sums.get(name, 0.0) for name in names]
        totals = torch.tensor([sums.loss_sum, sums.correct, sums.seen, sums.skipped, *term_sums], dtype=torch.float64)
        loss_sum, correct, seen, skipped, *term_totals = all_reduce_sum(totals).tolist()
        seconds, data_seconds = all_reduce_max([sums.seconds, sums.data_seconds])
        if seen == 0:
            raise TrainingError("no training image of this epoch could be read", "check the dataset")
        return {
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "loss_terms": {name: total / seen for name, total in zip(names, term_totals, strict=True)},
            "train_images": int(seen),
            "skipped_images": int(skipped),
            "train_seconds": seconds,
            "data_seconds": data_seconds,
            "images_per_second": seen / max(seconds, 1e-9),
            "first_step_seconds": self.first_step,
        }


def _val_logits(session: TrainingSession) -> Callable[[Path], tuple[Any, torch.Tensor, torch.Tensor]]:
    """(Checkpoint, val logits, labels) of a checkpoint file of this run: every rank evaluates its shard of the
    val split with the checkpoint's raw model (no temperature) in fp32, and the logits are gathered."""
    from tltool.checkpoint import load_checkpoint
    from tltool.device import resolve_precision
    from tltool.evaluate import evaluate
    from tltool.models import load_trained_model

    device, num_classes = session.device, len(session.split.class_names)

    def logits_of(path: Path) -> tuple[Any, torch.Tensor, torch.Tensor]:
        checkpoint = load_checkpoint(path)
        model = load_trained_model(checkpoint).to(device)  # temperature 1: the raw logits
        precision = resolve_precision("fp32", device)
        outputs = evaluate(model, session.image_val, device, precision, num_classes, per_sample=True)["outputs"]
        parts = distributed.all_gather_objects((outputs.logits, outputs.labels))
        return checkpoint, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    return logits_of


def _end_of_run_checkpoints(session: TrainingSession) -> tuple[list[Path], str]:
    """last.pt and best.pt (after rank 0 wrote them) and the words for the val split they are fitted on."""
    distributed.barrier()
    data, folder = session.cfg.data, session.checkpoint_dir
    return [folder / "last.pt", folder / "best.pt"], f"val split of {data.val or data.train}"


def _echo(session: TrainingSession) -> Callable[[str], None]:
    return lambda line: say(session.quiet, line)


def calibrate_checkpoints(session: TrainingSession) -> dict[str, Any]:
    """`train.calibrate`: temperature scaling of last.pt and best.pt on the val split (calibration.py); every rank
    fits the same T from the gathered logits, rank 0 writes it into the checkpoint."""
    from tltool.calibration import calibrate_run

    paths, where = _end_of_run_checkpoints(session)
    return calibrate_run(paths, _val_logits(session), where, session.world.is_main, _echo(session))


def threshold_checkpoints(session: TrainingSession) -> dict[str, Any]:
    """data.task multilabel: the per-class decision thresholds of last.pt and best.pt chosen on the val split
    and kept in each (multilabel.threshold_run)."""
    from tltool.multilabel import threshold_run

    paths, where = _end_of_run_checkpoints(session)
    return threshold_run(paths, _val_logits(session), where, session.world.is_main, _echo(session))


def finetune(
    cfg: Config,
    resume: str | None = None,
    dry_run: bool = False,
    quiet: bool = False,
    config_path: str = "<config>",
    overrides: list[str] | None = None,
    resume_changed_data: bool = False,
    on_epoch: Callable[[dict[str, Any]], str | None] | None = None,
) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `cfg.data`; returns the run summary (also written to summary.json).

    `config_path` and `overrides` only appear in messages (the command that resumes the run). The run
    directory is locked (runlock.py) from before anything is read or written to the end, by rank 0 under
    torchrun (the other ranks write nothing); a dry run takes no lock. `resume_changed_data`: resume even
    though the data changed since the checkpoint (keeping its val split; see runstate.resume_data).
    """
    writer, lock, tracker, started = None, None, None, time.monotonic()
    try:
        if not dry_run and distributed.env_rank() == 0:  # (a moved run directory: where the run is now)
            run_dir = run_directory(resume_location(cfg, resume, quiet=True))
            lock = acquire(run_dir)
            if cfg.log.mlflow:  # (only rank 0 logs) the store answers, in seconds, before anything is built
                tracker = MlflowTracker.connect(run_dir, quiet)
        elif cfg.log.mlflow and distributed.env_rank() == 0:
            require_mlflow()  # (a dry run writes nothing, not even the store)
        try:
            session = build_session(cfg, resume, quiet, dry_run, changed_data=resume_changed_data)
        except RunFinished as done:
            if distributed.current().is_main:
                print(done, flush=True)
            return {"finished": True, "epochs_completed": done.epochs, "run_dir": str(done.run_dir)}
        cfg, state, is_main = session.cfg, session.state, session.world.is_main
        if dry_run:
            if is_main:
                print(describe(session))
                print("dry run: nothing trained, nothing written")
            return {"dry_run": True}
        session.start()
        if tracker is not None:
            tracker.start(session)
            session.saves.log_epoch = tracker.log_epoch
        writer = open_tensorboard(cfg, session.run_dir, state.epoch) if cfg.log.tensorboard and is_main else None
        if cfg.log.report and is_main:
            from tltool.report import require_matplotlib

            require_matplotlib()  # fail now, not after hours of training
        limit = cfg.run.time_limit_seconds()
        budget = None
        if limit is not None:
            budget = TimeBudget(limit, session.checkpoint_bytes(), len(session.inputs.val), cfg.train.accumulate_steps,
                                start=started)  # fmt: skip
        stop = StopRequest(budget)
        try:
            with stop.installed():
                stopped_early, stop_reason = _run_epochs(session, stop, writer, on_epoch)
        except Interrupted as exc:
            raise _stopped(session, stop, tracker, exc, config_path, overrides) from None
        return _finish(session, tracker, writer, stopped_early, stop_reason)
    finally:
        if tracker is not None:
            tracker.close()
        if writer is not None:
            writer.close()
        distributed.teardown()
        if lock is not None:
            lock.release()


def _run_epochs(
    session: TrainingSession,
    stop: StopRequest,
    writer: Any,
    on_epoch: Callable[[dict[str, Any]], str | None] | None,
) -> tuple[bool, str | None]:
    """The epochs from the session's next one to train.epochs, each trained, evaluated and recorded
    (`_end_epoch`), then the stops between epochs in this order: `on_epoch`'s reason, early stopping, a
    requested stop (Interrupted). Returns (stopped early, on_epoch's reason)."""
    cfg, state, quiet = session.cfg, session.state, session.quiet
    for epoch in range(state.epoch, cfg.train.epochs):
        record = train_and_evaluate(session, epoch, stop)
        stopping = _end_epoch(session, record, stop, writer)
        stop_reason = on_epoch(record) if on_epoch is not None else None
        if session.world.enabled and distributed.any_rank(stop_reason is not None)[0]:
            stop_reason = stop_reason or "stopped by another process"
        if stop_reason is not None and state.epoch < cfg.train.epochs:
            if session.saves.unsaved:  # (a deferred end-of-epoch save: the run stops here)
                _save_epoch(session, stop, is_best=False)
            say(quiet, f"stopped after epoch {state.epoch}: {stop_reason}")
            return False, stop_reason
        if _out_of_patience(cfg, state) and state.epoch < cfg.train.epochs:
            patience = cfg.train.early_stopping_patience
            say(quiet, f"early stopping: {cfg.checkpoint.monitor} did not improve for {patience} epochs")
            return True, None
        if stopping and state.epoch < cfg.train.epochs:
            raise Interrupted(f"stopped after epoch {state.epoch}", "")
    return False, None


def _end_epoch(session: TrainingSession, record: dict[str, Any], stop: StopRequest, writer: Any) -> bool:
    """An epoch's end: the best metric and early-stopping count (TrainState.end_epoch), TensorBoard, the
    metrics.jsonl line, then last.pt and best.pt, unless checkpoint.max_save_overhead defers them (MLflow logs the
    record with the save that holds it: session.saves); the epoch line. True: the run stops now (a signal, agreed
    over ranks, or run.time_limit without room for the next epoch's first step and its save), its epoch saved."""
    cfg, state = session.cfg, session.state
    is_best = state.end_epoch(record, cfg.checkpoint.monitor)
    if writer is not None:
        log_tensorboard(writer, record)
    # metrics first, then the checkpoint: a crash in between re-runs this epoch and rewrites its line.
    if session.world.is_main:
        append_metrics(session.run_dir, record)
    session.saves.log(record)  # (MLflow logs it with the save that holds it: a logged epoch is never run again)
    # The save, unless checkpoint.max_save_overhead defers it (epochsaves.py): never the last epoch's.
    last = state.epoch >= cfg.train.epochs or _out_of_patience(cfg, state)
    big = is_best and cfg.checkpoint.save_best and session.checkpoint_bytes() > SNAPSHOT_LIMIT
    if last or any_rank(session.saves.due() or big)[0]:
        _save_epoch(session, stop, is_best)
    else:
        session.defer_save(is_best)
    # A signal that reached one rank during evaluation stops them all; every rank decides on the agreed flag
    # (one that arrives after this is seen at the next step).
    stopping = stop.requested
    if session.world.enabled:
        stopping = distributed.any_rank(stop.requested)[0]
        if stopping:
            stop.agree()
    next_ends_epoch = session.steps_per_epoch == 1  # run.time_limit: room for the next epoch's first step and its save?
    if stop.budget is not None and distributed.any_rank(stop.budget.exhausted(next_ends_epoch))[0]:
        stop.out_of_time()
        stopping = True
    if stopping and session.saves.unsaved:
        _save_epoch(session, stop, is_best=False)
    say(session.quiet, epoch_line(record, cfg.train.epochs, is_best))
    return stopping


def _save_epoch(session: TrainingSession, stop: StopRequest, is_best: bool) -> None:
    """The epoch's end into last.pt (and best.pt: `is_best`, or a deferred best epoch that waits)."""
    if is_best:
        session.saves.best = None  # (an earlier deferred best is no longer the best)
    stop.timed("save", session.save_last)()
    if is_best:
        session.save_best()


def _out_of_patience(cfg: Config, state: TrainState) -> bool:
    patience = cfg.train.early_stopping_patience
    return patience is not None and state.bad_epochs >= patience


def _stopped(
    session: TrainingSession,
    stop: StopRequest,
    tracker: MlflowTracker | None,
    exc: Interrupted,
    config_path: str,
    overrides: list[str] | None,
) -> Interrupted:
    """A run stopped on request, its state saved: summary.json says how far it got and why (rank 0), its MLflow
    run is KILLED (a resume reopens it); the one line to raise, with the command that continues the run."""
    cfg, reason = session.cfg, stop.reason or "SIGINT"
    if session.world.is_main:
        stopped = {**run_summary(session, False), "stop_reason": reason}
        if tracker is not None:
            stopped["mlflow"] = tracker.describe()
        write_text_atomic(session.run_dir / "summary.json", json.dumps(stopped, indent=2) + "\n")
        if tracker is not None:
            tracker.finish(cfg, session.run_dir, "KILLED")
    why = f"run.time_limit {cfg.run.time_limit} reached" if reason == "time_limit" else reason
    return Interrupted(
        f"{why}: {exc.what}; {session.checkpoint_dir / 'last.pt'} holds the state",
        f"continue with: {resume_command(config_path, overrides, session.world.world_size)}",
        stop.exit_code,
    )


def _finish(
    session: TrainingSession, tracker: MlflowTracker | None, writer: Any, stopped_early: bool, stop_reason: str | None
) -> dict[str, Any]:
    """After the last epoch: the summary, WiSE-FT's wise.pt and train.calibrate's T (every rank: their
    evaluations are sharded), then on rank 0 summary.json, TensorBoard's hparams, the report, MLflow's artifacts."""
    cfg, quiet = session.cfg, session.quiet
    summary = {
        **run_summary(session, stopped_early),
        "stop_reason": stop_reason or ("early_stopping" if stopped_early else "finished"),
    }
    if tracker is not None:
        summary["mlflow"] = tracker.describe()
    if cfg.train.wise_alpha is not None:
        summary["wise"] = finish_wise(session)
    if cfg.train.calibrate:  # (after wise.pt: T belongs to last.pt's and best.pt's weights only)
        summary["calibration"] = calibrate_checkpoints(session)
    if cfg.data.task == "multilabel":  # (likewise: the thresholds of last.pt's and best.pt's weights)
        summary["thresholds"] = threshold_checkpoints(session)
    if not session.world.is_main:
        return {**summary, "rank": session.world.rank}  # (the CLI prints rank 0's only)
    write_text_atomic(session.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if writer is not None and summary["final"]:
        with open_tensorboard(cfg, session.run_dir, 0) as hparams_writer:
            final = {f"hparam/{k}": summary["final"][k] for k in ("val_acc1", "val_acc5", "val_loss", "train_loss")}
            hparams_writer.add_hparams(hparams(cfg), final, run_name="hparams")
    if cfg.log.report:
        from tltool.report import write_report

        summary["report"] = str(write_report(session.run_dir, device=cfg.run.device))
        say(quiet, f"report written to {summary['report']}")
    if tracker is not None:
        report = Path(summary["report"]).parent if "report" in summary else None
        tracker.finish(cfg, session.run_dir, "FINISHED", report)
    return summary


def train_and_evaluate(session: TrainingSession, epoch: int, stop: StopRequest) -> dict[str, Any]:
    """Enter (0-based) `epoch`, train it, evaluate: its line of metrics.jsonl."""
    cfg, state = session.cfg, session.state
    epoch_start = time.perf_counter()
    session.enter_epoch(epoch)
    show = cfg.log.progress and not session.quiet
    bar = tqdm(
        total=session.streams["train"].num_batches(),
        initial=state.in_epoch.batches_done,
        desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
        leave=False,
        disable=None if show else True,
        file=sys.stderr,
    )
    with bar:
        train = train_one_epoch(session, bar, stop, stop.timed("save", session.save_last))
    if session.compile_pending and train["first_step_seconds"] is not None:
        session.compile_pending = False
        session.compile_seconds += train["first_step_seconds"]
        say(session.quiet, f"torch.compile: the first step took {train['first_step_seconds']:.1f} s (compiling)")
    val = stop.timed("eval", session.evaluate)()
    if not math.isfinite(val["loss"]):
        raise TrainingError(
            f"the validation loss became {val['loss']} at epoch {epoch + 1}",
            "lower train.lr or set train.grad_clip_norm (the last finite checkpoint is kept)",
        )
    ema = ema_metrics(session.evaluate_ema()) if session.ema is not None else {}
    state.epoch, state.in_epoch = epoch + 1, None
    return {
        "epoch": state.epoch,
        "lr": session.head_lr(),
        "lr_groups": {g["name"]: g["lr"] for g in session.optimizer.param_groups},
        "train_loss": train["train_loss"],
        "train_acc": train["train_acc"],
        "loss_terms": train["loss_terms"],
        "val_loss": val["loss"],
        "val_acc1": val["acc1"],
        "val_acc5": val["acc5"],
        **{f"val_{key}": val[key] for key in MULTILABEL_METRICS if key in val},  # data.task: multilabel
        **ema,
        "epoch_seconds": time.perf_counter() - epoch_start,
        "images_per_second": train["images_per_second"],
        "data_seconds": train["data_seconds"],
        "train_images": train["train_images"],
        # Images that could not be decoded this epoch (summed over processes); the val set's are those it
        # holds but the evaluation could not read (cached features: those whose extraction failed).
        "skipped_images": {
            "train": len(session.split.train) - len(session.cache.train)
            if session.inputs.cached
            else train["skipped_images"],
            "val": len(session.split.val) - val["num_images"],
        },  # fmt: skip
        "global_step": state.global_step,
    }
