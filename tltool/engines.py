"""What runs the frozen backbone while its features are extracted: `train.feature_engine`.

- `eager`: the backbone as PyTorch runs it (under autocast at the run's precision).
- `compile`: `torch.compile` of the backbone, at the run's precision. Its first batch compiles (40-45 s for
  MobileNetV2 on this project's 2-core CPU machine, where it then ran no faster than eager: BENCHMARKS.md).
- `onnxruntime`: the backbone exported to ONNX (torch.onnx, tltool's opset and quiet exporters: the same path as
  `tltool export`'s fallback exporter) into a temporary folder and run by ONNX Runtime, in fp32 whatever
  `train.precision` says (its key records fp32). Export + session: about 3 s for MobileNetV2; then 3-4x
  eager channels_last's speed on this CPU machine (BENCHMARKS.md).
- `auto` (`choose_engine`): onnxruntime on CPU for at least `AUTO_ONNX_MIN_IMAGES` images at fp32 when
  onnxruntime is installed and not under torchrun, else eager; `AUTO_ONNX_MIN_IMAGES_IN_WORKERS` where eager
  would run in the loader's workers (`extraction.extraction_schedule`), about 1.2x faster than phased eager: there
  the export + session's ~2 s pays for itself later (measured whole first runs, MobileNetV2 96 px, 2 cores:
  eager 0.3-0.8 s faster at 1,500 images, ONNX Runtime 0-1.9 s faster at 3,750). On CUDA eager: no engine was
  measured on a GPU. The parity batches double as a measurement: under auto the engine is kept only when its
  last parity batch ran at least `AUTO_MIN_SPEEDUP` x faster than eager's on the same images, else eager runs
  on (measured at 1 thread, batch 32, 96 px: ONNX Runtime 2.3x eager channels_last for MobileNetV2 but 0.94x
  for ResNet-18).

Parity: before an engine's features are used, its first `PARITY_BATCHES` batches are also run by eager
PyTorch and compared (max abs diff within `parity_limit`: export's tolerance, PARITY_TOLERANCE x max(1, max
|eager|) at fp32, 1e-2 x that scale at bf16/fp16). A failure under `auto` falls back to eager for the rest of
the run with a one-line warning (the features already computed are eager's); a failure of an engine named
explicitly is an error (exit 2) naming the difference: the user asked for that engine, so its silent
replacement would hide the problem.
"""

from __future__ import annotations

import io
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tltool.device import autocast
from tltool.errors import ConfigError, TltoolError

ENGINES = ("auto", "eager", "compile", "onnxruntime")
AUTO_ONNX_MIN_IMAGES = 1000  # export + session (~3 s) pays for itself past a few hundred images on CPU
AUTO_ONNX_MIN_IMAGES_IN_WORKERS = 2500  # against eager in the loader's workers (see the module)
PARITY_BATCHES = 2
AUTO_MIN_SPEEDUP = 1.1  # under auto, an engine slower than this x eager on its last parity batch is dropped
PARITY_TOLERANCE = 1e-4  # as tltool export's parity check (export/parity.py)
LOW_PRECISION_TOLERANCE = 1e-2  # bf16 / fp16: an engine's own rounding order shows in the last bits of 8


class EngineError(TltoolError):
    """An engine named in train.feature_engine cannot run or does not match eager PyTorch."""


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def choose_engine(
    setting: str,
    images: int,
    device: torch.device,
    precision: str,
    distributed: bool = False,
    eager_in_workers: bool = False,
) -> str:
    """The engine `train.feature_engine` names; for `auto`, the one the measured rule picks (see the module).
    `eager_in_workers`: whether eager would run in the loader's workers (`features.eager_in_workers`)."""
    if setting != "auto":
        return setting
    least = AUTO_ONNX_MIN_IMAGES_IN_WORKERS if eager_in_workers else AUTO_ONNX_MIN_IMAGES
    if device.type == "cpu" and precision == "fp32" and not distributed and images >= least:
        return "onnxruntime" if onnxruntime_available() else "eager"
    return "eager"


def engine_precision(engine: str, precision: str) -> str:
    """The precision the engine computes in (ONNX Runtime runs the fp32 graph)."""
    return "fp32" if engine == "onnxruntime" else precision


def parity_limit(reference: torch.Tensor, precision: str) -> float:
    scale = reference.abs().max().item() if reference.numel() else 0.0
    base = PARITY_TOLERANCE if precision == "fp32" else LOW_PRECISION_TOLERANCE
    return base * max(1.0, scale) if math.isfinite(scale) else base


def _eager(backbone: nn.Module, device: torch.device, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(images: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return backbone(images.to(device, non_blocking=True)).float()

    return run


def _compiled(backbone: nn.Module, device: torch.device, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return _eager(torch.compile(backbone), device, precision)


def export_onnx(backbone: nn.Module, example: torch.Tensor) -> bytes:
    """The backbone as an ONNX graph (input `images`, output `features`, a dynamic batch axis)."""
    from tltool.export.spec import INPUT_NAME, ONNX_OPSET, first_line, quiet_exporters

    buffer = io.BytesIO()
    try:
        with quiet_exporters(), torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                backbone,
                (example.float().contiguous(),),
                buffer,
                input_names=[INPUT_NAME],
                output_names=["features"],
                opset_version=ONNX_OPSET,
                dynamo=False,  # (the TorchScript-based exporter: ~3 s for MobileNetV2, the dynamo one far longer)
                dynamic_axes={INPUT_NAME: {0: "batch"}, "features": {0: "batch"}},
            )
    except Exception as exc:  # any exporter failure
        raise EngineError(
            f"train.feature_engine onnxruntime: cannot export the backbone to ONNX ({first_line(exc)})",
            "set train.feature_engine to eager or auto",
        ) from None
    return buffer.getvalue()


def _onnxruntime(backbone: nn.Module, device: torch.device, example: torch.Tensor) -> Callable:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "train.feature_engine onnxruntime needs onnxruntime", "pip install 'tltool[onnx]' (or onnxruntime)"
        ) from None
    graph = export_onnx(backbone, example)
    with tempfile.TemporaryDirectory(prefix="tltool-engine-") as folder:  # (a file, as a deployment loads it)
        path = Path(folder) / "backbone.onnx"
        path.write_bytes(graph)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # (one thread knob for torch and ORT)
        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        session = onnxruntime.InferenceSession(str(path), options, providers=providers)

    def run(images: torch.Tensor) -> torch.Tensor:
        (out,) = session.run(["features"], {"images": images.float().contiguous().cpu().numpy()})
        return torch.from_numpy(out)

    return run


@dataclass
class Engine:
    """Runs the backbone on a batch of images: the named engine after it passed its parity check, else eager.

    `requested` is the setting (auto or a name), `name` the engine chosen, `used` what runs now (eager after a
    fallback); `max_diff` the largest difference from eager seen in the parity batches.
    """

    backbone: nn.Module
    device: torch.device
    precision: str
    name: str
    requested: str
    warn: Callable[[str], None]
    used: str = ""
    max_diff: float | None = None
    build_seconds: float = 0.0
    speedup: float | None = None  # eager's time / the engine's on the last parity batch
    fallback: str | None = None  # why eager runs instead (a failed parity check, or slower under auto)
    checked: int = 0
    _run: Callable | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.used = self.name
        self._eager = _eager(self.backbone, self.device, self.precision)

    def _build(self, example: torch.Tensor) -> Callable:
        start = time.perf_counter()
        if self.name == "compile":
            run = _compiled(self.backbone, self.device, self.precision)
        elif self.name == "onnxruntime":
            run = _onnxruntime(self.backbone, self.device, example)
        else:
            run = self._eager
        self.build_seconds = time.perf_counter() - start
        return run

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features of one batch (float32, on CPU)."""
        if self.used == "eager":
            return self._eager(images).cpu()
        if self._run is None:
            self._run = self._build(images)
        start = time.perf_counter()
        out = self._run(images).float().cpu()
        if self.checked < PARITY_BATCHES:
            self.checked += 1
            middle = time.perf_counter()
            reference = self._eager(images).cpu()
            self.speedup = (time.perf_counter() - middle) / max(middle - start, 1e-9)
            diff = (out - reference).abs().max().item() if out.shape == reference.shape else math.inf
            self.max_diff = diff if self.max_diff is None else max(self.max_diff, diff)
            limit = parity_limit(reference, self.precision)
            if not diff <= limit:  # (NaN fails)
                what = (
                    f"the {self.name} engine's features differ from eager PyTorch's by {diff:.3g} (limit {limit:.3g})"
                )
                if self.requested == self.name:
                    raise EngineError(what, "set train.feature_engine to eager or auto")
                self.warn(f"warning: {what}; extracting with eager PyTorch instead")
                self.used, self.fallback = "eager", "failed its parity check"
                return reference
            if self.checked == PARITY_BATCHES and self.requested == "auto" and self.speedup < AUTO_MIN_SPEEDUP:
                self.used = "eager"  # (measured slower here: not a problem to warn about)
                self.fallback = f"ran at {self.speedup:.2f}x eager's speed"
        return out

    def describe(self) -> dict:
        return {
            "requested": self.requested,
            "chosen": self.name,
            "used": self.used,
            "max_diff_from_eager": self.max_diff,
            "build_seconds": self.build_seconds,
            "speedup_vs_eager": self.speedup,
            "fallback": self.fallback,
        }


def eager_engine(backbone: nn.Module, device: torch.device, precision: str) -> Engine:
    return Engine(backbone, device, precision, "eager", "eager", lambda text: None)
