"""The training session: built once from (config, resume), each stateful part saved and restored in one place,
named streams positioned per epoch, and entering an epoch (unfreeze, cache on/off) in one method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tltool.session as session_module
from conftest import run_overrides
from tltool.checkpoint import Checkpoint, load_checkpoint, rng_state, save_atomic
from tltool.config import load_config
from tltool.runstate import EpochProgress
from tltool.session import RunFinished, build_session
from tltool.train import finetune, train_one_epoch


class Crash(Exception):
    pass


def config(tmp_path: Path, dataset: Path, *extra: str):
    return load_config(None, run_overrides(tmp_path / "r", dataset, *extra))


def test_building_a_session_writes_nothing_and_start_writes_the_run_directory(tmp_path: Path, dataset: Path) -> None:
    session = build_session(config(tmp_path, dataset, "train.freeze=none"), quiet=True)
    assert not (tmp_path / "r").exists()
    assert session.objective.names == ["ce"] and session.plan.backbone_trains()
    assert [g["name"] for g in session.optimizer.param_groups] == ["backbone", "head"]
    session.start()
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"config.yaml", "classes.json"}
    assert list(session.streams) == ["train"] and not session.inputs.cached
    assert session.streams["train"].num_batches() == session.steps_per_epoch == 4  # 30 train images, batch 8


def test_a_checkpoint_restores_every_part_of_the_session(tmp_path: Path, dataset: Path) -> None:
    cfg = config(tmp_path, dataset, "train.freeze=none", "train.regularization=l2sp", "train.optimizer=sgd")
    first = build_session(cfg, quiet=True)
    first.start()
    first.enter_epoch(0)
    train_one_epoch(first)
    first.state.epoch, first.state.in_epoch = 1, None
    path = tmp_path / "r" / "checkpoints" / "last.pt"
    save_atomic(first.checkpoint([{"rng": rng_state(), "epoch_progress": None}]).to_dict(), path)

    second = build_session(cfg, resume="auto", quiet=True)
    assert second.state.epoch == 1 and second.state.global_step == first.state.global_step == 4
    a, b = first.optimizer.state_dict(), second.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for key, value in a["state"].items():
        torch.testing.assert_close(b["state"][key]["momentum_buffer"], value["momentum_buffer"], rtol=0, atol=0)
    assert first.scheduler.state_dict()["last_epoch"] == second.scheduler.state_dict()["last_epoch"] == 4
    for key, value in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[key], value), key
    w0 = first.objective.state_dict()["l2sp"]["reference"]
    for key, value in second.objective.state_dict()["l2sp"]["reference"].items():
        assert torch.equal(value, w0[key]), key  # the start of training, not the weights resumed


def test_entering_an_epoch_positions_the_train_stream(tmp_path: Path, dataset: Path) -> None:
    cfg = config(tmp_path, dataset, "train.freeze=none", "data.augment=light")
    session = build_session(cfg, quiet=True)
    session.start()

    def labels_of_epoch(epoch: int, skip: int) -> list[list[int]]:
        session.state.in_epoch = EpochProgress(batches_done=skip)
        session.enter_epoch(epoch)
        return [batch[1].tolist() for batch in session.streams["train"].loader]

    whole = labels_of_epoch(1, 0)
    assert len(whole) == 4 and whole == labels_of_epoch(1, 0)  # a function of (seed, epoch)
    assert labels_of_epoch(1, 2) == whole[2:]  # a resumed epoch continues where it stopped
    assert labels_of_epoch(2, 0) != whole


def test_entering_the_epoch_a_plan_opens_leaves_the_feature_cache(tmp_path: Path, dataset: Path) -> None:
    cfg = config(tmp_path, dataset, "train.unfreeze_at_epoch=2", "train.feature_cache=on")
    session = build_session(cfg, quiet=True)
    session.start()
    assert session.cache is not None and session.inputs.cached and session.forward is session.model.head
    session.enter_epoch(0)
    assert session.inputs.cached and not session.plan.backbone_trains()
    first_batch = next(iter(session.streams["train"].loader))[0]
    assert first_batch.shape == (8, 512)  # backbone features
    session.state.in_epoch = None
    session.enter_epoch(1)
    assert not session.inputs.cached and session.plan.backbone_trains() and session.forward is session.model
    assert [g["name"] for g in session.optimizer.param_groups] == ["head", "backbone"]
    assert next(iter(session.streams["train"].loader))[0].shape == (8, 3, 32, 32)  # images again


def test_a_finished_run_is_not_built_again(tmp_path: Path, dataset: Path) -> None:
    cfg = config(tmp_path, dataset, "train.epochs=1")
    finetune(cfg, quiet=True)
    with pytest.raises(RunFinished, match="already finished 1 of 1 epochs"):
        build_session(cfg, resume="auto", quiet=True)


def test_a_checkpoint_written_before_the_loss_terms_resumes_bitwise_mid_epoch(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints of format 1 written before the loss terms (no loss_terms key, no term_sums in the epoch
    sums) resume as before: the resumed run ends bitwise equal to an uninterrupted one."""
    extra = ("train.freeze=none", "train.epochs=2", "train.regularization=l2sp", "checkpoint.every_n_steps=3")
    straight = finetune(load_config(None, run_overrides(tmp_path / "straight", dataset, *extra)), quiet=True)
    real_save, saves = session_module.save_atomic, []

    def save_as_before_then_crash(payload, path):
        saves.append(path)
        old = {key: value for key, value in payload.items() if key != "loss_terms"}
        if old["epoch_progress"] is not None:
            old["epoch_progress"] = {k: v for k, v in old["epoch_progress"].items() if k != "term_sums"}
        real_save(old, path)
        if len(saves) == 3:  # step 3 (epoch 1, batch 3), epoch 1's end, step 6 (epoch 2, batch 2): crash there
            raise Crash()

    monkeypatch.setattr(session_module, "save_atomic", save_as_before_then_crash)
    overrides = run_overrides(tmp_path / "resumed", dataset, *extra)
    with pytest.raises(Crash):
        finetune(load_config(None, overrides), quiet=True)
    monkeypatch.setattr(session_module, "save_atomic", real_save)
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert "loss_terms" not in saved and "term_sums" not in saved["epoch_progress"]
    assert saved["epoch_progress"]["batches_done"] == 2
    resumed = finetune(load_config(None, overrides), resume="auto", quiet=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert isinstance(b, Checkpoint)
    for key, value in a.model.items():
        assert torch.equal(b.model[key], value), key
    assert resumed["final"]["val_acc1"] == straight["final"]["val_acc1"]
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2] and lines[-1]["train_loss"] == straight["final"]["train_loss"]


def test_a_session_built_from_the_python_api_checks_the_model_names(tmp_path: Path, dataset: Path) -> None:
    from tltool.errors import ConfigError

    with pytest.raises(ConfigError, match="resnet18"):  # (did you mean resnet18?)
        build_session(config(tmp_path, dataset, "model.backbone=resnet81"), quiet=True)
    assert not (tmp_path / "r").exists()


def test_a_resumed_epochs_earlier_seconds_are_not_counted_as_data_wait(tmp_path: Path, dataset: Path) -> None:
    """An epoch resumed mid-way carries its earlier seconds (sums.seconds); the first batch's wait for data is
    timed from the loop's start, not from that earlier start."""
    session = build_session(config(tmp_path, dataset), quiet=True)
    session.start()
    session.enter_epoch(0)
    session.state.in_epoch.seconds = 1000.0  # (as a checkpoint of an epoch that ran 1000 s before the stop)
    figures = train_one_epoch(session)
    assert figures["train_seconds"] >= 1000.0 and figures["data_seconds"] < 100.0
