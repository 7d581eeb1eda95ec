"""The figures of `tltool report`: training curves, confusion matrix, per-class bars, confident errors.

Drawn with matplotlib's Agg canvas and the object API (no pyplot state, no display needed); matplotlib is
the `plots` extra (`pip install tltool[plots]`): without it, a one-line error names the install.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from tltool.data import load_image
from tltool.errors import ReportError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CELL_NUMBERS_UP_TO = 30  # classes; above that the confusion matrix shows colour only
DPI = 100


def require_matplotlib(command: str = "tltool report") -> None:
    """Fail now, with the install line, when matplotlib is missing (call it before a long run that reports)."""
    _figure(1, 1, command)


def _figure(width: float, height: float, command: str = "tltool report") -> Figure:
    """A matplotlib Figure on an Agg canvas (no pyplot, no display); a clear error without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError(f"{command} needs matplotlib", "pip install 'tltool[plots]'") from None
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _short(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def curves_figure(records: Sequence[dict[str, Any]], best_epoch: int | None = None) -> Figure:
    """Loss, accuracy, learning rate and (with more than one) each loss term per epoch; a dashed line where
    `phase` changes, a dotted one at the best epoch."""
    from matplotlib.ticker import MaxNLocator

    # The objective's terms get a fourth panel when there is more than one (with only ce it is the train loss).
    terms = list(dict.fromkeys(name for r in records for name in (r.get("loss_terms") or {})))
    panels = 4 if len(terms) > 1 else 3
    figure = _figure(5 * panels, 4.2)
    axes = figure.subplots(1, panels)
    epochs = [r["epoch"] for r in records]
    marker = "o" if len(records) <= 30 else None

    def plot(ax: Any, key: str, label: str, style: str = "-") -> None:
        points = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), int | float)]
        if points:
            ax.plot(*zip(*points, strict=True), style, marker=marker, markersize=3, label=label)

    plot(axes[0], "train_loss", "train")
    plot(axes[0], "val_loss", "val")
    axes[0].set_title("loss")
    plot(axes[1], "train_acc", "train")
    multilabel = any("val_map" in r for r in records)  # (acc1: exact match, acc5: per-label accuracy)
    plot(axes[1], "val_acc1", "val exact match" if multilabel else "val top-1")
    plot(axes[1], "val_acc5", "val label accuracy" if multilabel else "val top-5", "--")
    plot(axes[1], "val_map", "val mAP", ":")
    axes[1].set_title("accuracy")
    axes[1].set_ylim(-0.02, 1.02)
    plot(axes[2], "lr", "lr")
    axes[2].set_title("learning rate (end of epoch)")
    rates = [r["lr"] for r in records if isinstance(r.get("lr"), int | float)]
    if rates and min(rates) > 0 and max(rates) / min(rates) > 20:
        axes[2].set_yscale("log")
    if panels == 4:
        for name in terms:
            points = [(r["epoch"], r["loss_terms"][name]) for r in records if name in (r.get("loss_terms") or {})]
            axes[3].plot(*zip(*points, strict=True), marker=marker, markersize=3, label=name, gid=f"term-{name}")
        axes[3].set_title("loss terms (train, weighted)")
    phases = [(r["epoch"], r["phase"]) for r in records if r.get("phase") is not None]
    boundaries = [(b[0], b[1]) for a, b in zip(phases, phases[1:], strict=False) if a[1] != b[1]]
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        for epoch, phase in boundaries:
            ax.axvline(epoch - 0.5, color="tab:purple", linestyle="--", linewidth=1.2, gid="phase-boundary")
            ax.annotate(
                str(phase),
                (epoch - 0.5, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, -12),
                textcoords="offset points",
                color="tab:purple",
                fontsize=8,
            )
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle=":", linewidth=1, gid="best-epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    notes = []
    if phases:
        notes.append(f"phases: {' → '.join(dict.fromkeys(str(p) for _, p in phases))} (dashed)")
    if best_epoch is not None:
        notes.append(f"best epoch {best_epoch} (dotted)")
    if notes:
        figure.suptitle("   ".join(notes), fontsize=10)
    return figure


def confusion_figure(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> Figure:
    """The row-normalized confusion matrix (each row: where the images of one true class went).

    The figure and its fonts grow with the class count so 100 names stay legible; above
    CELL_NUMBERS_UP_TO classes the cells carry colour only.
    """
    n = len(class_names)
    matrix = torch.tensor(confusion, dtype=torch.float64)
    rows = matrix.sum(dim=1, keepdim=True)
    normalized = torch.where(rows > 0, matrix / rows.clamp(min=1), torch.zeros_like(matrix))
    side = min(34.0, max(6.0, 3.0 + 0.3 * n))
    figure = _figure(side + 1.2, side)
    ax = figure.subplots()
    image = ax.imshow(normalized.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=ax, shrink=0.6, label="fraction of the true class")
    cell_points = side * 72 * 0.8 / max(n, 1)  # the axes take about 80% of the side
    tick_size = min(10.0, max(6.0, 0.45 * cell_points))
    names = [_short(c) for c in class_names]
    ax.set_xticks(range(n), names, rotation=90, fontsize=tick_size)
    ax.set_yticks(range(n), names, fontsize=tick_size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix, normalized per true class ({int(matrix.sum())} images)")
    if n <= CELL_NUMBERS_UP_TO:
        cell_size = 9 if n <= 12 else 7
        for i in range(n):
            for j in range(n):
                value = float(normalized[i, j])
                ax.text(
                    j,
                    i,
                    f"{value:.2f}" if value else "0",
                    ha="center",
                    va="center",
                    fontsize=cell_size,
                    color="white" if value > 0.55 else "black",
                )
    return figure


def per_class_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    """Precision, recall and F1 bars per class, worst F1 at the top, with each class's support."""
    ordered = sorted(rows, key=lambda r: (r["f1"], r["class"]))
    n = len(ordered)
    figure = _figure(10, min(40.0, max(3.5, 1.5 + 0.36 * n)))
    ax = figure.subplots()
    height = 0.26
    tick_size = 9 if n <= 40 else 7
    for offset, (key, colour) in enumerate((("precision", "tab:blue"), ("recall", "tab:orange"), ("f1", "tab:green"))):
        positions = [i + (offset - 1) * height for i in range(n)]
        ax.barh(positions, [r[key] for r in ordered], height=height, color=colour, label=key)
    ax.set_yticks(range(n), [_short(r["class"]) for r in ordered], fontsize=tick_size)
    for i, row in enumerate(ordered):
        ax.text(1.02, i, f"n={row['support']}", va="center", fontsize=tick_size - 1, color="dimgray")
    ax.set_xlim(0, 1.12)
    ax.set_ylim(n - 0.5, -0.5)  # worst class on top
    ax.set_xlabel("score")
    ax.set_title("per class, sorted by F1 (worst first)")
    ax.grid(axis="x", alpha=0.3)
    figure.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8)
    return figure


def errors_figure(errors: Sequence[dict[str, Any]], columns: int = 4) -> Figure:
    """A grid of the most confidently wrong images, each titled with its true and predicted class."""
    if not errors:
        figure = _figure(6, 1.5)
        ax = figure.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=12)
        return figure
    columns = min(columns, len(errors))
    rows = math.ceil(len(errors) / columns)
    figure = _figure(3.2 * columns, 3.5 * rows)
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, error in zip(axes.flat, errors, strict=False):
        try:
            image = load_image(error["path"])
            image.thumbnail((256, 256))
            ax.imshow(image)
        except (OSError, SyntaxError, ValueError):
            ax.text(0.5, 0.5, "cannot read", ha="center", va="center")
        ax.set_title(
            f"true: {_short(error['true'], 20)}\npred: {_short(error['predicted'], 20)} ({error['confidence']:.0%})",
            fontsize=9,
            color="tab:red",
        )
    figure.suptitle("most confidently wrong images", fontsize=11)
    return figure


def lr_find_figure(
    lrs: Sequence[float],
    losses: Sequence[float],
    smoothed: Sequence[float],
    suggestion: float,
    minimum_over_10: float,
    rule: str,
) -> Figure:
    """`tltool lr-find`'s curve: the loss per step (faint) and its smoothed value against the LR (log x), the
    suggestion (solid line, by `rule`) and the minimum / 10 (dotted)."""
    figure = _figure(7, 4.5, "tltool lr-find")
    ax = figure.subplots()
    ax.plot(lrs, losses, color="tab:blue", alpha=0.25, linewidth=1, label="loss per step")
    ax.plot(lrs, smoothed, color="tab:blue", linewidth=2, label="smoothed (EMA 0.98, bias-corrected)")
    ax.axvline(suggestion, color="tab:red", label=f"suggested {suggestion:.3g} ({rule})")
    ax.axvline(minimum_over_10, color="tab:gray", linestyle=":", label=f"minimum / 10: {minimum_over_10:.3g}")
    ax.set_xscale("log")
    finite = [value for value in smoothed if math.isfinite(value)]
    if finite:  # y spans the smoothed loss from its start down to its minimum: the diverging tail leaves upward
        lowest = min(finite)
        highest = max(finite[: finite.index(lowest) + 1])
        pad = 0.1 * (highest - lowest) or 0.1 * abs(highest) or 1.0
        ax.set_ylim(lowest - pad, highest + 3 * pad)
    ax.set_xlabel("learning rate (train.lr; each group at its configured multiple)")
    ax.set_ylabel("training loss (objective)")
    ax.legend(fontsize="small")
    ax.set_title("LR range test")
    return figure


def reliability_figure(bins: Sequence[Any], ece: float | None, temperature: float | None = None) -> Figure:
    """The reliability diagram: each confidence bin's accuracy against its mean confidence (the diagonal is a
    calibrated model), the gap shaded, and below it how many images fall in each bin.

    `bins` are `calibration.reliability_bins` (lower, upper, count, accuracy, confidence).
    """
    figure = _figure(6.5, 7.5)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    filled = [b for b in bins if b.count]
    width = [b.upper - b.lower for b in bins]
    lefts = [b.lower for b in bins]
    top.bar(lefts, [b.accuracy if b.count else 0 for b in bins], width=width, align="edge", color="tab:blue",
            edgecolor="white", label="accuracy")  # fmt: skip
    for b in filled:  # the gap between accuracy and confidence: what the ECE sums, weighted by the bin's share
        low, high = sorted((b.accuracy, b.confidence))
        top.bar(b.lower, high - low, bottom=low, width=b.upper - b.lower, align="edge", color="tab:red", alpha=0.3,
                edgecolor="tab:red", hatch="//")  # fmt: skip
    top.plot([b.confidence for b in filled], [b.accuracy for b in filled], "o", color="black", ms=3,
             label="(mean confidence, accuracy)")  # fmt: skip
    top.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    scaled = f", logits / T = {temperature:.3g}" if temperature is not None else ", not calibrated"
    measured = f"ECE {ece:.4f}" if ece is not None else "ECE needs torchmetrics"
    top.set_title(f"reliability diagram: {measured} ({len(bins)} bins{scaled})")
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(lefts, [b.count for b in bins], width=width, align="edge", color="gray", edgecolor="white")
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("images")
    return figure


def figure_png(figure: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
