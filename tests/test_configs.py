"""Every example config in configs/ validates and dry-runs on a tiny dataset (weights replaced offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tltool.cli import app
from tltool.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_example_configs() -> None:
    names = {path.stem for path in CONFIGS}
    assert {"mobilenet_v2_frozen", "resnet50_full", "efficientnet_b0"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_config_validates_and_dry_runs(path: Path, dataset: Path, tmp_path: Path) -> None:
    config = load_config(path)
    assert config.data.train
    overrides = [
        f"data.train={dataset}",
        "data.val=null",
        "model.weights=none",
        "data.image_size=64",
        "data.resize_size=64",
        f"run.output_dir={tmp_path / 'run'}",
        "run.device=cpu",
    ]
    if config.adapt.unlabeled:  # (the example's target images are not here either)
        overrides.append(f"adapt.unlabeled={dataset}")
    if config.source.train:  # (nor its source images)
        overrides.append(f"source.train={dataset}")
    if config.distill.teacher:  # (nor its teacher: the dry run checks the rest of the config)
        overrides.append("distill.teacher=null")
    if config.train.cotuning_weight:  # (nor the pretrained classifier that model.weights=none lacks)
        overrides.append("train.cotuning_weight=0")
    result = CliRunner().invoke(app, ["finetune", str(path), *overrides, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "dry run" in result.output and config.model.backbone in result.output
