"""`run.time_limit`: stop, saved, before a job's wall-clock limit, with room for what must come after.

The rule (checked after every optimizer step, and after each end-of-epoch save): the run takes its next
optimizer step only if, after it, the time left still holds a save, and the evaluation too when that step
ends an epoch:

    go on  <=>  now + SAFETY x (step + save [+ eval]) <= start + time_limit

`step` is the slowest of the last STEP_WINDOW optimizer steps (their wall time, data loading included),
`save` and `eval` the last ones measured in this process. Before the first save is measured, a save is
estimated at the checkpoint's size over 50 MB/s plus half a second; before the first evaluation, at one
training batch's time per validation batch (a training batch costs about three evaluation ones). The clock
starts when `finetune()` is called (building the model and the feature cache count); a resumed run gets
the whole limit again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

SAFETY = 1.5  # estimates from the last few measurements, times this
STEP_WINDOW = 10
SAVE_PRIOR_BYTES_PER_SECOND = 50e6


class TimeBudget:
    """The deadline of `run.time_limit` seconds from now, and the measured costs that must fit before it."""

    def __init__(
        self,
        limit_seconds: float,
        checkpoint_bytes: int,
        val_batches: int,
        accumulate_steps: int = 1,
        clock: Callable[[], float] = time.monotonic,
        start: float | None = None,
    ) -> None:
        self.clock = clock
        self.deadline = (clock() if start is None else start) + limit_seconds
        self.steps: deque[float] = deque(maxlen=STEP_WINDOW)
        self.last_step_at: float | None = None
        self.save_seconds: float | None = None
        self.eval_seconds: float | None = None
        self.save_prior = checkpoint_bytes / SAVE_PRIOR_BYTES_PER_SECOND + 0.5
        self.val_batches, self.accumulate_steps = val_batches, accumulate_steps

    def epoch_started(self) -> None:
        """The next step's time counts from now (not from the end of the last epoch's evaluation and save)."""
        self.last_step_at = self.clock()

    def step_done(self) -> None:
        now = self.clock()
        if self.last_step_at is not None:
            self.steps.append(now - self.last_step_at)
        self.last_step_at = now

    @contextmanager
    def measure(self, what: str) -> Iterator[None]:
        """Time a save ("save") or an evaluation ("eval")."""
        start = self.clock()
        yield
        setattr(self, f"{what}_seconds", self.clock() - start)

    def needed(self, with_eval: bool) -> float:
        """Seconds one more step, its save and (`with_eval`) the epoch's evaluation take, with the safety factor."""
        step = max(self.steps, default=0.0)
        save = self.save_seconds if self.save_seconds is not None else self.save_prior
        evaluation = 0.0
        if with_eval:
            per_batch = step / self.accumulate_steps
            evaluation = self.eval_seconds if self.eval_seconds is not None else self.val_batches * per_batch
        return SAFETY * (step + save + evaluation)

    def exhausted(self, next_ends_epoch: bool) -> bool:
        """True when the next step (and the evaluation, if it ends the epoch) and a save no longer fit."""
        return self.clock() + self.needed(next_ends_epoch) > self.deadline

    def left(self) -> float:
        return self.deadline - self.clock()
