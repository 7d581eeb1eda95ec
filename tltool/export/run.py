"""`tltool export`: write the files, prove each matches PyTorch, then (and only then) give them their names.

Every file is written to a temp name beside its output, loaded back the way a deployment would load it,
and checked against the PyTorch model (`parity.py`); only when every requested format has passed are
they renamed into place with their `<file>.json` sidecars. So a failure leaves nothing under a final
name and never destroys a file that was there, and `--format all` succeeds or fails as a whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tltool.checkpoint import archive_entries, archive_kind
from tltool.device import resolve_device
from tltool.errors import ExportError
from tltool.export.formats import EXPORTERS
from tltool.export.parity import ParityImages, check_parity, parity_images, reference_logits
from tltool.export.quantize import Int8Options, write_int8
from tltool.export.quantize import check_options as check_int8_options
from tltool.export.quantize import default_output as default_int8_output
from tltool.export.spec import (
    LAYOUTS,
    METADATA_FILE,
    METADATA_KEY,
    Echo,
    Exporter,
    ExportJob,
    ExportSpec,
    require,
    sidecar_path,
)
from tltool.files import failure_reason, path_problem, size_text, temp_path
from tltool.trained import TrainedModel, open_trained


def _temp_path(path: Path) -> Path:
    """A hidden name beside `path` that keeps its suffix (torch.export.load insists on `.pt2`)."""
    return temp_path(path, path.suffix)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


# --- what an existing output is -------------------------------------------------------------------------


def _has_tltool_metadata(path: Path, format: str) -> bool:
    """Whether `path` holds a file of `format` that tltool export wrote (its embedded metadata, read cheaply).

    Archives (TorchScript, ExportedProgram) carry `extra/tltool.json`, safetensors a `tltool` header key,
    ONNX a `tltool` metadata property (its JSON text is found near the end of the file).
    """
    if format in ("torchscript", "exported-program"):
        entries = archive_entries(path)
        return (
            entries is not None
            and archive_kind(entries) == format
            and any(name.endswith(f"/extra/{METADATA_FILE}") for name in entries)
        )
    try:
        with open(path, "rb") as handle:
            if format == "safetensors":
                size = int.from_bytes(handle.read(8), "little")
                if not 0 < size <= 100_000_000:
                    return False
                header = json.loads(handle.read(size))
                return METADATA_KEY in (header.get("__metadata__") or {})
            head = handle.read(1)
            handle.seek(max(0, path.stat().st_size - (4 << 20)))
            tail = handle.read()
    except (OSError, ValueError, AttributeError):  # ValueError: JSONDecodeError, UnicodeDecodeError
        return False
    return head == b"\x08" and b'"tltool_version"' in tail  # an ONNX ModelProto starts with its ir_version


def _is_tltool_sidecar(path: Path, format: str) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == format and "tltool_version" in data


def check_overwrites(paths: dict[str, Path], force: bool) -> None:
    """Refuse to replace a file that is not a tltool export of the same format (and its sidecar), unless `force`.

    So `-o runs/x/checkpoints/last.pt` never silently turns the run's resume checkpoint (or any other file
    of the user's) into an export. A FIFO, a device or a folder is never replaced, `force` or not.
    """
    for format, path in paths.items():
        for target, fits in ((path, _has_tltool_metadata), (sidecar_path(path), _is_tltool_sidecar)):
            if not (target.exists() or target.is_symlink()):
                continue
            problem = path_problem(target)
            if problem is not None:
                raise ExportError(f"cannot write {target}: it {problem}", "give another --output")
            if force or fits(target, format):
                continue
            what = "its sidecar " if target != path else ""
            raise ExportError(
                f"{what}{target} exists and is not a {format} file of tltool export",
                "give another --output, or add --force to replace it",
            )


# --- options -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportOptions:
    """What `tltool export` was asked for besides the checkpoint: one field per flag, defaults as the command's.

    `int8` holds `--quantize int8`'s own options (`quantize.int8_options` builds them from the flags).
    """

    format: str = "onnx"
    output: str | Path | None = None
    data: str | None = None
    verify: bool = True
    include_preprocessing: bool = False
    input_layout: str | None = None
    softmax: bool = False
    dynamic_size: bool = False
    benchmark: bool = False
    device: str = "auto"
    wise_alpha: float | None = None
    force: bool = False
    quantize: str | None = None
    int8: Int8Options = field(default_factory=Int8Options)


def formats_of(format: str) -> list[str]:
    """`--format` to the list of format names (`all` is every one, in the documented order)."""
    if format == "all":
        return list(EXPORTERS)
    if format not in EXPORTERS:
        raise ExportError(f"unknown export format {format!r}", f"valid formats: {', '.join(EXPORTERS)}, all")
    return [format]


def _check_options(formats: Sequence[str], options: ExportOptions) -> str:
    """The input layout to use; ExportError for options that contradict each other."""
    include_preprocessing, input_layout = options.include_preprocessing, options.input_layout
    if input_layout is not None and input_layout not in LAYOUTS:
        raise ExportError(f"unknown --input-layout {input_layout!r}", f"use one of: {', '.join(LAYOUTS)}")
    if input_layout is not None and not include_preprocessing:
        raise ExportError(
            "--input-layout applies to uint8 inputs only", "add --include-preprocessing (float inputs are NCHW)"
        )
    graph_options = [
        flag
        for flag, given in (
            ("--include-preprocessing", include_preprocessing),
            ("--softmax", options.softmax),
            ("--dynamic-size", options.dynamic_size),
        )
        if given
    ]
    if formats == ["safetensors"] and graph_options:
        raise ExportError(
            f"safetensors holds weights only, so {', '.join(graph_options)} cannot apply",
            "use them with --format onnx, torchscript or exported-program",
        )
    return (input_layout or "nhwc") if include_preprocessing else "nchw"


def default_output(checkpoint_path: Path, format: str) -> Path:
    """Beside the checkpoint: runs/x/checkpoints/best.pt -> best.onnx / best.torchscript.pt / best.pt2 ..."""
    return checkpoint_path.with_name(checkpoint_path.stem + EXPORTERS[format].suffix)


def _strip_suffix(path: Path) -> Path:
    for exporter in EXPORTERS.values():
        if path.name.endswith(exporter.suffix):
            return path.with_name(path.name[: -len(exporter.suffix)])
    return path


def resolve_outputs(checkpoint_path: Path, formats: Sequence[str], output: str | None) -> dict[str, Path]:
    """The file of each format: `--output` for one format; for several, `--output` is the shared stem."""
    if len(formats) == 1:
        paths = {formats[0]: Path(output) if output else default_output(checkpoint_path, formats[0])}
        if paths[formats[0]].is_dir():
            suffix = EXPORTERS[formats[0]].suffix
            raise ExportError(
                f"--output {output} is a folder", f"give a file path, e.g. {Path(output or '.') / ('model' + suffix)}"
            )
    else:
        if output and Path(output).is_dir():
            stem = Path(output) / checkpoint_path.stem
        elif output:
            stem = _strip_suffix(Path(output))
        else:
            stem = checkpoint_path.with_name(checkpoint_path.stem)
        paths = {f: stem.with_name(stem.name + EXPORTERS[f].suffix) for f in formats}
    for path in paths.values():
        if path.resolve() == checkpoint_path.resolve():
            raise ExportError(f"--output {path} is the checkpoint itself", "give another file name")
    return paths


# --- writing -------------------------------------------------------------------------------------------


def _write_checked(
    job: ExportJob,
    spec: ExportSpec,
    exporter: Exporter,
    temp: Path,
    images: ParityImages | None,
    references: list[torch.Tensor],
    echo: Echo,
) -> None:
    """Write one format to `temp` and check its parity there (ExportError on failure)."""
    exporter.write(job, spec, temp, echo)
    if images is None:
        echo(f"parity check of {spec.format} skipped (--no-verify)")
        return
    loaded = exporter.load(temp, torch.device("cpu"), echo)
    check_parity(references, loaded.run, images, spec, echo)


def _write_all(
    job: ExportJob,
    specs: dict[str, ExportSpec],
    paths: dict[str, Path],
    images: ParityImages | None,
    echo: Echo,
) -> None:
    """Every format to temp files, every parity check, then every rename: all or nothing."""
    temps: list[Path] = []
    references = reference_logits(job.model, images, len(job.spec.class_names)) if images is not None else []
    try:
        for format, spec in specs.items():
            path = paths[format]
            path.parent.mkdir(parents=True, exist_ok=True)
            temp, sidecar_temp = _temp_path(path), _temp_path(sidecar_path(path))
            temps += [temp, sidecar_temp]
            _write_checked(job, spec, EXPORTERS[format], temp, images, references, echo)
            sidecar_temp.write_text(json.dumps(spec.metadata(), indent=2) + "\n", encoding="utf-8")
        for temp in temps:
            _fsync(temp)
        for format in specs:
            os.replace(_temp_path(paths[format]), paths[format])
            os.replace(_temp_path(sidecar_path(paths[format])), sidecar_path(paths[format]))
    except (OSError, RuntimeError) as exc:  # a full disk: an OSError, or torch's writer's RuntimeError around one
        reason = failure_reason(exc, next(iter(paths.values())))
        if reason is None:
            raise
        filename = getattr(exc, "filename", None)
        raise ExportError(
            f"cannot write {filename or 'the export'}: {reason}",
            "free disk space or fix permissions; files that were there are untouched",
        ) from None
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)


def _predict_images(trained: TrainedModel, data: str | None) -> str:
    """What the printed `tltool predict` command runs on: --data, else the run's images if still there."""
    if data:
        return shlex.quote(data)
    data_cfg = trained.checkpoint.config.get("data", {})
    for key in ("val", "train"):
        folder = data_cfg.get(key)
        if folder and Path(folder).is_dir():
            return shlex.quote(str(folder))
    return "IMAGES..."


# --- the command ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    """The checked options: the formats, the input layout, each format's file, the benchmark's device."""

    formats: list[str]
    layout: str
    paths: dict[str, Path]
    bench_device: torch.device | None


def _check_request(checkpoint_path: Path, options: ExportOptions) -> _Request:
    """Every check that needs no model, before any work: options, packages, device, outputs and what they replace."""
    formats = formats_of(options.format)
    layout = _check_options(formats, options)
    if options.quantize is not None:
        check_int8_options(formats, options.quantize, options.int8)
        require(("onnx", "onnxruntime"), "int8 quantization")
    for name in formats:
        exporter = EXPORTERS[name]
        install = "pip install safetensors" if name == "safetensors" else "pip install 'tltool[onnx]'"
        runs = options.verify or options.benchmark
        require(exporter.needs + (exporter.run_needs if runs else ()), f"{name} export", install)
    bench_device = resolve_device(options.device, "--device") if options.benchmark else None
    output = options.output
    if options.quantize is not None and not output:
        output = default_int8_output(checkpoint_path)
    paths = resolve_outputs(checkpoint_path, formats, str(output) if output else None)
    check_overwrites(paths, options.force)  # before any work: an export never silently replaces another file
    return _Request(formats, layout, paths, bench_device)


def _build_specs(
    trained: TrainedModel, checkpoint_path: Path, request: _Request, options: ExportOptions
) -> tuple[ExportSpec, dict[str, ExportSpec]]:
    """The job's spec (every graph option, the first format) and what each format's file holds and how it is called."""
    task, thresholds = "multiclass", None
    if trained.multilabel:  # (its thresholds chosen on the run's val split now, embedded in the metadata)
        if options.softmax:
            raise ExportError(
                f"--softmax is for multiclass models, but {checkpoint_path} is multilabel",
                "leave --softmax out: its logits take a sigmoid per class",
            )
        from tltool.evaluate import val_thresholds

        task, thresholds = "multilabel", tuple(val_thresholds(trained))
    temperature = trained.model.temperature
    base = ExportSpec(
        format=request.formats[0],
        class_names=tuple(trained.class_names),
        preprocess=trained.preprocess,
        backbone=trained.backbone,
        include_preprocessing=options.include_preprocessing,
        input_layout=request.layout,
        softmax=options.softmax,
        dynamic_size=options.dynamic_size,
        temperature=float(temperature) if temperature != 1.0 else None,  # calibration.py
        task=task,
        thresholds=thresholds,
    )
    specs = {}
    for name in request.formats:
        if EXPORTERS[name].is_graph:
            specs[name] = dataclasses.replace(base, format=name)
        else:  # weights only: the file describes the plain model that predict rebuilds from it
            specs[name] = ExportSpec(name, base.class_names, base.preprocess, base.backbone,
                                     temperature=base.temperature, task=task, thresholds=thresholds)  # fmt: skip
    return base, specs


def _announce(checkpoint_path: Path, base: ExportSpec, request: _Request, options: ExportOptions, echo: Echo) -> None:
    """The line that says what is exported, with which options (and a note when some cannot apply)."""
    weights_only = [name for name in request.formats if not EXPORTERS[name].is_graph]
    graph_options = options.include_preprocessing or options.softmax or options.dynamic_size
    if len(request.formats) > 1 and weights_only and graph_options:
        echo(f"note: {', '.join(weights_only)} holds weights only; the graph options apply to the other formats")
    given = (
        (options.include_preprocessing, f"uint8 {request.layout.upper()} input"),
        (options.softmax, "softmax"),
        (options.dynamic_size, "any size"),
        (options.wise_alpha is not None, f"WiSE-FT alpha {options.wise_alpha}"),
        (base.temperature is not None, f"calibrated temperature {base.temperature or 1.0:.4g}"),
        (options.quantize is not None, f"{options.quantize} quantization"),
    )
    extras = [text for on, text in given if on]
    echo(
        f"exporting {checkpoint_path} ({base.backbone}, {len(base.class_names)} classes) to "
        f"{', '.join(request.formats)}" + (f" with {', '.join(extras)}" if extras else "")
    )


def _write_quantized(
    job: ExportJob, spec: ExportSpec, path: Path, trained: TrainedModel, request: _Request, options: ExportOptions,
    echo: Echo,
) -> None:  # fmt: skip
    """`--quantize int8`: the calibrated, accuracy-checked file (export/quantize.py) under its name."""
    try:
        write_int8(job, spec, path, trained, options.data, options.int8, options.verify, echo, request.bench_device)
    except (OSError, RuntimeError) as exc:  # as in _write_all: a full disk, a read-only folder
        reason = failure_reason(exc, path)
        if reason is None:
            raise
        raise ExportError(
            f"cannot write {getattr(exc, 'filename', None) or path}: {reason}",
            "free disk space or fix permissions; files that were there are untouched",
        ) from None
    echo(f"wrote {path} ({size_text(path.stat().st_size)}) and {sidecar_path(path).name}")


def run_export(checkpoint: str | Path, options: ExportOptions | None = None, echo: Echo = print) -> list[Path]:
    """`tltool export`: write the checkpoint's model in `options.format` (or `all`), parity-checked unless not
    `options.verify`.

    `options.wise_alpha`: export WiSE-FT's theta(alpha) of the checkpoint (`trained.open_trained`).
    Returns the paths written, in format order. On any failure nothing is left under a final name, and a
    file that was there before is untouched (the exports live in temp files until all have passed). An
    existing output that is not a tltool export of its format is refused before any work, unless `options.force`.
    `options.quantize="int8"` (ONNX only, `options.int8` its options): the calibrated int8 file,
    accuracy-checked instead of parity-checked (export/quantize.py), by default `<checkpoint stem>.int8.onnx`.
    """
    options = options or ExportOptions()
    checkpoint_path = Path(checkpoint)
    request = _check_request(checkpoint_path, options)
    trained = open_trained(checkpoint_path, torch.device("cpu"), options.wise_alpha)
    base, specs = _build_specs(trained, checkpoint_path, request, options)
    job = ExportJob(trained.model, base, dict(trained.checkpoint.arch), dict(trained.checkpoint.config))
    _announce(checkpoint_path, base, request, options, echo)
    paths = request.paths
    if options.quantize is not None:
        _write_quantized(job, specs["onnx"], paths["onnx"], trained, request, options, echo)
    else:
        images = parity_images(trained, options.data, options.dynamic_size, echo) if options.verify else None
        _write_all(job, specs, paths, images, echo)
        for name in request.formats:
            echo(f"wrote {paths[name]} ({size_text(paths[name].stat().st_size)}) and {sidecar_path(paths[name]).name}")
        if request.bench_device is not None:
            from tltool.export.benchmark import run_benchmark

            exports = [(specs[n], EXPORTERS[n], paths[n]) for n in request.formats]
            run_benchmark(trained.model, exports, request.bench_device, echo)
    images_arg = _predict_images(trained, options.data)
    for name in request.formats:
        echo(f"next: tltool predict {shlex.quote(str(paths[name]))} {images_arg}")
    return [paths[name] for name in request.formats]
