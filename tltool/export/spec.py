"""What one exported file is: its spec, the metadata that travels with it, and the graph that is exported.

Every format carries the same metadata dict (`ExportSpec.metadata()`): it is the `<file>.json` sidecar,
ONNX `metadata_props["tltool"]`, the TorchScript / ExportedProgram extra file `tltool.json` and the
safetensors header key `tltool`. `tltool predict` rebuilds the spec from it (`ExportSpec.from_metadata`)
to know how to feed a file and how to read what it returns.

Two kinds of input exist. Without `--include-preprocessing` a file takes what the PyTorch model takes:
float32 N x 3 x H x W, resized, center-cropped, scaled to [0, 1] and normalized with the recorded mean/std.
With it, the graph takes uint8 RGB pixels (N x H x W x 3 or N x 3 x H x W) already resized and cropped to
`image_size`, and does the rest itself ("resize-free normalization": cast, / 255, minus mean, over std),
so a consumer needs no mean/std; the resize and crop stay the caller's, because a resize inside the
graph would not match Pillow's antialiased resize that training used.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from tltool import __version__
from tltool.data import Preprocess
from tltool.errors import ExportError

INPUT_NAME = "images"
LOGITS = "logits"
PROBABILITIES = "probabilities"
# Where the metadata dict lives inside each format.
METADATA_KEY = "tltool"
METADATA_FILE = "tltool.json"
LAYOUTS = ("nhwc", "nchw")
# The dynamo exporter's own opset (torchlib is written for 18); pinned so a file is the same on every machine.
ONNX_OPSET = 18

Echo = Callable[[str], None]
Runner = Callable[[torch.Tensor], torch.Tensor]


# --- images as an exported file takes them ------------------------------------------------------------


def uint8_transform(preprocess: Preprocess) -> T.Compose:
    """PIL image -> uint8 RGB tensor 3 x image_size x image_size: the resize and crop of `eval_transform`.

    These are exactly the first steps of `tltool.data.eval_transform`; `normalize` does the rest, so
    `normalize(uint8_transform(p)(image), p)` equals `eval_transform(p)(image)` bit for bit (tested).
    """
    return T.Compose(
        [
            T.Resize(preprocess.resize_size, interpolation=InterpolationMode(preprocess.interpolation), antialias=True),
            T.CenterCrop(preprocess.image_size),
            T.ToImage(),
        ]
    )


def normalize(images: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 N x 3 x H x W -> the float32 input of the PyTorch model (the last steps of `eval_transform`)."""
    scaled = TF.to_dtype(images, torch.float32, scale=True)
    return TF.normalize(scaled, list(preprocess.mean), list(preprocess.std))


class DeployedModel(nn.Module):
    """The trained model plus what a consumer would otherwise have to know: normalization and softmax.

    With `include_preprocessing` it takes uint8 pixels already resized/cropped (NHWC when
    `channels_last_input`) and computes the same float ops as torchvision's ToDtype(scale) + Normalize.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess: Preprocess,
        include_preprocessing: bool,
        channels_last_input: bool,
        softmax: bool,
    ) -> None:
        super().__init__()
        self.model = model
        self.include_preprocessing = include_preprocessing
        self.channels_last_input = channels_last_input
        self.softmax = softmax
        self.register_buffer("mean", torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.include_preprocessing:
            if self.channels_last_input:
                # contiguous: a permuted (channels-last strided) input makes torch.export guard the sizes
                # on the convolutions' memory-format choice, bounding a dynamic height/width.
                images = images.permute(0, 3, 1, 2).contiguous()
            images = (images.to(torch.float32) * (1.0 / 255.0) - self.mean) / self.std
        logits = self.model(images)
        if self.softmax:
            return logits.softmax(dim=1)
        return logits


# --- the spec ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSpec:
    """One exported file: format, classes, preprocessing and the calling convention of its graph."""

    format: str
    class_names: tuple[str, ...]
    preprocess: Preprocess
    backbone: str
    include_preprocessing: bool = False
    input_layout: str = "nchw"
    softmax: bool = False
    dynamic_size: bool = False
    # Temperature scaling (tltool.calibration): the model's logits are divided by it; None: not calibrated.
    # Graph formats have the division inside; safetensors (weights only) records it for the loader to apply.
    temperature: float | None = None
    # An int8 file (export/quantize.py): how it was quantized and its accuracy check; None: float32 weights.
    quantization: dict[str, Any] | None = field(default=None, compare=False)
    # data.task: multilabel: a sigmoid per class, and class c is predicted when p_c >= thresholds[c] (chosen on the
    # run's val split at export time, each maximizing F1 there; tltool.multilabel).
    task: str = "multiclass"
    thresholds: tuple[float, ...] | None = None

    @property
    def output_name(self) -> str:
        return PROBABILITIES if self.softmax else LOGITS

    @property
    def input_dtype(self) -> str:
        return "uint8" if self.include_preprocessing else "float32"

    def input_shape(self) -> list[str | int]:
        """Dimension names or sizes of the input, in its layout (`batch` is always dynamic)."""
        height: str | int = "height" if self.dynamic_size else self.preprocess.image_size
        width: str | int = "width" if self.dynamic_size else self.preprocess.image_size
        if self.input_layout == "nhwc":
            return ["batch", height, width, 3]
        return ["batch", 3, height, width]

    def dimension_names(self) -> dict[int, str]:
        """The dynamic axes of the input, by index: batch, and height/width with `dynamic_size`."""
        return {i: name for i, name in enumerate(self.input_shape()) if isinstance(name, str)}

    def resize_description(self) -> str:
        pre = self.preprocess
        return (
            f"resize the shorter side to {pre.resize_size} px ({pre.interpolation}, antialiased), "
            f"then center-crop {pre.image_size}x{pre.image_size}"
        )

    def input_description(self) -> str:
        shape = "[" + ", ".join(str(d) for d in self.input_shape()) + "]"
        pre = self.preprocess
        if self.include_preprocessing:
            return (
                f"{INPUT_NAME}: uint8 {shape} ({self.input_layout.upper()}), RGB pixels 0-255 after the caller's "
                f"resize and crop ({self.resize_description()}); the graph casts to float, divides by 255 and "
                f"normalizes with mean {list(pre.mean)} and std {list(pre.std)} itself"
            )
        return (
            f"{INPUT_NAME}: float32 {shape}, RGB scaled to [0, 1], then normalized with mean {list(pre.mean)} and "
            f"std {list(pre.std)} (after: {self.resize_description()})"
        )

    def output_description(self) -> str:
        what = (
            "probabilities (softmax applied)" if self.softmax else "unnormalized scores (softmax gives probabilities)"
        )
        if self.task == "multilabel":
            what = "unnormalized scores, one per class (multilabel: a sigmoid per class gives probabilities)"
        scaled = f", calibrated: logits divided by temperature {self.temperature:.6g}" if self.temperature else ""
        return (
            f"{self.output_name}: float32 [batch, {len(self.class_names)}], {what}{scaled}, in the order of class_names"
        )

    def metadata(self) -> dict[str, Any]:
        """The sidecar / embedded metadata: everything a runtime needs to feed the file and read its output."""
        out: dict[str, Any] = {
            "format": self.format,
            "tltool_version": __version__,
            "backbone": self.backbone,
            "class_names": list(self.class_names),
            **self.preprocess.to_dict(),
            "resize": self.resize_description(),
            "crop": "center",
            "resize_and_crop_by": "caller",  # never inside the graph: see the module docstring
            "includes_preprocessing": self.include_preprocessing,
            "input_name": INPUT_NAME,
            "input_dtype": self.input_dtype,
            "input_layout": self.input_layout.upper(),
            "input_shape": self.input_shape(),
            "dynamic_size": self.dynamic_size,
            "output_name": self.output_name,
            "output_kind": self.output_name,
            "input": self.input_description(),
            "output": self.output_description(),
            "temperature": self.temperature,
            "task": self.task,
            "thresholds": list(self.thresholds) if self.thresholds is not None else None,
        }
        if self.format == "onnx":
            out["onnx_opset"] = ONNX_OPSET
        if self.quantization is not None:
            out.update(self.quantization)
        return out

    @classmethod
    def from_metadata(cls, data: dict[str, Any]) -> ExportSpec:
        """The spec an exported file was written with, from its metadata (ExportError if it is not tltool's)."""
        try:
            return cls(
                format=str(data["format"]),
                class_names=tuple(str(name) for name in data["class_names"]),
                preprocess=Preprocess.from_dict(data),
                backbone=str(data.get("backbone", "")),
                include_preprocessing=bool(data.get("includes_preprocessing", False)),
                input_layout=str(data.get("input_layout", "NCHW")).lower(),
                softmax=data.get("output_kind", LOGITS) == PROBABILITIES,
                dynamic_size=bool(data.get("dynamic_size", False)),
                temperature=float(data["temperature"]) if data.get("temperature") is not None else None,
                task=str(data.get("task", "multiclass")),
                thresholds=tuple(float(t) for t in data["thresholds"]) if data.get("thresholds") is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(
                f"the tltool metadata is incomplete ({type(exc).__name__}: {exc})", "re-export with tltool export"
            ) from None

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x H x W (resized and cropped) -> what this file's graph takes."""
        if not self.include_preprocessing:
            return normalize(images, self.preprocess)
        if self.input_layout == "nhwc":
            return images.permute(0, 2, 3, 1).contiguous()
        return images.contiguous()

    def graph(self, model: nn.Module) -> nn.Module:
        """The module to export: the model itself, or wrapped with normalization and/or softmax."""
        if not (self.include_preprocessing or self.softmax):
            return model
        wrapped = DeployedModel(
            model, self.preprocess, self.include_preprocessing, self.input_layout == "nhwc", self.softmax
        )
        return wrapped.eval()

    def example(self) -> torch.Tensor:
        """The example input the exporters trace with.

        Batch 2: torch.export specializes a batch axis of size 1 to a constant. With `dynamic_size` the
        example is twice the image size, so that no layer's output shrinks to 1 x 1 there (which would
        specialize height and width to at most the image size).
        """
        size = self.preprocess.image_size * (2 if self.dynamic_size else 1)
        generator = torch.Generator().manual_seed(0)
        if self.include_preprocessing:
            pixels = torch.randint(0, 256, (2, 3, size, size), generator=generator, dtype=torch.uint8)
            return self.model_input(pixels)
        return torch.randn(2, 3, size, size, generator=generator)

    def export_dynamic_shapes(self) -> dict[str, dict[int, Any]]:
        """torch.export's dynamic_shapes: a named batch axis; height/width left to the exporter to bound."""
        dims: dict[int, Any] = {}
        for index, name in self.dimension_names().items():
            dims[index] = torch.export.Dim("batch") if name == "batch" else torch.export.Dim.DYNAMIC
        return {INPUT_NAME: dims}


# --- small shared helpers --------------------------------------------------------------------------------


def require(modules: Sequence[str], purpose: str, install: str = "pip install 'tltool[onnx]'") -> None:
    """Import `modules` or raise the one-line ExportError that says how to install them."""
    missing = []
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"{purpose} needs {', '.join(missing)}, which is not installed", install)


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """Silence the exporters' deprecation notices: the user did nothing wrong and cannot act on them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
        warnings.filterwarnings(
            "ignore", message=r".*legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", message=r".*feature will be removed", category=DeprecationWarning)
        yield


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (exporters raise pages of text)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def sidecar_path(path: Path) -> Path:
    """`<output>.json`: the metadata beside the exported file, for runtimes that cannot read it inside.

    `tltool export` writes it and `tltool predict` reads it when a file carries no metadata of its own.
    """
    return path.with_name(path.name + ".json")


# --- one export run, and the interface of a format ------------------------------------------------------


@dataclass
class ExportJob:
    """The checkpoint's model prepared once and shared by every format of one `tltool export` run.

    `program()` runs torch.export once: the ExportedProgram format saves it and the ONNX exporter
    translates the same program, so `--format all` pays for the (slow) tracing only once.
    """

    model: nn.Module
    spec: ExportSpec
    arch: dict[str, Any]
    config: dict[str, Any]
    _graph: nn.Module | None = field(default=None, repr=False)
    _program: Any = field(default=None, repr=False)
    _program_error: BaseException | None = field(default=None, repr=False)

    def graph(self) -> nn.Module:
        """The module every graph format exports (see `ExportSpec.graph`)."""
        if self._graph is None:
            self._graph = self.spec.graph(self.model)
        return self._graph

    def program(self) -> Any:
        """The torch.export ExportedProgram of `graph()` with a dynamic batch axis (computed once)."""
        if self._program_error is not None:
            raise self._program_error
        if self._program is None:
            try:
                with quiet_exporters(), _size_oblivious(self.spec.dynamic_size):
                    self._program = torch.export.export(
                        self.graph(), (self.spec.example(),), dynamic_shapes=self.spec.export_dynamic_shapes()
                    )
            except Exception as exc:  # torch.export raises many error types; remember it for the next caller
                self._program_error = exc
                raise
        return self._program


def _size_oblivious(enabled: bool) -> contextlib.AbstractContextManager:
    """For a dynamic height/width: keep torch.export from specializing on sizes being 1 or not.

    Otherwise a feature map that is 1 x 1 at the example size (mobilenet_v3_small at 32 px) and larger
    at others makes torch.export bound height/width to one side of that (e.g. >= 33 or <= 32), and the
    ExportedProgram then refuses the very size it was trained at. `backed_size_oblivious` is a torch
    config flag (torch >= 2.6); where it is missing, export proceeds without it and parity tells.
    """
    if not enabled:
        return contextlib.nullcontext()
    try:
        from torch.fx.experimental import _config as fx_config

        return fx_config.patch(backed_size_oblivious=True)
    except (ImportError, AttributeError, KeyError):
        return contextlib.nullcontext()


@dataclass(frozen=True)
class LoadedModel:
    """An exported file loaded to run: the callable, the tltool metadata it carries, where it runs."""

    run: Runner
    metadata: dict[str, Any] | None
    device: str


@dataclass(frozen=True)
class Exporter:
    """One output format: its default suffix, how to write a file and how to load a written one.

    `needs` are the packages writing takes, `run_needs` those running a written file takes (the
    parity check and predict); `is_graph` is False for a weights-only format.
    """

    suffix: str
    write: Callable[[ExportJob, ExportSpec, Path, Echo], None]
    load: Callable[[Path, torch.device, Echo], LoadedModel]
    needs: tuple[str, ...] = ()
    run_needs: tuple[str, ...] = ()
    is_graph: bool = True
