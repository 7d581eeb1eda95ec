"""checkpoint.max_save_overhead: deferred end-of-epoch saves (epochsaves.py). The rule, and what a deferral keeps:
best.pt the best epoch's, the final and a stopped epoch saved, an exact resume after a crash, MLflow never
logging an epoch that is not saved."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

import tltool.session as session_module
from conftest import run_overrides
from tltool.checkpoint import load_checkpoint
from tltool.config import load_config
from tltool.epochsaves import EpochSaves, save_due, snapshot
from tltool.train import Interrupted, finetune

# The monitored accuracy of each epoch (evaluate's own, replaced): the best epochs are 1, 2 and 4.
ACCURACY = [0.5, 0.9, 0.6, 0.95, 0.7, 0.8]
EXTRA = ("train.epochs=6", "model.head_dropout=0.3")  # (a frozen backbone: the head trains on cached features)


def test_the_rule_bounds_the_share_of_time_spent_saving() -> None:
    assert save_due(0.91, 0.1, 0.1)  # 9 saves' time since the last one: save (a tenth of the time)
    assert not save_due(0.89, 0.1, 0.1)
    assert save_due(0.31, 0.1, 0.25) and not save_due(0.29, 0.1, 0.25)  # (1 - f) / f = 3
    assert save_due(0.0, 5.0, 1.0)  # f = 1: every epoch
    assert save_due(0.0, 5.0, None)  # null: every epoch
    assert save_due(0.0, None, 0.1)  # no save measured yet in this process: save (and measure it)


def test_a_snapshot_does_not_change_with_training_and_shares_the_rest() -> None:
    weight, preprocess = torch.ones(3), object()
    original = {"model": {"w": weight}, "preprocess": preprocess, "groups": [torch.zeros(2)], "epoch": 4}
    copy = snapshot(original)
    weight.add_(1.0)  # the next epoch's step
    original["groups"][0].add_(1.0)
    assert torch.equal(copy["model"]["w"], torch.ones(3)) and torch.equal(copy["groups"][0], torch.zeros(2))
    assert copy["preprocess"] is preprocess and copy["epoch"] == 4 and copy["groups"] is not original["groups"]


def test_records_wait_for_the_save_that_holds_them() -> None:
    now = [0.0]
    logged: list[int] = []
    saves = EpochSaves(0.1, clock=lambda: now[0])
    saves.log({"epoch": 1})  # no MLflow: nothing kept
    saves.log_epoch = lambda record: logged.append(record["epoch"])
    now[0] = 1.0
    saves.saved(started=0.8)  # a save of 0.2 s
    assert saves.save_seconds == pytest.approx(0.2) and not saves.due()
    saves.log({"epoch": 2})
    saves.defer(2, {"model": {"w": torch.ones(1)}})
    saves.log({"epoch": 3})
    saves.defer(3, None)
    assert logged == [] and saves.unsaved and saves.best[0] == 2 and saves.deferred == 2
    now[0] = 2.8  # 1.8 s after the save: 9 times its 0.2 s
    assert saves.due()
    saves.saved(started=2.8)
    assert logged == [2, 3] and not saves.unsaved and saves.best is None


class Tracker:
    """MLflow's place in the loop: which epochs it logged, and last.pt's epoch at the time of each."""

    def __init__(self, run_dir: Path, log: list[tuple[int, int]]) -> None:
        self.last, self.log = run_dir / "checkpoints" / "last.pt", log

    def log_epoch(self, record: dict) -> None:
        self.log.append((record["epoch"], load_checkpoint(self.last).epoch))


def slow_saves(
    monkeypatch: pytest.MonkeyPatch, crash_at: int | None = None, sigterm_at: int | None = None
) -> list[tuple[str, int]]:
    """Each save takes 0.25 s more (a big checkpoint): the head's epochs are far shorter than 9 saves. The
    accuracies are ACCURACY's; `crash_at` (1-based) raises in that epoch's evaluation, as a killed process stops;
    `sigterm_at` sends this process SIGTERM there (a scheduler's stop). Returns the (file, epoch) of every
    checkpoint written whole."""
    written: list[tuple[str, int]] = []
    real_save, real_evaluate = session_module.save_atomic, session_module.TrainingSession.evaluate

    def save(payload: dict, path: Path) -> None:
        real_save(payload, path)
        written.append((Path(path).name, payload["epoch"]))
        time.sleep(0.25)

    def evaluate(self) -> dict:
        if crash_at is not None and self.state.epoch + 1 == crash_at:
            raise KeyboardInterrupt  # (not caught by the loop: nothing else is saved)
        if sigterm_at is not None and self.state.epoch + 1 == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return {**real_evaluate(self), "acc1": ACCURACY[self.state.epoch]}

    monkeypatch.setattr(session_module, "save_atomic", save)
    monkeypatch.setattr(session_module.TrainingSession, "evaluate", evaluate)
    return written


def run(run_dir: Path, dataset: Path, *extra: str, resume: str | None = None, on_epoch=None) -> dict:
    cfg = load_config(None, run_overrides(run_dir, dataset, *EXTRA, *extra))
    return finetune(cfg, resume=resume, quiet=True, on_epoch=on_epoch)


def metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timing = ("epoch_seconds", "images_per_second", "data_seconds")
    return [{k: v for k, v in line.items() if k not in timing} for line in lines]


def assert_same_checkpoint(a: Path, b: Path) -> None:
    left, right = load_checkpoint(a), load_checkpoint(b)
    assert (left.epoch, left.best_epoch, left.best_metric) == (right.epoch, right.best_epoch, right.best_metric)
    assert left.model.keys() == right.model.keys()
    for key in left.model:
        assert torch.equal(left.model[key], right.model[key]), key


@pytest.fixture(scope="module")
def every_epoch(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    """The reference: the same run saved at every epoch's end (null), with ACCURACY."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        written = slow_saves(monkeypatch)
        run_dir = tmp_path_factory.mktemp("every_epoch") / "run"
        summary = run(run_dir, dataset, "checkpoint.max_save_overhead=null")
    assert summary["best_epoch"] == 4 and summary["checkpoints"]["deferred_epoch_saves"] == 0
    assert [name for name, _ in written] == ["last.pt"] * 6  # (best.pt: hard links of epochs 1, 2 and 4)
    return run_dir


def test_deferred_saves_end_with_the_files_of_a_run_saved_every_epoch(
    tmp_path: Path, dataset: Path, every_epoch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = slow_saves(monkeypatch)
    summary = run(tmp_path / "run", dataset)
    # Epoch 1 saves (no save measured yet; best.pt its hard link); 2-5 wait; epoch 6, the last, saves, and
    # writes best.pt from epoch 4's end, kept in memory since.
    assert written == [("last.pt", 1), ("last.pt", 6), ("best.pt", 4)]
    assert summary["checkpoints"]["deferred_epoch_saves"] == 4 and summary["best_epoch"] == 4
    for name in ("last.pt", "best.pt"):
        assert_same_checkpoint(tmp_path / "run" / "checkpoints" / name, every_epoch / "checkpoints" / name)
    assert metrics(tmp_path / "run") == metrics(every_epoch)


def test_a_crash_loses_the_unsaved_epochs_and_the_resume_ends_as_the_uninterrupted_run(
    tmp_path: Path, dataset: Path, every_epoch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logged: list[tuple[int, int]] = []
    real_start = session_module.TrainingSession.start

    def start(self) -> None:  # a run that logs to MLflow: the loop hands its records to the tracker
        real_start(self)
        self.saves.log_epoch = Tracker(self.run_dir, logged).log_epoch

    monkeypatch.setattr(session_module.TrainingSession, "start", start)
    written = slow_saves(monkeypatch, crash_at=5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", dataset)
    assert written == [("last.pt", 1)]  # epochs 2-4 were deferred: the crash lost them, and best.pt is epoch 1's
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt").epoch == 1
    assert logged == [(1, 1)]  # MLflow never saw an epoch that last.pt does not hold

    monkeypatch.undo()
    monkeypatch.setattr(session_module.TrainingSession, "start", start)
    slow_saves(monkeypatch)
    summary = run(tmp_path / "run", dataset, "checkpoint.max_save_overhead=0.2", resume="auto")  # 2-6 again
    # (the setting may change on resume: when last.pt is written, not what it holds)
    assert summary["best_epoch"] == 4
    for name in ("last.pt", "best.pt"):
        assert_same_checkpoint(tmp_path / "run" / "checkpoints" / name, every_epoch / "checkpoints" / name)
    assert metrics(tmp_path / "run") == metrics(every_epoch)  # epochs 2-4's first lines dropped, no line twice
    assert [epoch for epoch, _ in logged] == [1, 2, 3, 4, 5, 6]
    assert all(saved >= epoch for epoch, saved in logged)


def test_a_run_stopped_between_epochs_saves_the_epoch_it_stops_at(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = slow_saves(monkeypatch)
    summary = run(tmp_path / "run", dataset, on_epoch=lambda record: "pruned" if record["epoch"] == 3 else None)
    assert summary["stop_reason"] == "pruned"
    assert written == [("last.pt", 1), ("last.pt", 3), ("best.pt", 2)]  # 2 and 3 deferred; the stop saves 3
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt").epoch == 3


def test_a_signal_during_a_deferred_epoch_saves_that_epoch(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = slow_saves(monkeypatch, sigterm_at=3)
    with pytest.raises(Interrupted) as stopped:
        run(tmp_path / "run", dataset)
    assert stopped.value.exit_code == 143
    assert written == [("last.pt", 1), ("last.pt", 3), ("best.pt", 2)]  # epoch 3's end, deferred, then saved


def test_every_n_steps_saves_every_epoch_end(tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = slow_saves(monkeypatch)
    run(tmp_path / "run", dataset, "train.epochs=3", "checkpoint.every_n_steps=100")  # (more steps than an epoch)
    assert written == [("last.pt", 1), ("last.pt", 2), ("last.pt", 3)]
