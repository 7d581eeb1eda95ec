"""train.grad_checkpointing: the same gradients and batch-norm statistics as without, only training stages
checkpointed, state_dict unchanged, and a run (resumed mid-epoch or not) equal to one without it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import tltool.gradckpt as gradckpt
import tltool.session as session_module
from conftest import make_dataset, run_overrides
from tltool.checkpoint import load_checkpoint
from tltool.config import load_config
from tltool.models import TransferModel, make_head
from tltool.train import finetune


def resnet18() -> TransferModel:
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    return TransferModel(net, make_head(512, 3, 0.0))


def one_step(model: TransferModel, seed: int = 0) -> dict[str, torch.Tensor]:
    """One SGD step in train mode (batch norm updates its statistics); the gradients, then the state after it."""
    torch.manual_seed(seed)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    nn.functional.cross_entropy(model(images), labels).backward()
    grads = {f"grad.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return grads | {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(plain: dict[str, torch.Tensor], checkpointed: dict[str, torch.Tensor]) -> None:
    assert list(plain) == list(checkpointed)  # state_dict keys unchanged by the wrapping
    for key, value in plain.items():
        assert torch.equal(checkpointed[key], value), key


def test_resnet_gradients_and_batch_norm_statistics_are_bitwise_those_without() -> None:
    plain, checkpointed = resnet18(), resnet18()
    wrapped = gradckpt.enable_grad_checkpointing(checkpointed.backbone)
    assert wrapped == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]  # stages.py's ResNet stages
    before = plain.backbone.layer1[0].bn1.running_mean.clone()
    a, b = one_step(plain), one_step(checkpointed)
    assert_same(a, b)  # every gradient, weight, running_mean/var and num_batches_tracked
    assert not torch.equal(a["backbone.layer1.0.bn1.running_mean"], before)  # (the statistics did move)
    assert int(b["backbone.layer1.0.bn1.num_batches_tracked"]) == 1  # once per step, not twice (the recompute)


def test_the_recompute_would_update_batch_norm_twice_without_the_kept_buffers(monkeypatch) -> None:
    """The mechanism: without `buffers_kept`, the backward's recompute moves the statistics a second time."""
    monkeypatch.setattr(gradckpt, "buffers_kept", lambda buffers: __import__("contextlib").nullcontext())
    plain, checkpointed = resnet18(), resnet18()
    gradckpt.enable_grad_checkpointing(checkpointed.backbone)
    a, b = one_step(plain), one_step(checkpointed)
    assert int(b["backbone.layer1.0.bn1.num_batches_tracked"]) == 2
    assert not torch.equal(a["backbone.layer1.0.bn1.running_mean"], b["backbone.layer1.0.bn1.running_mean"])


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext"])
def test_timm_stages_are_checkpointed_exactly_dropout_paths_replayed(name: str) -> None:
    timm = pytest.importorskip("timm")

    def build() -> TransferModel:
        torch.manual_seed(0)
        # drop_path_rate: stochastic depth inside the checkpointed stages (its draws must be replayed)
        net = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=0.3)
        return TransferModel(net, make_head(net.num_features, 3, 0.0))

    plain, checkpointed = build(), build()
    assert len(gradckpt.enable_grad_checkpointing(checkpointed.backbone)) >= 3
    a, b = one_step(plain, seed=1), one_step(checkpointed, seed=1)
    for key, value in a.items():
        assert torch.allclose(b[key], value, rtol=0, atol=1e-6), key
        if not value.is_floating_point() or "running" in key:
            assert torch.equal(b[key], value), key  # batch-norm statistics (test_resnet) bitwise


def test_only_stages_that_train_are_checkpointed_and_a_copy_stays_its_own(monkeypatch) -> None:
    calls = []
    real = gradckpt.checkpoint
    monkeypatch.setattr(gradckpt, "checkpoint", lambda fn, *a, **k: calls.append(fn.__self__) or real(fn, *a, **k))
    model = resnet18()
    gradckpt.enable_grad_checkpointing(model.backbone)
    for module in (model.backbone.conv1, model.backbone.bn1, model.backbone.layer1, model.backbone.layer2):
        module.requires_grad_(False)  # a partial fine-tune / closed stages of an unfreeze plan
    one_step(model)
    assert calls == [model.backbone.layer3, model.backbone.layer4]
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert calls == []  # evaluation: plain forwards
    twin = copy.deepcopy(model)  # (the EMA's copy) checkpoints its own modules, not the original's
    assert gradckpt.is_checkpointed(twin.backbone.layer4)
    assert twin.backbone.layer4.forward.__self__ is twin.backbone.layer4


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("gradckpt") / "images", per_class=5, size=32)


class Crash(Exception):
    pass


@pytest.mark.slow
def test_a_checkpointed_run_resumed_mid_epoch_equals_a_plain_run_bitwise(
    tmp_path: Path, small: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    extra = ("train.freeze=none", "data.batch_size=4", "checkpoint.every_n_steps=1", "data.augment=light",
             "model.head_dropout=0.3")  # fmt: skip

    def run(name: str, *more: str, resume: str | None = None) -> dict:
        cfg = load_config(None, run_overrides(tmp_path / name, small, *extra, *more))
        return finetune(cfg, resume=resume, quiet=True)

    run("plain")
    real_save, saves = session_module.save_atomic, []

    def crash_on_fifth_save(payload, path):
        saves.append(path)
        real_save(payload, path)
        if len(saves) == 5:  # epoch 2, batch 2
            raise Crash()

    monkeypatch.setattr(session_module, "save_atomic", crash_on_fifth_save)
    with pytest.raises(Crash):
        run("checkpointed", "train.grad_checkpointing=true")
    monkeypatch.setattr(session_module, "save_atomic", real_save)
    assert load_checkpoint(tmp_path / "checkpointed" / "checkpoints" / "last.pt").epoch_progress["batches_done"] == 2
    run("checkpointed", "train.grad_checkpointing=true", resume="auto")
    a, b = (load_checkpoint(tmp_path / name / "checkpoints" / "last.pt") for name in ("plain", "checkpointed"))
    assert a.global_step == b.global_step == 6
    for key, value in a.model.items():  # weights and batch-norm statistics
        assert torch.equal(b.model[key], value), key


def test_a_frozen_backbone_says_once_that_nothing_is_checkpointed(tmp_path: Path, small: Path, capsys) -> None:
    overrides = run_overrides(tmp_path / "run", small, "train.freeze=backbone", "train.grad_checkpointing=true")
    finetune(load_config(None, overrides), dry_run=True)
    out = capsys.readouterr()
    assert (out.out + out.err).count("train.grad_checkpointing: the backbone never trains") == 1


def test_under_bf16_autocast_and_channels_last_too() -> None:
    """The recompute runs under the forward's autocast state: the same bf16 gradients and statistics."""
    plain, checkpointed = (m.to(memory_format=torch.channels_last) for m in (resnet18(), resnet18()))
    gradckpt.enable_grad_checkpointing(checkpointed.backbone)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for model in (plain, checkpointed):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(images)
        nn.functional.cross_entropy(logits.float(), labels).backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    assert_same(plain.state_dict(), checkpointed.state_dict())
