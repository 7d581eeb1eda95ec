"""`tltool lr-find`: the range test's schedule, smoothing, early stop and suggestion, and real runs through the
session (frozen backbone with the feature cache through the CLI; two optimizer groups of different LR
multipliers) that leave the run directory as it was."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import run_overrides, tree_checksum, write_config
from tltool.cli import app
from tltool.config import load_config
from tltool.lrfind import BETA, RULE, RangeTest, install_schedule, lr_schedule, run_lr_find, suggest


def test_the_schedule_is_exponential_and_every_group_keeps_its_multiple() -> None:
    lrs = lr_schedule(1e-6, 1.0, 7)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    for i, lr in enumerate(lrs):  # one decade per step: 1e-6 * 10 ** i
        assert lr == pytest.approx(10.0 ** (i - 6), rel=1e-12)
    # Two groups configured at train.lr 0.01 (x1) and 0.001 (x0.1); the base is train.lr = 0.01.
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD(
        [{"params": [a], "lr": 0.01, "initial_lr": 0.01}, {"params": [b], "lr": 0.0001, "initial_lr": 0.001}], lr=0.01
    )  # (the second group's current LR is mid-warmup: the configured one, initial_lr, is what counts)
    scheduler = install_schedule(optimizer, 0.01, lrs)
    for lr in lrs:
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
        assert optimizer.param_groups[1]["lr"] == pytest.approx(0.1 * lr, rel=1e-12)
        optimizer.step()
        scheduler.step()


def feed(test: RangeTest, losses: list[float], per_step: int = 1) -> bool:
    """Call the recorder as the loop does: `per_step` batches per optimizer step; True when it stopped."""
    step = 0
    test.step = lambda: step
    for index, loss in enumerate(losses):
        ends = (index + 1) % per_step == 0
        if test(torch.tensor(loss), ends):
            return True
        step += ends
    return False


def test_the_smoothed_loss_is_the_bias_corrected_moving_average() -> None:
    test = RangeTest(lr_schedule(1e-3, 1.0, 10), step=lambda: 0)
    feed(test, [2.0, 1.0, 0.5])
    b = 0.98
    assert b == BETA
    by_hand = [
        (1 - b) * 2.0 / (1 - b),
        (b * (1 - b) * 2.0 + (1 - b) * 1.0) / (1 - b**2),
        (b * b * (1 - b) * 2.0 + b * (1 - b) * 1.0 + (1 - b) * 0.5) / (1 - b**3),
    ]
    assert [p["smoothed"] for p in test.points] == pytest.approx(by_hand, rel=1e-12)
    assert [p["loss"] for p in test.points] == [2.0, 1.0, 0.5]
    assert [p["lr"] for p in test.points] == pytest.approx(lr_schedule(1e-3, 1.0, 10)[:3])
    # With accumulation, a step's loss is the mean of its batches (2 per step here).
    accumulated = RangeTest(lr_schedule(1e-3, 1.0, 10), step=lambda: 0)
    feed(accumulated, [3.0, 1.0, 0.5, 1.5, 2.0, 0.0], per_step=2)
    assert [p["loss"] for p in accumulated.points] == [2.0, 1.0, 1.0]
    assert [p["step"] for p in accumulated.points] == [0, 1, 2]


def test_it_stops_when_the_smoothed_loss_passes_4x_its_minimum() -> None:
    b = 0.98
    # After five losses of 1 the smoothed loss is 1 (its minimum); the sixth loss that makes it exactly 4:
    at_4x = (4 * (1 - b**6) - b * (1 - b**5)) / (1 - b)
    below = RangeTest(lr_schedule(1e-3, 1.0, 10), step=lambda: 0)
    assert not feed(below, [1.0] * 5 + [at_4x * 0.999])
    assert below.points[-1]["smoothed"] == pytest.approx(4.0, rel=1e-3) and below.points[-1]["smoothed"] < 4
    above = RangeTest(lr_schedule(1e-3, 1.0, 10), step=lambda: 0)
    assert feed(above, [1.0] * 5 + [at_4x * 1.001, 1.0])
    assert len(above.points) == 6 and above.points[-1]["smoothed"] > 4  # (stopped there, the 7th never fed)
    assert "4x its minimum" in above.stop_reason
    # The last step of the range ends it; a non-finite loss stops it before it is recorded.
    done = RangeTest(lr_schedule(1e-3, 1.0, 3), step=lambda: 0)
    assert feed(done, [1.0, 1.0, 1.0, 1.0]) and len(done.points) == 3 and done.stop_reason == "reached --end"
    nan = RangeTest(lr_schedule(1e-3, 1.0, 10), step=lambda: 0)
    assert feed(nan, [1.0, float("nan"), 1.0]) and len(nan.points) == 1 and "nan" in nan.stop_reason


def test_the_suggestion_is_the_steepest_descent_and_the_minimum_over_10_is_reported() -> None:
    lrs = lr_schedule(1e-6, 1.0, 61)  # 10 points per decade
    # Falls fastest (in log10 lr) at 1e-3, has its minimum at 1e-1, then diverges (the last point is left out).
    smoothed = [2 - math.tanh(2 * (math.log10(lr) + 3)) + 0.5 * max(0.0, math.log10(lr) + 1) ** 2 for lr in lrs]
    smoothed[-1] = 100.0
    result = suggest(lrs, smoothed)
    assert result.rule == RULE and result.lr == result.steepest
    assert result.steepest == pytest.approx(1e-3, rel=1e-9)
    assert result.minimum == pytest.approx(1e-1, rel=1e-9)
    assert result.minimum_over_10 == pytest.approx(1e-2, rel=1e-9)
    # The first tenth of the curve (the average warming up) is not a candidate, even when steepest there.
    early = [10.0 - i if i < 6 else 4.0 - 0.01 * i for i in range(61)]
    assert suggest(lrs, early).steepest > lrs[5]


def test_lr_find_through_the_cli_writes_the_curve_and_leaves_the_run_directory_absent(
    cli: CliRunner, tmp_path: Path, dataset: Path, one_thread: None
) -> None:
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", run_overrides(run_dir, dataset))  # (frozen backbone, augment none)
    data_before = tree_checksum(dataset)
    out = tmp_path / "finder"
    args = ["--steps", "12", "--start", "1e-4", "--end", "1", "--out", str(out)]
    result = cli.invoke(app, ["lr-find", str(config), *args])
    assert result.exit_code == 0, result.output
    assert "feature cache:" in result.output  # the frozen backbone's features, extracted once
    assert "use: train.lr=" in result.output and "minimum / 10" in result.output and "steepest descent" in result.output
    assert not run_dir.exists()
    assert tree_checksum(dataset) == data_before
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.csv", "lr_find.json", "lr_find.png"]
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    found = json.loads((out / "lr_find.json").read_text())
    points = found["points"]
    assert [p["step"] for p in points] == list(range(len(points)))
    # 36 train images in batches of 8: 5 steps a pass, so 12 steps passed over the data three times.
    assert found["steps_done"] == 12 and found["stop_reason"] == "reached --end"
    assert [p["lr"] for p in points] == pytest.approx(lr_schedule(1e-4, 1.0, 12), rel=1e-12)
    assert [p["groups"]["head"] for p in points] == pytest.approx([p["lr"] for p in points], rel=1e-12)
    assert f"use: {found['override']}" in result.output
    assert found["override"] == f"train.lr={found['suggestion']:.3g}"
    rows = list(csv.DictReader((out / "lr_find.csv").open()))
    assert [float(r["smoothed"]) for r in rows] == [p["smoothed"] for p in points]


def test_every_optimizer_group_runs_at_its_configured_multiple_and_a_run_there_is_untouched(
    tmp_path: Path, dataset: Path, one_thread: None
) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)  # a run already there: not refused, not touched
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"not read")
    before = tree_checksum(run_dir)
    overrides = run_overrides(run_dir, dataset, "train.freeze=none", "train.backbone_lr_mult=0.1",
                              "train.warmup_epochs=1")  # fmt: skip
    result = run_lr_find(load_config(None, overrides), 1e-4, 1e-1, 4, str(tmp_path / "out"), quiet=True)
    assert {g["name"]: g["factor"] for g in result["groups"]} == pytest.approx({"backbone": 0.1, "head": 1.0})
    assert len(result["points"]) == 4
    for point, lr in zip(result["points"], lr_schedule(1e-4, 1e-1, 4), strict=True):  # (warmup replaced)
        assert point["groups"] == pytest.approx({"backbone": 0.1 * lr, "head": lr}, rel=1e-12)
    assert tree_checksum(run_dir) == before


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--start", "1", "--end", "0.1"], "--end 0.1 must be above --start 1"),
        (["--start", "1e-3", "--end", "1e-3"], "must be above --start"),
        (["--steps", "1"], "--steps 1 is fewer than 2"),
        (["--start", "0"], "--start 0 is not a positive learning rate"),
        (["train.lrr=0.1"], "train.lrr: unknown key; did you mean 'train.lr'?"),
        (["--out", "{run}/finder"], "is inside the run directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    cli: CliRunner, tmp_path: Path, dataset: Path, args: list[str], expected: str
) -> None:
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", run_overrides(run_dir, dataset))
    result = cli.invoke(app, ["lr-find", str(config), *(a.format(run=run_dir) for a in args)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("error: ") and expected in result.output, result.output
    assert all(line.startswith("  ") for line in lines[1:])  # (a config's problems: one indented line each)
    assert "Traceback" not in result.output
    assert not run_dir.exists()


def test_the_figure_is_log_x_with_the_suggestion_marked(cli: CliRunner) -> None:
    from tltool.plots import lr_find_figure

    lrs = lr_schedule(1e-5, 1.0, 11)
    smoothed = [2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.7, 0.9, 1.5, 3.0, 9.0]
    figure = lr_find_figure(lrs, smoothed, smoothed, 1e-3, 1e-2, RULE)
    ax = figure.axes[0]
    assert ax.get_xscale() == "log"
    marked = {line.get_label().split(" ")[0]: line.get_xdata()[0] for line in ax.get_lines()[2:]}
    assert marked == {"suggested": 1e-3, "minimum": 1e-2}
    bottom, top = ax.get_ylim()  # from the start down to the minimum; the diverging tail leaves the figure
    assert bottom < 0.7 and 2.0 < top < 3.0
    result = cli.invoke(app, ["lr-find", "--help"])
    assert result.exit_code == 0 and "Example: tltool lr-find" in result.output


def test_under_torchrun_it_is_one_line_exit_2(
    cli: CliRunner, tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "run", dataset))
    result = cli.invoke(app, ["lr-find", str(config)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: tltool lr-find runs in one process, not under torchrun — run it without torchrun"
    ]
    assert not (tmp_path / "run").exists()
