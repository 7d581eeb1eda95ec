"""`tltool predict`: top-k labels for images, from a tltool checkpoint or any file `tltool export` wrote.

The model file says how to feed it: a checkpoint its `preprocess`, an export its tltool metadata (ONNX
metadata_props, TorchScript / ExportedProgram extra files, safetensors header; the `<file>.json`
sidecar when a file lacks it). Images are decoded and resized/cropped exactly as in training and
`tltool eval` (`tltool.data.load_image` + the eval transform), then normalized here, or handed over as
uint8 pixels to a file exported with `--include-preprocessing`. An image that cannot be read is
reported and skipped; the others are still predicted. A calibrated model's temperature (calibration.py) is
applied by the model itself: a checkpoint's through `open_trained`, an export's inside its graph (safetensors:
by its loader, from the metadata), so the probabilities here are softmax(logits / T).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from tltool.checkpoint import TORCH_SAVE, archive_entries, archive_kind
from tltool.data import IMAGE_EXTENSIONS, image_files, image_problem, load_image
from tltool.device import resolve_device
from tltool.errors import CheckpointError, ConfigError, DataError
from tltool.export.formats import EXPORTERS
from tltool.export.spec import Echo, ExportSpec, Runner, require, sidecar_path, uint8_transform
from tltool.files import path_problem, write_text_atomic

CHECKPOINT = "checkpoint"
GLOB_CHARACTERS = "*?["
# What a failed decode raises (DecompressionBombError is not an OSError; load_image turns the warning into one).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Prediction:
    """One of the top-k answers for an image."""

    label: str
    index: int
    probability: float


@dataclass(frozen=True)
class ImageResult:
    """The answers for one input file, or why it could not be read."""

    file: str
    predictions: tuple[Prediction, ...] = ()
    error: str | None = None
    multilabel: bool = False  # predictions: every label at or above its threshold (maybe none), not the top-k

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: {"file", "predictions": [{"label", "index", "probability"}]} or {"file", "error"}."""
        if self.error is not None:
            return {"file": self.file, "error": self.error}
        return {"file": self.file, "predictions": [asdict(p) for p in self.predictions]}


@dataclass(frozen=True)
class Predictor:
    """A model file ready to label images: how to feed it (spec) and the callable that runs it."""

    path: Path
    kind: str
    spec: ExportSpec
    run: Runner
    device: str

    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x H x W (resized and cropped) -> N x classes probabilities."""
        output = self.run(self.spec.model_input(pixels)).float()
        if self.spec.task == "multilabel":  # (a sigmoid per class; never exported with --softmax)
            return output.sigmoid()
        return output if self.spec.softmax else output.softmax(dim=1)


# --- the model file ------------------------------------------------------------------------------------


def model_kind(path: Path) -> str:
    """`checkpoint` or an export format name, from the suffix and, for zip archives, the entries inside.

    TorchScript files and checkpoints both end in `.pt`: a TorchScript archive holds `code/` and
    `constants.pkl`, an ExportedProgram `archive_format`, a torch.save file just `data.pkl`.
    """
    problem = path_problem(path)
    if problem is not None:
        fix = "check the path" if "exist" in problem else "give a checkpoint (.pt) or an exported file"
        raise CheckpointError(f"model {path} {problem}", fix)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".safetensors":
        return "safetensors"
    entries = archive_entries(path)
    if entries is not None:
        kind = archive_kind(entries)
        if kind in EXPORTERS:
            return kind
        if kind == TORCH_SAVE:
            return CHECKPOINT
        raise CheckpointError(
            f"{path} is neither a tltool checkpoint nor an exported model",
            "give a checkpoint (.pt) or a file written by tltool export (.onnx, .torchscript.pt, .pt2, .safetensors)",
        )
    if suffix == ".pt2":
        return "exported-program"
    return CHECKPOINT  # an old-style torch.save file or garbage: open_trained says which, in one line


def _checkpoint_predictor(path: Path, device: torch.device, threshold: float | None = None) -> Predictor:
    """A tltool checkpoint (weights_only load) as a Predictor in eager PyTorch. A multilabel one decides at
    `threshold`, else at per-class thresholds chosen on its run's val split (`evaluate.val_thresholds`)."""
    from tltool.trained import open_trained

    trained = open_trained(path, device)
    temperature = float(trained.model.temperature) if trained.model.temperature != 1.0 else None  # as an export's
    spec = ExportSpec(
        CHECKPOINT, tuple(trained.class_names), trained.preprocess, trained.backbone, temperature=temperature
    )
    if trained.multilabel:
        from tltool.evaluate import val_thresholds

        chosen = [threshold] * len(trained.class_names) if threshold is not None else val_thresholds(trained)
        spec = dataclasses.replace(spec, task="multilabel", thresholds=tuple(chosen))

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return trained.model(images.to(device)).cpu()

    return Predictor(path, CHECKPOINT, spec, run, str(device))


def _sidecar_metadata(path: Path) -> dict[str, Any] | None:
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{sidecar} is not valid JSON ({exc})", "re-export the model") from None


def open_model(path: str | Path, device: torch.device, echo: Echo, threshold: float | None = None) -> Predictor:
    """Load MODEL (a checkpoint or an export) to run on `device`, with what it needs to be fed.

    `threshold` (multilabel models): every class's threshold, in place of the checkpoint's val-chosen ones or
    the export's embedded ones; a multiclass model refuses it."""
    path = Path(path)
    kind = model_kind(path)
    if kind == CHECKPOINT:
        predictor = _checkpoint_predictor(path, device, threshold)
        _check_threshold(predictor, threshold)
        return predictor
    exporter = EXPORTERS[kind]
    install = "pip install safetensors" if kind == "safetensors" else "pip install 'tltool[onnx]'"
    require(exporter.run_needs, f"running a {kind} file", install)
    loaded = exporter.load(path, device, echo)
    metadata = loaded.metadata or _sidecar_metadata(path)
    if metadata is None:
        raise CheckpointError(
            f"{path} carries no tltool metadata and has no {sidecar_path(path).name} beside it",
            "export it with tltool export, or put its .json sidecar back beside it",
        )
    predictor = Predictor(path, kind, ExportSpec.from_metadata(metadata), loaded.run, loaded.device)
    _check_threshold(predictor, threshold)
    if threshold is not None:
        thresholds = (threshold,) * len(predictor.spec.class_names)
        predictor = dataclasses.replace(predictor, spec=dataclasses.replace(predictor.spec, thresholds=thresholds))
    return predictor


def _check_threshold(predictor: Predictor, threshold: float | None) -> None:
    if threshold is not None and predictor.spec.task != "multilabel":
        raise ConfigError(
            f"--threshold is for multilabel models, but {predictor.path} is a multiclass one",
            "leave --threshold out (--topk picks how many classes are shown)",
        )


# --- the inputs ----------------------------------------------------------------------------------------


def _expand(item: str) -> list[str]:
    """One INPUT: a file as given, a folder's images (recursive, hidden entries skipped), or a glob's matches."""
    path = Path(item)
    if path.is_file():
        return [item]
    if path.is_dir():
        return [str(p) for p in image_files(path)]
    if any(c in item for c in GLOB_CHARACTERS):
        found: list[str] = []
        for match in sorted(glob.glob(item, recursive=True)):
            if Path(match).is_dir():
                found += [str(p) for p in image_files(Path(match))]
            elif Path(match).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(match)
        return found
    return []


def collect_inputs(inputs: Sequence[str]) -> list[str]:
    """Every image file the INPUTs name, in order, each once; an INPUT that matches nothing is a DataError."""
    if not inputs:
        raise DataError("no INPUT given", "give image files, folders or globs, e.g. tltool predict model.onnx photos/")
    files: dict[str, None] = {}
    for item in inputs:
        found = _expand(item)
        if not found:
            path = Path(item)
            if path.is_dir():
                what = "is an empty folder or has no images"
            elif path.exists() or path.is_symlink():
                what = path_problem(path) or "is not an image file"  # a FIFO or a device: never opened
            else:
                what = "matches no file"
            raise DataError(f"INPUT {item} {what}", f"image extensions read: {' '.join(IMAGE_EXTENSIONS)}")
        files.update(dict.fromkeys(found))
    return list(files)


def check_output_width(predictor: Predictor, output: torch.Tensor) -> None:
    """The model's outputs must be one per listed class: otherwise every label it gives would be wrong.

    The class list comes from the file's metadata (or its sidecar), which can be edited or belong to another
    export; a mismatch is one line (exit 2), never a wrong label or an IndexError.
    """
    names = predictor.spec.class_names
    width = output.shape[1] if output.dim() == 2 else None
    if width != len(names):
        where = "its metadata" if predictor.kind != CHECKPOINT else "the checkpoint"
        got = f"{width} scores per image" if width is not None else f"an output of shape {list(output.shape)}"
        raise CheckpointError(
            f"{predictor.path} gives {got} but {where} lists {len(names)} class names",
            f"the class list does not belong to this model: re-export it with tltool export (or restore "
            f"{sidecar_path(predictor.path).name})",
        )


# --- one code path for `tltool predict` and `tltool serve` (serve.py): decode, one model call, top-k --------


def pixels_of(source: str | Path | IO[bytes], transform: T.Compose) -> torch.Tensor:
    """One image (a path, or the bytes of an upload as a file object) decoded, resized and cropped: uint8
    3 x image_size x image_size, as `tltool.data.load_image` and the eval transform make it in training."""
    return transform(load_image(source))  # type: ignore[arg-type]  # PIL opens a file object as well as a path


def batch_probabilities(predictor: Predictor, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
    """One model call on the stacked images -> N x classes probabilities, checked one per listed class."""
    # After resize + center crop every image is image_size x image_size, so a batch always stacks.
    probabilities = predictor.probabilities(torch.stack(list(pixels)))
    check_output_width(predictor, probabilities)
    return probabilities


def label_thresholds(spec: ExportSpec) -> list[float] | None:
    """A multilabel model's per-class thresholds (0.5 where none were given), or None (a multiclass one: top-k)."""
    if spec.task != "multilabel":
        return None
    return list(spec.thresholds or [0.5] * len(spec.class_names))


def top_predictions(
    names: Sequence[str], probabilities: torch.Tensor, topk: int, thresholds: Sequence[float] | None = None
) -> list[tuple[Prediction, ...]]:
    """The top-k (label, index, probability) of each row of N x classes probabilities; with `thresholds` (a
    multilabel model, `label_thresholds`) every class at or above its threshold instead, most probable first
    (maybe none)."""
    if thresholds is not None:
        values, indices = probabilities.sort(dim=1, descending=True)
        kept = values >= torch.tensor(list(thresholds))[indices]
        rows = [(v[keep].tolist(), i[keep].tolist()) for v, i, keep in zip(values, indices, kept, strict=True)]
    else:
        values, indices = probabilities.topk(min(topk, len(names)), dim=1)
        rows = list(zip(values.tolist(), indices.tolist(), strict=True))
    return [
        tuple(Prediction(names[i], i, p) for p, i in zip(row_values, row_indices, strict=True))
        for row_values, row_indices in rows
    ]


def predict_files(
    predictor: Predictor, files: Sequence[str], topk: int, batch_size: int, echo: Echo
) -> list[ImageResult]:
    """Top-k predictions of every file (in input order); an unreadable one is reported and gets an `error`."""
    transform = uint8_transform(predictor.spec.preprocess)
    results: dict[str, ImageResult] = {}
    batch: list[tuple[str, torch.Tensor]] = []
    progress = _progress(len(files))

    def run_batch() -> None:
        probabilities = batch_probabilities(predictor, [pixels for _, pixels in batch])
        thresholds = label_thresholds(predictor.spec)
        answers = top_predictions(predictor.spec.class_names, probabilities, topk, thresholds)
        for (file, _), file_answers in zip(batch, answers, strict=True):
            results[file] = ImageResult(file, file_answers, multilabel=thresholds is not None)
        progress.update(len(batch))
        batch.clear()

    for file in files:
        try:
            problem = path_problem(Path(file))  # a FIFO named like an image would block the read forever
            if problem is not None:
                raise OSError(problem)
            batch.append((file, pixels_of(file, transform)))
        except DECODE_ERRORS as exc:
            reason = path_problem(Path(file)) or image_problem(file) or f"cannot decode ({exc})"
            echo(f"warning: cannot read {file}: {reason}")
            results[file] = ImageResult(file, error=reason)
            progress.update(1)
        if len(batch) == batch_size:
            run_batch()
    if batch:
        run_batch()
    progress.close()
    return [results[file] for file in files]


def _progress(total: int) -> Any:
    """A tqdm bar on stderr for long runs at a terminal; silent otherwise (DESIGN: quiet when not a TTY)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=total < 64 or not sys.stderr.isatty(), file=sys.stderr, leave=False)


# --- output --------------------------------------------------------------------------------------------


def format_table(results: Sequence[ImageResult]) -> str:
    """file, then `label (prob%)` for each of the top-k (a multilabel model's: each label at or above its
    threshold, `-` when none is); unreadable files are left out (they were reported)."""
    rows = [r for r in results if r.error is None]
    if not rows:
        return ""
    multilabel = any(r.multilabel for r in rows)
    k = max(1, *(len(r.predictions) for r in rows))
    cells = [[r.file, *(f"{p.label} ({p.probability:.1%})" for p in r.predictions)] for r in rows]
    cells = [row if len(row) > 1 else [row[0], "-"] for row in cells]  # (multilabel: no class reached its threshold)
    header = ["file", *(f"{'label' if multilabel else 'top'}-{i + 1}" for i in range(k))]
    widths = [max(len(row[i]) for row in [header, *cells] if i < len(row)) for i in range(k + 1)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in [header, *cells]]
    return "\n".join(lines)


def to_json(results: Sequence[ImageResult]) -> str:
    """The JSON list `--json` prints: one object per input file, failures with an `error`."""
    return json.dumps([r.to_dict() for r in results], indent=2)


def write_csv(results: Sequence[ImageResult], path: str | Path) -> None:
    """Rows file, rank, label, probability (one per answer; unreadable files have none)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["file", "rank", "label", "probability"])
    for result in results:
        for rank, prediction in enumerate(result.predictions, start=1):
            writer.writerow([result.file, rank, prediction.label, f"{prediction.probability:.6f}"])
    write_text_atomic(Path(path), buffer.getvalue(), DataError, "pick a writable path")


# --- the command ---------------------------------------------------------------------------------------


def run_predict(
    model: str | Path,
    inputs: Sequence[str],
    topk: int = 3,
    batch_size: int = 32,
    device: str = "auto",
    echo: Echo = print,
    threshold: float | None = None,
) -> list[ImageResult]:
    """`tltool predict`: the top-k predictions of MODEL for every image INPUTS name (a multilabel model: the
    labels with sigmoid p >= their threshold, `threshold` for every class when given; see `open_model`).

    `echo` gets the per-file warnings and the summary (the CLI sends them to stderr, keeping stdout for
    the table or JSON). All inputs unreadable is a DataError, raised after each has been reported.
    """
    if topk < 1 or batch_size < 1:
        raise ConfigError("--topk and --batch-size must be at least 1", "e.g. --topk 3 --batch-size 32")
    files = collect_inputs(inputs)  # before loading the model: a typo fails in a moment
    predictor = open_model(model, resolve_device(device, "--device"), echo, threshold)
    started = time.perf_counter()
    results = predict_files(predictor, files, topk, batch_size, echo)
    failed = sum(r.error is not None for r in results)
    echo(
        f"{len(results) - failed} image(s) predicted by {predictor.path} ({predictor.kind} on {predictor.device}) "
        f"in {time.perf_counter() - started:.1f} s" + (f"; {failed} unreadable" if failed else "")
    )
    return results


def check_some_readable(results: Sequence[ImageResult]) -> None:
    """DataError when no input could be read (after the output was printed: exit code 2)."""
    if results and all(r.error is not None for r in results):
        raise DataError(f"none of the {len(results)} input image(s) could be read", "check the files listed above")
