"""Co-Tuning (train.cotuning_weight): the loss formula, the relation estimate (by hand, cached or not), which
parameters its gradient reaches, a bitwise mid-epoch resume that never re-estimates, export/eval of the target
model alone, and the bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torchvision

import tltool.session as session_module
from conftest import make_dataset, run_overrides, trained_checkpoint, write_config
from tltool.checkpoint import load_checkpoint
from tltool.cli import app
from tltool.config import load_config
from tltool.cotuning import category_relation, cotuning_loss
from tltool.data import eval_transform, load_image
from tltool.models import hub_file
from tltool.objective import StepOutputs
from tltool.session import build_session
from tltool.train import finetune

SOURCE_CLASSES = 7


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 weights file with its own (7-class) classifier, as a pretrained network's file holds it."""
    torch.manual_seed(3)
    net = torchvision.models.resnet18(num_classes=SOURCE_CLASSES)
    with torch.no_grad():  # a classifier that tells the images apart (default init gives near-uniform outputs)
        net.fc.weight.mul_(20)
    path = tmp_path_factory.mktemp("weights") / "resnet18_src.pt"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 6 images of 16 px (trained at 16 px: resnet18 full fine-tunes stay cheap)."""
    return make_dataset(tmp_path_factory.mktemp("small") / "images", per_class=6, size=16, seed=5)


def overrides(tmp_path: Path, name: str, dataset: Path, weights: Path, *extra: str) -> list[str]:
    return run_overrides(tmp_path / name, dataset, f"model.weights={weights}", "train.freeze=none",
                         "train.cotuning_weight=2", "train.backbone_lr_mult=0.5", "data.image_size=16",
                         "data.resize_size=16", *extra)  # fmt: skip


def test_the_loss_is_the_cross_entropy_against_the_soft_relation() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    targets = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]])
    expected = 0.0
    for row, target in zip(logits.tolist(), targets.tolist(), strict=True):
        log_z = math.log(sum(math.exp(v) for v in row))
        expected += -sum(t * (v - log_z) for t, v in zip(target, row, strict=True))
    torch.testing.assert_close(cotuning_loss(logits, targets), torch.tensor(expected / 2))


def test_the_relation_is_each_target_classs_mean_source_prediction() -> None:
    probabilities = torch.tensor([[0.6, 0.4], [0.2, 0.8], [0.9, 0.1], [0.5, 0.5]])
    labels = torch.tensor([0, 0, 2, 2])
    batches = [(probabilities[:3], labels[:3]), (probabilities[3:], labels[3:])]  # (accumulated over batches)
    relation = category_relation(batches, num_classes=3)
    # class 1 has no image: the uniform row
    torch.testing.assert_close(relation, torch.tensor([[0.4, 0.6], [0.5, 0.5], [0.7, 0.3]]))


def by_hand_relation(weights: Path, samples: list, preprocess, classes: int) -> torch.Tensor:
    """The pretrained network as torchvision builds it (its own fc), eval mode, image by image."""
    net = torchvision.models.resnet18(num_classes=SOURCE_CLASSES)
    net.load_state_dict(torch.load(weights, weights_only=True))
    net.eval()
    rows = torch.zeros(classes, SOURCE_CLASSES, dtype=torch.float64)
    counts = torch.zeros(classes)
    transform = eval_transform(preprocess)
    with torch.no_grad():
        for path, label in samples:
            rows[label] += net(transform(load_image(path))[None]).softmax(dim=1)[0].double()
            counts[label] += 1
    return (rows / counts[:, None]).float()


@pytest.mark.parametrize("cached", [False, True])
def test_the_relation_is_estimated_once_from_the_pretrained_model(
    tmp_path: Path, small: Path, pretrained: Path, cached: bool
) -> None:
    # cached: the backbone starts frozen (two-phase), so the feature cache's train features serve the estimate
    extra = ("train.freeze=backbone", "train.unfreeze_at_epoch=2") if cached else ()
    session = build_session(load_config(None, overrides(tmp_path, "r", small, pretrained, *extra)), quiet=True)
    session.start()
    assert session.inputs.cached is cached
    relation = session.objective.term("cotuning").state["relation"]
    assert relation.shape == (3, SOURCE_CLASSES)
    torch.testing.assert_close(relation.sum(dim=1), torch.ones(3))
    expected = by_hand_relation(pretrained, session.split.train, session.built.preprocess, 3)
    torch.testing.assert_close(relation, expected, rtol=1e-4, atol=1e-5)
    assert relation.std(dim=0).max() > 1e-3  # (the classes' rows differ: the comparison can fail)


def test_its_gradient_reaches_the_backbone_and_source_head_only(tmp_path: Path, small: Path, pretrained: Path) -> None:
    session = build_session(load_config(None, overrides(tmp_path, "r", small, pretrained)), quiet=True)
    session.start()
    session.model.train()
    term = session.objective.term("cotuning")
    source_head = term.module
    assert not any(p is q for p in session.model.parameters() for q in source_head.parameters())
    group = next(g for g in session.optimizer.param_groups if g["name"] == "cotuning")
    assert group["initial_lr"] == pytest.approx(0.01 * 0.5)  # the backbone's LR: train.lr x backbone_lr_mult
    images, labels = next(iter(session.streams["train"].loader))
    logits, features, *_ = session.forward(images, None, None)
    outputs = StepOutputs(logits.float(), labels, features)
    term.compute(outputs).backward()
    assert all(p.grad is None or not p.grad.any() for p in session.model.head.parameters())
    assert all(p.grad is not None and p.grad.any() for p in source_head.parameters())
    assert session.model.backbone.conv1.weight.grad.abs().sum() > 0
    # and its value is the formula on the source head's logits against relation[y]
    expected = cotuning_loss(source_head(features), term.state["relation"][labels])
    torch.testing.assert_close(term.compute(outputs), expected)
    value, parts = session.objective(outputs)
    assert session.objective.names == ["ce", "cotuning"]
    torch.testing.assert_close(parts[1], 2 * expected)


@pytest.mark.slow
def test_a_cotuning_run_resumes_bitwise_mid_epoch_without_reestimating(
    tmp_path: Path, small: Path, pretrained: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    extra = ("train.epochs=2", "checkpoint.every_n_steps=2", "data.batch_size=4")
    straight = finetune(load_config(None, overrides(tmp_path, "straight", small, pretrained, *extra)), quiet=True)
    assert "Co-Tuning" in straight["method"] and straight["loss_terms"] == ["ce", "cotuning"]
    real_save = session_module.save_atomic

    def crash(payload, path):
        real_save(payload, path)
        if payload["epoch"] == 1 and payload["epoch_progress"] is not None:  # mid epoch 2
            raise Crash()

    monkeypatch.setattr(session_module, "save_atomic", crash)
    with pytest.raises(Crash):
        finetune(load_config(None, overrides(tmp_path, "resumed", small, pretrained, *extra)), quiet=True)
    monkeypatch.setattr(session_module, "save_atomic", real_save)

    def never(*args, **kwargs):
        raise AssertionError("a resume re-estimated the relation")

    monkeypatch.setattr(session_module, "estimate_relation", never)
    finetune(load_config(None, overrides(tmp_path, "resumed", small, pretrained, *extra)), resume="auto", quiet=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for key, value in a.model.items():
        assert torch.equal(b.model[key], value), key
    saved_a, saved_b = a.loss_terms["cotuning"], b.loss_terms["cotuning"]
    assert torch.equal(saved_a["relation"], saved_b["relation"])
    for key, value in saved_a["module"].items():
        assert torch.equal(saved_b["module"][key], value), key
    original, trained = torch.load(pretrained, weights_only=True)["fc.weight"], saved_a["module"]["weight"]
    assert trained.shape == original.shape and not torch.equal(trained, original)  # (it trained)
    # the model is the target's alone: eval, export (with its parity check) and predict never see the source head
    assert not any(key.startswith("fc.") or "cotuning" in key for key in a.model)
    record = json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["loss_terms"]["cotuning"] > 0
    checkpoint = tmp_path / "straight" / "checkpoints" / "last.pt"
    result = cli.invoke(app, ["eval", str(checkpoint), "--data", str(small)])
    assert result.exit_code == 0, result.output
    exported = tmp_path / "model.torchscript.pt"
    args = ["export", str(checkpoint), "-f", "torchscript", "-o", str(exported), "--data", str(small)]
    result = cli.invoke(app, args)
    assert result.exit_code == 0 and exported.is_file(), result.output


def test_torchvision_weights_keep_their_imagenet_classifier(tmp_path: Path, dataset: Path) -> None:
    enum = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    net = torchvision.models.mobilenet_v3_small(weights=None)
    path = hub_file(enum.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    cfg = load_config(None, run_overrides(tmp_path / "r", dataset, "model.backbone=mobilenet_v3_small",
                                          "model.weights=IMAGENET1K_V1", "train.freeze=none",
                                          "train.cotuning_weight=1"))  # fmt: skip
    session = build_session(cfg, quiet=True, dry_run=True)
    head = session.objective.term("cotuning").module
    assert head.out_features == 1000
    torch.testing.assert_close(head.weight, net.classifier[-1].weight)
    assert session.model.head[-1].out_features == 3


def test_cotuning_bad_inputs_are_one_line_errors(
    tmp_path: Path, dataset: Path, pretrained: Path, cli, tmp_path_factory: pytest.TempPathFactory
) -> None:
    no_classifier = tmp_path / "no_fc.pt"
    torch.save({k: v for k, v in torch.load(pretrained, weights_only=True).items() if not k.startswith("fc.")},
               no_classifier)  # fmt: skip
    squeeze = tmp_path / "squeeze.pt"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), squeeze)
    checkpoint = trained_checkpoint("resnet18", tmp_path_factory)
    cases = {
        "model.weights is none": ("model.weights=none",),
        "is a tltool checkpoint": (f"model.weights={checkpoint}",),
        "holds no fc.weight": (f"model.weights={no_classifier}",),
        "is a Conv2d, not a Linear": (
            f"model.weights={squeeze}",
            "model.backbone=squeezenet1_1",
            "data.image_size=64",
            "data.resize_size=64",
        ),  # fmt: skip
        "needs a backbone that trains": (f"model.weights={pretrained}", "train.freeze=backbone"),
    }
    for message, extra in cases.items():
        run_dir = tmp_path / "run"
        items = run_overrides(run_dir, dataset, "train.freeze=none", "train.cotuning_weight=1", *extra)
        config = write_config(tmp_path / "c.yaml", items)
        result = cli.invoke(app, ["finetune", str(config)])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and message in result.output, (message, result.output)
        # (a config problem is the config's usual report: a heading line, then one line per problem)
        assert len(lines) == (2 if "none" in message else 1) and "Traceback" not in result.output, result.output
        assert not run_dir.exists()
