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

    def probabilities(self) -> torch.Tensor:
        return self.logits.softmax(dim=1)


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
    labels_of = torch.tensor(sample_labels, dtype=torch.long) if sample_labels is not None else None
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


def format_report(metrics: dict[str, Any], class_names: list[str]) -> str:
    """A human-readable table: the headline metrics, per-class rows, and a small confusion matrix."""
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
) -> dict[str, Any]:
    """`tltool eval`: metrics of a checkpoint on `data` or on the val split its run used.

    `wise_alpha`: measure WiSE-FT's theta(alpha) of the checkpoint instead of its weights (`trained.open_trained`).
    """
    if json_path:  # before the evaluation: an unwritable --json fails in a moment, not after it
        check_writable(Path(json_path))
    trained = open_trained(checkpoint_path, resolve_device(device_name), wise_alpha)
    samples, source = trained.samples(data)
    metrics = evaluate_trained(trained, samples, batch_size, num_workers)
    metrics["data"] = source
    metrics["wise_alpha"] = wise_alpha
    metrics["weights"] = trained.checkpoint.weights  # "ema": the run's EMA of the weights (train.ema_decay)
    if json_path:
        write_text_atomic(Path(json_path), json.dumps(metrics, indent=2) + "\n")
    return metrics
