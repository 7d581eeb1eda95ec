"""Evaluation: loss, top-1/top-5, per-class precision/recall/F1 and the confusion matrix.

`evaluate()` is what the training loop calls every epoch; `run_eval()` is `tltool eval`, which needs
nothing but the checkpoint (and optionally another folder of images).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tltool.checkpoint import load_checkpoint
from tltool.config import DataConfig
from tltool.data import Preprocess, Sample, eval_transform, make_loader, scan_data, scan_eval_folder
from tltool.device import autocast, resolve_device, resolve_precision, sum_dtype
from tltool.distributed import all_reduce_sum
from tltool.errors import DataError
from tltool.models import load_trained_model


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    precision: str,
    num_classes: int,
) -> dict[str, Any]:
    """Metrics of `model` over every batch of `loader` (the loss is plain cross-entropy, no smoothing).

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
    for batch in loader:
        if batch is None:
            continue
        images, labels = batch
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
    sums = all_reduce_sum(torch.cat([loss_sum.view(1).cpu().double(), counts.cpu().double()]))
    total_loss, count, correct1, correct5 = sums[0].item(), *(int(v) for v in sums[1:].tolist())
    confusion = all_reduce_sum(confusion.cpu())
    if count == 0:
        raise DataError("no image of the evaluation set could be read", "check the dataset")
    return {
        "loss": total_loss / count,
        "acc1": correct1 / count,
        "acc5": correct5 / count,
        "num_images": count,
        "confusion_matrix": confusion.view(num_classes, num_classes).tolist(),
    }


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
        "",
    ]
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


def evaluation_samples(checkpoint: dict[str, Any], data: str | None) -> tuple[list[Sample], str]:
    """The images to evaluate a checkpoint on: `data` if given, else its run's val split (recomputed).

    Returns the samples, labelled with the checkpoint's class indices, and a description of where they are.
    """
    class_names = list(checkpoint["class_names"])
    if data:
        samples, source = scan_eval_folder(data, class_names), data
    else:
        data_cfg = DataConfig.model_validate(checkpoint["config"]["data"])
        split = scan_data(data_cfg, int(checkpoint["config"]["run"]["seed"]))
        if split.class_names != class_names:
            raise DataError(
                "the dataset recorded in the checkpoint no longer has the checkpoint's classes",
                "give the images to evaluate with --data DIR",
            )
        samples, source = split.val, f"val split of {data_cfg.val or data_cfg.train}"
    if not samples:
        raise DataError(f"no images to evaluate in {source}", "give a folder of class sub-folders with --data")
    return samples, source


def run_eval(
    checkpoint_path: str | Path,
    data: str | None = None,
    json_path: str | None = None,
    device_name: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """`tltool eval`: metrics of a checkpoint on `data` or on the val split its run used."""
    checkpoint = load_checkpoint(checkpoint_path)
    class_names = list(checkpoint["class_names"])
    data_cfg = DataConfig.model_validate(checkpoint["config"]["data"])
    samples, source = evaluation_samples(checkpoint, data)
    device = resolve_device(device_name)
    precision = resolve_precision("fp32", device)
    model = load_trained_model(checkpoint).to(device)
    preprocess = Preprocess.from_dict(checkpoint["preprocess"])
    loader = make_loader(
        samples,
        eval_transform(preprocess),
        batch_size or data_cfg.batch_size,
        data_cfg.num_workers if num_workers is None else num_workers,
        seed=0,
        shuffle=False,
        pin_memory=device.type == "cuda",
    )
    metrics = evaluate(model, loader, device, precision, len(class_names))
    metrics["per_class"] = per_class(metrics["confusion_matrix"], class_names)
    metrics["class_names"] = class_names
    metrics["checkpoint"] = str(checkpoint_path)
    metrics["data"] = source
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics
