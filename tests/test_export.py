"""`tltool export`: every format runs without tltool, matches PyTorch, and carries its classes and preprocessing.

Two tiny runs are trained once per session (resnet18 and mobilenet_v3_small, random init, 32 px) and
exported once with `--format all`; `test_predict.py` uses the same files (both through conftest's
`export_all`). Every test drives the real CLI and checks what a user would: the files, the parity lines,
the exit code, the message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import EXPORT_FORMATS, ExportRun, export_all, export_uint8_all, shared_dataset, trained_checkpoint
from tltool.checkpoint import load_checkpoint, save_atomic
from tltool.cli import app
from tltool.data import Preprocess, eval_transform, load_image
from tltool.export import EXPORTERS, benchmark, parity
from tltool.export import onnx as onnx_format
from tltool.export.spec import Exporter, LoadedModel, normalize, uint8_transform
from tltool.trained import open_trained

PARITY_LINE = re.compile(
    r"parity (?P<format>\S+) batch (?P<batch>\d+)(?: at (?P<size>\d+x\d+))?: max abs diff (?P<diff>\S+) "
    r"\((?P<output>\w+)\), top-1 agreement (?P<agreement>[\d.]+)% \((?P<count>\d+) (?P<kind>[\w ]+?)s?\)"
)
pytestmark = pytest.mark.usefixtures("one_thread")


def parity_lines(output: str) -> list[dict[str, str]]:
    return [m.groupdict() for m in PARITY_LINE.finditer(output)]


def torch_logits(checkpoint: Path, images: torch.Tensor) -> torch.Tensor:
    model = open_trained(checkpoint).model
    with torch.inference_mode():
        return model(images)


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]


def dataset_pixels(dataset: Path) -> tuple[list[Path], np.ndarray]:
    """The dataset's files and their raw pixels (N x 32 x 32 x 3 uint8), read with nothing but Pillow."""
    files = sorted(dataset.rglob("*.png"))
    return files, np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


# --- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_checkpoint("resnet18", tmp_path_factory)


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


# --- --format all, the "done when" ---------------------------------------------------------------------------


def _check_all_formats(run: ExportRun) -> None:
    """All four files and sidecars, parity at batch 1 and 6 for each, files that run without tltool."""
    assert run.exit_code == 0, run.output
    lines = parity_lines(run.output)
    assert [(line["format"], line["batch"]) for line in lines] == [(f, b) for f in EXPORT_FORMATS for b in ("1", "6")]
    for line in lines:
        assert float(line["diff"]) <= 1e-4 and line["agreement"] == "100.0" and line["output"] == "logits"
        assert line["kind"] == "image"  # the run's val split: 2 of 8 real images per class
    class_names = load_checkpoint(run.checkpoint).class_names
    for format, path in run.paths.items():
        assert path.is_file() and f"wrote {path}" in run.output
        assert f"next: tltool predict {path} " in run.output
        sidecar = json.loads(path.with_name(path.name + ".json").read_text())
        assert sidecar["format"] == format and sidecar["class_names"] == class_names
        assert (sidecar["image_size"], sidecar["resize_size"], sidecar["crop"]) == (32, 32, "center")
        assert {"mean", "std", "interpolation", "resize", "tltool_version", "input", "output"} <= set(sidecar)
        assert sidecar["resize_and_crop_by"] == "caller" and sidecar.get("onnx_opset") == (
            18 if format == "onnx" else None
        )
        assert (sidecar["input_dtype"], sidecar["input_layout"], sidecar["output_name"]) == (
            "float32",
            "NCHW",
            "logits",
        )
        assert no_temp_files(path.parent)

    images = torch.randn(5, 3, 32, 32)  # batch 5: neither the parity batches nor the export's example (2)
    expected = torch_logits(run.checkpoint, images)
    for format, path in run.paths.items():
        loaded = EXPORTERS[format].load(path, torch.device("cpu"), print)
        # Random inputs give larger logits than real images: float error grows with them (rtol).
        torch.testing.assert_close(loaded.run(images), expected, atol=1e-4, rtol=1e-4)
        assert loaded.metadata is not None and loaded.metadata["class_names"] == class_names


def _check_files_by_hand(run: ExportRun) -> None:
    """Each file read the way another program would, without tltool: names, opset, metadata, weights."""
    import onnx
    import onnxruntime
    from safetensors import safe_open
    from safetensors.torch import load_file

    checkpoint = load_checkpoint(run.checkpoint)
    proto = onnx.load(str(run.paths["onnx"]))
    assert [(o.domain, o.version) for o in proto.opset_import if o.domain == ""] == [("", 18)]
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["class_names"]) == checkpoint.class_names
    assert json.loads(props["tltool"])["format"] == "onnx" and props["backbone"] == checkpoint.arch["backbone"]
    session = onnxruntime.InferenceSession(str(run.paths["onnx"]), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == [
        ("images", "tensor(float)", ["batch", 3, 32, 32])
    ]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("logits", ["batch", 3])]

    extra = {"tltool.json": "", "class_names.json": "", "preprocess.json": ""}
    torch.jit.load(str(run.paths["torchscript"]), _extra_files=extra)
    assert json.loads(extra["class_names.json"]) == checkpoint.class_names
    assert json.loads(extra["preprocess.json"]) == checkpoint.preprocess
    extra = {"tltool.json": ""}
    program = torch.export.load(str(run.paths["exported-program"]), extra_files=extra)
    assert json.loads(extra["tltool.json"])["format"] == "exported-program"
    with torch.inference_mode():
        out = program.module()(torch.randn(1, 3, 32, 32))  # batch 1 passes the program's own guards
    assert out.shape == (1, 3)

    with safe_open(str(run.paths["safetensors"]), framework="pt") as handle:
        header = handle.metadata()
    assert {"config", "class_names", "preprocess", "arch", "tltool_version", "tltool"} <= set(header)
    assert json.loads(header["arch"])["backbone"] == checkpoint.arch["backbone"]
    assert json.loads(header["config"])["model"]["backbone"] == checkpoint.arch["backbone"]
    tensors = load_file(str(run.paths["safetensors"]))
    assert set(tensors) == set(checkpoint.model)
    for name, value in checkpoint.model.items():
        assert torch.equal(tensors[name], value), name


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
def test_format_all_resnet18_writes_four_checked_files(tmp_path_factory: pytest.TempPathFactory) -> None:
    run = export_all("resnet18", tmp_path_factory)
    _check_all_formats(run)
    _check_files_by_hand(run)
    assert run.paths["onnx"] == run.checkpoint.with_name("best.onnx")  # default: beside the checkpoint


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
def test_format_all_mobilenet_v3_small_writes_four_checked_files(tmp_path_factory: pytest.TempPathFactory) -> None:
    run = export_all("mobilenet_v3_small", tmp_path_factory)
    _check_all_formats(run)
    assert run.paths["onnx"].name == "model.onnx"


# --- preprocessing inside -----------------------------------------------------------------------------------


def test_uint8_onnx_gives_the_checkpoints_predictions_on_raw_pixels(
    tmp_path_factory: pytest.TempPathFactory, dataset: Path
) -> None:
    """A consumer with only onnxruntime and Pillow: raw pixels in, the checkpoint's probabilities out."""
    import onnxruntime

    run = export_uint8_all(tmp_path_factory)
    assert run.exit_code == 0, run.output
    assert "with uint8 NHWC input, softmax, any size" in run.output
    assert "note: safetensors holds weights only" in run.output
    sizes = [(line["format"], line["batch"], line["size"], line["output"]) for line in parity_lines(run.output)]
    for format in ("onnx", "torchscript", "exported-program"):
        expected_lines = [("1", None), ("6", None), ("6", "48x40")]
        assert [(b, size) for f, b, size, _ in sizes if f == format] == expected_lines
        assert {output for f, _, _, output in sizes if f == format} == {"probabilities"}
    assert [(b, output) for f, b, _, output in sizes if f == "safetensors"][:2] == [("1", "logits"), ("6", "logits")]

    session = onnxruntime.InferenceSession(str(run.paths["onnx"]), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    assert (model_input.name, model_input.type) == ("images", "tensor(uint8)")
    assert model_input.shape == ["batch", "height", "width", 3]
    meta = json.loads(session.get_modelmeta().custom_metadata_map["tltool"])
    assert meta["includes_preprocessing"] and meta["input_layout"] == "NHWC" and meta["output_kind"] == "probabilities"
    assert "caller's resize and crop" in meta["input"] and "center-crop 32x32" in meta["resize"]

    files, pixels = dataset_pixels(dataset)
    (probabilities,) = session.run(["probabilities"], {"images": pixels})
    checkpoint = load_checkpoint(run.checkpoint)
    transform = eval_transform(Preprocess.from_dict(checkpoint.preprocess))
    expected = torch_logits(run.checkpoint, torch.stack([transform(load_image(f)) for f in files])).softmax(dim=1)
    torch.testing.assert_close(torch.from_numpy(probabilities), expected, atol=1e-5, rtol=0)
    assert (probabilities.argmax(axis=1) == expected.argmax(dim=1).numpy()).all()
    assert len(set(expected.argmax(dim=1).tolist())) > 1  # the model tells images apart: agreement means something
    (other,) = session.run(None, {"images": np.zeros((2, 45, 61, 3), dtype=np.uint8)})  # any size
    assert other.shape == (2, 3)


def test_dynamic_size_exported_program_takes_other_sizes(tmp_path_factory: pytest.TempPathFactory) -> None:
    """torch.export's own guards accept the trained size and others (no specialization on 1x1 feature maps)."""
    run = export_uint8_all(tmp_path_factory)
    module = torch.export.load(str(run.paths["exported-program"])).module()
    preprocess = Preprocess.from_dict(load_checkpoint(run.checkpoint).preprocess)
    for shape in ((1, 32, 32, 3), (3, 64, 40, 3), (2, 17, 23, 3)):
        pixels = torch.randint(0, 256, shape, dtype=torch.uint8)
        expected = torch_logits(run.checkpoint, normalize(pixels.permute(0, 3, 1, 2), preprocess)).softmax(dim=1)
        with torch.inference_mode():
            torch.testing.assert_close(module(pixels), expected, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
def test_uint8_nchw_torchscript_with_softmax(
    runner: CliRunner, tmp_path: Path, dataset: Path, resnet_checkpoint: Path
) -> None:
    path = tmp_path / "nchw.torchscript.pt"
    args = ["export", str(resnet_checkpoint), "-f", "torchscript", "-o", str(path), "--data", str(dataset)]
    result = runner.invoke(app, [*args, "--include-preprocessing", "--input-layout", "nchw", "--softmax"])
    assert result.exit_code == 0, result.output
    assert "parity torchscript batch 8: " in result.output and "(8 images)" in result.output  # --data: all 24
    sidecar = json.loads(path.with_name(path.name + ".json").read_text())
    assert (sidecar["input_dtype"], sidecar["input_layout"], sidecar["input_shape"]) == (
        "uint8",
        "NCHW",
        ["batch", 3, 32, 32],
    )
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    preprocess = Preprocess.from_dict(load_checkpoint(resnet_checkpoint).preprocess)
    expected = torch_logits(resnet_checkpoint, normalize(pixels, preprocess)).softmax(dim=1)
    torch.testing.assert_close(torch.jit.load(str(path))(pixels), expected, atol=1e-5, rtol=0)


def test_uint8_transform_then_normalize_is_the_eval_transform(dataset: Path) -> None:
    """What exports with preprocessing take, normalized, is bit for bit what training and eval feed the model."""
    preprocess = Preprocess(image_size=28, resize_size=36, interpolation="bicubic")
    image = load_image(next(dataset.rglob("*.png")))
    pixels = uint8_transform(preprocess)(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 28, 28)
    assert torch.equal(normalize(pixels[None], preprocess)[0], eval_transform(preprocess)(image))


# --- failures leave nothing behind -------------------------------------------------------------------------


def test_onnx_legacy_exporter_fallback_has_dynamic_batch(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, resnet_checkpoint: Path
) -> None:
    import onnxruntime

    def refuse(*args: Any) -> None:
        raise RuntimeError("torch.export cannot take this model")

    monkeypatch.setattr(onnx_format, "_proto_dynamo", refuse)
    path = tmp_path / "legacy.onnx"
    result = runner.invoke(app, ["export", str(resnet_checkpoint), "-o", str(path)])
    assert result.exit_code == 0, result.output
    assert "trying the legacy one" in result.output and "parity onnx batch 6:" in result.output
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, 32, 32]
    images = torch.randn(5, 3, 32, 32)
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), torch_logits(resnet_checkpoint, images), atol=1e-4, rtol=0)


def _shifted(original: Exporter) -> Exporter:
    """The same exporter, but the loaded file's outputs are off by 0.01."""

    def load(path: Path, device: torch.device, echo: Callable[[str], None]) -> LoadedModel:
        loaded = original.load(path, device, echo)
        return dataclasses.replace(loaded, run=lambda images: loaded.run(images) + 0.01)

    return dataclasses.replace(original, load=load)


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
def test_one_failing_format_fails_all_and_leaves_nothing(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, resnet_checkpoint: Path
) -> None:
    # --format all over the two cheap formats; the last one fails after the first has passed.
    monkeypatch.delitem(EXPORTERS, "onnx")
    monkeypatch.delitem(EXPORTERS, "exported-program")
    monkeypatch.setitem(EXPORTERS, "safetensors", _shifted(EXPORTERS["safetensors"]))
    result = runner.invoke(app, ["export", str(resnet_checkpoint), "-f", "all", "-o", str(tmp_path / "m")])
    assert result.exit_code == 2, result.output
    assert "parity torchscript batch 6:" in result.output and "max abs diff 1.0e-02" in result.output
    assert "error: safetensors parity check failed" in result.stderr
    # Not even the torchscript file that passed, nor a temp file (tltool_cache: conftest's TLTOOL_CACHE_DIR, where
    # the parity images' header verdicts are remembered).
    assert [p.name for p in tmp_path.iterdir() if p.name != "tltool_cache"] == []


def test_failed_parity_keeps_the_previous_file(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, resnet_checkpoint: Path
) -> None:
    monkeypatch.setattr(parity, "PARITY_TOLERANCE", -1.0)
    path = tmp_path / "model.safetensors"
    path.write_text("the previous export")
    result = runner.invoke(app, ["export", str(resnet_checkpoint), "-f", "safetensors", "-o", str(path), "--force"])
    assert result.exit_code == 2 and "error: safetensors parity check failed" in result.stderr
    assert path.read_text() == "the previous export"
    assert not (tmp_path / "model.safetensors.json").exists() and no_temp_files(tmp_path)


def test_non_finite_weights_are_refused(runner: CliRunner, tmp_path: Path, resnet_checkpoint: Path) -> None:
    checkpoint = load_checkpoint(resnet_checkpoint)
    checkpoint.model["head.1.weight"][0, 0] = float("nan")
    broken = tmp_path / "nan.pt"
    save_atomic(checkpoint.to_dict(), broken)
    result = runner.invoke(app, ["export", str(broken), "-f", "safetensors", "--no-verify"])
    assert result.exit_code == 2
    assert "non-finite" in result.stderr and "head.1.weight" in result.stderr
    assert not (tmp_path / "nan.safetensors").exists() and no_temp_files(tmp_path)


def test_no_verify_skips_parity(runner: CliRunner, tmp_path: Path, resnet_checkpoint: Path) -> None:
    path = tmp_path / "unchecked.safetensors"
    result = runner.invoke(app, ["export", str(resnet_checkpoint), "-f", "safetensors", "-o", str(path), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert "parity check of safetensors skipped" in result.output and "parity safetensors batch" not in result.output
    assert path.is_file() and f"next: tltool predict {path}" in result.output


def test_no_readable_images_falls_back_to_random_pixels(
    runner: CliRunner, tmp_path: Path, resnet_checkpoint: Path
) -> None:
    data = tmp_path / "broken"
    (data / "class_0").mkdir(parents=True)
    (data / "class_0" / "a.png").write_bytes(b"not a png")
    path = tmp_path / "model.safetensors"
    args = ["export", str(resnet_checkpoint), "-f", "safetensors", "-o", str(path), "--data", str(data)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "using random pixels" in result.output and "(8 random images)" in result.output
    assert path.is_file()


# --- options and user errors -------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
def test_benchmark_prints_a_table_next_to_eager(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, resnet_checkpoint: Path
) -> None:
    monkeypatch.setattr(benchmark, "LATENCY_CALLS", (1, 2, 0.0))  # the table, not the precision, is under test
    monkeypatch.setattr(benchmark, "THROUGHPUT_CALLS", (0, 1, 0.0))
    monkeypatch.setattr(benchmark, "MIN_CALLS", 1)
    path = tmp_path / "bench.torchscript.pt"
    args = ["export", str(resnet_checkpoint), "-f", "torchscript", "-o", str(path), "--no-verify", "--benchmark"]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "benchmark on cpu" in result.output and "batch 1 ms" in result.output and "batch 32 img/s" in result.output
    for name in ("eager PyTorch", "torchscript"):
        row = re.search(rf"^{name}\s+(\d+\.\d+)\s+([\d,]+)\s+(\d+\.\d+)x / (\d+\.\d+)x", result.output, re.MULTILINE)
        assert row is not None, result.output
        assert float(row.group(1)) > 0 and int(row.group(2).replace(",", "")) > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "tflite"], "unknown export format 'tflite'"),
        (["--input-layout", "nhwc"], "--input-layout applies to uint8 inputs only"),
        (["--include-preprocessing", "--input-layout", "hwc"], "unknown --input-layout 'hwc'"),
        (["-f", "safetensors", "--softmax"], "safetensors holds weights only"),
        (["-f", "safetensors", "--benchmark", "--device", "gpu"], "--device 'gpu' is not a device"),
    ],
)
def test_bad_options_are_one_line_errors(
    runner: CliRunner, resnet_checkpoint: Path, args: list[str], message: str
) -> None:
    result = runner.invoke(app, ["export", str(resnet_checkpoint), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr


def test_not_a_checkpoint_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    fake = tmp_path / "x.pt"
    fake.write_text("hello")
    result = runner.invoke(app, ["export", str(fake)])
    assert result.exit_code == 2
    assert "not a valid tltool checkpoint" in result.output
    assert not (tmp_path / "x.onnx").exists()


def test_missing_onnx_packages_say_how_to_install(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, resnet_checkpoint: Path
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    result = runner.invoke(app, ["export", str(resnet_checkpoint), "-f", "all", "-o", "model"])
    assert result.exit_code == 2
    assert "onnxruntime" in result.output and "pip install 'tltool[onnx]'" in result.output


def test_output_over_the_checkpoint_is_refused(runner: CliRunner, resnet_checkpoint: Path) -> None:
    before = resnet_checkpoint.stat().st_size
    result = runner.invoke(app, ["export", str(resnet_checkpoint), "-f", "torchscript", "-o", str(resnet_checkpoint)])
    assert result.exit_code == 2 and "is the checkpoint itself" in result.output
    assert resnet_checkpoint.stat().st_size == before


def test_export_over_the_runs_last_pt_or_any_other_file_needs_force(
    runner: CliRunner, tmp_path: Path, resnet_checkpoint: Path
) -> None:
    last = resnet_checkpoint.with_name("last.pt")
    before = last.read_bytes()
    result = runner.invoke(app, ["export", str(resnet_checkpoint), "-f", "torchscript", "-o", str(last)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {last} exists and is not a torchscript file of tltool export — "
        "give another --output, or add --force to replace it"
    ]
    assert last.read_bytes() == before and no_temp_files(last.parent)
    # A copy of it, replaced on purpose; then the export it became may be replaced by one of its kind only.
    copy = tmp_path / "last.pt"
    copy.write_bytes(before)
    args = ["export", str(resnet_checkpoint), "-f", "safetensors", "-o", str(copy), "--no-verify"]
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    assert runner.invoke(app, args).exit_code == 0  # a safetensors export over a safetensors export
    other = runner.invoke(app, ["export", str(resnet_checkpoint), "-f", "torchscript", "-o", str(copy)])
    assert other.exit_code == 2 and "is not a torchscript file of tltool export" in other.stderr


def test_check_overwrites_tells_exports_from_other_files(tmp_path: Path) -> None:
    from tltool.errors import ExportError
    from tltool.export.run import check_overwrites

    check_overwrites({"onnx": tmp_path / "new.onnx"}, force=False)  # nothing there: fine
    (tmp_path / "mine.onnx").write_bytes(b"\x08\x07 an onnx file of someone else")
    with pytest.raises(ExportError, match="is not a onnx file of tltool export"):
        check_overwrites({"onnx": tmp_path / "mine.onnx"}, force=False)
    check_overwrites({"onnx": tmp_path / "mine.onnx"}, force=True)
    (tmp_path / "x.onnx.json").write_text("my notes")  # a sidecar name the user had taken
    (tmp_path / "x.onnx").write_bytes(b"\x08\x07" + json.dumps({"tltool_version": "0"}).encode())
    with pytest.raises(ExportError, match="its sidecar .*x.onnx.json exists"):
        check_overwrites({"onnx": tmp_path / "x.onnx"}, force=False)
    os.mkfifo(tmp_path / "pipe.onnx")
    with pytest.raises(ExportError, match=r"is a FIFO \(named pipe\), not a file"):
        check_overwrites({"onnx": tmp_path / "pipe.onnx"}, force=True)


def test_compare_counts_nan_shape_and_ties() -> None:
    reference = torch.tensor([[1.0, 0.0], [0.5, 0.5 + 1e-6]])
    same = parity.compare(reference, reference.clone())
    assert same.passed() and same.agreement == 1.0
    # Row 2 is a tie within the tolerance: a flipped arg-max there is not a disagreement.
    flipped_tie = parity.compare(reference, torch.tensor([[1.0, 0.0], [0.5 + 2e-6, 0.5]]))
    assert flipped_tie.agreement == 1.0 and flipped_tie.passed()
    assert not parity.compare(reference, torch.tensor([[0.0, 1.0], [0.5, 0.5]])).passed()
    assert not parity.compare(reference, torch.full_like(reference, float("nan"))).passed()
    assert not parity.compare(reference, reference[:1]).passed()


def test_parity_limit_is_absolute_up_to_one_and_relative_above() -> None:
    small = torch.tensor([[0.5, -0.25, 0.1]])
    assert parity.compare(small, small + 5e-5).passed()
    assert not parity.compare(small, small + 5e-4).passed()  # absolute 1e-4 where outputs are small
    # A diverged model's logits in the thousands: an fp32 ulp at 3,000 is 2.4e-4, so an absolute 1e-4 would
    # fail two correct implementations; the limit is 1e-4 of the largest |logit| there.
    large = torch.tensor([[3000.0, -1200.0, 10.0], [-2500.0, 2900.0, 0.0]])
    result = parity.compare(large, large + 2.4e-4)
    assert result.passed() and result.limit == pytest.approx(0.3)
    assert not parity.compare(large, large + 0.5).passed()
    assert not parity.compare(large, large.flip(1)).passed()  # disagreeing at any scale
    infinite = torch.tensor([[float("inf"), 0.0]])
    assert parity.compare(infinite, torch.tensor([[1e30, 0.0]])).limit == parity.PARITY_TOLERANCE
