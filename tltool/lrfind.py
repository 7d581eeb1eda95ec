"""`tltool lr-find`: the learning-rate range test (Smith 2017, "Cyclical Learning Rates"; fastai's `lr_find`,
Lightning's `Tuner.lr_find`) on a run's real training session.

The session is the one `tltool finetune` would train with (`session.build_session`): the model (LP-FT's probe
head included), the freeze and unfreeze plan as of the first epoch, the feature cache when the backbone is
frozen, the optimizer's real parameter groups and the objective's real loss terms. Only the schedule is
replaced: step i of `steps` runs at lr_i = start * (end / start) ** (i / (steps - 1)), and every group at
lr_i times its configured LR over train.lr (backbone_lr_mult, layer_lr_decay and loss-term scales kept), so
lr_i is the value of train.lr it tests. The steps are the loop's own (`train.train_one_epoch`, with
accumulation, clipping and the grad scaler), passing over the data as many times as `steps` needs; the
loop hands each batch's objective to `RangeTest` before its backward.

`RangeTest` keeps the per-step loss (the mean objective of the step's batches) and its exponential moving
average with beta 0.98, bias-corrected (smoothed_i = avg_i / (1 - beta^(i+1))), and stops when the smoothed
loss exceeds 4x its minimum so far, or the loss is not finite (before that batch's backward). No library
fits here: torch-lr-finder, fastai and Lightning each drive their own loop over (model, criterion, loader),
which would not be this session's multi-stream forward and named loss terms.

The suggestion (`suggest`) is the LR of the steepest descent of the smoothed loss against log10(lr)
(Lightning's rule), over the curve without its first tenth (the average still warming up) and its last
point (the one that diverged); the minimum's LR / 10 (fastai's `lr_min`) is reported beside it.

Nothing of the run directory is read or written: no lock, no checkpoint, no metrics; the trained weights
are dropped. The output goes to `--out` (default `lr-find/<run.name>/`): lr_find.png, .json, .csv, and the
feature cache's files only where it outgrows train.feature_cache_memory_mb.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tltool import distributed
from tltool.config import Config
from tltool.data import epoch_seed
from tltool.errors import ConfigError, TrainingError
from tltool.files import check_writable, write_atomic, write_text_atomic
from tltool.runstate import EpochProgress, run_directory

BETA = 0.98  # the moving average of the loss (fastai, Lightning)
DIVERGE = 4.0  # stop once the smoothed loss exceeds this many times its minimum (fastai, Lightning)
RULE = "steepest descent of the smoothed loss vs log10(lr)"


def check_range(start: float, end: float, steps: int) -> None:
    """One line for a range the test cannot run."""
    if not (math.isfinite(start) and start > 0):
        raise ConfigError(f"--start {start:g} is not a positive learning rate", "give e.g. --start 1e-7")
    if not (math.isfinite(end) and end > start):
        raise ConfigError(f"--end {end:g} must be above --start {start:g}", "give e.g. --start 1e-7 --end 10")
    if steps < 2:
        raise ConfigError(f"--steps {steps} is fewer than 2", "give e.g. --steps 100")


def lr_schedule(start: float, end: float, steps: int) -> list[float]:
    """lr_i = start * (end / start) ** (i / (steps - 1)), i = 0 .. steps - 1: exponential, from start to end."""
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


def install_schedule(optimizer: torch.optim.Optimizer, base_lr: float, lrs: Sequence[float]):
    """A LambdaLR giving every group lr_i x its configured LR (`initial_lr`) / `base_lr` at step i."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    last = len(lrs) - 1
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lrs[min(step, last)] / base_lr)


@dataclass
class RangeTest:
    """The range test's record: called by the loop with each batch's objective (before its backward) and
    whether the batch ends an optimizer step; True stops the loop there.

    `step()` is the optimizer step the batch belongs to (the session's global step); `lrs` the schedule;
    `group_lrs()` the optimizer groups' LRs now (recorded with each step, as the optimizer has them).
    """

    lrs: Sequence[float]
    step: Callable[[], int]
    group_lrs: Callable[[], dict[str, float]] = dict
    beta: float = BETA
    diverge: float = DIVERGE
    points: list[dict[str, Any]] = field(default_factory=list)  # {step, lr, loss, smoothed, groups}
    stop_reason: str | None = None
    _average: float = 0.0
    _batches: list[float] = field(default_factory=list)
    _batches_step: int | None = None

    def __call__(self, objective: torch.Tensor, ends_step: bool) -> bool:
        loss = float(objective)
        step = self.step()
        # (a step whose last batch could not be read was taken on the batches before it: record it now)
        unrecorded = self._batches_step is not None and self._batches_step != step
        if unrecorded and self._record(self._batches_step, sum(self._batches) / len(self._batches)):
            return True
        if not math.isfinite(loss):
            self.stop_reason = f"the loss became {loss} at lr {self.lrs[min(step, len(self.lrs) - 1)]:.3g}"
            return True
        self._batches.append(loss)
        self._batches_step = step
        if not ends_step:
            return False
        return self._record(step, sum(self._batches) / len(self._batches))

    def _record(self, step: int, loss: float) -> bool:
        self._batches, self._batches_step = [], None
        self._average = self.beta * self._average + (1 - self.beta) * loss
        smoothed = self._average / (1 - self.beta ** (len(self.points) + 1))
        lr = self.lrs[min(step, len(self.lrs) - 1)]
        self.points.append({"step": step, "lr": lr, "loss": loss, "smoothed": smoothed, "groups": self.group_lrs()})
        best = min(point["smoothed"] for point in self.points)
        if smoothed > self.diverge * best:
            self.stop_reason = f"the smoothed loss passed {self.diverge:g}x its minimum at lr {lr:.3g}"
            return True
        if step >= len(self.lrs) - 1:
            self.stop_reason = "reached --end"
            return True
        return False


@dataclass(frozen=True)
class Suggestion:
    lr: float  # the suggested train.lr (by `rule`)
    rule: str
    steepest: float | None  # None: too few points for a slope
    minimum: float  # the LR of the smoothed loss's minimum
    minimum_over_10: float


def suggest(lrs: Sequence[float], smoothed: Sequence[float]) -> Suggestion:
    """The steepest descent of the smoothed loss against log10(lr), and the minimum / 10, over the curve
    without its first tenth and its last point; the steepest is the suggestion (the minimum / 10 when fewer
    than 3 points remain)."""
    if not lrs:
        raise ValueError("no point recorded")
    count = len(lrs)
    window = slice(count // 10, count - 1) if count - 1 - count // 10 >= 3 else slice(0, count)
    x = np.log10(np.asarray(lrs[window], dtype=np.float64))
    y = np.asarray(smoothed[window], dtype=np.float64)
    minimum = float(10 ** x[int(np.argmin(y))])
    steepest = float(10 ** x[int(np.argmin(np.gradient(y, x)))]) if len(x) >= 3 else None
    if steepest is None:
        return Suggestion(minimum / 10, "minimum of the smoothed loss / 10 (too few points for a slope)", None,
                          minimum, minimum / 10)  # fmt: skip
    return Suggestion(steepest, RULE, steepest, minimum, minimum / 10)


def output_folder(cfg: Config, out: str | None) -> Path:
    """--out, or lr-find/<run.name>; never inside the run directory (which the test leaves untouched)."""
    folder = Path(out) if out else Path("lr-find") / cfg.run.name
    run_dir = run_directory(cfg).resolve()
    where = folder.resolve()
    if where == run_dir or run_dir in where.parents:
        raise ConfigError(f"--out {folder} is inside the run directory {run_directory(cfg)}",
                          "give a folder outside it: lr-find leaves the run directory untouched")  # fmt: skip
    return folder


def run_lr_find(
    cfg: Config,
    start: float = 1e-7,
    end: float = 10.0,
    steps: int = 100,
    out: str | None = None,
    quiet: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The range test on `cfg`'s session; writes lr_find.png/.json/.csv to the output folder; the result."""
    from tltool.plots import figure_png, lr_find_figure, require_matplotlib
    from tltool.session import build_session
    from tltool.train import train_one_epoch

    check_range(start, end, steps)
    if distributed.launched():
        raise ConfigError("tltool lr-find runs in one process, not under torchrun", "run it without torchrun")
    folder = output_folder(cfg, out)
    require_matplotlib("tltool lr-find")  # (before the work: a missing extra is one line now)
    check_writable(folder / "lr_find.json")
    lrs = lr_schedule(start, end, steps)
    try:
        session = build_session(cfg, quiet=quiet, read_only=True)
        cfg = session.cfg
        session.prepare_inputs(folder / "feature_cache")
        session.enter_epoch(0)  # (epoch 1's plan: what it opens now; nothing opens later in the test)
        optimizer, base = session.optimizer, cfg.train.lr
        session.scheduler = install_schedule(optimizer, base, lrs)
        groups = [{"name": g.get("name", str(i)), "lr": g["initial_lr"], "factor": g["initial_lr"] / base}
                  for i, g in enumerate(optimizer.param_groups)]  # fmt: skip
        if not quiet:
            described = ", ".join(f"{g['name']} x{g['factor']:.3g}" for g in groups)
            echo(f"lr-find: {steps} steps, train.lr {start:.3g} -> {end:.3g}, each group at lr x (its configured "
                 f"LR / train.lr): {described}")  # fmt: skip
        test = RangeTest(
            lrs,
            step=lambda: session.state.global_step,
            group_lrs=lambda: {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)},
        )
        passes = 0
        while train_one_epoch(session, on_batch=test) is not None:
            # Another pass over the data, as an epoch would position it (seed, cache view, each stream), with
            # the plan kept as in epoch 1 (session.enter_epoch would open parts a schedule opens later).
            passes += 1
            session.state.in_epoch = EpochProgress()
            torch.manual_seed(epoch_seed(cfg.run.seed, passes, session.world.rank))
            if session.inputs.cached:
                session.cache.set_epoch(passes)
            for stream in session.streams.values():
                stream.set_epoch(cfg.run.seed, passes, 0, session.world.rank)
    finally:
        distributed.teardown()
    if not test.points:
        raise TrainingError(f"the first step's loss is not finite ({test.stop_reason})", "lower --start")
    curve_lrs = [p["lr"] for p in test.points]
    suggestion = suggest(curve_lrs, [p["smoothed"] for p in test.points])
    result = {
        "start": start,
        "end": end,
        "steps": steps,
        "steps_done": len(test.points),
        "stop_reason": test.stop_reason,
        "beta": BETA,
        "diverge": DIVERGE,
        "rule": suggestion.rule,
        "suggestion": suggestion.lr,
        "steepest": suggestion.steepest,
        "minimum": suggestion.minimum,
        "minimum_over_10": suggestion.minimum_over_10,
        "override": f"train.lr={suggestion.lr:.3g}",
        "groups": groups,
        "points": test.points,
        "out": str(folder),
    }
    figure = lr_find_figure(curve_lrs, [p["loss"] for p in test.points], [p["smoothed"] for p in test.points],
                            suggestion.lr, suggestion.minimum_over_10, suggestion.rule)  # fmt: skip
    png = figure_png(figure)
    write_atomic(folder / "lr_find.png", lambda handle: handle.write(png))
    write_text_atomic(folder / "lr_find.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(folder / "lr_find.csv", _csv(test.points))
    return result


def _csv(points: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["step", "lr", "loss", "smoothed"])
    for point in points:
        writer.writerow([point["step"], repr(point["lr"]), repr(point["loss"]), repr(point["smoothed"])])
    return buffer.getvalue()


def format_result(result: dict[str, Any]) -> str:
    """The lines the command prints: how far it went, both rules, the override, the files."""
    steepest = f"{result['steepest']:.3g}" if result["steepest"] is not None else "n/a (too few points)"
    last = result["points"][-1]["lr"]
    folder = Path(result["out"])
    return "\n".join([
        f"lr-find: {result['steps_done']} of {result['steps']} steps, lr {result['start']:.3g} -> {last:.3g} "
        f"(stopped: {result['stop_reason']})",
        f"steepest descent: {steepest}   minimum / 10: {result['minimum_over_10']:.3g}   "
        f"(minimum of the smoothed loss at {result['minimum']:.3g})",
        f"suggested ({result['rule']}): {result['suggestion']:.3g}",
        f"use: {result['override']}",
        f"wrote {folder / 'lr_find.png'}, {folder / 'lr_find.json'}, {folder / 'lr_find.csv'} "
        "(the run directory was not touched; the model was not saved)",
    ])  # fmt: skip
