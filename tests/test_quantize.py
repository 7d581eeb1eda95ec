"""`tltool export --format onnx --quantize int8`: ONNX Runtime static quantization with an accuracy check.

One tiny resnet18 run (conftest's shared `trained_checkpoint`, 3 classes of noisy colours at 32 px) is
quantized twice through the real CLI: calibrated on the run's training split (the good file), and
calibrated on one black image with `--max-drop 100` (a deliberately bad file, whose agreement and drop
are far from 100% and 0, so that recomputing them by hand proves the arithmetic, not a constant).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import shared, shared_dataset, trained_checkpoint
from tltool.checkpoint import load_checkpoint, save_atomic
from tltool.cli import app
from tltool.data import eval_transform, load_image
from tltool.export import benchmark, quantize
from tltool.export.spec import sidecar_path
from tltool.trained import open_trained

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_checkpoint("resnet18", tmp_path_factory)


def black_folder(root: Path) -> Path:
    folder = root / "black"
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (0, 0, 0)).save(folder / "a.png")
    return folder


def mislabelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A label file over the shared dataset with every third image given the next class's label.

    So the fp32 model is not 100% right on it, and agreement with fp32 differs from accuracy on the labels.
    """

    def make() -> Path:
        dataset = shared_dataset(tmp_path_factory)
        classes = sorted(p.name for p in dataset.iterdir())
        rows = ["path,label"]
        for index, path in enumerate(sorted(dataset.rglob("*.png"))):
            label = classes.index(path.parent.name)
            rows.append(f"{path},{classes[(label + 1) % len(classes)] if index % 3 == 0 else classes[label]}")
        csv = tmp_path_factory.mktemp("labels") / "mislabelled.csv"
        csv.write_text("\n".join(rows) + "\n")
        return csv

    return shared("int8-mislabelled", make)


@pytest.fixture(scope="module")
def exports(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The fp32 ONNX, the good int8 file (with --benchmark) and the bad int8 file, each through the CLI."""

    def make() -> dict[str, Any]:
        root = tmp_path_factory.mktemp("int8")
        runner = CliRunner()
        out: dict[str, Any] = {"root": root}
        fp32 = runner.invoke(app, ["export", str(checkpoint), "-o", str(root / "fp32.onnx")])
        assert fp32.exit_code == 0, fp32.output
        with pytest.MonkeyPatch.context() as patch:  # the table, not the timing precision, is under test here
            patch.setattr(benchmark, "LATENCY_CALLS", (1, 2, 0.0))
            patch.setattr(benchmark, "THROUGHPUT_CALLS", (0, 1, 0.0))
            patch.setattr(benchmark, "MIN_CALLS", 1)
            good = runner.invoke(
                app, ["export", str(checkpoint), "--quantize", "int8", "-o", str(root / "good.onnx"), "--benchmark"]
            )
        assert good.exit_code == 0, good.output
        bad_args = ["--calibration-data", str(black_folder(root)), "--max-drop", "100"]
        bad = runner.invoke(
            app,
            [
                "export",
                str(checkpoint),
                "--quantize",
                "int8",
                "-o",
                str(root / "bad.onnx"),
                "--data",
                str(mislabelled(tmp_path_factory)),
                *bad_args,
            ],
        )
        assert bad.exit_code == 0, bad.output
        out.update(fp32=root / "fp32.onnx", good=root / "good.onnx", bad=root / "bad.onnx", good_output=good.output)
        return out

    return shared("int8-exports", make)


def op_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def sidecar(path: Path) -> dict[str, Any]:
    return json.loads(sidecar_path(path).read_text())


def test_int8_file_holds_quantized_nodes_and_is_smaller(exports: dict[str, Any]) -> None:
    int8, fp32 = op_counts(exports["good"]), op_counts(exports["fp32"])
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(fp32)
    # Every convolution and the classifier's Gemm read int8 weights through a DequantizeLinear.
    assert int8["QuantizeLinear"] >= fp32["Conv"] and int8["DequantizeLinear"] >= fp32["Conv"] + fp32.get("Gemm", 0)
    weights = [t for t in onnx.load(str(exports["good"])).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert sum(int(np.prod(t.dims)) for t in weights) > 10_000_000  # resnet18's ~11M conv/fc weights in int8
    assert exports["good"].stat().st_size < exports["fp32"].stat().st_size / 3
    printed = f"{int8['QuantizeLinear']} QuantizeLinear, {int8['DequantizeLinear']} DequantizeLinear"
    assert f"quantized to int8 ({printed}; per-channel weights)" in exports["good_output"]


def test_a_graph_with_no_quantized_node_is_refused(
    cli: CliRunner, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quantize, "quantized_node_counts", lambda path: {})
    out = tmp_path / "out"
    out.mkdir()
    args = ["export", str(checkpoint), "--quantize", "int8", "-o", str(out / "m.onnx"), "--no-verify"]
    result = cli.invoke(app, [*args, "--calibration-images", "2"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: ONNX Runtime quantized no node of the resnet18 graph — nothing was written; keep the fp32 export"
    ]
    assert not list(out.iterdir())


def test_metadata_records_quantization_calibration_and_the_check(exports: dict[str, Any], checkpoint: Path) -> None:
    data = sidecar(exports["good"])
    session = onnxruntime.InferenceSession(str(exports["good"]), providers=["CPUExecutionProvider"])
    embedded = json.loads(session.get_modelmeta().custom_metadata_map["tltool"])
    assert embedded == data
    trained = open_trained(checkpoint)
    train = quantize.run_train_samples(trained)
    assert data["quantization"] == "int8" and data["format"] == "onnx"
    assert data["calibration_images"] == min(len(train), quantize.DEFAULT_CALIBRATION_IMAGES)
    assert data["calibration_source"] == "the run's training split"
    check = data["accuracy_check"]
    assert check["images"] == len(trained.samples()[0]) and check["top1_drop_points"] <= 1.0
    assert 0.0 <= check["top1_agreement"] <= 1.0


def test_calibration_uses_training_images_never_the_val_images_of_the_check(checkpoint: Path) -> None:
    trained = open_trained(checkpoint)
    paths, source = quantize.calibration_paths(trained, quantize.Int8Options(calibration_images=1000))
    val = {path for path, _ in trained.samples()[0]}
    assert source == "the run's training split" and val and not set(paths) & val
    assert sorted(paths) == sorted(path for path, _ in quantize.run_train_samples(trained))
    few, _ = quantize.calibration_paths(trained, quantize.Int8Options(calibration_images=3))
    labels = {label for path, label in quantize.run_train_samples(trained) if path in few}
    assert len(few) == 3 and labels == {0, 1, 2}  # interleaved over classes


def test_agreement_and_drop_equal_a_recomputation_from_both_models(
    exports: dict[str, Any], checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Run the fp32 and int8 files by hand over the --data images (eval_transform, not the export's code)."""
    trained = open_trained(checkpoint)
    samples, _ = trained.samples(str(mislabelled(tmp_path_factory)))
    transform = eval_transform(trained.preprocess)
    images = torch.stack([transform(load_image(path)) for path, _ in samples]).numpy()
    labels = np.array([label for _, label in samples])
    top1 = {}
    for name in ("fp32", "bad"):
        session = onnxruntime.InferenceSession(str(exports[name]), providers=["CPUExecutionProvider"])
        top1[name] = session.run(None, {"images": images})[0].argmax(axis=1)
    agreement = float((top1["fp32"] == top1["bad"]).mean())
    drop = float((top1["fp32"] == labels).mean() - (top1["bad"] == labels).mean()) * 100
    check = sidecar(exports["bad"])["accuracy_check"]
    assert check["images"] == len(samples) == 24
    assert check["top1_agreement"] == pytest.approx(agreement, abs=1e-6)
    assert check["top1_drop_points"] == pytest.approx(drop, abs=1e-3)
    # Neither number is trivial: the black-image calibration really is bad, and fp32 is not always right.
    assert agreement < 0.9 and drop > 5 and float((top1["fp32"] == labels).mean()) < 0.9
    assert sidecar(exports["bad"])["calibration_images"] == 1


def test_max_drop_below_the_measured_drop_writes_nothing_and_keeps_an_existing_file(
    cli: CliRunner, exports: dict[str, Any], checkpoint: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    drop = sidecar(exports["bad"])["accuracy_check"]["top1_drop_points"]
    target = tmp_path / "out" / "model.onnx"
    target.parent.mkdir()
    target.write_bytes(exports["good"].read_bytes())  # an earlier int8 export there
    sidecar_path(target).write_bytes(sidecar_path(exports["good"]).read_bytes())
    before = {p.name: p.read_bytes() for p in target.parent.iterdir()}
    args = ["export", str(checkpoint), "--quantize", "int8", "-o", str(target)]
    args += ["--data", str(mislabelled(tmp_path_factory)), "--calibration-data", str(black_folder(tmp_path))]
    result = cli.invoke(app, [*args, "--max-drop", str(drop / 2)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: int8 top-1 accuracy"), result.stderr
    assert f"{drop:.2f} points" in lines[0] and "--calibration-images" in lines[0] and "fp32" in lines[0]
    assert {p.name: p.read_bytes() for p in target.parent.iterdir()} == before  # untouched, no temp files left


def test_predict_runs_the_int8_file_like_any_onnx_export(
    cli: CliRunner, exports: dict[str, Any], checkpoint: Path
) -> None:
    trained = open_trained(checkpoint)
    samples = trained.samples()[0]
    result = cli.invoke(app, ["predict", str(exports["good"]), *[p for p, _ in samples], "--json", "--topk", "1"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    transform = eval_transform(trained.preprocess)
    images = torch.stack([transform(load_image(path)) for path, _ in samples]).numpy()
    session = onnxruntime.InferenceSession(str(exports["good"]), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"images": images})[0].argmax(axis=1)
    assert [row["predictions"][0]["label"] for row in rows] == [trained.class_names[i] for i in expected]


def test_uint8_input_is_calibrated_on_pixels_and_predicts(cli: CliRunner, checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "pixels.onnx"
    args = ["export", str(checkpoint), "--quantize", "int8", "-o", str(path), "--include-preprocessing"]
    result = cli.invoke(app, [*args, "--calibration-images", "6"])
    assert result.exit_code == 0, result.output
    data = sidecar(path)
    assert data["input_dtype"] == "uint8" and data["calibration_images"] == 6
    assert data["accuracy_check"]["top1_drop_points"] <= 1.0
    assert "QuantizeLinear" in op_counts(path)
    samples = open_trained(checkpoint).samples()[0]
    result = cli.invoke(app, ["predict", str(path), samples[0][0], "--json"])
    assert result.exit_code == 0, result.output


def test_benchmark_shows_int8_next_to_fp32_with_sizes(exports: dict[str, Any]) -> None:
    output = exports["good_output"]
    assert "file size" in output
    rows = {line.split()[0] + (" int8" if " int8 " in line else ""): line for line in output.splitlines()}
    assert "onnx int8" in rows and "onnx" in rows and "MB" in rows["onnx int8"] and "MB" in rows["onnx"]
    assert "onnx int8" in output and "x smaller" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-f", "torchscript", "--quantize", "int8"], "--quantize int8 applies to ONNX only"),
        (["-f", "all", "--quantize", "int8"], "--quantize int8 applies to ONNX only"),
        (["--quantize", "int8", "--calibration-images", "0"], "--calibration-images must be at least 1"),
        (["--quantize", "int4"], "unknown --quantize 'int4'"),
        (["--max-drop", "2"], "--max-drop applies to --quantize int8 only"),
        (["--quantize", "int8", "--max-drop", "-1"], "--max-drop must be >= 0"),
        (["--quantize", "int8", "--calibration-data", "EMPTY"], "holds no images"),
        (["--quantize", "int8", "--calibration-data", "missing"], "--calibration-data missing does not exist"),
        (["--quantize", "int8", "--calibration-data", "BROKEN"], "could be read to calibrate on"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    cli: CliRunner, checkpoint: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    args = [{"EMPTY": str(tmp_path / "empty"), "BROKEN": str(tmp_path / "broken")}.get(a, a) for a in args]
    out = tmp_path / "out"
    out.mkdir()
    result = cli.invoke(app, ["export", str(checkpoint), "-o", str(out / "m.onnx"), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert not list(out.iterdir())


def test_no_verify_skips_both_checks_and_records_no_accuracy(cli: CliRunner, checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "unchecked.onnx"
    args = [
        "export",
        str(checkpoint),
        "--quantize",
        "int8",
        "-o",
        str(path),
        "--no-verify",
        "--calibration-images",
        "3",
    ]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "int8 accuracy check skipped (--no-verify)" in result.output and "parity" not in result.output
    data = sidecar(path)
    assert data["accuracy_check"] is None and data["calibration_images"] == 3 and data["quantization"] == "int8"


def test_a_run_whose_training_folder_has_no_images_names_calibration_data(
    cli: CliRunner, checkpoint: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The recorded data.train is now an empty folder: one line naming --calibration-data, nothing written."""
    moved = load_checkpoint(checkpoint)
    (tmp_path / "gone").mkdir()
    moved.config["data"]["train"] = str(tmp_path / "gone")
    save_atomic(moved.to_dict(), tmp_path / "moved.pt")
    out = tmp_path / "out"
    out.mkdir()
    args = ["export", str(tmp_path / "moved.pt"), "--quantize", "int8", "-o", str(out / "m.onnx")]
    result = cli.invoke(app, [*args, "--data", str(shared_dataset(tmp_path_factory))])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read the run's training images for calibration")
    assert lines[0].endswith("give calibration images with --calibration-data DIR") and not list(out.iterdir())
