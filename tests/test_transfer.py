"""Transfer-learning methods: unfreeze plans, discriminative LR, L2-SP, class imbalance; each does what it says."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import tltool.objective as objective_module
import tltool.session as session_module
from conftest import make_dataset, run_overrides
from tltool.checkpoint import Checkpoint, load_checkpoint
from tltool.config import load_config
from tltool.data import BalancedSampler
from tltool.errors import ConfigError
from tltool.models import (
    _arch_kwargs,
    _drop_aux,
    _set_slot,
    build_model,
    head_path,
)
from tltool.session import seed_everything
from tltool.stages import STAGE_TABLE, backbone_stages
from tltool.train import finetune

ALL_MODELS = torchvision.models.list_models(module=torchvision.models)
# Modules whose output depends on train/eval mode: a stage must hold them so that "closed" means eval.
MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.Dropout, torchvision.ops.StochasticDepth)


def run(run_dir: Path, train: Path, *extra: str, resume: str | None = None) -> dict:
    return finetune(load_config(None, run_overrides(run_dir, train, *extra)), resume=resume, quiet=True)


def last(run_dir: Path) -> Checkpoint:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def initial_weights(run_dir: Path, train: Path, *extra: str) -> dict[str, torch.Tensor]:
    """The weights a run starts from (the same seed builds the same model)."""
    config = load_config(None, run_overrides(run_dir, train, *extra))
    seed_everything(config.run.seed)
    return build_model(config.model, config.data, 3).model.state_dict()


def record_epoch_weights(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """The model of every checkpoint a run saves (one per epoch with checkpoint.max_save_overhead=null, more with
    checkpoint.every_n_steps)."""
    saved: list[dict[str, torch.Tensor]] = []
    real = session_module.save_atomic

    def save(payload, path):
        saved.append({k: v.clone() for k, v in payload["model"].items()})
        real(payload, path)

    monkeypatch.setattr(session_module, "save_atomic", save)
    return saved


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> list[str]:
    return [k for k in a if k.startswith(prefix) and not torch.equal(a[k], b[k])]


# --- the stage table --------------------------------------------------------------------------------


@pytest.fixture()
def regnet_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    """RegNet computes its block widths with tensor maths that the meta device cannot run: do that on CPU."""
    import torchvision.models.regnet as regnet

    real = regnet.BlockParams.from_init_params.__func__

    def on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return real(cls, *args, **kwargs)

    monkeypatch.setattr(regnet.BlockParams, "from_init_params", classmethod(on_cpu))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_stage_table_covers_every_torchvision_model(regnet_on_meta: None) -> None:
    families = set()
    for name in ALL_MODELS:
        with torch.device("meta"):  # shapes only: building all of them takes seconds
            net = torchvision.models.get_model(name, weights=None, **_arch_kwargs(name, None, 224))
        _drop_aux(net)
        _set_slot(net, head_path(net), nn.Identity())
        families.add(type(net).__name__)
        stages = backbone_stages(net)
        assert len(stages) >= 4, name
        owner: dict[str, str] = {}
        for stage in stages:
            for path in stage.paths:
                try:
                    names = [f"{path}.{n}" for n, _ in net.get_submodule(path).named_parameters()]
                except AttributeError:
                    names = [path]
                for param in names:
                    assert param not in owner, f"{name}: {param} in {owner[param]} and {stage.name}"
                    owner[param] = stage.name
        assert set(owner) == {n for n, _ in net.named_parameters()}, name
        # Input to output: a stage's parameters come before the next stage's in the module order.
        order = [owner[n] for n, _ in net.named_parameters()]
        assert [s.name for s in stages] == list(dict.fromkeys(order)), name
        paths = tuple(p for stage in stages for p in stage.paths)
        for module_name, module in net.named_modules():
            if isinstance(module, MODE_DEPENDENT):
                inside = any(module_name == p or module_name.startswith(p + ".") for p in paths)
                assert inside, f"{name}: {module_name} ({type(module).__name__}) is in no stage"
    assert families == set(STAGE_TABLE)


def test_a_family_without_stages_is_a_config_error_only_where_stages_are_needed(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(STAGE_TABLE, "ResNet")
    with pytest.raises(ConfigError, match="train.layer_lr_decay needs the stages .* no entry for ResNet"):
        finetune(load_config(None, run_overrides(tmp_path / "r", dataset, "train.freeze=none",
                                                 "train.layer_lr_decay=0.5")), dry_run=True)  # fmt: skip
    config = load_config(None, run_overrides(tmp_path / "r", dataset, "train.unfreeze_at_epoch=2"))
    assert finetune(config, dry_run=True) == {"dry_run": True}  # the whole backbone needs no stages


def test_plan_config_is_validated(tmp_path: Path, dataset: Path) -> None:
    def problems(*overrides: str) -> str:
        with pytest.raises(ConfigError) as exc:
            load_config(None, ["train.epochs=8", *overrides])
        return exc.value.message()

    assert load_config(None, ["train.epochs=8", "train.unfreeze_schedule={3: 1, 5: 2, 7: all}"]).train.unfreeze_schedule
    assert "grow" in problems("train.unfreeze_schedule={3: 2, 5: 1}")
    assert "'all' can only" in problems("train.unfreeze_schedule={3: all, 5: 4}")
    assert "after the last epoch" in problems("train.unfreeze_schedule={9: 1}")
    assert "after the last epoch" in problems("train.unfreeze_at_epoch=9")
    assert "not both" in problems("train.unfreeze_at_epoch=2", "train.unfreeze_schedule={3: 1}")
    assert "train.freeze: backbone" in problems("train.unfreeze_at_epoch=2", "train.freeze=none")
    assert "one positive number per class" in problems("train.class_weights=[1, 0]")
    assert "balanced" in problems("train.class_weights=equal")
    with pytest.raises(ConfigError, match="opens 6 stages at epoch 2, but resnet18 has 5: stem, layer1"):
        finetune(load_config(None, run_overrides(tmp_path / "r", dataset, "train.unfreeze_schedule={2: 6}")),
                 dry_run=True)  # fmt: skip


# --- unfreeze plans ---------------------------------------------------------------------------------

GRADUAL = ("train.epochs=3", "train.unfreeze_schedule={2: 1, 3: 2}", "train.optimizer=sgd", "train.scheduler=none",
           "train.backbone_lr_mult=0.5", "train.layer_lr_decay=0.5", "train.unfreeze_warmup_epochs=2")  # fmt: skip


def test_gradual_unfreezing_opens_stages_at_their_epochs_with_their_lr(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    initial = initial_weights(tmp_path / "r", dataset)
    saved = record_epoch_weights(monkeypatch)
    summary = run(tmp_path / "r", dataset, *GRADUAL, "checkpoint.save_best=false", "checkpoint.max_save_overhead=null")
    after = dict(enumerate(saved, start=1))
    assert len(saved) == 3
    # Bitwise unchanged until its epoch (weights and batch-norm statistics), changed from it on.
    assert changed(initial, after[1], "backbone.") == []
    assert changed(initial, after[2], "backbone.") and all(
        k.startswith("backbone.layer4.") for k in changed(initial, after[2], "backbone.")
    )
    moved = changed(initial, after[3], "backbone.")
    assert any(k.startswith("backbone.layer3.") for k in moved) and any("running_mean" in k for k in moved)
    assert all(k.startswith(("backbone.layer3.", "backbone.layer4.")) for k in moved)
    checkpoint = last(tmp_path / "r")
    assert checkpoint.transfer["opened"] == [
        {"part": "backbone.layer4", "step": 4, "epoch": 2},
        {"part": "backbone.layer3", "step": 8, "epoch": 3},
    ]
    assert [g["name"] for g in checkpoint.optimizer["param_groups"]] == [
        "head",
        "backbone.layer4",
        "backbone.layer3",
    ]
    assert checkpoint.frozen_modules == ["backbone.conv1", "backbone.bn1", "backbone.layer1", "backbone.layer2"]
    assert all(n.startswith(("head.", "backbone.layer3.", "backbone.layer4.")) for n in checkpoint.trainable)
    # LR per group: head 0.01; layer4 0.01 x 0.5; layer3 one stage further, x 0.5 again. Each opened group
    # warms up over 2 epochs (8 steps) from its opening step: after 4 of them it is at 5/8 of its peak.
    lrs = [r["lr_groups"] for r in metrics(tmp_path / "r")]
    assert lrs[0] == {"head": 0.01}
    assert lrs[1] == pytest.approx({"head": 0.01, "backbone.layer4": 0.005 * 5 / 8})
    assert lrs[2] == pytest.approx({"head": 0.01, "backbone.layer4": 0.005, "backbone.layer3": 0.0025 * 5 / 8})
    assert summary["method"].startswith("gradual unfreezing (epoch 2: last 1, epoch 3: last 2) + discriminative LR")
    assert summary["transfer"]["groups"] == pytest.approx(
        {"head": 0.01, "backbone.layer4": 0.005, "backbone.layer3": 0.0025}
    )


def test_two_phase_with_the_feature_cache_equals_without(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = ("train.unfreeze_at_epoch=2", "train.bn_policy=frozen", "train.optimizer=sgd", "model.head_dropout=0.3",
             "checkpoint.save_best=false", "checkpoint.max_save_overhead=null")  # fmt: skip
    initial = initial_weights(tmp_path / "cached", dataset)
    saved = record_epoch_weights(monkeypatch)
    cached = run(tmp_path / "cached", dataset, *extra)
    plain = run(tmp_path / "plain", dataset, *extra, "train.feature_cache=off")
    assert cached["feature_cache"] is not None and plain["feature_cache"] is None
    assert cached["method"] == "two-phase (unfreeze at epoch 2) + frozen batch norm"
    assert changed(initial, saved[0], "backbone.") == []  # epoch 1: the head only
    a, b = last(tmp_path / "cached"), last(tmp_path / "plain")
    for key in a.model:
        torch.testing.assert_close(a.model[key], b.model[key], rtol=1e-5, atol=1e-6)
    for x, y in zip(metrics(tmp_path / "cached"), metrics(tmp_path / "plain"), strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
    assert [g["name"] for g in a.optimizer["param_groups"]] == ["head", "backbone"]
    # Epoch 2 trained the backbone; bn_policy frozen kept its batch-norm statistics (and eval mode).
    moved = changed(initial, a.model, "backbone.")
    assert any(k.endswith("conv1.weight") for k in moved) and any(k.endswith("bn1.weight") for k in moved)
    assert not [k for k in moved if "running" in k or "num_batches" in k]


class Crash(Exception):
    pass


# A gradual plan with layer decay, warmup restarts, L2-SP, momentum, head dropout and the balanced sampler;
# epoch 1 trains on cached features, epoch 2 opens layer4 and layer3, epoch 3 the rest.
MID_PLAN = ("train.epochs=3", "train.unfreeze_schedule={2: 2, 3: all}", "train.layer_lr_decay=0.8",
            "train.unfreeze_warmup_epochs=1", "train.regularization=l2sp", "train.optimizer=sgd",
            "model.head_dropout=0.2", "data.sampler=balanced", "checkpoint.every_n_steps=2",
            "checkpoint.save_best=false")  # fmt: skip


@pytest.fixture(scope="module")
def straight_runs() -> dict[str, Path]:
    """Uninterrupted runs shared by the tests of this module (each made inside a test: same thread setup)."""
    return {}


def straight_mid_plan(runs: dict[str, Path], factory: pytest.TempPathFactory, dataset: Path) -> Path:
    if "mid_plan" not in runs:
        runs["mid_plan"] = factory.mktemp("straight") / "run"
        run(runs["mid_plan"], dataset, *MID_PLAN)
    return runs["mid_plan"]


@pytest.mark.parametrize("crash_at", [3, 4], ids=["mid-epoch-after-opening", "end-of-unfreeze-epoch"])
def test_resume_in_the_middle_of_a_plan_equals_uninterrupted(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    dataset: Path,
    monkeypatch: pytest.MonkeyPatch,
    straight_runs: dict[str, Path],
    crash_at: int,
) -> None:
    straight = straight_mid_plan(straight_runs, tmp_path_factory, dataset)
    real = session_module.save_atomic
    saves = {"n": 0}

    def crash(payload, path):
        real(payload, path)
        saves["n"] += 1
        if saves["n"] == crash_at:  # 2 saves an epoch (after step 2 of 4, at the end): both in epoch 2
            raise Crash()

    monkeypatch.setattr(session_module, "save_atomic", crash)
    with pytest.raises(Crash):
        run(tmp_path / "resumed", dataset, *MID_PLAN)
    monkeypatch.setattr(session_module, "save_atomic", real)
    saved = last(tmp_path / "resumed")
    assert saved.transfer["opened"] == [
        {"part": "backbone.layer4", "step": 4, "epoch": 2}, {"part": "backbone.layer3", "step": 4, "epoch": 2}
    ]  # fmt: skip
    torch.manual_seed(4321)  # the process's RNG before resuming must not matter
    run(tmp_path / "resumed", dataset, *MID_PLAN, resume="auto")
    a, b = last(straight), last(tmp_path / "resumed")
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
    for key in ("transfer", "trainable", "frozen_modules", "global_step", "scheduler"):
        assert getattr(a, key) == getattr(b, key), key
    assert a.optimizer["param_groups"] == b.optimizer["param_groups"]
    for index, value in a.optimizer["state"].items():
        assert torch.equal(value["momentum_buffer"], b.optimizer["state"][index]["momentum_buffer"])
    for key, value in a.l2sp_reference.items():
        assert torch.equal(value, b.l2sp_reference[key]), key
    for x, y in zip(metrics(straight), metrics(tmp_path / "resumed"), strict=True):
        for key in ("train_loss", "val_loss", "lr_groups"):
            assert x[key] == y[key], key
    assert [r["part"] for r in a.transfer["opened"]][2:] == ["backbone.layer2", "backbone.layer1", "backbone.stem"]


# --- discriminative LR ------------------------------------------------------------------------------


def test_lr_per_group_in_the_dry_run(tmp_path: Path, dataset: Path, capsys: pytest.CaptureFixture) -> None:
    overrides = ("train.freeze=none", "train.lr=0.1", "train.backbone_lr_mult=0.1", "train.layer_lr_decay=0.5")
    assert finetune(load_config(None, run_overrides(tmp_path / "r", dataset, *overrides)), dry_run=True)
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(" " * 11 + "backbone.")}
    expected = {"layer4": 0.01, "layer3": 0.005, "layer2": 0.0025, "layer1": 0.00125, "stem": 0.000625}
    assert {name.removeprefix("backbone."): float(row[1]) for name, row in rows.items()} == pytest.approx(expected)
    assert rows["backbone.stem"][0] == "9,536" and rows["backbone.layer4"][3:] == ["epoch", "1"]
    assert "full fine-tune + discriminative LR (backbone x0.1, layer decay 0.5)" in out
    # Without a layer decay the backbone is one group at train.lr x backbone_lr_mult.
    plain = ("train.epochs=3", "train.unfreeze_at_epoch=3", "train.lr=0.1", "train.backbone_lr_mult=0.1")
    finetune(load_config(None, run_overrides(tmp_path / "r", dataset, *plain)), dry_run=True)
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(" " * 11 + "backbone ") and "epoch" in line]
    assert rows == [["backbone", "11,176,512", "1.00e-02", "0.0001", "epoch", "3"]]
    assert "two-phase (unfreeze at epoch 3) + discriminative LR (backbone x0.1)" in out


# --- L2-SP ------------------------------------------------------------------------------------------


def test_l2sp_replaces_weight_decay_in_the_loop(tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With a zero data loss and w0 = 0 only the penalty moves the weights: plain SGD shrinks the backbone by
    # (1 - lr * alpha) and the head by (1 - lr * beta) per step, and the configured weight decay plays no part.
    extra = ("train.freeze=none", "train.epochs=1", "train.optimizer=sgd", "train.momentum=0", "train.lr=0.1",
             "train.scheduler=none", "train.weight_decay=0.5", "train.regularization=l2sp", "train.l2sp_alpha=0.4",
             "train.l2sp_beta=0.2", "checkpoint.save_best=false")  # fmt: skip
    initial = initial_weights(tmp_path / "r", dataset, *extra)
    real = objective_module.F.cross_entropy
    monkeypatch.setattr(objective_module.F, "cross_entropy", lambda logits, labels, **kw: real(logits, labels) * 0.0)
    monkeypatch.setattr(objective_module, "l2sp_reference", lambda model: {
        name: torch.zeros_like(p) for name, p in model.backbone.named_parameters(prefix="backbone")})  # fmt: skip
    summary = run(tmp_path / "r", dataset, *extra)
    final = last(tmp_path / "r")
    steps = final.global_step
    assert steps == 4 and summary["method"] == "full fine-tune + L2-SP (alpha 0.4, beta 0.2)"
    assert {g["weight_decay"] for g in final.optimizer["param_groups"]} == {0.0}
    assert len(final.trainable) == 62  # every parameter of resnet18 and its head
    for name in final.trainable:
        factor = (1 - 0.1 * (0.2 if name.startswith("head.") else 0.4)) ** steps
        torch.testing.assert_close(final.model[name], initial[name] * factor, rtol=1e-5, atol=1e-7)
    assert all(not v.any() for v in final.l2sp_reference.values())


# --- class imbalance --------------------------------------------------------------------------------


def test_balanced_sampler_is_a_function_of_seed_and_epoch() -> None:
    labels = [0] * 90 + [1] * 10
    sampler = BalancedSampler(labels, seed=3)
    sampler.set_epoch(4)
    order = list(sampler)
    assert len(order) == 100 and len(sampler) == 100
    again = BalancedSampler(labels, seed=3)
    again.set_epoch(4)
    assert list(again) == order
    again.set_epoch(4, skip=30)
    assert list(again) == order[30:] and len(again) == 70
    again.set_epoch(5)
    assert list(again) != order
    draws = Counter()
    for epoch in range(20):
        sampler.set_epoch(epoch)
        draws.update(labels[i] for i in sampler)
    assert 0.4 < draws[1] / 2000 < 0.6  # 10% of the images, half of the draws


def test_imbalanced_data_with_the_cache_equals_without(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_dataset(tmp_path / "images", per_class=10)
    for path in sorted((data / "class_2").iterdir())[3:]:
        path.unlink()  # 10 / 10 / 3 images
    seen = []
    real = objective_module.F.cross_entropy

    def record(*args, **kwargs):
        seen.append(kwargs.get("weight"))
        return real(*args, **kwargs)

    monkeypatch.setattr(objective_module.F, "cross_entropy", record)
    extra = ("train.class_weights=balanced", "data.sampler=balanced", "data.val_split=0.3")
    cached = run(tmp_path / "cached", data, *extra)
    plain = run(tmp_path / "plain", data, *extra, "train.feature_cache=off")
    assert cached["feature_cache"] is not None and plain["feature_cache"] is None
    assert cached["method"] == "frozen backbone + class weights (balanced) + balanced sampler"
    counts = [7, 7, 2]  # train images per class after the 30% stratified hold-out
    expected = torch.tensor([16 / (3 * c) for c in counts])
    torch.testing.assert_close(torch.tensor(cached["transfer"]["class_weights"]), expected)
    assert seen and all(torch.equal(w, expected) for w in seen if w is not None)
    a, b = last(tmp_path / "cached").model, last(tmp_path / "plain").model
    torch.testing.assert_close(a["head.1.weight"], b["head.1.weight"], rtol=1e-5, atol=1e-6)
    for x, y in zip(metrics(tmp_path / "cached"), metrics(tmp_path / "plain"), strict=True):
        assert x["train_acc"] == y["train_acc"] and x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
    assert not math.isnan(cached["best_metric"])
