"""`tltool predict`: the checkpoint and each of its exports give the same answers, and bad inputs are handled.

The runs and `--format all` exports are the ones `test_export.py` checks (conftest's `export_all`, made
once per session); the images are the training dataset itself, 32x32 PNGs with a colour per class.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import ExportRun, export_all, export_uint8_all, shared_dataset, trained_checkpoint
from tltool.checkpoint import load_checkpoint, save_atomic
from tltool.cli import app
from tltool.export.spec import ExportSpec
from tltool.trained import open_trained

ROW = re.compile(r"^(?P<file>\S+)((?:\s+class_\d \(\d+\.\d%\))+)$")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_checkpoint("resnet18", tmp_path_factory)


def predict_json(cli: CliRunner, model: Path, *inputs: str | Path, topk: int = 3) -> list[dict[str, Any]]:
    """`tltool predict MODEL INPUT... --json`, parsed (stdout holds the JSON alone)."""
    result = cli.invoke(app, ["predict", str(model), *map(str, inputs), "--json", "--topk", str(topk)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def error_line(result: Any) -> str:
    """The last stderr line of a user error (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    return last


def _assert_same_answers(cli: CliRunner, run: ExportRun, dataset: Path, models: list[Path]) -> None:
    """Every model gives the checkpoint's top-1 on every image, with probabilities within 1e-4."""
    reference = predict_json(cli, run.checkpoint, dataset)
    files = [entry["file"] for entry in reference]
    assert len(files) == 24 and files == sorted(files)
    top1 = [entry["predictions"][0]["label"] for entry in reference]
    assert len(set(top1)) > 1  # the model tells images apart, so agreeing means something
    for model in models:
        answers = predict_json(cli, model, dataset)
        assert [entry["file"] for entry in answers] == files, model
        assert [entry["predictions"][0]["label"] for entry in answers] == top1, model
        for got, expected in zip(answers, reference, strict=True):
            probabilities = [p["probability"] for p in got["predictions"]]
            assert probabilities == pytest.approx([p["probability"] for p in expected["predictions"]], abs=1e-4)


@pytest.mark.parametrize("backbone", ["resnet18", pytest.param("mobilenet_v3_small", marks=pytest.mark.slow)])
def test_checkpoint_and_every_export_agree(
    cli: CliRunner, tmp_path_factory: pytest.TempPathFactory, dataset: Path, backbone: str
) -> None:
    run = export_all(backbone, tmp_path_factory)
    assert run.exit_code == 0, run.output
    _assert_same_answers(cli, run, dataset, list(run.paths.values()))


def test_exports_with_preprocessing_inside_agree(
    cli: CliRunner, tmp_path_factory: pytest.TempPathFactory, dataset: Path, checkpoint: Path, tmp_path: Path
) -> None:
    """predict reads from the metadata that these files take uint8 pixels (NHWC, or NCHW) and give probabilities."""
    run = export_uint8_all(tmp_path_factory)
    assert run.exit_code == 0, run.output
    nchw = tmp_path / "nchw.torchscript.pt"
    args = ["export", str(checkpoint), "-f", "torchscript", "-o", str(nchw), "--no-verify"]
    result = cli.invoke(app, [*args, "--include-preprocessing", "--input-layout", "nchw"])
    assert result.exit_code == 0, result.output
    _assert_same_answers(cli, run, dataset, [*run.paths.values(), nchw])


def test_table_shows_top_k_labels_with_probabilities(cli: CliRunner, checkpoint: Path, dataset: Path) -> None:
    first, second = sorted(dataset.rglob("*.png"))[:2]
    result = cli.invoke(app, ["predict", str(checkpoint), str(first), str(second), "--topk", "5"])
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.strip().splitlines()
    assert header.split() == ["file", "top-1", "top-2", "top-3"]  # --topk 5 of 3 classes: all 3
    assert [ROW.match(row)["file"] for row in rows] == [str(first), str(second)]
    percentages = [float(p) for p in re.findall(r"\((\d+\.\d)%\)", rows[0])]
    assert percentages == sorted(percentages, reverse=True) and sum(percentages) == pytest.approx(100, abs=0.2)
    assert f"2 image(s) predicted by {checkpoint} (checkpoint on cpu)" in result.stderr


def _truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[:200])


def test_unreadable_inputs_are_reported_and_the_rest_predicted(
    cli: CliRunner, checkpoint: Path, dataset: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    (folder / "nested" / "deeper").mkdir(parents=True)
    (folder / ".cache").mkdir()
    good = sorted(dataset.rglob("*.png"))
    shutil.copy(good[0], folder / "a.png")
    shutil.copy(good[10], folder / "nested" / "deeper" / "b.PNG")
    shutil.copy(good[20], folder / ".hidden.png")  # hidden: skipped
    shutil.copy(good[20], folder / ".cache" / "c.png")  # in a hidden folder: skipped
    (folder / "notes.txt").write_text("not an image extension: skipped")
    (folder / "bad.jpg").write_text("a text file with an image name")
    (folder / "empty.png").write_bytes(b"")
    _truncated_jpeg(folder / "cut.jpg")
    csv_path = tmp_path / "out" / "predictions.csv"
    args = ["predict", str(checkpoint), str(folder), "--json", "--csv", str(csv_path), "--topk", "2"]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output

    entries = json.loads(result.stdout)
    assert [Path(e["file"]).relative_to(folder).as_posix() for e in entries] == [
        "a.png",
        "bad.jpg",
        "cut.jpg",
        "empty.png",
        "nested/deeper/b.PNG",
    ]
    errors = {Path(e["file"]).name: e["error"] for e in entries if "error" in e}
    assert errors["bad.jpg"] == "not an image" and errors["empty.png"] == "empty file"
    assert "cut.jpg" in errors
    for name in errors:
        assert f"warning: cannot read {folder / name}: " in result.stderr
    predicted = [e for e in entries if "predictions" in e]
    assert len(predicted) == 2 and all(len(e["predictions"]) == 2 for e in predicted)
    assert set(predicted[0]["predictions"][0]) == {"label", "index", "probability"}
    assert "2 image(s) predicted" in result.stderr and "3 unreadable" in result.stderr

    rows = list(csv.DictReader(csv_path.open()))
    assert [(Path(r["file"]).name, r["rank"]) for r in rows] == [
        ("a.png", "1"),
        ("a.png", "2"),
        ("b.PNG", "1"),
        ("b.PNG", "2"),
    ]
    assert float(rows[0]["probability"]) == pytest.approx(predicted[0]["predictions"][0]["probability"], abs=1e-6)


def test_globs_expand_recursively_and_files_count_once(cli: CliRunner, checkpoint: Path, dataset: Path) -> None:
    first = sorted(dataset.rglob("*.png"))[0]
    entries = predict_json(cli, checkpoint, dataset / "**" / "00[01].png", first)
    names = [Path(e["file"]).relative_to(dataset).as_posix() for e in entries]
    assert names == [f"class_{c}/00{i}.png" for c in range(3) for i in range(2)]  # `first` is among them: once


def test_an_input_that_matches_nothing_is_a_one_line_error(
    cli: CliRunner, checkpoint: Path, dataset: Path, tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    for item, message in (
        ("nothing*.png", "matches no file"),
        ("missing.jpg", "matches no file"),
        (str(tmp_path / "empty"), "is an empty folder or has no images"),
    ):
        result = cli.invoke(app, ["predict", str(checkpoint), str(dataset), item])
        line = error_line(result)
        assert item in line and message in line and len(result.stderr.strip().splitlines()) == 1


def test_all_inputs_unreadable_exits_2_after_reporting_each(cli: CliRunner, checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_text("nope")
    result = cli.invoke(app, ["predict", str(checkpoint), str(tmp_path / "a.png"), str(tmp_path / "b.jpg")])
    assert "none of the 2 input image(s) could be read" in error_line(result)
    assert "cannot read" in result.stderr and result.stderr.count("warning: cannot read") == 2


class Payload:
    """A pickle that would run a shell command when loaded unsafely."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_model_that_is_none_of_the_kinds_is_a_one_line_error(
    cli: CliRunner, checkpoint: Path, dataset: Path, tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with zipfile.ZipFile(tmp_path / "archive.pt", "w") as archive:
        archive.writestr("archive/readme.txt", "a zip, but not a PyTorch one")
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07garbage")
    torch.save({"just": torch.zeros(1)}, tmp_path / "plain.pt")
    marker = tmp_path / "pwned"
    torch.save({"model": Payload(str(marker))}, tmp_path / "evil.pt")
    for name, message in (
        ("missing.pt", "does not exist"),
        ("notes.txt", "is not a valid tltool checkpoint"),
        ("archive.pt", "neither a tltool checkpoint nor an exported model"),
        ("broken.onnx", "is not a valid ONNX model"),
        ("plain.pt", "is not a valid tltool checkpoint"),
        ("evil.pt", "refused"),
    ):
        result = cli.invoke(app, ["predict", str(tmp_path / name), str(dataset)])
        assert message in error_line(result), name
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
def test_an_export_without_embedded_metadata_uses_its_sidecar(
    cli: CliRunner, tmp_path_factory: pytest.TempPathFactory, dataset: Path, tmp_path: Path
) -> None:
    run = export_all("resnet18", tmp_path_factory)
    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(open_trained(run.checkpoint).model), str(plain))
    result = cli.invoke(app, ["predict", str(plain), str(dataset)])
    assert "carries no tltool metadata and has no plain.pt.json beside it" in error_line(result)
    sidecar = run.paths["torchscript"].with_name(run.paths["torchscript"].name + ".json")
    shutil.copy(sidecar, tmp_path / "plain.pt.json")
    expected = [e["predictions"][0]["label"] for e in predict_json(cli, run.checkpoint, dataset)]
    assert [e["predictions"][0]["label"] for e in predict_json(cli, plain, dataset)] == expected


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
def test_a_class_list_that_does_not_fit_the_model_is_a_one_line_error(
    cli: CliRunner, checkpoint: Path, dataset: Path, tmp_path: Path
) -> None:
    """The class names come from metadata that can be edited or mixed up; the model's outputs decide."""
    trained = open_trained(checkpoint)
    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(trained.model), str(plain))
    spec = ExportSpec("torchscript", ("cat", "dog"), trained.preprocess, trained.backbone)
    (tmp_path / "plain.pt.json").write_text(json.dumps(spec.metadata()))
    result = cli.invoke(app, ["predict", str(plain), str(dataset)])
    assert f"{plain} gives 3 scores per image but its metadata lists 2 class names" in error_line(result)
    edited = load_checkpoint(checkpoint)
    edited.class_names = [*edited.class_names, "extra"]
    save_atomic(edited.to_dict(), tmp_path / "edited.pt")
    result = cli.invoke(app, ["predict", str(tmp_path / "edited.pt"), str(dataset), "--topk", "4"])
    assert "gives 3 scores per image but the checkpoint lists 4 class names" in error_line(result)


def test_a_fifo_input_is_named_and_never_opened(
    cli: CliRunner, checkpoint: Path, dataset: Path, tmp_path: Path
) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    result = cli.invoke(app, ["predict", str(checkpoint), str(tmp_path / "pipe.jpg")])
    assert "pipe.jpg is a FIFO (named pipe), not a file" in error_line(result)
    shutil.copy(next(dataset.rglob("*.png")), tmp_path / "photo.png")
    entries = predict_json(cli, checkpoint, tmp_path)  # the folder's FIFO is reported, not waited on
    assert [Path(e["file"]).name for e in entries] == ["photo.png", "pipe.jpg"]
    assert entries[1]["error"] == "is a FIFO (named pipe), not a file" and "predictions" in entries[0]


def test_bad_device_and_sizes_are_one_line_errors(cli: CliRunner, checkpoint: Path, dataset: Path) -> None:
    result = cli.invoke(app, ["predict", str(checkpoint), str(dataset), "--device", "gpu"])
    assert "--device 'gpu' is not a device" in error_line(result)
    if not torch.cuda.is_available():
        result = cli.invoke(app, ["predict", str(checkpoint), str(dataset), "--device", "cuda"])
        assert "--device cuda but no CUDA device is available" in error_line(result)
    result = cli.invoke(app, ["predict", str(checkpoint), str(dataset), "--topk", "0"])
    assert result.exit_code == 2  # Typer's own range check


def test_batch_size_does_not_change_the_answers(cli: CliRunner, checkpoint: Path, dataset: Path) -> None:
    def answers(batch_size: int) -> list[Any]:
        args = ["predict", str(checkpoint), str(dataset), "--json", "--batch-size", str(batch_size)]
        result = cli.invoke(app, args)
        assert result.exit_code == 0, result.output
        return [e["predictions"] for e in json.loads(result.stdout)]

    one, many = answers(1), answers(7)
    for a, b in zip(one, many, strict=True):
        assert [p["label"] for p in a] == [p["label"] for p in b]
        assert [p["probability"] for p in a] == pytest.approx([p["probability"] for p in b], abs=1e-5)


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
def test_predict_on_cuda_matches_cpu(cli: CliRunner, tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> None:
    run = export_all("resnet18", tmp_path_factory)
    for model in (run.checkpoint, run.paths["torchscript"], run.paths["exported-program"], run.paths["safetensors"]):
        on_cpu = predict_json(cli, model, dataset)
        result = cli.invoke(app, ["predict", str(model), str(dataset), "--json", "--device", "cuda"])
        assert result.exit_code == 0, result.output
        on_cuda = json.loads(result.stdout)
        assert [e["predictions"][0]["label"] for e in on_cuda] == [e["predictions"][0]["label"] for e in on_cpu]
