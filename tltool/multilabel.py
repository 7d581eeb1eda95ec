"""Multi-label classification (`data.task: multilabel`): its metrics and decision thresholds.

A multilabel model has one sigmoid per class: p_c = sigmoid(z_c), and an image holds class c when p_c >= t_c.
The arithmetic is torchmetrics' (the optional `metrics` extra, required by a multilabel run):

- `metrics(logits, targets)`: per class the average precision (`multilabel_average_precision`, average=None:
  sum over the ranked scores of (R_k - R_{k-1}) P_k) and the mean over the classes with at least one positive
  in the set (mAP, `map`; a class without positives has no AP: None, left out of the mean); F1 at the
  thresholds (0.5, or per class), micro (over every image x class decision) and macro (the mean of the per-class
  F1s); `exact_match` (every class of the image right) and `label_accuracy` (the share of right image x class
  decisions). In metrics.jsonl an epoch's `val_acc1` is `exact_match` and `val_acc5` is `label_accuracy` at 0.5.
- `choose_thresholds(probabilities, targets)`: per class the threshold that maximizes F1 on those images
  (`multilabel_precision_recall_curve`: each distinct score is a candidate); 0.5 for a class without positives.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tltool.errors import ConfigError

MULTILABEL_METRICS = ("map", "f1_micro", "f1_macro")  # also in metrics.jsonl, as val_map, val_f1_micro, val_f1_macro
DEFAULT_THRESHOLD = 0.5
PIP = "pip install 'tltool[metrics]'"


def functional() -> Any:
    """torchmetrics' functional classification module, or the one line naming the pip command."""
    try:
        from torchmetrics.functional import classification
    except ImportError:
        raise ConfigError(
            "data.task: multilabel needs torchmetrics (its mAP, F1 and thresholds)", f"install it: {PIP}"
        ) from None
    return classification


def thresholds_tensor(thresholds: float | Sequence[float] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """One threshold per class (a single number is every class's)."""
    if isinstance(thresholds, int | float):
        return torch.full((num_classes,), float(thresholds))
    return torch.as_tensor(thresholds, dtype=torch.float32).reshape(num_classes)


def decide(probabilities: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Which classes each image holds: p_c >= t_c (a bool tensor, images x classes)."""
    return probabilities >= thresholds.to(probabilities.device)


def metrics(
    logits: torch.Tensor, targets: torch.Tensor, thresholds: float | Sequence[float] | torch.Tensor = 0.5
) -> dict[str, Any]:
    """mAP, per-class AP and F1, micro/macro F1, exact-match and per-label accuracy of `logits` (images x classes)
    against multi-hot `targets`, deciding at `thresholds` (see the module's docstring)."""
    tm = functional()
    num_classes = logits.shape[1]
    probabilities = logits.float().sigmoid()
    target = (targets > 0.5).long()
    thresholds = thresholds_tensor(thresholds, num_classes)
    decided = decide(probabilities, thresholds)
    # Binarized first, so the rule is p >= t with a threshold per class; torchmetrics then counts at 0.5.
    hard = decided.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torchmetrics warns about classes without positives: handled below)
        ap = tm.multilabel_average_precision(probabilities, target, num_classes, average=None, thresholds=None)
        f1 = tm.multilabel_f1_score(hard, target, num_classes, average=None, zero_division=0)
        f1_micro = tm.multilabel_f1_score(hard, target, num_classes, average="micro", zero_division=0)
    positives = target.sum(dim=0)
    per_class_ap = [float(ap[c]) if positives[c] > 0 else None for c in range(num_classes)]
    known = [value for value in per_class_ap if value is not None]
    return {
        "map": sum(known) / len(known) if known else float("nan"),
        "f1_micro": float(f1_micro),
        "f1_macro": float(f1.mean()),
        "exact_match": float((decided == target.bool()).all(dim=1).float().mean()),
        "label_accuracy": float((decided == target.bool()).float().mean()),
        "per_class_ap": per_class_ap,
        "per_class_f1": [float(v) for v in f1],
        "support": [int(v) for v in positives],
        "thresholds": [float(t) for t in thresholds],
    }


def choose_thresholds(probabilities: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per class, the threshold t (one of its scores) whose decision p >= t has the highest F1 on these images;
    the lowest such t on a tie; 0.5 for a class without a positive among them."""
    tm = functional()
    target = (targets > 0.5).long()
    num_classes = probabilities.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precision, recall, candidates = tm.multilabel_precision_recall_curve(
            probabilities.float(), target, num_classes, thresholds=None
        )
    chosen = []
    for c in range(num_classes):
        if target[:, c].sum() == 0 or not len(candidates[c]):
            chosen.append(DEFAULT_THRESHOLD)
            continue
        p, r = precision[c][: len(candidates[c])].double(), recall[c][: len(candidates[c])].double()
        f1 = torch.where(p + r > 0, 2 * p * r / (p + r), torch.zeros_like(p))
        chosen.append(float(candidates[c][int(torch.argmax(f1))]))  # (ascending thresholds: the first best)
    return chosen


def threshold_run(
    paths: Sequence[Path],
    logits_of: Callable[[Path], tuple[Any, torch.Tensor, torch.Tensor]],
    data: str,
    write: bool,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """The end of a multilabel run: each checkpoint's per-class thresholds (`choose_thresholds` on its val logits)
    written into it (`Checkpoint.thresholds`), so `tltool eval --data`, `predict` and `export` decide as chosen
    on the run's val split without reading those images again. `logits_of(path)` gives (Checkpoint, val logits,
    multi-hot labels); every rank calls it, only the rank with `write` writes (`checkpoint.rewrite_checkpoints`).
    Returns summary.json's `thresholds`: {file name: {"thresholds", "chosen_on"}}."""
    from tltool.checkpoint import rewrite_checkpoints

    def fit(path: Path) -> tuple[Any, dict[str, Any]]:
        checkpoint, logits, labels = logits_of(path)
        chosen = choose_thresholds(logits.sigmoid(), labels)
        echo(f"thresholds of {path.name}: chosen on the {data} (F1 per class), kept in the checkpoint")
        return dataclasses.replace(checkpoint, thresholds=chosen), {"thresholds": chosen, "chosen_on": data}

    return rewrite_checkpoints(paths, fit, write)
