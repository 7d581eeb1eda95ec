"""How tltool/cli.py assembles the commands of tltool/commands/: none lost, help without torch, export's options."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

import tltool.commands
from tltool.cli import COMMANDS, app
from tltool.errors import ExportError

REPO = Path(__file__).resolve().parents[1]


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command of the click group, sub-commands as (group, name)."""
    paths = []
    for name, command in group.commands.items():
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths += command_paths(command, (*prefix, name))
    return paths


def test_every_command_of_every_commands_module_is_in_the_app_once() -> None:
    in_modules = []
    for module_info in pkgutil.iter_modules(tltool.commands.__path__):
        module = importlib.import_module(f"tltool.commands.{module_info.name}")
        if hasattr(module, "commands"):
            in_modules += [info.callback for info in module.commands.registered_commands]
    in_app = [info.callback for info in app.registered_commands]
    assert sorted(in_app, key=id) == sorted(in_modules, key=id)  # (a module left out of cli.GROUPS: its commands lost)
    assert in_app == list(COMMANDS)  # in the order of cli.COMMANDS, each once
    assert list(typer.main.get_command(app).commands)[-2:] == ["config", "cache"]


def test_no_help_imports_torch() -> None:
    """`tltool --help` and every command's `--help` (in one process) import neither torch nor torchvision."""
    code = (
        "import sys, typer\n"
        "from typer.testing import CliRunner\n"
        "from tltool.cli import app\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_commands import command_paths\n"
        "runner = CliRunner()\n"
        "for path in [(), *command_paths(typer.main.get_command(app))]:\n"
        "    result = runner.invoke(app, [*path, '--help'])\n"
        "    assert result.exit_code == 0 and 'Usage' in result.output, (path, result.output)\n"
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_export_flags_become_one_export_options(cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    import tltool.export
    from tltool.export import ExportOptions
    from tltool.export.quantize import Int8Options

    given = []
    monkeypatch.setattr(
        tltool.export, "run_export", lambda checkpoint, options, echo: given.append((checkpoint, options))
    )
    values = ["-o", "m.onnx", "--data", "d", "--input-layout", "nchw", "--device", "cpu", "--wise-alpha", "0.5",
              "--quantize", "int8", "--calibration-images", "7", "--calibration-data", "c", "--max-drop",
              "2.5"]  # fmt: skip
    # Each flag True in another subset of the three calls, so two fields swapped differ in at least one.
    for flags in (["--no-verify", "--dynamic-size", "--benchmark", "--force"],
                  ["--no-verify", "--include-preprocessing", "--softmax", "--force"],
                  ["--softmax", "--benchmark"]):  # fmt: skip
        result = cli.invoke(app, ["export", "x.pt", "-f", "all", *values, *flags])
        assert result.exit_code == 0, result.output
        expected = ExportOptions(
            format="all", output="m.onnx", data="d", verify="--no-verify" not in flags,
            include_preprocessing="--include-preprocessing" in flags, input_layout="nchw",
            softmax="--softmax" in flags, dynamic_size="--dynamic-size" in flags,
            benchmark="--benchmark" in flags, device="cpu", wise_alpha=0.5, force="--force" in flags,
            quantize="int8", int8=Int8Options(calibration_images=7, max_drop=2.5, calibration_data="c"),
        )  # fmt: skip
        assert given.pop() == ("x.pt", expected)
    cli.invoke(app, ["export", "y.pt"])
    assert given == [("y.pt", ExportOptions())]  # the command's defaults are ExportOptions' defaults


def test_export_options_are_checked_before_the_checkpoint_is_read(tmp_path: Path) -> None:
    from tltool.export import ExportOptions, run_export

    with pytest.raises(ExportError, match="--input-layout applies to uint8 inputs only"):
        run_export(tmp_path / "missing.pt", ExportOptions(input_layout="nchw"))
    with pytest.raises(ExportError, match="safetensors holds weights only, so --softmax"):
        run_export(tmp_path / "missing.pt", ExportOptions(format="safetensors", softmax=True))
    with pytest.raises(AttributeError):  # frozen
        ExportOptions().format = "all"  # type: ignore[misc]
