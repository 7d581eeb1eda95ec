"""Evaluation: loss, top-1/top-5, per-class precision/recall/F1, the confusion matrix, per-sample outputs.

`evaluate()` is the one evaluation loop: the training loop calls it every epoch, `tltool eval` and
`tltool report` through `evaluate_trained()`, and the export parity check for its reference logits.
`run_eval()` is `tltool eval`, which needs nothing but the checkpoint (and optionally another folder of
images).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tltool.data import Sample, ShardSamples, eval_transform, make_loader
from tltool.device import autocast, resolve_device, resolve_precision, sum_dtype
from tltool.distributed import all_reduce_sum
from tltool.errors import DataError
from tltool.files import check_writable, write_text_atomic
from tltool.trained import TrainedModel, open_trained


@dataclass(frozen=True)
class SampleOutputs:
    """What the model said for each image of one evaluation pass, in loader order (CPU tensors).

    Under torchrun these are this rank's images only (the metrics beside them are the whole set's).
    """

    logits: torch.Tensor  # N x classes, float32
    predictions: torch.Tensor  # N: the top-1 class, as counted in acc1 and the confusion matrix
    labels: torch.Tensor  # N: the true class
    indices: torch.Tensor | None  # N: each row's sample index, when the loader gives indices (`sample_labels`)
    multilabel: bool = False  # labels are multi-hot (N x classes), predictions p >= 0.5, probabilities sigmoids

    def probabilities(self) -> torch.Tensor:
        return self.logits.sigmoid() if self.multilabel else self.logits.softmax(dim=1)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device,
    precision: str,
    num_classes: int,
    *,
    per_sample: bool = False,
    sample_labels: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Metrics of `model` over every batch of `loader` (the loss is plain cross-entropy, no smoothing).

    `loader` yields (images, labels) batches, or None for a batch whose images all failed to decode. With
    `sample_labels` it yields (images, sample indices) instead and `sample_labels[i]` is sample i's class:
    each output row then names its sample even when an image is dropped from its batch. `per_sample`
    adds `outputs`, a SampleOutputs (kept on the device until the end of the pass).

    Under torchrun each rank evaluates its shard of the set and the sums are added over ranks, so every
    rank returns the metrics of the whole set. `model` must not be DDP-wrapped (ranks may run different
    numbers of batches here).
    """
    model.eval()
    # The sums stay on the device (float64 loss on all but MPS, exact counts): one host sync per evaluation.
    loss_sum = torch.zeros((), dtype=sum_dtype(device), device=device)
    counts = torch.zeros(3, dtype=torch.long, device=device)  # images, top-1 hits, top-5 hits
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    k = min(5, num_classes)
    multi_hot = sample_labels is not None and len(sample_labels) > 0 and isinstance(sample_labels[0], tuple)
    labels_of = (
        torch.tensor(sample_labels, dtype=torch.float32 if multi_hot else torch.long)
        if sample_labels is not None
        else None
    )
    multilabel = False  # data.task: multilabel (the batches' labels are multi-hot floats)
    kept: dict[str, list[torch.Tensor]] = {"logits": [], "predictions": [], "labels": [], "indices": []}
    for batch in loader:
        if batch is None:
            continue
        images, targets = batch
        indices = targets if labels_of is not None else None
        labels = labels_of[targets] if labels_of is not None else targets
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images)
        logits = logits.float()
        if labels.dim() == 2:  # multilabel (multi-hot): the bce term's loss; hits: exact matches, right labels
            multilabel, labels = True, labels.float()
            loss_sum += F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=1).sum()
            right = (logits >= 0) == (labels > 0.5)  # (p >= 0.5, as multilabel.decide)
            counts[0] += labels.shape[0]
            counts[1] += right.all(dim=1).sum()
            counts[2] += right.sum()
            kept["logits"].append(logits)
            kept["labels"].append(labels)
            if indices is not None:
                kept["indices"].append(indices)
            continue
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").to(loss_sum.dtype)
        top = logits.topk(k, dim=1).indices
        counts[0] += labels.numel()
        counts[1] += (top[:, 0] == labels).sum()
        counts[2] += (top == labels[:, None]).any(dim=1).sum()
        confusion += torch.bincount(labels * num_classes + top[:, 0], minlength=num_classes**2)
        if per_sample:
            kept["logits"].append(logits)
            kept["predictions"].append(top[:, 0])
            kept["labels"].append(labels)
            if indices is not None:
                kept["indices"].append(indices)
    sums = all_reduce_sum(torch.cat([loss_sum.view(1).cpu().double(), counts.cpu().double()]))
    total_loss, count, correct1, correct5 = sums[0].item(), *(int(v) for v in sums[1:].tolist())
    confusion = all_reduce_sum(confusion.cpu())
    if count == 0:
        raise DataError("no image of the evaluation set could be read", "check the dataset")
    if multilabel:
        return _multilabel_metrics(kept, total_loss / count, count, correct1, correct5, num_classes, per_sample)
    metrics: dict[str, Any] = {
        "loss": total_loss / count,
        "acc1": correct1 / count,
        "acc5": correct5 / count,
        "num_images": count,
        "confusion_matrix": confusion.view(num_classes, num_classes).tolist(),
    }
    if per_sample:
        metrics["outputs"] = SampleOutputs(
            _joined(kept["logits"], torch.zeros(0, num_classes)),
            _joined(kept["predictions"]),
            _joined(kept["labels"]),
            _joined(kept["indices"]) if labels_of is not None else None,
        )
    return metrics


def _multilabel_metrics(
    kept: dict[str, list[torch.Tensor]],
    loss: float,
    count: int,
    exact: int,
    right: int,
    num_classes: int,
    per_sample: bool,
) -> dict[str, Any]:
    """A multilabel pass's metrics (multilabel.py, over every rank's images): loss, acc1 = exact match and
    acc5 = per-label accuracy at 0.5, map, f1_micro, f1_macro, per-class AP/F1; `outputs` with `per_sample`."""
    from tltool.distributed import all_gather_objects
    from tltool.multilabel import metrics as multilabel_metrics

    logits = _joined(kept["logits"], torch.zeros(0, num_classes))
    targets = _joined(kept["labels"], torch.zeros(0, num_classes))
    gathered = all_gather_objects((logits, targets))
    scores = multilabel_metrics(torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered]))
    out: dict[str, Any] = {"loss": loss, "acc1": exact / count, "acc5": right / (count * num_classes),
                           "num_images": count, "multilabel": True, **scores}  # fmt: skip
    if per_sample:
        predictions = (logits >= 0).long()
        indices = _joined(kept["indices"]) if kept["indices"] else None
        out["outputs"] = SampleOutputs(logits, predictions, targets, indices, multilabel=True)
    return out


def _joined(parts: list[torch.Tensor], empty: torch.Tensor | None = None) -> torch.Tensor:
    """One pass's per-batch tensors as one CPU tensor (`empty` on a rank that had no image)."""
    if not parts:
        return empty if empty is not None else torch.zeros(0, dtype=torch.long)
    return torch.cat(parts).cpu()


def evaluate_trained(
    trained: TrainedModel,
    samples: Sequence[Sample],
    batch_size: int | None = None,
    num_workers: int | None = None,
    per_sample: bool = False,
) -> dict[str, Any]:
    """`evaluate` of a checkpoint's model on `samples`: what `tltool eval` prints and `tltool report` draws.

    The images go through the run's eval transform in fp32; the batch size and loader workers default to
    the run's. Adds `per_class`, `class_names`, `checkpoint`, the expected calibration error `ece`
    (calibration.py, 15 bins) and the `temperature` the model's logits were divided by (None: not
    calibrated), and `outputs` (with each row's sample index) when `per_sample`.
    """
    from tltool.calibration import ECE_BINS, expected_calibration_error

    data_cfg = trained.data_config
    indexed = [(path, index) for index, (path, _label) in enumerate(samples)]
    if isinstance(samples, ShardSamples):  # (streamed in the scan's order: the indices line up)
        indexed = samples.relabelled(range(len(samples)))
    loader = make_loader(
        indexed,
        eval_transform(trained.preprocess),
        batch_size or data_cfg.batch_size,
        data_cfg.num_workers if num_workers is None else num_workers,
        seed=0,
        shuffle=False,
        pin_memory=trained.device.type == "cuda",
    )
    class_names = trained.class_names
    metrics = evaluate(
        trained.model,
        loader,
        trained.device,
        resolve_precision("fp32", trained.device),
        len(class_names),
        per_sample=True,  # the ECE needs every image's probabilities
        sample_labels=[label for _path, label in samples],
    )
    outputs = metrics["outputs"] if per_sample else metrics.pop("outputs")
    if metrics.get("multilabel"):  # (no ECE, no confusion matrix: per-class AP and F1 instead)
        metrics["per_class"] = multilabel_rows(metrics, class_names)
        metrics["class_names"] = class_names
        metrics["checkpoint"] = str(trained.path)
        return metrics
    metrics["ece"] = expected_calibration_error(outputs.probabilities(), outputs.labels)
    metrics["ece_bins"] = ECE_BINS
    temperature = float(getattr(trained.model, "temperature", 1.0))
    metrics["temperature"] = temperature if temperature != 1.0 else None
    metrics["per_class"] = per_class(metrics["confusion_matrix"], class_names)
    metrics["class_names"] = class_names
    metrics["checkpoint"] = str(trained.path)
    return metrics


def per_class(confusion: list[list[int]], class_names: list[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per class, from a confusion matrix (rows: true, columns: predicted)."""
    matrix = torch.tensor(confusion, dtype=torch.float64)
    true_positive = matrix.diag()
    predicted = matrix.sum(dim=0)
    actual = matrix.sum(dim=1)
    rows = []
    for i, name in enumerate(class_names):
        precision = (true_positive[i] / predicted[i]).item() if predicted[i] > 0 else 0.0
        recall = (true_positive[i] / actual[i]).item() if actual[i] > 0 else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        rows.append(
            {"class": name, "precision": precision, "recall": recall, "f1": f1, "support": int(actual[i].item())}
        )
    return rows


def multilabel_rows(metrics: dict[str, Any], class_names: list[str]) -> list[dict[str, Any]]:
    """A multilabel evaluation's per-class rows: AP (None without positives), F1 at the threshold, support."""
    return [
        {
            "class": name,
            "ap": metrics["per_class_ap"][i],
            "f1": metrics["per_class_f1"][i],
            "threshold": metrics["thresholds"][i],
            "support": metrics["support"][i],
        }  # fmt: skip
        for i, name in enumerate(class_names)
    ]


def apply_thresholds(metrics: dict[str, Any], thresholds: Sequence[float], chosen_on: str) -> dict[str, Any]:
    """A multilabel evaluation (with `outputs`) recomputed at per-class `thresholds` (multilabel.metrics)."""
    from tltool.multilabel import metrics as multilabel_metrics

    outputs = metrics["outputs"]
    metrics.update(multilabel_metrics(outputs.logits, outputs.labels, list(thresholds)))
    metrics["per_class"] = multilabel_rows(metrics, metrics["class_names"])
    metrics["thresholds_from"] = chosen_on
    return metrics


def val_thresholds(trained: TrainedModel, batch_size: int | None = None, num_workers: int | None = None) -> list[float]:
    """A multilabel checkpoint's per-class thresholds chosen on its run's val split (each maximizes F1 there): the
    ones the run kept in the checkpoint when it ended (`Checkpoint.thresholds`), else chosen now, which needs the
    run's val images (a checkpoint saved mid-run, or by an older tltool)."""
    from tltool.multilabel import choose_thresholds

    if trained.checkpoint.thresholds is not None:
        return [float(t) for t in trained.checkpoint.thresholds]
    samples, _source = trained.samples(None)
    outputs = evaluate_trained(trained, samples, batch_size, num_workers, per_sample=True)["outputs"]
    return choose_thresholds(outputs.probabilities(), outputs.labels)


def format_multilabel(metrics: dict[str, Any], class_names: list[str]) -> str:
    """`tltool eval`'s table of a multilabel model: mAP, F1, accuracies, then AP / F1 / threshold per class."""
    lines = [
        f"images {metrics['num_images']}   loss {metrics['loss']:.4f}   mAP {metrics['map']:.4f}   "
        f"F1 micro {metrics['f1_micro']:.4f}   F1 macro {metrics['f1_macro']:.4f}",
        f"exact match {metrics['exact_match']:.2%}   label accuracy {metrics['label_accuracy']:.2%}   "
        f"(thresholds: {metrics.get('thresholds_from', 'p >= 0.5')})",
        "",
    ]
    width = max(12, *(len(n) for n in class_names))
    lines.append(f"{'class':<{width}}      AP      F1  threshold  support")
    for row in metrics["per_class"]:
        ap = f"{row['ap']:6.3f}" if row["ap"] is not None else "     -"
        lines.append(f"{row['class']:<{width}}  {ap}  {row['f1']:6.3f}  {row['threshold']:9.4f}  {row['support']:7d}")
    return "\n".join(lines)


def format_report(metrics: dict[str, Any], class_names: list[str]) -> str:
    """A human-readable table: the headline metrics, per-class rows, and a small confusion matrix."""
    if metrics.get("multilabel"):
        return format_multilabel(metrics, class_names)
    lines = [
        f"images {metrics['num_images']}   loss {metrics['loss']:.4f}   "
        f"top-1 {metrics['acc1']:.2%}   top-5 {metrics['acc5']:.2%}",
    ]
    if "ece" in metrics:
        from tltool.calibration import ECE_NEEDS

        temperature = metrics.get("temperature")
        scaled = f"logits / temperature {temperature:.4g}" if temperature is not None else "not calibrated"
        if metrics["ece"] is None:
            lines.append(f"{ECE_NEEDS} ({scaled})")
        else:
            lines.append(
                f"expected calibration error {metrics['ece']:.4f} ({metrics.get('ece_bins', 15)} bins; {scaled})"
            )
    lines.append("")
    width = max(12, *(len(n) for n in class_names))
    lines.append(f"{'class':<{width}}  precision  recall      f1  support")
    for row in metrics["per_class"]:
        lines.append(
            f"{row['class']:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  "
            f"{row['f1']:6.3f}  {row['support']:7d}"
        )
    if len(class_names) <= 20:
        lines += ["", "confusion matrix (rows: true class, columns: predicted)"]
        cell = max(4, len(str(metrics["num_images"])) + 1)
        lines.append(" " * width + "".join(f"{i:>{cell}}" for i in range(len(class_names))))
        for i, row in enumerate(metrics["confusion_matrix"]):
            label = f"{i} {class_names[i]}"[:width]
            lines.append(f"{label:<{width}}" + "".join(f"{v:>{cell}}" for v in row))
    else:
        lines += ["", "(confusion matrix omitted for more than 20 classes; see --json)"]
    return "\n".join(lines)


def run_eval(
    checkpoint_path: str | Path,
    data: str | None = None,
    json_path: str | None = None,
    device_name: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    wise_alpha: float | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """`tltool eval`: metrics of a checkpoint on `data` or on the val split its run used.

    `wise_alpha`: measure WiSE-FT's theta(alpha) of the checkpoint instead of its weights (`trained.open_trained`).
    A multilabel checkpoint decides at `threshold` for every class when given, else at per-class thresholds
    chosen on its run's val split (`val_thresholds`: optimistic when `data` is that split itself).
    """
    if json_path:  # before the evaluation: an unwritable --json fails in a moment, not after it
        check_writable(Path(json_path))
    trained = open_trained(checkpoint_path, resolve_device(device_name), wise_alpha)
    samples, source = trained.samples(data)
    if threshold is not None and not trained.multilabel:
        raise DataError(
            f"--threshold is for multilabel models, but {checkpoint_path} is a multiclass one", "leave --threshold out"
        )
    metrics = evaluate_trained(trained, samples, batch_size, num_workers, per_sample=trained.multilabel)
    if trained.multilabel:
        if threshold is not None:
            chosen, how = [threshold] * len(trained.class_names), f"--threshold {threshold:g}"
        elif data is None:
            from tltool.multilabel import choose_thresholds

            outputs = metrics["outputs"]
            chosen, how = choose_thresholds(outputs.probabilities(), outputs.labels), "chosen on this val split"
        else:
            chosen, how = val_thresholds(trained, batch_size, num_workers), "chosen on the run's val split"
        apply_thresholds(metrics, chosen, how)
        metrics.pop("outputs")
    metrics["data"] = source
    metrics["wise_alpha"] = wise_alpha
    metrics["weights"] = trained.checkpoint.weights  # "ema": the run's EMA of the weights (train.ema_decay)
    if json_path:
        write_text_atomic(Path(json_path), json.dumps(metrics, indent=2) + "\n")
    return metrics
