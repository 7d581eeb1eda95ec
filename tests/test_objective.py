"""The loss as a sum of named terms: each term's formula, the objective's sum, the per-epoch log of terms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import run_overrides
from tltool.config import load_config
from tltool.errors import ConfigError
from tltool.models import TransferModel, make_head
from tltool.objective import (
    Objective,
    StepOutputs,
    Term,
    build_objective,
    class_weight_tensor,
    l2sp_penalty,
    l2sp_reference,
)
from tltool.train import finetune


def tiny_model() -> TransferModel:
    torch.manual_seed(0)
    return TransferModel(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), make_head(3, 2, 0.0))


def fixed_outputs() -> StepOutputs:
    generator = torch.Generator().manual_seed(1)
    return StepOutputs(torch.randn(6, 2, generator=generator), torch.tensor([0, 1, 1, 0, 1, 1]))


def test_the_objective_is_the_weighted_sum_of_its_terms_in_order() -> None:
    out = fixed_outputs()
    objective = Objective([Term("a", lambda o: o.logits.sum()), Term("b", lambda o: o.logits.pow(2).mean(), 0.25)])
    total, values = objective(out)
    assert objective.names == ["a", "b"]
    torch.testing.assert_close(values[0], out.logits.sum())
    torch.testing.assert_close(values[1], 0.25 * out.logits.pow(2).mean())
    torch.testing.assert_close(total, values[0] + values[1])


def test_the_ce_term_is_cross_entropy_with_class_weights_and_label_smoothing() -> None:
    out = fixed_outputs()
    cfg = load_config(None, ["data.train=.", "train.class_weights=[1.0, 3.0]", "train.label_smoothing=0.1"])
    objective = build_objective(cfg, tiny_model(), ["a", "b"], [0, 1], torch.device("cpu"))
    assert objective.names == ["ce"]
    # By hand: smoothed targets q = (1 - e) onehot + e / C, weighted by w[y] and by w per class in the smoothing.
    w, eps = torch.tensor([1.0, 3.0]), 0.1
    logp = F.log_softmax(out.logits, dim=1)
    nll = -(w[out.labels] * logp.gather(1, out.labels[:, None]).squeeze(1)).sum() / w[out.labels].sum()
    smooth = -(logp * w).sum(dim=1).sum() / w[out.labels].sum() / 2
    expected = (1 - eps) * nll + eps * smooth
    total, values = objective(out)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(values[0], expected)
    torch.testing.assert_close(objective.class_weight, w)


def test_l2sp_term_is_its_formula_and_keeps_its_reference_across_a_resume() -> None:
    model = tiny_model()
    cfg = load_config(None, ["data.train=.", "train.freeze=none", "train.regularization=l2sp",
                             "train.l2sp_alpha=0.3", "train.l2sp_beta=0.07"])  # fmt: skip
    objective = build_objective(cfg, model, ["a", "b"], [0, 1], torch.device("cpu"))
    assert objective.names == ["ce", "l2sp"]
    saved = objective.state_dict()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    out = fixed_outputs()
    _, values = objective(out)
    torch.testing.assert_close(values[1], l2sp_penalty(model, saved["l2sp"]["reference"], 0.3, 0.07))
    # A resumed objective pulls toward the saved w0, not toward the weights it is rebuilt with.
    resumed = build_objective(cfg, model, ["a", "b"], [0, 1], torch.device("cpu"), saved)
    torch.testing.assert_close(resumed(out)[1][1], values[1])
    fresh = build_objective(cfg, model, ["a", "b"], [0, 1], torch.device("cpu"))
    assert fresh(out)[1][1].item() < values[1].item()  # (w0 = the shifted weights: only the head's part is left)


def test_a_run_logs_each_terms_mean_per_epoch(tmp_path: Path, dataset: Path) -> None:
    overrides = run_overrides(tmp_path / "r", dataset, "train.freeze=none", "train.regularization=l2sp",
                              "train.l2sp_alpha=0.5", "train.epochs=2")  # fmt: skip
    summary = finetune(load_config(None, overrides), quiet=True)
    assert summary["loss_terms"] == ["ce", "l2sp"]
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert set(record["loss_terms"]) == {"ce", "l2sp"}
        assert record["loss_terms"]["ce"] == pytest.approx(record["train_loss"], rel=1e-12)
        assert record["loss_terms"]["l2sp"] > 0
    # Epoch 1 starts at w0 and moves away from it: the pull grows.
    assert records[1]["loss_terms"]["l2sp"] > records[0]["loss_terms"]["l2sp"]


def test_l2sp_penalty_is_its_formula() -> None:
    torch.manual_seed(0)
    model = TransferModel(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), make_head(3, 2, 0.0))
    reference = l2sp_reference(model)
    assert set(reference) == {"backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias"}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    alpha, beta = 0.3, 0.07
    w = torch.cat([p.flatten() for p in model.backbone.parameters()])
    w0 = torch.cat([reference[f"backbone.{n}"].flatten() for n, _ in model.backbone.named_parameters()])
    head = torch.cat([p.flatten() for p in model.head.parameters()])
    expected = alpha / 2 * (w - w0).pow(2).sum() + beta / 2 * head.pow(2).sum()
    torch.testing.assert_close(l2sp_penalty(model, reference, alpha, beta), expected)
    model.backbone[1].requires_grad_(False)  # frozen parameters are not pulled (and cost nothing)
    w, w0 = w[:15], w0[:15]
    expected = alpha / 2 * (w - w0).pow(2).sum() + beta / 2 * head.pow(2).sum()
    torch.testing.assert_close(l2sp_penalty(model, reference, alpha, beta), expected)


def test_class_weights() -> None:
    names = ["a", "b"]
    torch.testing.assert_close(class_weight_tensor("balanced", names, [0, 0, 0, 1]), torch.tensor([4 / 6, 2.0]))
    torch.testing.assert_close(class_weight_tensor([1.0, 3.0], names, [0, 1]), torch.tensor([1.0, 3.0]))
    assert class_weight_tensor("none", names, [0, 1]) is None
    with pytest.raises(ConfigError, match="3 weights, but the data has 2 classes"):
        class_weight_tensor([1.0, 2.0, 3.0], names, [0, 1])
