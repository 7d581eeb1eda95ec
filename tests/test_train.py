"""The training loop: frozen parts untouched, exact resume, schedules, accumulation, clipping, guards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import tltool.objective as objective_module
import tltool.session as session_module
import tltool.train as train_module
from conftest import run_overrides, tree_checksum
from tltool.checkpoint import load_checkpoint
from tltool.config import TrainConfig, load_config
from tltool.data import Stream
from tltool.errors import CheckpointError, ConfigError, TrainingError
from tltool.models import build_model
from tltool.optim import lr_factor
from tltool.runstate import EpochProgress
from tltool.session import build_session, seed_everything
from tltool.train import finetune, train_one_epoch


def run(run_dir: Path, train: Path, *extra: str, resume: str | None = None, **kwargs) -> dict:
    return finetune(load_config(None, run_overrides(run_dir, train, *extra, **kwargs)), resume=resume, quiet=True)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_frozen_run_writes_the_run_directory_and_learns(tmp_path: Path, dataset: Path) -> None:
    before = tree_checksum(dataset)
    summary = run(tmp_path / "r", dataset, "train.epochs=3", "train.lr=0.05")
    run_dir = tmp_path / "r"
    for name in (
        "config.yaml",
        "classes.json",
        "metrics.jsonl",
        "summary.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "classes.json").read_text()) == ["class_0", "class_1", "class_2"]
    lines = metrics(run_dir)
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    expected = {
        "epoch",
        "lr",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc1",
        "val_acc5",
        "epoch_seconds",
        "images_per_second",
        "data_seconds",
    }
    assert expected <= set(lines[0])
    assert lines[-1]["val_acc1"] > 0.6  # chance is 1/3
    assert summary["best_metric"] == max(r["val_acc1"] for r in lines)
    assert json.loads((run_dir / "summary.json").read_text())["epochs_completed"] == 3
    resolved = load_config(run_dir / "config.yaml")
    assert resolved.train.epochs == 3 and Path(resolved.data.train).is_absolute()
    assert tree_checksum(dataset) == before  # nothing written into the dataset


def test_frozen_backbone_and_its_batch_norm_statistics_are_bitwise_unchanged(tmp_path: Path, dataset: Path) -> None:
    config = load_config(None, run_overrides(tmp_path / "r", dataset))
    seed_everything(config.run.seed)
    initial = build_model(config.model, config.data, 3).model.state_dict()
    run(tmp_path / "r", dataset, "data.augment=light")
    final = weights(tmp_path / "r" / "checkpoints" / "last.pt")
    backbone = [k for k in initial if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone)
    for key in backbone:
        assert torch.equal(initial[key], final[key]), key
    assert not torch.equal(initial["head.1.weight"], final["head.1.weight"])
    checkpoint = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert checkpoint.trainable == ["head.1.weight", "head.1.bias"]
    assert checkpoint.frozen_modules == ["backbone"]


class Crash(Exception):
    pass


@pytest.mark.parametrize("freeze", ["backbone", "none"])
def test_resume_after_a_crash_equals_an_uninterrupted_run(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch, freeze: str
) -> None:
    extra = (
        "train.epochs=3",
        f"train.freeze={freeze}",
        "data.augment=light",
        "model.head_dropout=0.3",
        "train.optimizer=sgd",
        "train.warmup_epochs=1",
        "train.scheduler=cosine",
        "checkpoint.max_save_overhead=null",  # (epoch 2 is saved before the crash; tests/test_epochsaves.py defers)
    )
    run(tmp_path / "straight", dataset, *extra)

    real_evaluate = session_module.evaluate
    calls = {"n": 0}

    def crash_in_third_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash()
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(session_module, "evaluate", crash_in_third_epoch)
    with pytest.raises(Crash):
        run(tmp_path / "resumed", dataset, *extra)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt").epoch == 2
    monkeypatch.setattr(session_module, "evaluate", real_evaluate)
    # A different process state before resuming must not matter: RNG comes from the checkpoint.
    torch.manual_seed(12345)
    run(tmp_path / "resumed", dataset, *extra, resume="auto")

    assert_same_weights(
        weights(tmp_path / "straight" / "checkpoints" / "last.pt"),
        weights(tmp_path / "resumed" / "checkpoints" / "last.pt"),
    )
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for key in ("train_loss", "val_loss", "val_acc1", "lr"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for key in ("epoch", "global_step", "best_metric", "best_epoch", "early_stopping", "trainable"):
        assert getattr(straight, key) == getattr(resumed, key), key
    assert straight.scheduler["last_epoch"] == resumed.scheduler["last_epoch"]


def test_resume_rules(tmp_path: Path, dataset: Path) -> None:
    run_dir = tmp_path / "r"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run(run_dir, dataset, resume="auto")
    run(run_dir, dataset)
    with pytest.raises(ConfigError, match="already holds a run"):
        run(run_dir, dataset)
    last = run_dir / "checkpoints" / "last.pt"
    stamp = last.stat().st_mtime_ns
    assert run(run_dir, dataset, resume="auto")["finished"] is True
    assert last.stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError) as exc:
        run(run_dir, dataset, "train.lr=0.5", "train.epochs=4", resume="auto")
    assert "train.lr: 0.01 in the checkpoint, 0.5 now" in exc.value.message()
    run(run_dir, dataset, "train.epochs=3", resume="auto")  # extending a run is allowed
    assert [r["epoch"] for r in metrics(run_dir)] == [1, 2, 3]


@pytest.mark.parametrize("read_every", [1, 3])
def test_non_finite_loss_stops_and_keeps_the_last_finite_checkpoint(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch, read_every: int
) -> None:
    # read_every 3: as on an accelerator, where the loop reads the loss every 32 batches (no sync per step)
    monkeypatch.setattr(train_module, "host_read_interval", lambda device: read_every)
    real = objective_module.F.cross_entropy
    calls = {"n": 0}

    def nan_after_first_epoch(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 5 else loss

    monkeypatch.setattr(objective_module.F, "cross_entropy", nan_after_first_epoch)
    with pytest.raises(TrainingError) as exc:
        run(tmp_path / "r", dataset, "train.epochs=3")
    assert "nan at epoch 2, batch 1" in exc.value.message() and "train.lr" in exc.value.message()
    for name in ("last.pt", "best.pt"):
        checkpoint = load_checkpoint(tmp_path / "r" / "checkpoints" / name)
        assert checkpoint.epoch == 1
        assert all(torch.isfinite(v).all() for v in checkpoint.model.values() if v.is_floating_point())


def test_reading_the_device_sums_every_few_batches_changes_nothing(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an accelerator the loop reads its loss sums every 32 batches (host_read_interval); here every 3."""
    extra = ("train.freeze=none", "data.batch_size=4", "train.epochs=2", "checkpoint.every_n_steps=2")
    run(tmp_path / "every", dataset, *extra)
    monkeypatch.setattr(train_module, "host_read_interval", lambda device: 3)
    real_save, progress = session_module.save_atomic, []

    def record(payload, path):
        progress.append(payload["epoch_progress"])
        real_save(payload, path)

    monkeypatch.setattr(session_module, "save_atomic", record)
    run(tmp_path / "third", dataset, *extra)
    assert_same_weights(
        weights(tmp_path / "every" / "checkpoints" / "last.pt"), weights(tmp_path / "third" / "checkpoints" / "last.pt")
    )
    for a, b in zip(metrics(tmp_path / "every"), metrics(tmp_path / "third"), strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc1", "val_acc5", "global_step"):
            assert a[key] == b[key], key
    mid_epoch = [p for p in progress if p is not None]
    assert len(mid_epoch) >= 4  # (batches 2, 4, 6 of each epoch: before a read, after one, between)
    for p in mid_epoch:  # the sums a mid-epoch checkpoint holds cover every batch done
        assert p["seen"] == 4 * p["batches_done"] and p["loss_sum"] > 0


def test_early_stopping(tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scores = iter([0.5, 0.7, 0.6, 0.6, 0.9, 0.9])
    real = session_module.evaluate

    def scripted(*args, **kwargs):
        out = real(*args, **kwargs)
        out["acc1"] = next(scores)
        return out

    monkeypatch.setattr(session_module, "evaluate", scripted)
    summary = run(tmp_path / "r", dataset, "train.epochs=6", "train.early_stopping_patience=2")
    assert summary["stopped_early"] and summary["epochs_completed"] == 4
    assert summary["best_epoch"] == 2 and summary["best_metric"] == 0.7
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "best.pt").epoch == 2


def test_gradient_accumulation_matches_a_larger_batch(tmp_path: Path, dataset: Path) -> None:
    common = ("train.epochs=1", "train.optimizer=sgd", "train.momentum=0", "train.scheduler=none")
    run(tmp_path / "big", dataset, "data.batch_size=6", *common)
    run(tmp_path / "accumulated", dataset, "data.batch_size=3", "train.accumulate_steps=2", *common)
    a = weights(tmp_path / "big" / "checkpoints" / "last.pt")
    b = weights(tmp_path / "accumulated" / "checkpoints" / "last.pt")
    torch.testing.assert_close(a["head.1.weight"], b["head.1.weight"], rtol=1e-5, atol=1e-6)


def test_gradient_clipping_bounds_the_step(tmp_path: Path, dataset: Path) -> None:
    overrides = run_overrides(
        tmp_path / "r",
        dataset,
        "train.epochs=1",
        "data.batch_size=64",
        "train.optimizer=sgd",
        "train.momentum=0",
        "train.weight_decay=0",
        "train.scheduler=none",
        "train.lr=1.0",
        "train.grad_clip_norm=0.01",
    )
    config = load_config(None, overrides)
    seed_everything(config.run.seed)
    initial = build_model(config.model, config.data, 3).model.head.state_dict()
    finetune(config, quiet=True)
    final = weights(tmp_path / "r" / "checkpoints" / "last.pt")
    step = torch.cat([(final[f"head.{k}"] - initial[k]).flatten() for k in initial])
    assert 0 < step.norm().item() <= 0.01 * (1 + 1e-4)


def test_lr_schedules() -> None:
    steps = 10
    warm = lr_factor(TrainConfig(epochs=4, warmup_epochs=1, scheduler="cosine"), steps)
    assert warm(0) == pytest.approx(0.1) and warm(9) == pytest.approx(1.0)
    assert warm(10) == pytest.approx(1.0) and warm(39) < 0.01
    step = lr_factor(TrainConfig(epochs=4, scheduler="step", step_size=2, step_gamma=0.5), steps)
    assert [step(s) for s in (0, 19, 20, 39)] == [1.0, 1.0, 0.5, 0.5]
    cycle = lr_factor(TrainConfig(epochs=10, scheduler="onecycle"), steps)
    values = [cycle(s) for s in range(100)]
    assert values[0] == pytest.approx(1 / 25) and max(values) == pytest.approx(1.0, abs=1e-3)
    assert values.index(max(values)) in (29, 30) and values[-1] < 1e-3
    assert lr_factor(TrainConfig(scheduler="none"), steps)(55) == 1.0
    assert all(math.isfinite(warm(s)) for s in range(100))


def test_dry_run_writes_nothing(tmp_path: Path, dataset: Path, capsys) -> None:
    config = load_config(None, run_overrides(tmp_path / "r", dataset, "train.freeze=none"))
    assert finetune(config, dry_run=True) == {"dry_run": True}
    out = capsys.readouterr().out
    assert "backbone" in out and "11,176,512" in out and "train 36, val 0" not in out
    assert "steps" in out and "train 30, val 6" in out
    assert not (tmp_path / "r").exists()


def test_missing_data_path_fails_before_weights_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(session_module, "build_model", no_model)
    with pytest.raises(Exception, match="does not exist"):
        run(tmp_path / "r", tmp_path / "missing")


def test_freeze_that_leaves_nothing_to_train_is_an_error(tmp_path: Path, dataset: Path) -> None:
    with pytest.raises(ConfigError, match="leaves no parameter"):
        run(tmp_path / "r", dataset, "train.freeze=[backbone, head]")


def test_config_yaml_of_a_run_is_the_resolved_config(tmp_path: Path, dataset: Path) -> None:
    run(tmp_path / "r", dataset, "train.epochs=1")
    data = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert data["train"]["optimizer"] == "adamw" and data["checkpoint"]["monitor"] == "val_acc1"


@pytest.mark.slow
def test_run_compile_trains_the_same_head_and_reports_the_compile_time(tmp_path: Path, dataset: Path) -> None:
    # The feature cache: only the head (dropout + linear) is compiled, which keeps the compile short.
    runs = {}
    for flag in ("false", "true"):
        overrides = run_overrides(tmp_path / flag, dataset, f"run.compile={flag}", "train.epochs=2")
        runs[flag] = finetune(load_config(None, overrides), quiet=True)
    assert runs["false"]["compile_seconds"] is None and runs["true"]["compile_seconds"] > 0
    plain, compiled = (load_checkpoint(tmp_path / f / "checkpoints" / "last.pt").model for f in ("false", "true"))
    assert plain.keys() == compiled.keys()  # the uncompiled model's names: no _orig_mod prefix
    for key in plain:
        torch.testing.assert_close(compiled[key], plain[key], rtol=1e-4, atol=1e-5)
    assert runs["true"]["final"]["val_acc1"] == pytest.approx(runs["false"]["final"]["val_acc1"])


def test_a_step_whose_batches_were_all_unreadable_changes_no_weight(tmp_path: Path, dataset: Path) -> None:
    """The loop drops gradients just before a step's first backward: a step with none must not reuse them."""
    overrides = run_overrides(tmp_path / "r", dataset, "train.optimizer=sgd", "train.momentum=0",
                              "train.weight_decay=0", "train.scheduler=none", "train.freeze=none")  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(4, 3, 32, 32, generator=generator), torch.tensor([0, 1, 0, 1]))

    def trained(batches: list) -> dict[str, torch.Tensor]:
        session = build_session(load_config(None, overrides), quiet=True)
        session.start()
        session.set_streams({"train": Stream("train", batches)})
        session.state.in_epoch = EpochProgress()
        train_one_epoch(session)
        assert session.state.global_step == len(batches)
        return {k: v.clone() for k, v in session.model.state_dict().items()}

    once, then_nothing = trained([batch]), trained([batch, None])
    assert_same_weights(once, then_nothing)
    key = "backbone.conv1.weight"
    assert not torch.equal(once[key], trained([batch, batch])[key])
