"""Data honesty (issue #19): what a run trains on is what it says, and a change of the data is never silent.

A last batch of one under batch norm, the data fingerprint checked on resume, a moved run directory,
decode failures counted per epoch, a single class refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tltool.session as session_module
from conftest import make_dataset, run_overrides, write_config
from tltool.checkpoint import load_checkpoint
from tltool.cli import app
from tltool.config import load_config
from tltool.doctor import diagnose
from tltool.train import finetune


def one_line(result) -> str:
    """The single `error:` line of a failed command (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_a_single_class_is_refused_in_one_line_and_by_doctor(tmp_path: Path, cli: CliRunner) -> None:
    data = make_dataset(tmp_path / "one", classes=1, per_class=6, size=16)
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "run", data))
    line = one_line(cli.invoke(app, ["finetune", str(config)]))
    assert "single class (class_0)" in line and "at least 2" in line
    assert not (tmp_path / "run").exists()  # nothing written
    assert "one_class" in {f.code for f in diagnose(data).problems}
    result = cli.invoke(app, ["doctor", str(data)])
    assert result.exit_code == 2 and "single class" in result.stdout


# --- a moved run directory -------------------------------------------------------------------------------


class Crash(Exception):
    pass


def run(run_dir: Path | str, train: Path, *extra: str, resume: str | None = None) -> dict:
    return finetune(load_config(None, run_overrides(Path(run_dir), train, *extra)), resume=resume, quiet=True)


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a = load_checkpoint(a_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(b_dir / "checkpoints" / "last.pt")
    assert a.epoch == b.epoch and a.global_step == b.global_step
    for key, value in a.model.items():
        assert torch.equal(value, b.model[key]), key
    lines = [
        [json.loads(x)["val_loss"] for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a_dir, b_dir)
    ]
    assert lines[0] == lines[1]


@pytest.mark.slow
def test_a_moved_run_directory_resumes_bitwise(tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_dataset(tmp_path / "images", classes=2, per_class=6, size=16)
    extra = ("train.freeze=none", "train.epochs=2", "data.batch_size=5", "data.image_size=16", "data.resize_size=16")
    run(tmp_path / "straight", data, *extra)
    real_save = session_module.save_atomic

    def crash_after_first_save(payload, path):  # the end of epoch 1
        real_save(payload, path)
        raise Crash()

    monkeypatch.setattr(session_module, "save_atomic", crash_after_first_save)
    with pytest.raises(Crash):
        run("relative_run", data, *extra)  # (run.output_dir relative to the working directory, tmp_path)
    monkeypatch.setattr(session_module, "save_atomic", real_save)
    assert load_checkpoint(tmp_path / "relative_run" / "checkpoints" / "last.pt").epoch == 1
    shutil.copytree(tmp_path / "relative_run", tmp_path / "copied")
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(tmp_path / "relative_run", moved)
    # 1) --resume auto with run.output_dir where the run is now (absolute; it was relative).
    run(moved, data, *extra, resume="auto")
    assert_same_weights(tmp_path / "straight", moved)
    # 2) The config that travelled with the run (naming the old place) and --resume DIR/checkpoints/last.pt.
    copied = tmp_path / "copied"
    result = cli.invoke(
        app, ["finetune", str(copied / "config.yaml"), "--resume", str(copied / "checkpoints" / "last.pt")]
    )
    assert result.exit_code == 0, result.output
    assert f"continuing in {copied}" in result.output
    assert not (tmp_path / "relative_run").exists()  # nothing written at the old place
    assert_same_weights(tmp_path / "straight", copied)
    assert load_checkpoint(copied / "checkpoints" / "last.pt").config["run"]["output_dir"] == str(copied)
