"""`tltool report`: real PNGs with the expected content, one self-contained HTML, numbers equal to `tltool eval`."""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import make_dataset, run_overrides
from tltool.cli import app
from tltool.config import load_config
from tltool.errors import CheckpointError, ReportError
from tltool.evaluate import run_eval
from tltool.plots import errors_figure
from tltool.report import PLOTS, evaluate_run, read_run, write_report
from tltool.train import finetune

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch run whose model is still near chance (tiny LR), so the val split has errors."""
    root = tmp_path_factory.mktemp("report_run")
    data = make_dataset(root / "images", classes=3, per_class=10)
    finetune(load_config(None, run_overrides(root / "run", data, "train.lr=1e-6")), quiet=True)
    return root / "run"


@pytest.fixture(scope="module")
def report(run_dir: Path) -> Path:
    return write_report(run_dir, device="cpu")


class ImageSources(HTMLParser):
    """Collects every <img src>, and every other attribute that could load something from outside."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.external: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        for name, value in attrs:
            if tag == "img" and name == "src":
                self.images.append(value or "")
            elif name in ("src", "href") and value:
                self.external.append(value)


def test_report_writes_real_images_of_plausible_size(report: Path, run_dir: Path) -> None:
    assert report == run_dir / "report" / "report.html"
    sizes = {}
    for name in PLOTS:
        path = run_dir / "report" / name
        assert path.read_bytes().startswith(PNG_SIGNATURE), name
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            sizes[name] = image.size
            assert image.size[0] >= 300 and image.size[1] >= 100, (name, image.size)
            assert len(image.convert("L").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 10, f"{name} is blank"
    width, height = sizes["curves.png"]
    assert width > 2 * height  # three panels side by side
    width, height = sizes["confusion_matrix.png"]
    assert 0.8 < width / height < 1.5


def test_html_is_self_contained_with_every_image_embedded(report: Path, run_dir: Path) -> None:
    page = report.read_text(encoding="utf-8")
    parser = ImageSources()
    parser.feed(page)
    assert len(parser.images) == len(PLOTS)
    prefix = "data:image/png;base64,"
    embedded = []
    for source in parser.images:
        assert source.startswith(prefix), source[:40]
        embedded.append(base64.b64decode(source[len(prefix) :], validate=True))
    assert all(data.startswith(PNG_SIGNATURE) for data in embedded)
    assert sorted(embedded) == sorted((run_dir / "report" / name).read_bytes() for name in PLOTS)
    assert not parser.external and not {"script", "link", "iframe"} & parser.tags
    # The run's config and summary are in it.
    assert "<pre>" in page and "backbone: resnet18" in page
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "epochs_completed" in page and str(summary["train_images"]) in page
    assert "best.pt" in page and "top-1 accuracy" in page


def test_numbers_equal_tltool_eval_and_errors_are_the_confident_mistakes(run_dir: Path) -> None:
    run = read_run(run_dir)
    evaluation = evaluate_run(run, device_name="cpu")
    reference = run_eval(run_dir / "checkpoints" / "best.pt", device_name="cpu")
    metrics = evaluation.metrics
    assert metrics["confusion_matrix"] == reference["confusion_matrix"]
    assert metrics["acc1"] == reference["acc1"] and metrics["acc5"] == reference["acc5"]
    assert metrics["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert metrics["per_class"] == reference["per_class"]
    confusion = metrics["confusion_matrix"]
    wrong = metrics["num_images"] - sum(confusion[i][i] for i in range(len(confusion)))
    assert wrong > 0, "the fixture run should still make mistakes"
    errors = evaluation.errors
    assert len(errors) == min(wrong, 16)
    assert all(e["true"] != e["predicted"] and Path(e["path"]).is_file() for e in errors)
    confidences = [e["confidence"] for e in errors]
    assert confidences == sorted(confidences, reverse=True) and all(0 < c <= 1 for c in confidences)
    # The grid shows each of them, titled with true and predicted class.
    figure = errors_figure(errors)
    shown = [ax for ax in figure.axes if ax.images]
    assert len(shown) == len(errors)
    assert all("true:" in ax.get_title() and "pred:" in ax.get_title() for ax in shown)
    assert not [ax for ax in errors_figure([]).axes if ax.images]


def test_cli_report_and_one_line_errors(run_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report"))
    (copy / "checkpoints" / "best.pt").unlink()  # falls back to last.pt
    (copy / "summary.json").unlink()  # an interrupted run has none
    result = runner.invoke(app, ["report", str(copy), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "report written to" in result.stdout and (copy / "report" / "report.html").is_file()
    assert "last.pt" in (copy / "report" / "report.html").read_text(encoding="utf-8")

    def one_line(args: list[str]) -> str:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
        return lines[0]

    assert "does not exist" in one_line(["report", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    assert "not a tltool run" in one_line(["report", str(tmp_path / "empty")])
    assert "unknown device" in one_line(["report", str(copy), "--device", "gpu"])
    (copy / "checkpoints" / "last.pt").unlink()
    assert "neither best.pt nor last.pt" in one_line(["report", str(copy)])
    with pytest.raises(CheckpointError):
        read_run(copy)


def test_missing_matplotlib_is_a_clear_error(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ReportError, match=r"tltool\[plots\]"):
        write_report(run_dir, device="cpu")


def test_an_unwritable_report_is_one_line_and_checked_before_the_evaluation(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tltool.report as report_module

    runner = CliRunner()
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report"))

    def one_line(args: list[str]) -> str:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
        return lines[0]

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated before checking that the report can be written")

    (copy / "report").write_text("a file where the report folder goes")
    with monkeypatch.context() as patch:
        patch.setattr(report_module, "evaluate_run", no_evaluation)
        line = one_line(["report", str(copy), "--device", "cpu"])
    assert "report" in line and "is a file" in line
    (copy / "report").unlink()
    # A full disk while writing report.html (after the evaluation): one line, no temp file left.
    real_fsync = os.fsync

    def full(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".report.html"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    assert "no space left on device" in one_line(["report", str(copy), "--device", "cpu"])
    assert not (copy / "report" / "report.html").exists()
    assert not [p for p in (copy / "report").iterdir() if p.name.startswith(".")]
