"""train.ema_decay: the EMA's formula, its steps, its exact resume, its monitoring, best.pt holding it, bad values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import tltool.session as session_module
from conftest import make_dataset, run_overrides, write_config
from tltool.checkpoint import load_checkpoint
from tltool.cli import app
from tltool.config import load_config
from tltool.ema import WeightEMA
from tltool.errors import ConfigError
from tltool.models import TransferModel
from tltool.runstate import TrainState
from tltool.train import finetune
from tltool.trained import open_trained

# Everything of resnet18 frozen but layer4: the backbone trains (a whole-model EMA, batch-norm buffers that move)
# at a fraction of a full backward's cost.
PARTLY_FROZEN = "train.freeze=[backbone.conv1, backbone.bn1, backbone.layer1, backbone.layer2, backbone.layer3]"


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 5 images: 12 train / 3 val."""
    return make_dataset(tmp_path_factory.mktemp("ema") / "images", per_class=5, size=32)


def run(run_dir: Path, train: Path, *extra: str, resume: str | None = None) -> dict:
    return finetune(load_config(None, run_overrides(run_dir, train, *extra)), resume=resume, quiet=True)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tiny_model() -> TransferModel:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return TransferModel(backbone, nn.Sequential(nn.Dropout(0.0), nn.Linear(4, 3)))


def train_steps(model: TransferModel, ema: WeightEMA, steps: int) -> list[dict[str, torch.Tensor]]:
    """`steps` SGD steps (batch norm in train mode: its buffers move), the EMA updated after each; the model's
    state after each step."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    states = []
    for step in range(steps):
        images, labels = torch.randn(6, 3, 8, 8) + step, torch.tensor([0, 1, 2, 0, 1, 2])
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        ema.update()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


def by_hand(states: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """ema_1 = w_1, ema_t = d ema_(t-1) + (1 - d) w_t (integer buffers: the model's)."""
    ema = dict(states[0])
    for state in states[1:]:
        ema = {k: decay * ema[k] + (1 - decay) * w if w.is_floating_point() else w for k, w in state.items()}
    return ema


def test_the_ema_of_the_whole_model_is_the_formula_buffers_included() -> None:
    model, decay = tiny_model(), 0.7
    ema = WeightEMA(model, decay, head_only=False)
    states = train_steps(model, ema, 5)
    expected, averaged = by_hand(states, decay), ema.averaged.module.state_dict()
    assert ema.steps == 5 and expected.keys() == averaged.keys()
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # not the last weights: a real average (the batch-norm statistics too), and integer buffers copied
    assert not torch.allclose(averaged["head.1.weight"], states[-1]["head.1.weight"])
    assert not torch.allclose(averaged["backbone.1.running_mean"], states[-1]["backbone.1.running_mean"])
    assert int(averaged["backbone.1.num_batches_tracked"]) == 5
    assert not any(p.requires_grad for p in ema.averaged.parameters())
    # the checkpoint's state loads back into a fresh EMA as it was
    saved = ema.checkpoint_state({k: v.clone() for k, v in model.state_dict().items()})
    again = WeightEMA(tiny_model(), decay, head_only=False)
    again.restore(saved)
    assert again.steps == 5
    for key, value in again.averaged.module.state_dict().items():
        assert torch.equal(value, averaged[key]), key


def test_a_head_only_ema_averages_the_head_under_the_live_frozen_backbone() -> None:
    model, decay = tiny_model(), 0.5
    model.backbone.requires_grad_(False)
    ema = WeightEMA(model, decay, head_only=True)
    states = train_steps(model, ema, 4)
    expected = by_hand(states, decay)
    for key, value in ema.averaged.module.state_dict().items():
        torch.testing.assert_close(value, expected[f"head.{key}"], rtol=1e-5, atol=1e-6, msg=key)
    view = ema.module(cached=False)
    assert view.backbone is model.backbone and view.head is ema.averaged.module
    assert ema.module(cached=True) is ema.averaged.module
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    full = ema.state_dict(weights)
    assert full.keys() == weights.keys()
    assert torch.equal(full["backbone.0.weight"], weights["backbone.0.weight"])
    assert torch.equal(full["head.1.weight"], ema.averaged.module.state_dict()["1.weight"])


def test_monitoring_a_loss_keeps_its_lowest_value() -> None:
    state = TrainState()
    for value in (3.0, 1.0, 2.0):
        state.end_epoch({"val_loss_ema": value, "epoch": state.epoch + 1}, "val_loss_ema")
        state.epoch += 1
    assert state.best_metric == 1.0 and state.best_epoch == 1


@pytest.mark.slow
def test_a_run_resumed_mid_epoch_ends_with_the_same_ema_bitwise(
    tmp_path: Path, small: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    # 3 batches per epoch, 2 per optimizer step: steps 1 (mid-epoch save), 2 | 3 (mid-epoch save), 4
    extra = ("train.ema_decay=0.6", PARTLY_FROZEN, "data.batch_size=4", "train.accumulate_steps=2",
             "checkpoint.every_n_steps=1", "data.augment=light", "model.head_dropout=0.3")  # fmt: skip
    straight = run(tmp_path / "straight", small, *extra)
    assert straight["ema"] == {"decay": 0.6, "averages": "model", "steps": 4}  # once per optimizer step
    real_save, saves = session_module.save_atomic, []

    def crash_on_third_save(payload, path):
        saves.append(path)
        real_save(payload, path)
        if len(saves) == 3:  # step 3: epoch 2, batch 2
            raise Crash()

    monkeypatch.setattr(session_module, "save_atomic", crash_on_third_save)
    with pytest.raises(Crash):
        run(tmp_path / "resumed", small, *extra)
    monkeypatch.setattr(session_module, "save_atomic", real_save)
    crashed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert crashed.epoch_progress["batches_done"] == 2 and crashed.ema["n_averaged"] == 3
    torch.manual_seed(99)  # the process's RNG must not matter
    run(tmp_path / "resumed", small, *extra, resume="auto")
    a, b = (load_checkpoint(tmp_path / name / "checkpoints" / "last.pt") for name in ("straight", "resumed"))
    assert a.weights == b.weights == "raw" and a.ema["n_averaged"] == b.ema["n_averaged"] == 4
    for key, value in a.ema["model"].items():
        assert torch.equal(b.ema["model"][key], value), key
    for key, value in a.model.items():
        assert torch.equal(b.model[key], value), key
    # the backbone's trained part and its batch-norm statistics are averaged, not copied
    statistics = "backbone.layer4.1.bn2.running_var"
    assert not torch.equal(a.ema["model"][statistics], a.model[statistics])
    keys = ("val_loss", "val_loss_ema", "val_acc1_ema", "val_acc5_ema")
    assert [[r[k] for k in keys] for r in records(tmp_path / "straight")] == [
        [r[k] for k in keys] for r in records(tmp_path / "resumed")
    ]


@pytest.mark.slow
def test_monitored_ema_picks_best_pt_which_holds_the_ema_that_eval_reproduces(
    tmp_path: Path, small: Path, cli, one_thread: None
) -> None:
    run_dir = tmp_path / "r"
    extra = ("train.ema_decay=0.5", "checkpoint.monitor=val_loss_ema", "train.epochs=3", "data.batch_size=4",
             "train.lr=0.05")  # fmt: skip
    summary = run(run_dir, small, *extra)  # frozen backbone, feature cache: the EMA of the head, on cached features
    lines = records(run_dir)
    losses = [r["val_loss_ema"] for r in lines]
    assert summary["ema"]["averages"] == "head" and summary["checkpoint_weights"] == "ema"
    assert summary["best_metric"] == min(losses) and summary["best_epoch"] == losses.index(min(losses)) + 1
    assert min(losses) not in [r["val_loss"] for r in lines]  # the EMA's metric, not the raw weights'
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert best.weights == "ema" and best.epoch == summary["best_epoch"]
    for key, value in best.ema["model"].items():
        assert torch.equal(best.model[key], value), key
    assert not torch.equal(best.model["head.1.weight"], best.raw_model["head.1.weight"])
    assert torch.equal(best.model["backbone.conv1.weight"], best.raw_model["backbone.conv1.weight"])  # frozen
    trained = open_trained(run_dir / "checkpoints" / "best.pt")  # what eval, report, predict and export load
    for key, value in trained.model.state_dict().items():
        assert torch.equal(value, best.ema["model"][key]), key

    out = tmp_path / "eval.json"
    result = cli.invoke(app, ["eval", str(run_dir / "checkpoints" / "best.pt"), "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "(EMA weights)" in result.output
    measured, at_best = json.loads(out.read_text()), lines[summary["best_epoch"] - 1]
    assert measured["weights"] == "ema" and measured["acc1"] == at_best["val_acc1_ema"]
    assert measured["loss"] == pytest.approx(at_best["val_loss_ema"], rel=1e-4)

    # a resume continues from the trained weights, and ema_decay is part of the config it must match
    with pytest.raises(ConfigError) as exc:
        run(run_dir, small, *extra[:2], "train.ema_decay=0.9", "train.epochs=4", resume="auto")
    assert "train.ema_decay: 0.5 in the checkpoint, 0.9 now" in str(exc.value.details)
    run(run_dir, small, *extra[:2], "train.epochs=4", *extra[3:], resume="auto")
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt").ema["n_averaged"] == 4 * 3


def test_bad_ema_settings_are_one_error_exit_2(tmp_path: Path, small: Path, cli) -> None:
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "r", small))
    cases = {
        "train.ema_decay: Input should be less than 1": ["train.ema_decay=1.5"],
        "checkpoint.monitor=val_acc1_ema needs train.ema_decay": ["checkpoint.monitor=val_acc1_ema"],
        "adapt.bn_stats=target and a backbone that trains is not supported": [
            "train.ema_decay=0.99", "train.freeze=none", f"adapt.unlabeled={small}", "adapt.bn_stats=target",
        ],
    }  # fmt: skip
    for expected, overrides in cases.items():
        result = cli.invoke(app, ["finetune", str(config), "--dry-run", *overrides])
        assert result.exit_code == 2, result.output
        assert expected in result.stderr and "Traceback" not in result.output, result.stderr
        assert result.stderr.startswith("error: ")
    assert not (tmp_path / "r").exists()  # nothing written


@pytest.mark.slow
def test_two_processes_average_as_one_with_the_global_batch(tmp_path: Path, small: Path, one_thread: None) -> None:
    """Under torchrun each rank averages its unwrapped model after the all-reduced step; rank 0 saves it."""
    # (no feature cache: the EMA is evaluated on images, its averaged head under the live frozen backbone)
    common = ("train.ema_decay=0.6", "train.feature_cache=off", "train.epochs=2", "train.lr=0.05")
    run(tmp_path / "one", small, *common, "data.batch_size=8")
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "two", small, *common, "data.batch_size=4"))
    command = [sys.executable, "-m", "tltool", "finetune", str(config), "--nproc", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ema loss") == 2  # rank 0's epoch lines only
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    for key in ("val_loss_ema", "val_acc1_ema"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-6), key
    a, b = (load_checkpoint(tmp_path / name / "checkpoints" / "last.pt").ema for name in ("one", "two"))
    assert a["n_averaged"] == b["n_averaged"] == 4
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
