"""Data honesty (issue #19): what a run trains on is what it says, and a change of the data is never silent.

A last batch of one under batch norm, the data fingerprint checked on resume, a moved run directory,
decode failures counted per epoch, a single class refused.
"""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from conftest import make_dataset, run_overrides, write_config
from tltool.cli import app
from tltool.doctor import diagnose


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
