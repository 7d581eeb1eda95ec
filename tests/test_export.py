"""`tltool export`: ONNX and TorchScript files that run without tltool, match PyTorch, and carry their classes.

A tiny run is trained once per module (resnet18 and mobilenet_v3_small, random init, 32 px); every test
drives the real CLI and checks what a user would: the file, the parity lines, the exit code, the message.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tltool import export
from tltool.checkpoint import load_checkpoint
from tltool.cli import app
from tltool.config import load_config
from tltool.models import load_trained_model
from tltool.train import finetune

COLOURS = {"cyan": (30, 200, 200), "magenta": (200, 30, 200), "yellow": (210, 210, 30)}


def _make_dataset(root: Path) -> Path:
    """3 classes x 8 PNGs of 24x24, one colour per class (slightly varied per image)."""
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (24, 24), tuple(min(255, c + 4 * i) for c in colour)).save(root / name / f"{i}.png")
    return root


def _train(root: Path, dataset: Path, backbone: str) -> Path:
    overrides = [
        f"run.output_dir={root / backbone}",
        "run.device=cpu",
        f"data.train={dataset}",
        "data.image_size=32",
        "data.num_workers=0",
        "data.augment=none",
        "data.batch_size=8",
        f"model.backbone={backbone}",
        "model.weights=none",
        "train.epochs=1",
    ]
    summary = finetune(load_config(None, overrides), quiet=True)
    return Path(summary["checkpoints"]["best"] or summary["checkpoints"]["last"])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_dataset(tmp_path_factory.mktemp("export_data") / "images")


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    return _train(tmp_path_factory.mktemp("export_runs"), dataset, "resnet18")


@pytest.fixture(scope="module")
def mobilenet_checkpoint(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    return _train(tmp_path_factory.mktemp("export_runs"), dataset, "mobilenet_v3_small")


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def _torch_logits(checkpoint: Path, images: torch.Tensor) -> torch.Tensor:
    model = load_trained_model(load_checkpoint(checkpoint))
    with torch.inference_mode():
        return model(images)


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]


def test_onnx_export_beside_checkpoint_matches_pytorch(runner: CliRunner, resnet_checkpoint: Path) -> None:
    import onnx
    import onnxruntime

    result = runner.invoke(app, ["export", str(resnet_checkpoint), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    path = resnet_checkpoint.with_name("best.onnx")
    assert path.is_file() and str(path) in result.output
    assert "parity onnx batch 1:" in result.output and "100.0%" in result.output
    assert "(6 images)" in result.output  # the val split: 2 of 8 per class
    assert _no_temp_files(path.parent)

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for batch in (1, 5):  # the batch axis is dynamic: neither size is the export's example size (2)
        images = torch.randn(batch, 3, 32, 32)
        (logits,) = session.run(["logits"], {"images": images.numpy()})
        torch.testing.assert_close(
            torch.from_numpy(logits), _torch_logits(resnet_checkpoint, images), atol=1e-4, rtol=0
        )

    class_names = load_checkpoint(resnet_checkpoint)["class_names"]
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["class_names"]) == class_names == sorted(COLOURS)
    assert json.loads(props["preprocess"])["image_size"] == 32
    assert props["backbone"] == "resnet18" and props["tltool_version"]
    assert "images" in props["input"] and "logits" in props["output"]
    sidecar = json.loads(path.with_name("best.onnx.json").read_text())
    assert sidecar["class_names"] == class_names and sidecar["format"] == "onnx"
    assert (sidecar["image_size"], sidecar["input_name"], sidecar["output_name"]) == (32, "images", "logits")
    assert {"resize_size", "mean", "std", "interpolation", "tltool_version"} <= set(sidecar)


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
def test_torchscript_export_loads_with_classes(
    runner: CliRunner, tmp_path: Path, dataset: Path, resnet_checkpoint: Path
) -> None:
    path = tmp_path / "out" / "model.pt"
    args = ["export", str(resnet_checkpoint), "-f", "torchscript", "-o", str(path), "--data", str(dataset)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "parity torchscript batch 1:" in result.output and "(8 images)" in result.output
    assert "100.0%" in result.output and "FutureWarning" not in result.output

    extra_files = {"class_names.json": "", "preprocess.json": "", "tltool.json": ""}
    loaded = torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files)
    assert json.loads(extra_files["class_names.json"]) == sorted(COLOURS)
    assert json.loads(extra_files["preprocess.json"])["image_size"] == 32
    assert json.loads(extra_files["tltool.json"])["backbone"] == "resnet18"
    for batch in (1, 5):
        images = torch.randn(batch, 3, 32, 32)
        torch.testing.assert_close(loaded(images), _torch_logits(resnet_checkpoint, images), atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "out" / "model.pt.json").read_text())["format"] == "torchscript"


def _run_exported(path: Path, format: str, images: torch.Tensor) -> torch.Tensor:
    """The exported file run the way a deployment would: onnxruntime or torch.jit.load."""
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    return torch.jit.load(str(path), map_location="cpu")(images)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_mobilenet_export_has_dynamic_batch(
    runner: CliRunner, tmp_path: Path, mobilenet_checkpoint: Path, format: str
) -> None:
    path = tmp_path / f"mobilenet.{format}"
    result = runner.invoke(app, ["export", str(mobilenet_checkpoint), "-f", format, "-o", str(path)])
    assert result.exit_code == 0, result.output
    assert f"parity {format} batch 6:" in result.output and "100.0%" in result.output
    for batch in (1, 5):
        images = torch.randn(batch, 3, 32, 32)
        expected = _torch_logits(mobilenet_checkpoint, images)
        torch.testing.assert_close(_run_exported(path, format, images), expected, atol=1e-4, rtol=0)


def test_onnx_legacy_exporter_fallback_has_dynamic_batch(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, resnet_checkpoint: Path
) -> None:
    import onnxruntime

    def refuse(model: torch.nn.Module, example: torch.Tensor) -> None:
        raise RuntimeError("torch.export cannot take this model")

    monkeypatch.setattr(export, "_onnx_proto_dynamo", refuse)
    path = tmp_path / "legacy.onnx"
    result = runner.invoke(app, ["export", str(resnet_checkpoint), "-o", str(path)])
    assert result.exit_code == 0, result.output
    assert "trying the legacy one" in result.output and "parity onnx batch 6:" in result.output
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randn(5, 3, 32, 32)
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), _torch_logits(resnet_checkpoint, images), atol=1e-4, rtol=0)


def test_bad_format_is_one_line_error(runner: CliRunner, resnet_checkpoint: Path) -> None:
    result = runner.invoke(app, ["export", str(resnet_checkpoint), "--format", "tflite"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "tflite" in lines[0] and "onnx" in lines[0] and "torchscript" in lines[0]


def _shifted_runner(original: export.Exporter) -> export.Exporter:
    """The same exporter, but the exported model's outputs are off by 0.01."""

    def runner(path: Path) -> export.Runner:
        run = original.runner(path)
        return lambda images: run(images) + 0.01

    return dataclasses.replace(original, runner=runner)


@pytest.mark.parametrize("how", ["tolerance", "outputs differ"])
def test_failed_parity_writes_nothing_and_keeps_old_file(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, resnet_checkpoint: Path, how: str
) -> None:
    path = tmp_path / "model.pt"
    if how == "tolerance":
        monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)
        path.write_text("the previous export")  # must survive the failed export
    else:
        monkeypatch.setitem(export.EXPORTERS, "torchscript", _shifted_runner(export.EXPORTERS["torchscript"]))
    result = runner.invoke(app, ["export", str(resnet_checkpoint), "-f", "torchscript", "-o", str(path)])
    assert result.exit_code == 2, result.output
    assert "error: torchscript parity check failed" in result.output
    if how == "tolerance":
        assert path.read_text() == "the previous export"
    else:
        assert "max abs diff 1.0e-02" in result.output
        assert not path.exists()
    assert not (tmp_path / "model.pt.json").exists()
    assert _no_temp_files(tmp_path)


def test_no_verify_skips_parity(runner: CliRunner, tmp_path: Path, resnet_checkpoint: Path) -> None:
    path = tmp_path / "unchecked.pt"
    result = runner.invoke(app, ["export", str(resnet_checkpoint), "-f", "torchscript", "-o", str(path), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert "parity check skipped" in result.output and "parity torchscript batch" not in result.output
    assert path.is_file()


def test_no_readable_images_falls_back_to_random(runner: CliRunner, tmp_path: Path, resnet_checkpoint: Path) -> None:
    data = tmp_path / "broken"
    (data / "cyan").mkdir(parents=True)
    (data / "cyan" / "a.png").write_bytes(b"not a png")
    path = tmp_path / "model.pt"
    args = ["export", str(resnet_checkpoint), "-f", "torchscript", "-o", str(path), "--data", str(data)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "random normalized tensors" in result.output and "(8 random tensors)" in result.output
    assert path.is_file()


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
    result = runner.invoke(app, ["export", str(resnet_checkpoint), "-f", "onnx", "-o", "model.onnx"])
    assert result.exit_code == 2
    assert "onnxruntime" in result.output and "pip install 'tltool[onnx]'" in result.output


def test_output_over_the_checkpoint_is_refused(runner: CliRunner, resnet_checkpoint: Path) -> None:
    before = resnet_checkpoint.stat().st_size
    result = runner.invoke(app, ["export", str(resnet_checkpoint), "-f", "torchscript", "-o", str(resnet_checkpoint)])
    assert result.exit_code == 2 and "is the checkpoint itself" in result.output
    assert resnet_checkpoint.stat().st_size == before


def test_compare_counts_nan_shape_and_ties() -> None:
    reference = torch.tensor([[1.0, 0.0], [0.5, 0.5 + 1e-6]])
    same = export.compare(reference, reference.clone())
    assert same.passed() and same.agreement == 1.0
    # Row 2 is a tie within the tolerance: a flipped arg-max there is not a disagreement.
    flipped_tie = export.compare(reference, torch.tensor([[1.0, 0.0], [0.5 + 2e-6, 0.5]]))
    assert flipped_tie.agreement == 1.0 and flipped_tie.passed()
    assert not export.compare(reference, torch.tensor([[0.0, 1.0], [0.5, 0.5]])).passed()
    assert not export.compare(reference, torch.full_like(reference, float("nan"))).passed()
    assert not export.compare(reference, reference[:1]).passed()
