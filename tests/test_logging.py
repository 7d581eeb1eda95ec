"""What a run shows: TensorBoard scalars, the end-of-run summary, the report written at the end."""

from __future__ import annotations

from pathlib import Path

from conftest import run_overrides
from tltool.config import load_config
from tltool.runlog import format_summary
from tltool.train import finetune


def test_tensorboard_scalars_and_hparams(tmp_path: Path, dataset: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config(None, run_overrides(tmp_path / "r", dataset, "train.epochs=3", "log.tensorboard=true"))
    finetune(config, quiet=True)
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "accuracy/val_top1", "accuracy/val_top5", "lr",
            "speed/images_per_second"} <= tags  # fmt: skip
    assert [e.step for e in events.Scalars("loss/val")] == [1, 2, 3]
    hparams = list((tmp_path / "r" / "tensorboard").rglob("hparams/events.out.tfevents.*"))
    assert hparams, "no hparams event file"


def test_resumed_tensorboard_has_each_epoch_once(tmp_path: Path, dataset: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = run_overrides(tmp_path / "r", dataset, "log.tensorboard=true")
    finetune(load_config(None, [*base, "train.epochs=2"]), quiet=True)
    finetune(load_config(None, [*base, "train.epochs=3"]), resume="auto", quiet=True)
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/train")] == [1, 2, 3]


def test_report_at_the_end_of_the_run(tmp_path: Path, dataset: Path) -> None:
    config = load_config(None, run_overrides(tmp_path / "r", dataset, "train.epochs=1", "log.report=true"))
    summary = finetune(config, quiet=True)
    assert Path(summary["report"]).is_file()
    assert (tmp_path / "r" / "report" / "confusion_matrix.png").is_file()


def test_end_of_run_summary_table(tmp_path: Path, dataset: Path) -> None:
    summary = finetune(load_config(None, run_overrides(tmp_path / "r", dataset, "train.epochs=2")), quiet=True)
    text = format_summary(summary)
    best = tmp_path / "r" / "checkpoints" / "best.pt"
    expected = ("best epoch", "val top-1", "features extracted once", "images/s", f"tltool eval {best}",
                "tltool export", "tltool report")  # fmt: skip
    for item in expected:
        assert item in text, item
    assert f"{summary['best_metric']:.4f}" in text
