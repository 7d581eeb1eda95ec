"""`tltool export --format onnx --quantize int8`: ONNX Runtime static quantization, judged by accuracy.

The fp32 ONNX file that `tltool export` makes (onnx.py) is written to a temp name and parity-checked as
usual; ONNX Runtime then quantizes it (`quant_pre_process`, then `quantize_static`: QDQ format, uint8
activations, int8 weights per output channel, MinMax ranges) with a `CalibrationDataReader` over N of the
run's training images (never the val images the check uses), fed exactly as the file takes them (the
eval transform's resize and crop, then `ExportSpec.model_input`: normalized floats, or uint8 pixels with
`--include-preprocessing`).

An int8 file cannot pass the fp32 parity check (its outputs differ by design), so it gets an accuracy
check instead, on real labelled images (the run's val split, or `--data`): top-1 agreement of the int8
file with the fp32 graph in PyTorch (the module every format exports), and top-1 accuracy of each
against the labels. When the int8 accuracy is more than `--max-drop` points below fp32's, nothing is
written. The numbers go into the file's metadata and sidecar (`ExportSpec.quantization`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tltool.data import Sample, image_files, load_image
from tltool.errors import ExportError, TltoolError
from tltool.export.parity import interleave_classes
from tltool.export.spec import Echo, ExportJob, ExportSpec, Runner, first_line, sidecar_path, uint8_transform
from tltool.files import size_text, temp_path
from tltool.trained import TrainedModel

QUANTIZE_CHOICES = ("int8",)
DEFAULT_CALIBRATION_IMAGES = 200
DEFAULT_MAX_DROP = 1.0
# Images per calibration / check batch.
BATCH = 16
# Graph node types that hold int8 arithmetic (QDQ pairs, or fused QLinear / integer ops).
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")


@dataclass(frozen=True)
class Int8Options:
    """What `--quantize int8` was given: calibration size and source, the accuracy threshold."""

    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    max_drop: float = DEFAULT_MAX_DROP
    calibration_data: str | None = None


@dataclass(frozen=True)
class AccuracyCheck:
    """The int8 file against the fp32 graph on `images` labelled images."""

    images: int
    agreement: float
    fp32_accuracy: float
    int8_accuracy: float
    source: str

    @property
    def drop(self) -> float:
        """Top-1 accuracy lost, in percentage points (negative: int8 scored higher)."""
        return (self.fp32_accuracy - self.int8_accuracy) * 100


def int8_options(
    quantize: str | None, calibration_images: int | None, max_drop: float | None, calibration_data: str | None
) -> Int8Options:
    """The command line's int8 options (None: not given); ExportError when given without --quantize."""
    given = [
        flag
        for flag, value in (
            ("--calibration-images", calibration_images),
            ("--max-drop", max_drop),
            ("--calibration-data", calibration_data),
        )
        if value is not None
    ]
    if quantize is None and given:
        raise ExportError(f"{', '.join(given)} applies to --quantize int8 only", "add --quantize int8")
    return Int8Options(
        DEFAULT_CALIBRATION_IMAGES if calibration_images is None else calibration_images,
        DEFAULT_MAX_DROP if max_drop is None else max_drop,
        calibration_data,
    )


def check_options(formats: Sequence[str], quantize: str, options: Int8Options) -> None:
    """ExportError for `--quantize` values and combinations that cannot work, before any work."""
    if quantize not in QUANTIZE_CHOICES:
        raise ExportError(f"unknown --quantize {quantize!r}", f"use one of: {', '.join(QUANTIZE_CHOICES)}")
    if list(formats) != ["onnx"]:
        raise ExportError(
            f"--quantize {quantize} applies to ONNX only, not --format {','.join(formats)}", "use --format onnx"
        )
    if options.calibration_images < 1:
        raise ExportError(
            f"--calibration-images must be at least 1, not {options.calibration_images}",
            f"give a count of training images, e.g. {DEFAULT_CALIBRATION_IMAGES}",
        )
    if not options.max_drop >= 0:  # (NaN fails too)
        raise ExportError(f"--max-drop must be >= 0 points, not {options.max_drop}", "e.g. --max-drop 1.0")


def default_output(checkpoint_path: Path) -> Path:
    """runs/x/checkpoints/best.pt -> best.int8.onnx (beside the fp32 best.onnx, never over it)."""
    return checkpoint_path.with_name(checkpoint_path.stem + ".int8.onnx")


# --- calibration images ---------------------------------------------------------------------------------


def run_train_samples(trained: TrainedModel) -> list[Sample]:
    """The run's training split, recomputed with its val split (`TrainedModel.run_split`)."""
    return trained.run_split("give calibration images with --calibration-data DIR")[0]


def calibration_paths(trained: TrainedModel, options: Int8Options) -> tuple[list[str], str]:
    """Up to N image paths to calibrate on, and where they come from.

    `--calibration-data DIR`: the images under DIR (recursively, sorted). Otherwise the run's training split
    (its val images are the check's), interleaved over classes so that a small N still covers them.
    """
    if options.calibration_data is not None:
        folder = Path(options.calibration_data)
        problem = None if folder.is_dir() else ("is not a folder" if folder.exists() else "does not exist")
        if problem is not None:
            raise ExportError(
                f"--calibration-data {folder} {problem}", "give a folder of images (sub-folders are searched)"
            )
        paths = sorted(str(p) for p in image_files(folder))
        if not paths:
            raise ExportError(
                f"--calibration-data {folder} holds no images",
                "give a folder of .jpg/.png images (searched recursively)",
            )
        return paths[: options.calibration_images], str(folder)
    try:
        samples = run_train_samples(trained)
    except TltoolError as exc:
        raise ExportError(
            f"cannot read the run's training images for calibration ({exc.what})",
            "give calibration images with --calibration-data DIR",
        ) from None
    if not samples:
        raise ExportError(
            "the run's training split has no images to calibrate on",
            "give calibration images with --calibration-data DIR",
        )
    return [path for path, _ in interleave_classes(samples)][: options.calibration_images], "the run's training split"


def _load_batches(paths: Sequence[str], spec: ExportSpec, labels: Sequence[int] | None = None) -> Iterator[Any]:
    """(uint8 N x 3 x H x W, labels) batches of the images that decode, resized and cropped as eval does."""
    transform = uint8_transform(spec.preprocess)
    images: list[torch.Tensor] = []
    kept: list[int] = []
    for index, path in enumerate(paths):
        try:
            images.append(transform(load_image(path)))
        except (OSError, SyntaxError, ValueError):
            continue
        kept.append(labels[index] if labels is not None else 0)
        if len(images) == BATCH:
            yield torch.stack(images), torch.tensor(kept)
            images, kept = [], []
    if images:
        yield torch.stack(images), torch.tensor(kept)


def calibration_reader(paths: Sequence[str], spec: ExportSpec, input_name: str) -> Any:
    """An onnxruntime `CalibrationDataReader` over `paths`, each batch as the file's input takes it."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = _load_batches(paths, spec)
            self.count = 0
            self.asked = False

        def get_next(self) -> dict[str, Any] | None:
            self.asked = True
            batch = next(self.batches, None)
            if batch is None:
                return None
            self.count += len(batch[0])
            return {input_name: spec.model_input(batch[0]).numpy()}

    return Reader()


# --- quantizing ----------------------------------------------------------------------------------------


def quantize_file(fp32: Path, output: Path, reader: Any) -> None:
    """ONNX Runtime's static quantization of `fp32` into `output` (QDQ, U8 activations, S8 per-channel weights).

    `quant_pre_process` first (shape inference and graph optimization, folding batch norms into the
    convolutions), as ONNX Runtime's quantization guide asks.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = temp_path(output, ".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(output),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    except TltoolError:
        raise
    except Exception as exc:  # onnxruntime's tools raise many types
        raise ExportError(
            f"ONNX Runtime could not quantize the model: {first_line(exc)}", "nothing was written; keep the fp32 export"
        ) from None
    finally:
        prepared.unlink(missing_ok=True)
        prepared.with_name(prepared.name + ".data").unlink(missing_ok=True)


def quantized_node_counts(path: Path) -> dict[str, int]:
    """How many nodes of each QUANTIZED_OPS type the ONNX file at `path` holds (those present, in that order)."""
    import onnx

    types = [node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node]
    return {op: types.count(op) for op in QUANTIZED_OPS if op in types}


# --- the accuracy check --------------------------------------------------------------------------------


def check_samples(trained: TrainedModel, data: str | None) -> tuple[list[Sample], str]:
    """The labelled images of the accuracy check: `--data`, else the run's val split (as `tltool eval`)."""
    try:
        samples, source = trained.samples(data)
    except TltoolError as exc:
        if data:
            raise
        raise ExportError(
            f"the int8 accuracy check needs labelled images, and the run's val split is not readable ({exc.what})",
            "give them with --data DIR (class sub-folders or a label file)",
        ) from None
    return samples, source


def accuracy_check(
    reference: torch.nn.Module, run_int8: Runner, spec: ExportSpec, samples: Sequence[Sample], source: str
) -> AccuracyCheck:
    """Top-1 agreement of `run_int8` with `reference` (the fp32 graph) and both top-1 accuracies on `samples`."""
    agree = fp32_hits = int8_hits = total = 0
    paths, labels = [s[0] for s in samples], [s[1] for s in samples]
    for images, batch_labels in _load_batches(paths, spec, labels):
        inputs = spec.model_input(images)
        with torch.inference_mode():
            fp32 = reference(inputs).argmax(dim=1)
        int8 = run_int8(inputs).argmax(dim=1)
        agree += int((fp32 == int8).sum())
        fp32_hits += int((fp32 == batch_labels).sum())
        int8_hits += int((int8 == batch_labels).sum())
        total += len(images)
    if total == 0:
        raise ExportError(f"no readable images in {source} for the int8 accuracy check", "give them with --data DIR")
    return AccuracyCheck(total, agree / total, fp32_hits / total, int8_hits / total, source)


def quantization_metadata(options: Int8Options, calibrated: int, source: str, check: AccuracyCheck | None) -> dict:
    """What the file records of its quantization (`ExportSpec.quantization`)."""
    out: dict[str, Any] = {
        "quantization": "int8",
        "quantization_method": "onnxruntime quantize_static, QDQ, uint8 activations, int8 per-channel weights",
        "calibration_images": calibrated,
        "calibration_source": source,
        "max_drop_points": options.max_drop,
        "accuracy_check": None,
    }
    if check is not None:
        out["accuracy_check"] = {
            "images": check.images,
            "source": check.source,
            "top1_agreement": round(check.agreement, 6),
            "fp32_top1": round(check.fp32_accuracy, 6),
            "int8_top1": round(check.int8_accuracy, 6),
            "top1_drop_points": round(check.drop, 4),
        }
    return out


# --- the command's int8 path ---------------------------------------------------------------------------


def write_int8(
    job: ExportJob,
    spec: ExportSpec,
    path: Path,
    trained: TrainedModel,
    data: str | None,
    options: Int8Options,
    verify: bool,
    echo: Echo,
    bench_device: torch.device | None = None,
) -> AccuracyCheck | None:
    """fp32 ONNX (parity-checked) -> calibrated int8 -> accuracy check -> metadata -> its final name.

    All in temp files beside `path` until the check has passed: a failure leaves nothing new and any file
    that was at `path` untouched. Returns the check (None with `verify` off: then nothing is checked).
    """
    import onnx
    import onnxruntime

    from tltool.export.formats import EXPORTERS
    from tltool.export.onnx import set_metadata
    from tltool.export.parity import check_parity, parity_images, reference_logits

    exporter = EXPORTERS["onnx"]
    calibration, calibration_source = calibration_paths(trained, options)
    samples, source = check_samples(trained, data) if verify else ([], "")
    fp32 = temp_path(path, ".fp32.onnx")
    temp, sidecar_temp = temp_path(path, ".onnx"), temp_path(sidecar_path(path), ".json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        exporter.write(job, spec, fp32, echo)
        if verify:
            images = parity_images(trained, data, spec.dynamic_size, echo)
            references = reference_logits(job.model, images, len(spec.class_names))
            check_parity(references, exporter.load(fp32, torch.device("cpu"), echo).run, images, spec, echo)
        input_name = onnxruntime.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()[0].name
        reader = calibration_reader(calibration, spec, input_name)
        try:
            quantize_file(fp32, temp, reader)
        finally:
            if reader.asked and reader.count == 0:  # (onnxruntime's own error for an empty reader says less)
                raise ExportError(
                    f"none of the {len(calibration)} images of {calibration_source} could be read to calibrate on",
                    "give readable images with --calibration-data DIR",
                )
        nodes = quantized_node_counts(temp)
        if not nodes:  # never ship an "int8" file that holds no int8 arithmetic
            raise ExportError(
                f"ONNX Runtime quantized no node of the {spec.backbone} graph",
                "nothing was written; keep the fp32 export",
            )
        echo(
            f"quantized to int8 ({', '.join(f'{n} {op}' for op, n in nodes.items())}; per-channel weights), "
            f"calibrated on {reader.count} image(s) of {calibration_source}"
        )
        check = None
        if verify:
            loaded = exporter.load(temp, torch.device("cpu"), echo)
            check = accuracy_check(job.graph(), loaded.run, spec, samples, source)
            echo(
                f"int8 accuracy check on {check.images} images of {check.source}: top-1 agreement with fp32 "
                f"{check.agreement:.1%}, top-1 {check.int8_accuracy:.2%} vs fp32 {check.fp32_accuracy:.2%} "
                f"(drop {check.drop:.2f} points, allowed {options.max_drop:g})"
            )
            if check.drop > options.max_drop:
                raise ExportError(
                    f"int8 top-1 accuracy {check.int8_accuracy:.2%} is {check.drop:.2f} points below fp32's "
                    f"{check.fp32_accuracy:.2%} on {check.images} images (agreement {check.agreement:.1%}), "
                    f"more than --max-drop {options.max_drop:g}",
                    "nothing was written; try more --calibration-images (per-channel weights are already on), "
                    "a larger --max-drop, or keep the fp32 export (no --quantize)",
                )
        else:
            echo("int8 accuracy check skipped (--no-verify)")
        final = _with_quantization(spec, quantization_metadata(options, reader.count, calibration_source, check))
        proto = onnx.load(str(temp))
        set_metadata(proto, final)
        onnx.save(proto, str(temp))
        sidecar_temp.write_text(_json(final.metadata()), encoding="utf-8")
        for name in (temp, sidecar_temp):
            with open(name, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(temp, path)
        os.replace(sidecar_temp, sidecar_path(path))
        fp32_size, int8_size = fp32.stat().st_size, path.stat().st_size
        echo(f"int8 file {size_text(int8_size)}, fp32 {size_text(fp32_size)} ({fp32_size / int8_size:.1f}x smaller)")
        if bench_device is not None:
            from tltool.export.benchmark import run_benchmark

            files = [(spec, exporter, fp32), (final, exporter, path)]
            run_benchmark(job.model, files, bench_device, echo)
        return check
    finally:
        for name in (fp32, temp, sidecar_temp):
            name.unlink(missing_ok=True)


def _with_quantization(spec: ExportSpec, quantization: dict[str, Any]) -> ExportSpec:
    return dataclasses.replace(spec, quantization=quantization)


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"
