"""The CLI as a user runs it: commands, help, one-line errors with exit code 2, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import run_overrides, write_config
from tltool import __version__
from tltool.cli import app

REPO = Path(__file__).resolve().parents[1]


def one_error_line(result) -> str:
    """The CLI's user errors are exactly one line on stderr, exit code 2, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run through the CLI, shared by the eval tests."""
    from conftest import make_dataset

    root = tmp_path_factory.mktemp("cli_run")
    data = make_dataset(root / "images")
    config = write_config(root / "c.yaml", run_overrides(root / "run", data, "train.epochs=2", "train.lr=0.05"))
    result = CliRunner().invoke(app, ["finetune", str(config)])
    assert result.exit_code == 0, result.output
    return root / "run"


def test_version_and_help(cli: CliRunner) -> None:
    result = cli.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output and "torch" in result.output
    for command in (["finetune"], ["eval"], ["export"], ["config", "show"], ["config", "init"]):
        result = cli.invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "Example: tltool" in result.output, command


def test_finetune_prints_epochs_and_next_steps(trained: Path) -> None:
    assert (trained / "checkpoints" / "best.pt").is_file()
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["final"]["val_acc1"] > 0.5


def test_eval_prints_the_report_and_writes_json(cli: CliRunner, trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    result = cli.invoke(app, ["eval", str(trained / "checkpoints" / "best.pt"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "top-1" in result.output and "precision" in result.output and "confusion matrix" in result.output
    metrics = json.loads(out.read_text())
    assert {"loss", "acc1", "acc5", "num_images", "per_class", "confusion_matrix"} <= set(metrics)
    assert metrics["num_images"] == 6 and len(metrics["confusion_matrix"]) == 3
    last = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    best = max(last, key=lambda r: r["val_acc1"])
    assert metrics["acc1"] == pytest.approx(best["val_acc1"])
    assert metrics["loss"] == pytest.approx(best["val_loss"], rel=1e-5)


def test_eval_on_another_folder(cli: CliRunner, trained: Path, tmp_path: Path) -> None:
    from conftest import make_dataset

    other = make_dataset(tmp_path / "other", classes=2, per_class=3, seed=7)
    result = cli.invoke(app, ["eval", str(trained / "checkpoints" / "best.pt"), "--data", str(other)])
    assert result.exit_code == 0, result.output
    assert "images 6" in result.output


def test_config_show_and_init(cli: CliRunner, tmp_path: Path) -> None:
    result = cli.invoke(app, ["config", "init"])
    assert result.exit_code == 0
    (tmp_path / "c.yaml").write_text(result.output)
    shown = cli.invoke(app, ["config", "show", str(tmp_path / "c.yaml"), "train.lr=1e-4"])
    assert shown.exit_code == 0
    assert yaml.safe_load(shown.output)["train"]["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize("command", [["finetune"], ["baseline"], ["config", "show"]])
def test_model_name_typos_are_config_errors_before_any_data_is_read(
    cli: CliRunner, tmp_path: Path, command: list[str]
) -> None:
    config = write_config(tmp_path / "c.yaml", [f"data.train={tmp_path / 'missing'}", "model.weights=none"])
    result = cli.invoke(app, [*command, str(config), "model.backbone=resnet81"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.stderr.splitlines()[0] == f"error: {config} has 1 problem — fix them and run again"
    assert "model.backbone: unknown torchvision classification model; did you mean resnet18" in result.stderr
    result = cli.invoke(app, [*command, str(config), "model.weights=IMAGENET9K"])
    assert result.exit_code == 2 and "model.weights: not a weights name of resnet18" in result.stderr


def test_dry_run(cli: CliRunner, tmp_path: Path, dataset: Path) -> None:
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "run", dataset))
    result = cli.invoke(app, ["finetune", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "trainable" in result.output and "dry run" in result.output
    assert "loader     in the main process" in result.output and "precision fp32" in result.output
    assert not (tmp_path / "run").exists()
    result = cli.invoke(app, ["finetune", str(config), "data.num_workers=2", "run.compile=true", "--dry-run"])
    assert "loader     2 persistent worker(s)" in result.output and "compile on" in result.output


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_inputs_get_one_line_and_exit_2(cli: CliRunner, tmp_path: Path, dataset: Path, trained: Path) -> None:
    assert "does not exist" in one_error_line(cli.invoke(app, ["finetune", str(tmp_path / "none.yaml")]))
    typo = write_config(tmp_path / "typo.yaml", run_overrides(tmp_path / "r", dataset))
    typo.write_text(typo.read_text() + "trian:\n  epochs: 3\n")
    result = cli.invoke(app, ["finetune", str(typo)])
    assert result.exit_code == 2 and "did you mean 'train'?" in result.stderr
    good = write_config(tmp_path / "good.yaml", run_overrides(tmp_path / "r", dataset))
    line = one_error_line(cli.invoke(app, ["finetune", str(good), f"data.train={tmp_path / 'missing'}"]))
    assert "does not exist" in line
    assert "gpu" in cli.invoke(app, ["finetune", str(good), "run.device=gpu"]).stderr
    # Checkpoints: missing, empty, truncated, not a checkpoint, a pickle with a code payload.
    assert "does not exist" in one_error_line(cli.invoke(app, ["eval", str(tmp_path / "none.pt")]))
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "not a valid" in one_error_line(cli.invoke(app, ["eval", str(tmp_path / "empty.pt")]))
    data = (trained / "checkpoints" / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert "not a valid" in one_error_line(cli.invoke(app, ["eval", str(tmp_path / "cut.pt")]))
    torch.save({"just": torch.zeros(1)}, tmp_path / "plain.pt")
    assert "not a valid tltool checkpoint" in one_error_line(cli.invoke(app, ["eval", str(tmp_path / "plain.pt")]))
    marker = tmp_path / "pwned"
    torch.save({"model": Payload(str(marker))}, tmp_path / "evil.pt")
    for command in (["eval"], ["export"]):
        line = one_error_line(cli.invoke(app, [*command, str(tmp_path / "evil.pt")]))
        assert "refused" in line and "posix.system" in line
    result = cli.invoke(app, ["finetune", str(good), f"model.weights={tmp_path / 'evil.pt'}"])
    assert "refused" in one_error_line(result)
    assert not marker.exists()


def test_console_script_and_python_m(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for command in (
        [sys.executable, "-m", "tltool", "--version"],
        [str(Path(sys.executable).parent / "tltool"), "--version"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0 and __version__ in done.stdout, done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "tltool", "eval", str(tmp_path / "missing.pt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_readme_config_reference_is_current() -> None:
    from tltool.config_docs import reference_markdown

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    table = readme.split(start, 1)[1].split(end, 1)[0]
    assert table == reference_markdown(), "run `tltool config keys` and paste it into README.md"
    assert "make demo" in readme and "make test" in readme


@pytest.mark.parametrize("outcome", ["returns", "exits"])
def test_main_freezes_what_is_alive_before_the_interpreter_exits(monkeypatch: pytest.MonkeyPatch, outcome: str) -> None:
    # (the last garbage collections of the exit then skip torch's objects: about 1 s of every command)
    import gc

    import tltool.cli as cli_module

    frozen = []

    def command() -> None:
        if outcome == "exits":
            sys.exit(2)  # (an error line's exit, as typer's)

    monkeypatch.setattr(cli_module, "app", command)
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    if outcome == "exits":
        with pytest.raises(SystemExit):
            cli_module.main()
    else:
        cli_module.main()
    assert frozen == [True]
