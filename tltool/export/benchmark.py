"""`tltool export --benchmark`: latency at batch 1 and throughput at batch 32 of each file, next to eager PyTorch.

Each written file is loaded the way a deployment would load it (onnxruntime, torch.jit.load,
torch.export.load, safetensors + the rebuilt network) on the chosen device and timed on random pixels
at the image size: the median of a few calls after a warm-up, so that one slow call (a page fault,
another process) does not decide a number. Times include copying the input to the device and the
output back.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tltool.export.spec import Echo, Exporter, ExportSpec, Runner
from tltool.files import size_text

LATENCY_BATCH = 1
THROUGHPUT_BATCH = 32
# (warm-up calls, timed calls, seconds after which fewer calls are enough), per batch size.
LATENCY_CALLS = (3, 20, 4.0)
THROUGHPUT_CALLS = (1, 5, 8.0)
MIN_CALLS = 3


@dataclass(frozen=True)
class Contender:
    """One runner to time, with the input its file takes at each batch size."""

    name: str
    run: Runner
    small: torch.Tensor
    large: torch.Tensor
    note: str = ""
    size_bytes: int | None = None


@dataclass(frozen=True)
class Timing:
    """One row of the report."""

    name: str
    latency_ms: float
    images_per_second: float
    note: str = ""
    size_bytes: int | None = None


def median_seconds(run: Runner, images: torch.Tensor, rounds: tuple[int, int, float]) -> float:
    """Median wall time of `run(images)` over up to `repeats` timed calls after `warmup` untimed ones."""
    warmup, repeats, budget = rounds
    for _ in range(warmup):
        run(images)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats and (len(times) < MIN_CALLS or time.perf_counter() - started < budget):
        start = time.perf_counter()
        run(images)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_all(contenders: Sequence[Contender]) -> list[Timing]:
    """Latency at batch 1 and throughput at batch 32 of every contender, one contender at a time.

    One at a time, not interleaved: onnxruntime's and OpenMP's worker threads keep spinning for a while
    after a call, and would steal the cores from whichever runner came next.
    """
    rows = []
    for c in contenders:
        latency = median_seconds(c.run, c.small, LATENCY_CALLS)
        batch = median_seconds(c.run, c.large, THROUGHPUT_CALLS)
        rows.append(Timing(c.name, latency * 1000, THROUGHPUT_BATCH / batch, c.note, c.size_bytes))
    return rows


def eager_runner(model: nn.Module, device: torch.device) -> Runner:
    """The checkpoint's model in plain eager PyTorch (fp32, eval, inference_mode) on `device`."""
    model = model.to(device).eval()

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(images.to(device)).cpu()

    return run


def format_table(rows: Sequence[Timing], device: str, size: int) -> str:
    """The report: one row per runner, with its speed-up over eager PyTorch at both batch sizes.

    With a file size on any row (an int8 export next to its fp32 file), a size column too.
    """
    eager = rows[0]
    sizes = any(row.size_bytes is not None for row in rows)
    size_head = f" {'file size':>10}" if sizes else ""
    lines = [
        f"benchmark on {device} (torch threads: {torch.get_num_threads()}), {size}x{size} px, median of timed calls",
        f"{'format':<18} {'batch 1 ms':>10} {'batch 32 img/s':>15} {'speed-up b1 / b32':>18}{size_head}",
    ]
    for row in rows:
        ratio = f"{eager.latency_ms / row.latency_ms:.2f}x / {row.images_per_second / eager.images_per_second:.2f}x"
        note = f"  {row.note}" if row.note else ""
        size_cell = f" {size_text(row.size_bytes) if row.size_bytes is not None else '-':>10}" if sizes else ""
        lines.append(
            f"{row.name:<18} {row.latency_ms:>10.2f} {row.images_per_second:>15,.0f} {ratio:>18}{size_cell}{note}"
        )
    return "\n".join(lines)


def run_benchmark(
    model: nn.Module,
    files: Sequence[tuple[ExportSpec, Exporter, Path]],
    device: torch.device,
    echo: Echo,
) -> list[Timing]:
    """Time eager PyTorch and every written file on `device`, print the table, return its rows.

    An int8 file (`spec.quantization`) is named `<format> int8` and the table gets each file's size.
    """
    base = files[0][0]
    size = base.preprocess.image_size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (THROUGHPUT_BATCH, 3, size, size), generator=generator, dtype=torch.uint8)
    # Eager gets the already-normalized input, like a file without --include-preprocessing.
    eager_spec = ExportSpec("eager", base.class_names, base.preprocess, base.backbone)
    contenders = [
        Contender(
            "eager PyTorch",
            eager_runner(model, device),
            eager_spec.model_input(pixels[:LATENCY_BATCH]),
            eager_spec.model_input(pixels),
        )
    ]
    quantized = any(spec.quantization is not None for spec, _, _ in files)
    for spec, exporter, path in files:
        loaded = exporter.load(path, device, echo)
        note = "" if loaded.device == str(device) else f"(runs on {loaded.device})"
        if not exporter.is_graph:
            note = "(weights only: eager PyTorch)"
        small, large = spec.model_input(pixels[:LATENCY_BATCH]), spec.model_input(pixels)
        name = f"{spec.format} {spec.quantization['quantization']}" if spec.quantization else spec.format
        size_bytes = path.stat().st_size if quantized else None
        contenders.append(Contender(name, loaded.run, small, large, note, size_bytes))
    gc.collect()  # the export's garbage (graphs, protobufs) freed now, not during the first timed calls
    rows = time_all(contenders)
    echo(format_table(rows, str(device), size))
    busy = _busy_note()
    if busy:
        echo(busy)
    return rows


def _busy_note() -> str:
    """A warning when other processes load the CPU: then every number above is mostly noise."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return ""
    if load <= cores * 0.75 + 1.0:  # this process itself accounts for about one
        return ""
    return f"note: the machine is busy (load {load:.1f} on {cores} cores); these timings are unreliable"
