"""`tltool export`: a deployable model (ONNX or TorchScript) with its classes and preprocessing inside.

The model is exported in eval mode on CPU with a dynamic batch axis; the input is `images` (N, 3, H, W,
float32, normalized as the checkpoint's preprocessing says) and the output is `logits` (N, classes).
The export goes to a temp file beside the output, a parity check compares it with the PyTorch model on
real images at two batch sizes, and only a file that passes is renamed to its final name, so a failed
export never leaves a file there nor destroys one that was there. A JSON sidecar (`<output>.json`)
repeats the preprocessing and class names for runtimes that cannot read the embedded metadata.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tltool import __version__
from tltool.checkpoint import TEMP_MARKER, load_checkpoint
from tltool.config import DataConfig
from tltool.data import Preprocess, Sample, eval_transform, load_image, scan_data, scan_eval_folder
from tltool.errors import DataError, ExportError
from tltool.models import load_trained_model

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# The dynamo exporter's own opset (torchlib is written for 18); other opsets go through a version converter.
ONNX_OPSET = 18
# A parity check fails beyond this max abs diff of the logits, or below this top-1 agreement.
PARITY_TOLERANCE = 1e-4
PARITY_MIN_AGREEMENT = 1.0
PARITY_MAX_BATCH = 8
# A single ONNX file is a protobuf, which cannot exceed 2 GiB; leave room for the graph itself.
ONNX_MAX_WEIGHT_BYTES = 2**31 - 64 * 2**20

Echo = Callable[[str], None]
Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExportInfo:
    """What travels with the exported file: classes, preprocessing and how to call the model."""

    class_names: list[str]
    preprocess: Preprocess
    backbone: str
    format: str

    def input_description(self) -> str:
        size = self.preprocess.image_size
        return (
            f"{INPUT_NAME}: float32 [batch, 3, {size}, {size}], RGB scaled to [0, 1], then normalized with "
            f"mean {list(self.preprocess.mean)} and std {list(self.preprocess.std)} (after resize to "
            f"{self.preprocess.resize_size} ({self.preprocess.interpolation}) and center crop to {size})"
        )

    def output_description(self) -> str:
        return (
            f"{OUTPUT_NAME}: float32 [batch, {len(self.class_names)}], unnormalized scores in the order of "
            "class_names (softmax gives probabilities)"
        )

    def sidecar(self) -> dict[str, Any]:
        """The `<output>.json` content: everything a runtime needs to feed the model and read its output."""
        return {
            **self.preprocess.to_dict(),
            "class_names": list(self.class_names),
            "tltool_version": __version__,
            "format": self.format,
            "backbone": self.backbone,
            "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME,
            "input": self.input_description(),
            "output": self.output_description(),
        }


@dataclass(frozen=True)
class Exporter:
    """One output format: its default file suffix, how to write it, and how to run the written file."""

    suffix: str
    write: Callable[[nn.Module, torch.Tensor, Path, ExportInfo, Echo], None]
    runner: Callable[[Path], Runner]
    needs: tuple[str, ...] = ()
    verify_needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParityResult:
    """Exported vs PyTorch outputs on one batch."""

    batch_size: int
    max_abs_diff: float
    agreement: float

    def passed(self) -> bool:
        # `<=` rather than `>`: a NaN diff must fail, and NaN compares false with everything.
        return self.max_abs_diff <= PARITY_TOLERANCE and self.agreement >= PARITY_MIN_AGREEMENT


# --- ONNX --------------------------------------------------------------------------------------------


def _require(modules: Sequence[str], purpose: str) -> None:
    """Import `modules` or raise the one-line ExportError that says how to install them."""
    missing = []
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"{purpose} needs {', '.join(missing)}, which is not installed", "pip install 'tltool[onnx]'")


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Silence the exporters' deprecation notices: the user did nothing wrong and cannot act on them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
        warnings.filterwarnings(
            "ignore", message=r".*legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", message=r".*feature will be removed", category=DeprecationWarning)
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _onnx_proto_dynamo(model: nn.Module, example: torch.Tensor) -> Any:
    """ONNX through torch.export (the default exporter since torch 2.9), batch axis marked dynamic."""
    program = torch.onnx.export(
        model,
        (example,),
        None,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=ONNX_OPSET,
        dynamo=True,
        verbose=False,
        dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
    )
    return program.model_proto


def _onnx_proto_legacy(model: nn.Module, example: torch.Tensor) -> Any:
    """ONNX through the TorchScript-based exporter: the fallback for models torch.export cannot take."""
    import onnx

    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (example,),
        buffer,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=ONNX_OPSET,
        dynamo=False,
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )
    return onnx.load_from_string(buffer.getvalue())


def _set_metadata(proto: Any, info: ExportInfo) -> None:
    """Add tltool's keys to the model's metadata_props, keeping any the exporter wrote."""
    props = {
        "class_names": json.dumps(list(info.class_names)),
        "preprocess": json.dumps(info.preprocess.to_dict()),
        "tltool_version": __version__,
        "backbone": info.backbone,
        "input": info.input_description(),
        "output": info.output_description(),
    }
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"tltool {info.backbone} classifier. {info.input_description()}. {info.output_description()}."


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path, info: ExportInfo, echo: Echo) -> None:
    """Write `model` as one self-contained ONNX file (weights inside) with metadata_props."""
    import onnx

    if _weight_bytes(model) > ONNX_MAX_WEIGHT_BYTES:
        raise ExportError(
            f"the weights ({_weight_bytes(model) / 2**30:.1f} GiB) do not fit in a single ONNX file (2 GiB)",
            "export with --format torchscript",
        )
    with _quiet_exporters():
        try:
            proto = _onnx_proto_dynamo(model, example)
        except Exception as exc:  # any exporter failure: the legacy exporter may still take the model
            echo(f"note: the torch.export-based ONNX exporter failed ({_first_line(exc)}); trying the legacy one")
            try:
                proto = _onnx_proto_legacy(model, example)
            except Exception as legacy_exc:
                raise ExportError(
                    f"cannot export {info.backbone} to ONNX: {_first_line(legacy_exc)}", "try --format torchscript"
                ) from None
    _set_metadata(proto, info)
    onnx.save(proto, str(path))


def onnx_runner(path: Path) -> Runner:
    """Run an ONNX file with onnxruntime on CPU, as a deployment would."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> torch.Tensor:
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        return torch.from_numpy(logits)

    return run


# --- TorchScript -------------------------------------------------------------------------------------


def _script(model: nn.Module, example: torch.Tensor, echo: Echo) -> torch.jit.ScriptModule:
    """torch.jit.script (keeps every code path); torch.jit.trace for a model that cannot be scripted."""
    try:
        return torch.jit.script(model)
    except Exception as exc:  # TorchScript's frontend raises many error types
        echo(f"note: torch.jit.script failed ({_first_line(exc)}); tracing instead")
    try:
        return torch.jit.trace(model, example)
    except Exception as exc:
        raise ExportError(
            f"cannot export {type(model).__name__} to TorchScript: {_first_line(exc)}", "try --format onnx"
        ) from None


def write_torchscript(model: nn.Module, example: torch.Tensor, path: Path, info: ExportInfo, echo: Echo) -> None:
    """Write `model` as TorchScript with class names, preprocessing and tltool info as extra files."""
    extra_files = {
        "class_names.json": json.dumps(list(info.class_names)),
        "preprocess.json": json.dumps(info.preprocess.to_dict()),
        "tltool.json": json.dumps({key: value for key, value in info.sidecar().items() if key != "class_names"}),
    }
    with _quiet_exporters():
        scripted = _script(model, example, echo)
        torch.jit.save(scripted, str(path), _extra_files=extra_files)


def torchscript_runner(path: Path) -> Runner:
    """Load a TorchScript file with torch.jit.load, as a deployment would."""
    with _quiet_exporters():
        loaded = torch.jit.load(str(path), map_location="cpu")
    loaded.eval()

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), _quiet_exporters():
            return loaded(images)

    return run


EXPORTERS: dict[str, Exporter] = {
    "onnx": Exporter(".onnx", write_onnx, onnx_runner, ("onnx", "onnxscript"), ("onnxruntime",)),
    "torchscript": Exporter(".torchscript.pt", write_torchscript, torchscript_runner),
}


# --- parity images -----------------------------------------------------------------------------------


def _interleave_classes(samples: Sequence[Sample]) -> list[Sample]:
    """Samples reordered round-robin over classes, so the first few cover as many classes as possible."""
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    queues = [by_class[label] for label in sorted(by_class)]
    longest = max((len(q) for q in queues), default=0)
    return [q[i] for i in range(longest) for q in queues if i < len(q)]


def _parity_samples(checkpoint: dict[str, Any], data: str | None, echo: Echo) -> tuple[list[Sample], str]:
    """The candidate images: `data` if given (errors are the user's to fix), else the run's val split.

    The recorded dataset may be gone (exporting on another machine); then there are simply no images.
    """
    class_names = list(checkpoint["class_names"])
    if data:
        return scan_eval_folder(data, class_names), data
    try:
        data_cfg = DataConfig.model_validate(checkpoint["config"]["data"])
        split = scan_data(data_cfg, int(checkpoint["config"]["run"]["seed"]))
    except (DataError, KeyError, ValueError) as exc:
        reason = exc.what if isinstance(exc, DataError) else _first_line(exc)
        echo(f"note: the run's val split is not readable here ({reason})")
        return [], "the run's val split"
    return split.val, f"val split of {data_cfg.val or data_cfg.train}"


def _load_images(samples: Sequence[Sample], preprocess: Preprocess, count: int) -> list[torch.Tensor]:
    """Up to `count` preprocessed images, skipping any that fail to decode."""
    transform = eval_transform(preprocess)
    images = []
    for path, _ in _interleave_classes(samples):
        if len(images) == count:
            break
        try:
            images.append(transform(load_image(path)))
        except (OSError, SyntaxError, ValueError):
            continue
    return images


def parity_batches(
    checkpoint: dict[str, Any], preprocess: Preprocess, data: str | None, echo: Echo
) -> tuple[list[torch.Tensor], str]:
    """Two batches (1 image and up to PARITY_MAX_BATCH) of real images, or random ones if there are none."""
    samples, source = _parity_samples(checkpoint, data, echo)
    images = _load_images(samples, preprocess, PARITY_MAX_BATCH)
    if images:
        kind = "image"
    else:
        echo(f"note: no readable images in {source} for the parity check; using random normalized tensors")
        generator = torch.Generator().manual_seed(0)
        size = preprocess.image_size
        images = list(torch.randn(PARITY_MAX_BATCH, 3, size, size, generator=generator))
        kind = "random tensor"
    large = max(2, len(images))  # a single image is repeated: the second batch must still be > 1
    batch = torch.stack([images[i % len(images)] for i in range(large)])
    return [batch[:1], batch], kind


# --- parity check ------------------------------------------------------------------------------------


def compare(reference: torch.Tensor, exported: torch.Tensor) -> ParityResult:
    """Max abs diff and top-1 agreement of exported vs reference logits.

    A different arg-max counts as agreement only when the reference scores both classes within the
    tolerance of each other (a tie that float rounding may break either way).
    """
    exported = exported.float()
    if exported.shape != reference.shape:
        return ParityResult(reference.shape[0], float("inf"), 0.0)
    diff = (exported - reference).abs().max().item()
    chosen = exported.argmax(dim=1)
    best = reference.max(dim=1).values
    tie = reference.gather(1, chosen[:, None]).squeeze(1) >= best - PARITY_TOLERANCE
    agreement = ((chosen == reference.argmax(dim=1)) | tie).float().mean().item()
    return ParityResult(reference.shape[0], diff, agreement)


def check_parity(
    model: nn.Module, run_exported: Runner, batches: Sequence[torch.Tensor], format: str, kind: str, echo: Echo
) -> list[ParityResult]:
    """Run every batch through both models, print one line per batch, raise ExportError on any failure."""
    results = []
    for batch in batches:
        with torch.inference_mode():
            reference = model(batch).float()
        try:
            exported = run_exported(batch.clone())
        except Exception as exc:  # a runtime error here (e.g. a batch axis that is not dynamic) is a failure
            raise ExportError(
                f"the exported {format} model fails at batch {batch.shape[0]}: {_first_line(exc)}",
                "nothing was written; report this with the backbone name",
            ) from None
        result = compare(reference, exported)
        plural = "s" if result.batch_size != 1 else ""
        echo(
            f"parity {format} batch {result.batch_size}: max abs diff {result.max_abs_diff:.1e}, "
            f"top-1 agreement {result.agreement:.1%} ({result.batch_size} {kind}{plural})"
        )
        results.append(result)
    failed = [r for r in results if not r.passed()]
    if failed:
        first = failed[0]
        raise ExportError(
            f"{format} parity check failed at batch {first.batch_size}: max abs diff {first.max_abs_diff:.1e} "
            f"(limit {PARITY_TOLERANCE:.0e}), top-1 agreement {first.agreement:.1%} "
            f"(needed {PARITY_MIN_AGREEMENT:.0%})",
            "nothing was written; --no-verify writes the file unchecked",
        )
    return results


# --- files -------------------------------------------------------------------------------------------


def default_output(checkpoint_path: Path, format: str) -> Path:
    """Beside the checkpoint: runs/x/checkpoints/best.pt -> best.onnx / best.torchscript.pt."""
    return checkpoint_path.with_name(checkpoint_path.stem + EXPORTERS[format].suffix)


def sidecar_path(path: Path) -> Path:
    """`<output>.json`: the preprocessing and class names beside the exported file."""
    return path.with_name(path.name + ".json")


def _resolve_output(checkpoint_path: Path, format: str, output: str | None) -> Path:
    path = Path(output) if output else default_output(checkpoint_path, format)
    if path.is_dir():
        raise ExportError(
            f"--output {path} is a folder", f"give a file path, e.g. {path / ('model' + EXPORTERS[format].suffix)}"
        )
    if path.resolve() == checkpoint_path.resolve():
        raise ExportError(f"--output {path} is the checkpoint itself", "give another file name")
    return path


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _size_text(num_bytes: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as file managers show them)."""
    if num_bytes < 1000:
        return f"{num_bytes} B"
    value = float(num_bytes)
    for unit in ("KB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


# --- the command -------------------------------------------------------------------------------------


def _check_format(format: str) -> Exporter:
    if format not in EXPORTERS:
        raise ExportError(f"unknown export format {format!r}", f"valid formats: {', '.join(EXPORTERS)}")
    return EXPORTERS[format]


def _write_verified(
    exporter: Exporter,
    model: nn.Module,
    info: ExportInfo,
    path: Path,
    batches: Sequence[torch.Tensor] | None,
    kind: str,
    echo: Echo,
) -> None:
    """Export to temp files beside `path`, check parity on them, and only then rename them into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp, sidecar_temp = _temp_path(path), _temp_path(sidecar_path(path))
    size = info.preprocess.image_size
    # Batch >= 2: torch.export specializes a batch axis of size 1 to a constant.
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        exporter.write(model, example, temp, info, echo)
        if batches is None:
            echo("parity check skipped (--no-verify)")
        else:
            check_parity(model, exporter.runner(temp), batches, info.format, kind, echo)
        sidecar_temp.write_text(json.dumps(info.sidecar(), indent=2) + "\n", encoding="utf-8")
        for written in (temp, sidecar_temp):
            _fsync(written)
        os.replace(temp, path)
        os.replace(sidecar_temp, sidecar_path(path))
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}", "free disk space or fix permissions") from None
    finally:
        temp.unlink(missing_ok=True)
        sidecar_temp.unlink(missing_ok=True)


def run_export(
    checkpoint: str | Path,
    format: str = "onnx",
    output: str | Path | None = None,
    data: str | None = None,
    verify: bool = True,
    echo: Echo = print,
) -> Path:
    """`tltool export`: write the checkpoint's model as `format`, parity-checked unless `verify` is False.

    Returns the path written. On any failure nothing is left under the final name, and a file that was
    there before is untouched (the export lives in a temp file until it has passed).
    """
    exporter = _check_format(format)
    _require(exporter.needs + (exporter.verify_needs if verify else ()), f"{format} export")
    checkpoint_path = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint_path)
    model = load_trained_model(ckpt)
    preprocess = Preprocess.from_dict(ckpt["preprocess"])
    info = ExportInfo(list(ckpt["class_names"]), preprocess, str(ckpt["arch"]["backbone"]), format)
    path = _resolve_output(checkpoint_path, format, str(output) if output else None)
    batches, kind = parity_batches(ckpt, preprocess, data, echo) if verify else (None, "")
    echo(f"exporting {checkpoint_path} ({info.backbone}, {len(info.class_names)} classes) to {format}")
    _write_verified(exporter, model, info, path, batches, kind, echo)
    echo(f"wrote {path} ({_size_text(path.stat().st_size)}) and {sidecar_path(path).name}")
    return path
