"""The report's figures: real images of the right shape, readable at any class count."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tltool.evaluate import per_class
from tltool.plots import confusion_figure, curves_figure, figure_png, per_class_figure


@pytest.mark.parametrize("n", [3, 30, 100])
def test_confusion_matrix_has_n_by_n_cells_and_stays_readable(n: int) -> None:
    confusion = [[10 if i == j else (i + j) % 3 for j in range(n)] for i in range(n)]
    names = [f"class_{i:03d}" for i in range(n)]
    figure = confusion_figure(confusion, names)
    ax = figure.axes[0]
    cells = ax.images[0].get_array()
    assert cells.shape == (n, n)
    assert cells.sum(axis=1).tolist() == pytest.approx([1.0] * n)  # normalized per true class
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert len(ax.texts) == (n * n if n <= 30 else 0)
    pixels_per_class = figure.get_size_inches()[1] * figure.dpi / n
    assert pixels_per_class >= 25, "labels of 100 classes need room"
    assert min(t.get_fontsize() for t in ax.get_yticklabels()) >= 6


def test_per_class_bars_sorted_worst_first() -> None:
    confusion = [[5, 0, 0], [2, 3, 0], [0, 4, 1]]
    rows = per_class(confusion, ["a", "b", "c"])
    figure = per_class_figure(rows)
    ax = figure.axes[0]
    assert len(ax.patches) == 3 * 3  # precision, recall, F1 per class
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == min(rows, key=lambda r: r["f1"])["class"]
    png = figure_png(figure)
    assert Image.open(io.BytesIO(png)).size[0] >= 500


def test_curves_mark_phase_changes_and_tolerate_missing_keys() -> None:
    records = [
        {
            "epoch": e,
            "lr": 0.01 / e,
            "train_loss": 1 / e,
            "train_acc": 0.2 * e,
            "val_loss": 1.1 / e,
            "val_acc1": 0.2 * e,
        }
        for e in range(1, 5)
    ]
    plain = curves_figure(records)
    assert len(plain.axes) == 3
    assert not [line for ax in plain.axes for line in ax.lines if line.get_gid() == "phase-boundary"]
    phased = [{**r, "phase": "head" if r["epoch"] <= 2 else "full"} for r in records]
    figure = curves_figure(phased, best_epoch=4)
    for ax in figure.axes:
        boundaries = [line for line in ax.lines if line.get_gid() == "phase-boundary"]
        assert len(boundaries) == 1 and list(boundaries[0].get_xdata()) == [2.5, 2.5]
        assert any(line.get_gid() == "best-epoch" for line in ax.lines)
    assert Image.open(io.BytesIO(figure_png(figure))).size[0] >= 1000


def test_curves_get_a_loss_terms_panel_when_the_objective_has_several_terms() -> None:
    records = [
        {"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "train_acc": 0.2 * e, "val_acc1": 0.2 * e,
         "lr": 0.1, "loss_terms": {"ce": 1.0 / e, "l2sp": 0.01 * e}}
        for e in range(1, 4)
    ]  # fmt: skip
    figure = curves_figure(records)
    assert len(figure.axes) == 4 and figure.axes[3].get_title().startswith("loss terms")
    lines = {line.get_gid(): list(line.get_ydata()) for line in figure.axes[3].lines if line.get_gid()}
    assert lines["term-ce"] == [1.0, 0.5, 1.0 / 3] and lines["term-l2sp"] == [0.01, 0.02, 0.03]
    only_ce = [{**r, "loss_terms": {"ce": r["train_loss"]}} for r in records]
    assert len(curves_figure(only_ce).axes) == 3  # one term is the train loss itself
