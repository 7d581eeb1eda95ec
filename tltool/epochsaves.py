"""When an epoch's end writes `last.pt`: `checkpoint.max_save_overhead`.

A save writes the whole model, however little of it trains. With a frozen backbone the head's epochs on cached
features take milliseconds and a save takes tens (MobileNetV2, 9 MB: 25-35 ms; a ResNet-50 ~100 MB, a ViT-B
~350 MB): saved at every epoch, a linear probe spends most of its time writing the same backbone again. The
rule: an epoch's end saves when the time since the last save is at least (1 - f) / f times the last save's
duration (f = max_save_overhead, 0.1: at most about a tenth of the run goes to saves); otherwise it is deferred.
Epochs longer than 9 saves (most runs) save at every epoch, as before.

What a deferral keeps intact:
- A resume is still exact: last.pt is an earlier epoch's end (or a mid-epoch save), whole; the epochs after it
  run again (their metrics.jsonl lines are dropped on resume, TensorBoard purges them).
- The final epoch, a stop (a signal, run.time_limit, early stopping, a tuning trial's pruning) and the
  mid-epoch saves of checkpoint.every_n_steps are never deferred.
- best.pt is always the best epoch's: a deferred best epoch's checkpoint is kept in memory (`snapshot`) and
  written as best.pt by the next save, whichever it is. Above SNAPSHOT_LIMIT bytes that epoch saves instead.
- MLflow logs an epoch only once it is saved (`log`): a resumed run never logs an epoch twice.
What it costs: a crash (SIGKILL, power loss) loses the epochs since the last save, at most about 1/f saves'
time (plus an epoch).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tltool.checkpoint import map_tensors

SNAPSHOT_LIMIT = 2**30  # bytes: a best epoch whose checkpoint is larger saves at once instead of a copy in memory


def save_due(since_save: float, save_seconds: float | None, max_overhead: float | None) -> bool:
    """Whether an epoch's end saves: `since_save` seconds after the last save, which took `save_seconds` (None:
    no save measured yet in this process); `max_overhead` None saves every epoch."""
    if max_overhead is None or save_seconds is None:
        return True
    return since_save * max_overhead >= save_seconds * (1.0 - max_overhead)


def snapshot(value: Any) -> Any:
    """A copy of a checkpoint's dict whose tensors no longer change with training (containers rebuilt, tensors
    cloned, everything else shared: config, names and numbers are never changed in place)."""
    return map_tensors(value, lambda tensor: tensor.detach().clone())


class EpochSaves:
    """The deferral state of one run's process: the last save's time and end, the deferred best epoch's
    checkpoint, the epoch records MLflow has not logged yet, and how many epoch ends were deferred."""

    def __init__(self, max_overhead: float | None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.max_overhead, self.clock = max_overhead, clock
        self.save_seconds: float | None = None
        self.saved_at = clock()
        self.best: tuple[int, dict[str, Any]] | None = None  # (epoch, checkpoint dict) of a deferred best epoch
        self.unlogged: list[dict[str, Any]] = []
        self.log_epoch: Callable[[dict[str, Any]], None] | None = None  # MLflow's, where the run logs there
        self.deferred = 0
        self.unsaved = False  # the last epoch's end is not in last.pt yet

    def due(self) -> bool:
        return save_due(self.clock() - self.saved_at, self.save_seconds, self.max_overhead)

    def defer(self, epoch: int, best_checkpoint: dict[str, Any] | None) -> None:
        """Epoch `epoch` (1-based) ends unsaved; `best_checkpoint`: its checkpoint, when it is the best so far."""
        self.deferred += 1
        self.unsaved = True
        if best_checkpoint is not None:
            self.best = (epoch, snapshot(best_checkpoint))

    def log(self, record: dict[str, Any]) -> None:
        """An epoch's record for MLflow: logged with the save that holds the epoch."""
        if self.log_epoch is not None:
            self.unlogged.append(record)

    def saved(self, started: float) -> None:
        """A save that began at `started` (the clock's) has written last.pt (and a deferred best.pt)."""
        now = self.clock()
        self.save_seconds, self.saved_at, self.unsaved, self.best = now - started, now, False, None
        records, self.unlogged = self.unlogged, []
        for record in records:
            self.log_epoch(record)
