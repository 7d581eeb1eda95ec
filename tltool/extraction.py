"""How a frozen backbone's features are computed from a loader: `extract`, on the CPUs' `extraction_schedule`.

Three schedules (measured on 2 cores, BENCHMARKS.md): the loader's workers run the forward too (a worker per
CPU, eager PyTorch); phases of decoding and forward passes (workers would share the forward's cores); or the
two overlapped (a GPU, no workers, or enough cores). The feature cache (features.py) and every other user of
frozen features (baseline, source selection, Co-Tuning) extract through here.
"""

from __future__ import annotations

import ctypes
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tltool.config import Config
from tltool.data import OnImages, resolve_num_workers, usable_cpus, with_worker_step
from tltool.engines import Engine, eager_engine

# Phased extraction (see `extraction_schedule`): at most this many batches, and this many bytes of images,
# are decoded ahead of each run of forward passes.
PHASE_BATCHES = 8
PHASE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class ExtractionSchedule:
    """How decoding and the frozen backbone's forward share the CPUs: torch's intra-op `threads` of the process
    that runs the forward, and `chunk` (0: the loader's workers decode while the forward runs; k: the forward
    waits until k batches are decoded, then runs them all while the workers only refill their prefetch, so each
    phase has every CPU). `in_workers`: each loader worker runs the forward on the batches it decoded, at 1
    thread, and the main process only gathers the features."""

    threads: int
    chunk: int
    in_workers: bool = False


def loader_workers(batches: Any) -> int:
    """The worker processes of a DataLoader, or of the one a progress bar (tqdm) wraps; 0 for anything else."""
    loader = getattr(batches, "iterable", batches)
    return int(getattr(loader, "num_workers", 0) or 0)


def extraction_schedule(device: torch.device, workers: int, engine: str = "eager") -> ExtractionSchedule:
    """The schedule of an extraction on `device` with `workers` loader workers, at torch's thread count, where
    `engine` runs the backbone.

    On CPU, decoding workers and the forward's OpenMP threads must not share cores: a forward thread
    descheduled by a worker stalls its partners at every barrier (2 workers beside 2 forward threads on 2 cores:
    57 img/s, against 160-188 img/s with 1 thread; BENCHMARKS.md). Where every CPU has a worker and eager
    PyTorch runs the backbone, the workers run it too: each decodes a batch and runs its forward at 1 thread,
    processes in parallel with no barrier to stall (MobileNetV2 96 px on 2 cores, in memory: 2 processes at 1
    thread 530-570 img/s, 1 process at 2 threads 340-660 from run to run; from files: 459-489 img/s in the
    workers, 410-445 phased; BENCHMARKS.md). At 1 thread because OpenMP does not survive a fork: a worker forked
    from a process whose forward ran at 2 threads hangs in its first forward at 2 threads (at 1 it uses no
    thread pool); and only where the start method is fork, which shares the backbone with the workers instead
    of copying it into each. Where the CPUs left by the workers hold torch's threads (a GPU, no workers, or
    enough cores) the two overlap as usual. Elsewhere (more CPUs than workers, or another engine) the
    extraction is phased: decode a chunk of batches on every core, then run the forward on every core (0.80 of
    the single process's speed on 2 cores, against 0.63 overlapped on 1 thread).
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or workers == 0:
        return ExtractionSchedule(threads, 0)
    if engine == "eager" and workers >= usable_cpus() and multiprocessing.get_start_method() == "fork":
        return ExtractionSchedule(1, 0, in_workers=True)
    phased = usable_cpus() - workers < threads
    return ExtractionSchedule(threads, PHASE_BATCHES if phased else 0)


def eager_in_workers(cfg: Config, device: torch.device) -> bool:
    """Whether eager PyTorch would extract this config's features in the loader's workers (`choose_engine`)."""
    return extraction_schedule(device, resolve_num_workers(cfg.data.num_workers)).in_workers


def in_phases(batches: Any, chunk: int) -> Iterator[Any]:
    """`batches` handed out in phases: each phase first takes up to `chunk` batches (at most PHASE_BYTES of
    images) from the loader, waiting for the workers, then yields them; `chunk` 0: straight through."""
    if not chunk:
        yield from batches
        return
    iterator = iter(batches)
    while True:
        phase, size = [], 0
        for batch in iterator:
            phase.append(batch)
            size += batch[0].numel() * batch[0].element_size() if batch is not None else 0
            if len(phase) >= chunk or size >= PHASE_BYTES:
                break
        if not phase:
            return
        yield from phase


@torch.inference_mode()
def extract(
    backbone: nn.Module,
    loader: Any,
    device: torch.device,
    precision: str,
    engine: Engine | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (float32, on CPU) and labels of every image of `loader` (a DataLoader, or a progress
    bar over one), in order, on the loader's `extraction_schedule`.

    `engine` runs the backbone (engines.py: eager PyTorch when None). A batch whose images all failed to decode
    is skipped, so `labels` may be shorter than the dataset.
    """
    backbone.eval()
    engine = engine or eager_engine(backbone, device, precision)
    schedule = extraction_schedule(device, loader_workers(loader), engine.used)
    if schedule.in_workers:  # (the batches come out of the workers as features: the engine ran there)
        loader, run = forward_in_workers(loader, engine), _features_already
    else:
        run = engine
    features, labels = [], []
    for batch in in_phases(loader, schedule.chunk):
        if batch is None:
            continue
        images, targets = batch
        features.append(run(images))
        labels.append(targets)
    if not features:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)


# A worker's forward runs its batch in micro-batches of about this many input pixels (a power of two of images,
# at most the batch): at 1 thread a batch of 32 large images falls out of the CPU's caches. Measured in the workers
# (2 cores, BENCHMARKS.md), against whole batches of 32: MobileNetV2 1.68x at 224 px (micro-batch 4), 1.23x at
# 160 px (8), 0.98-1.2x at 96 px (16); MobileNetV3-Small 1.17x at 128 px; ResNet-18 1.03x at 224 px, 0.93 at 96
# px. A fixed rule of the input's size, not a timing, so a run's features never depend on the machine's load (they
# differ from whole batches' in the last bits: 3e-07 of their largest).
MICRO_BATCH_PIXELS = 250_000


def micro_batch(images: torch.Tensor) -> int:
    """How many of `images` (N, C, H, W) a worker's forward runs at once: see MICRO_BATCH_PIXELS."""
    fits = max(1, MICRO_BATCH_PIXELS // max(1, images.shape[-1] * images.shape[-2]))
    return max(1, min(len(images), 1 << (fits.bit_length() - 1)))


def _features_already(features: torch.Tensor) -> torch.Tensor:
    return features


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Have this process's malloc keep the memory it frees for reuse, instead of handing it back to the kernel
    and faulting it in again at the next forward; whether it could (glibc only).

    A forward's activations are blocks of megabytes, freed when it ends. By default glibc maps each block over
    its mmap threshold (128 KiB, raised up to 32 MiB by the blocks freed) afresh and returns the top of its heap
    once more than twice that is free, so a worker whose forward follows such a pattern touches every page of
    its activations anew each time. Measured in the extraction workers (MobileNetV2, 96 px, 2 cores), forked from
    a process holding 20 ResNet-18: 231,000-245,000 page faults per worker and pass, 308-416 img/s; with this
    set 19,000-26,000 faults (decoding's) and 448-529 img/s, as from a light process (BENCHMARKS.md). Blocks
    of more than 32 MiB are still mapped for themselves; the rest stays with the process up to its peak, which
    is what its forward needs anyway. Called in a short-lived extraction worker, never in the user's process."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # (not glibc: macOS, Windows)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(mallopt(M_TRIM_THRESHOLD, 2**30))


class _MicroBatched:
    """The engine on a batch's images, a `micro_batch` at a time (a worker's forward in an extraction in workers)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        step = micro_batch(images)
        if step >= len(images):
            return self.engine(images)
        return torch.cat([self.engine(images[i : i + step]) for i in range(0, len(images), step)])


def forward_in_workers(batches: Any, engine: Engine) -> Any:
    """`batches` (a DataLoader, or a progress bar over one) whose workers also run `engine` on each batch they
    collate, so each yields (features, labels); the workers are forked for this pass and see the backbone as
    it is now. Each worker keeps the memory its forward frees (`keep_freed_memory`), set as it starts."""
    loader = with_worker_step(
        getattr(batches, "iterable", batches), OnImages(_MicroBatched(engine)), worker_setup=keep_freed_memory
    )
    if hasattr(batches, "iterable"):  # (a progress bar: it counts the same batches from the new loader)
        batches.iterable = loader
        return batches
    return loader
