"""Co-Tuning (You, Kou, Jiang, Wang, Long, NeurIPS 2020, "Co-Tuning for Transfer Learning"): `train.cotuning_weight`.

Relation-based transfer: the classifier the backbone was pretrained with (ImageNet's 1000 classes for
torchvision weights) is kept as a second, *source* head on the same features (`models.build_model(...,
keep_source_head=True)`), and trains jointly with the model.

- Before the first step of a new run, the category relation p(source class | target class) is estimated
  once with the pretrained model: row c is the mean, over the training images of target class c, of the source
  head's softmax. This is the paper's *direct* estimate (TLlib's `Relationship.get_category_relationship`),
  not its calibrated variant. Rows sum to 1; a class without training images gets the uniform row. With a
  frozen backbone and the feature cache the cached train features serve (every cached view), else one pass
  without gradients over the training images (eval transform). A resume takes it from the checkpoint.
- Each step adds the `cotuning` term: the cross-entropy of the source head's logits on the labelled batch
  against the soft targets relation[y], times `train.cotuning_weight`. Its gradient reaches the source head
  and, through the shared features, the backbone; the target head learns from `ce` alone.
- The source head is the term's module (objective.py): its own optimizer group at the backbone's LR
  (train.lr x train.backbone_lr_mult: it is pretrained, as TLlib trains it), saved with the relation in the
  checkpoint's `loss_terms["cotuning"]`; the model that eval, predict and export see is the target's alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tltool.config import Config
from tltool.data import Sample, eval_transform, make_loader
from tltool.errors import ConfigError
from tltool.extraction import extract
from tltool.features import FeatureDataset
from tltool.models import BuiltModel
from tltool.transfer import UnfreezePlan

CHUNK = 4096  # feature rows through the source head at a time (their softmax is N x 1000 floats)


def cotuning_loss(source_logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """mean_i ( -sum_s soft_targets[i, s] * log_softmax(source_logits[i])_s ), in float32."""
    return -(soft_targets.float() * F.log_softmax(source_logits.float(), dim=1)).sum(dim=1).mean()


def category_relation(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int) -> torch.Tensor:
    """p(source | target) from (source probabilities (N, S), target labels (N,)) batches: the per-class mean.

    (num_classes, S), float32, each row summing to 1; a class with no image gets the uniform row.
    """
    sums: torch.Tensor | None = None
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for probabilities, labels in batches:
        probabilities, labels = probabilities.double().cpu(), labels.long().cpu()
        if sums is None:
            sums = torch.zeros(num_classes, probabilities.shape[1], dtype=torch.float64)
        sums.index_add_(0, labels, probabilities)
        counts += torch.bincount(labels, minlength=num_classes).double()
    if sums is None:
        raise ValueError("no training image to estimate the Co-Tuning relation from")
    relation = sums / counts.clamp_min(1.0)[:, None]
    relation[counts == 0] = 1.0 / sums.shape[1]
    return relation.float()


@torch.no_grad()
def source_probabilities(
    source_head: nn.Module, features: torch.Tensor, labels: torch.Tensor, device: torch.device
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """The source head's softmax (float32) of `features`, `CHUNK` rows at a time, with their labels."""
    for start in range(0, features.shape[0], CHUNK):
        rows = features[start : start + CHUNK].to(device).float()
        yield source_head(rows).float().softmax(dim=1), labels[start : start + CHUNK]


def estimate_relation(
    cfg: Config,
    built: BuiltModel,
    source_head: nn.Module,
    samples: list[Sample],
    num_classes: int,
    device: torch.device,
    precision: str,
    cached: FeatureDataset | None = None,
) -> torch.Tensor:
    """The relation of a new run, from the pretrained model: the cached train features (all views) when
    given, else one pass of the backbone (eval mode, no gradients) over `samples` with the eval transform."""
    if cached is not None:
        views, count, width = cached.features.shape
        features = cached.features.reshape(views * count, width)
        labels = cached.labels.repeat(views)
    else:
        loader = make_loader(samples, eval_transform(built.preprocess), cfg.data.batch_size, cfg.data.num_workers,
                             cfg.run.seed, shuffle=False)  # fmt: skip
        features, labels = extract(built.model.backbone, loader, device, precision)
    return category_relation(source_probabilities(source_head, features, labels, device), num_classes)


def restore_source_head(state: dict[str, Any]) -> nn.Linear:
    """The source head of a resumed run, shaped after its saved weights (they are loaded by the caller)."""
    weight = state["weight"]
    return nn.Linear(weight.shape[1], weight.shape[0], bias=state.get("bias") is not None)


def check_cotuning(cfg: Config, plan: UnfreezePlan) -> None:
    """Co-Tuning reaches the target model only through the backbone: it must train at some point."""
    if cfg.train.cotuning_weight > 0 and not plan.backbone_ever_trains():
        raise ConfigError(
            "train.cotuning_weight needs a backbone that trains: with it frozen the source head's loss cannot "
            "change the model",
            "set train.freeze=none (or an unfreeze plan), or train.cotuning_weight=0",
        )
