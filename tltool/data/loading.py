"""Loaders: the dataset over samples, the epoch samplers (seeded, resumable, sharded) and the DataLoader.

An image that fails to decode mid-epoch (a truncated JPEG) is dropped from its batch instead of breaking it.
"""

from __future__ import annotations

import functools
import math
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from tltool.data.folders import Sample
from tltool.data.images import load_image
from tltool.data.shards import ShardSamples, ShardStream
from tltool.data.transforms import split_batch_tail


class ImageDataset(Dataset):
    """(path, label) samples through a transform; an image that fails to decode yields None.

    A key may be an index or (index, seed): the random transform of that draw then runs on its own seeded
    stream, so a sample's augmentation depends on (run.seed, epoch, position in the epoch) only, not on the
    number of workers, which worker took it, or the main process's RNG (dropout).
    """

    def __init__(self, samples: Sequence[Sample], transform: Any) -> None:
        self.samples = list(samples)
        self.transform = transform
        # Which samples were reported undecodable: in shared memory, so each file is reported once over all
        # epochs, cycling passes and loader workers (the counts per epoch are the training loop's).
        self.reported = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        try:
            image = load_image(path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
            if not self.reported[index]:
                self.reported[index] = True
                print(f"warning: skipping {path}: cannot decode ({exc}); reported once", file=sys.stderr)
            return None
        if seed is None:
            return self.transform(image), label
        # torchvision's transforms draw from torch's global CPU generator: seed it for this draw and put it
        # back. (The generator itself, not torch.manual_seed, which also queues a CUDA seeding per call.)
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.transform(image), label
        finally:
            generator.set_state(state)


def collate_skip_bad(batch: list[Any]):
    """Default collation of the images that decoded; None when none of the batch did. Labels are class
    indices (long), or a multilabel run's multi-hot targets (float32, batch x classes)."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    images = torch.stack([item[0] for item in batch])
    multi_hot = isinstance(batch[0][1], tuple)
    labels = torch.tensor([item[1] for item in batch], dtype=torch.float32 if multi_hot else torch.long)
    return images, labels


class Then:
    """A loader's collate function followed by `step` on each collated batch that is not None."""

    def __init__(self, collate: Any, step: Any) -> None:
        self.collate, self.step = collate, step

    def __call__(self, batch: Any):
        out = self.collate(batch)
        return None if out is None else self.step(out)


class OnImages:
    """A step of a collated (images, labels) batch: `fn` on its images, the labels passed on."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, batch: tuple[Any, Any]) -> tuple[Any, Any]:
        return self.fn(batch[0]), batch[1]


class InitThen:
    """A loader's worker_init_fn (or none) followed by `then()` in each worker."""

    def __init__(self, init: Any, then: Any) -> None:
        self.init, self.then = init, then

    def __call__(self, worker_id: int) -> None:
        if self.init is not None:
            self.init(worker_id)
        self.then()


def with_worker_step(loader: DataLoader, step: Any, worker_setup: Any = None) -> DataLoader:
    """`loader`'s batches, in its order and from its dataset, with `step` applied to each in the worker that
    collated it (in the main process without workers). Its workers last one pass (not persistent); each first
    runs `loader`'s worker_init_fn, then `worker_setup()` where given (never in the main process)."""
    init = loader.worker_init_fn if worker_setup is None else InitThen(loader.worker_init_fn, worker_setup)
    options: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": Then(loader.collate_fn, step),
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": init,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
    }
    if loader.num_workers:
        options["prefetch_factor"] = loader.prefetch_factor
    if isinstance(loader.dataset, IterableDataset):
        options.update(batch_size=loader.batch_size, drop_last=loader.drop_last)
    elif loader.batch_sampler is not None:
        options["batch_sampler"] = loader.batch_sampler
    else:
        options.update(batch_size=None, sampler=loader.sampler)
    return DataLoader(loader.dataset, **options)


class EpochSampler(Sampler[int]):
    """A shuffled order that is a function of (seed, epoch) alone, so a resumed run sees the same order.

    `skip` leaves out the first samples of the epoch's order: a run resumed mid-epoch continues there.
    Under torchrun (`shard=(rank, world)`) each rank takes every world-th index of that one order; with
    `pad` (training) the order is first extended with its own start to a multiple of the world size, as
    torch's DistributedSampler does, so every rank runs the same number of steps. Without `pad`
    (evaluation) no sample is seen twice and ranks may get one fewer.

    `seeded` yields (index, seed) keys instead: the seed of each draw is a function of (seed, epoch, position
    in the epoch's order over all ranks), for ImageDataset's augmentation.

    `drop_single` (a batch size, 0: off): when this rank's part of the epoch would end in a batch of a single
    sample, that sample is left out (batch norm cannot train on one). The cut depends on the sizes alone, so
    it is the same at every epoch, on every rank (padded parts are equal) and in a resumed epoch.
    """

    def __init__(
        self,
        size: int,
        seed: int,
        shuffle: bool = True,
        shard: tuple[int, int] = (0, 1),
        pad: bool = True,
        seeded: bool = False,
        drop_single: int = 0,
    ) -> None:
        self.size, self.seed, self.shuffle, self.epoch, self.skip = size, seed, shuffle, 0, 0
        self.rank, self.world = shard
        self.pad, self.seeded, self.drop_single = pad, seeded, drop_single

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def order(self) -> list[int]:
        """The epoch's order over all ranks."""
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def indices(self) -> list[int]:
        """This rank's part of the epoch's order (without a last sample that `drop_single` leaves out)."""
        order = self.order()
        if self.world > 1:
            if self.pad and order:
                missing = -len(order) % self.world
                order = order + (order * (missing // len(order) + 1))[:missing]
            order = order[self.rank :: self.world]
        return order[: self.shard_size()]

    def full_shard_size(self) -> int:
        """Samples this rank draws per epoch, before `drop_single`."""
        if self.world == 1:
            return self.size
        if self.pad:
            return math.ceil(self.size / self.world) if self.size else 0
        return len(range(self.rank, self.size, self.world))

    def dropped(self) -> int:
        """1 when this rank's last batch would hold a single sample and `drop_single` leaves it out, else 0."""
        size = self.full_shard_size()
        return int(self.drop_single > 1 and size > 1 and size % self.drop_single == 1)

    def shard_size(self) -> int:
        """Samples this rank draws per epoch."""
        return self.full_shard_size() - self.dropped()

    def __iter__(self) -> Iterator[Any]:
        shard = self.indices()
        if not self.seeded:
            return iter(shard[self.skip :])
        base = (self.seed * 1_000_003 + self.epoch) * 2_654_435_761
        # Position k of this rank's shard is position rank + k * world of the epoch's order.
        return iter((shard[k], (base + self.rank + k * self.world) % 2**63) for k in range(self.skip, len(shard)))

    def __len__(self) -> int:
        return max(0, self.shard_size() - self.skip)


class CyclingSampler(EpochSampler):
    """`draws` draws per epoch from a pool of `pool` samples: shuffled passes over the pool, one after another,
    cut at `draws` (a second stream drawn beside the training set, e.g. unlabelled target images, one batch
    per training batch whatever the two sizes).

    Pass k of epoch e is a permutation seeded by (seed, e, k): a function of (seed, epoch) alone, so, as with
    EpochSampler, `skip` resumes it mid-epoch and `shard` splits it across ranks.
    """

    def __init__(
        self,
        pool: int,
        seed: int,
        draws: int,
        shard: tuple[int, int] = (0, 1),
        seeded: bool = False,
        drop_single: int = 0,
    ) -> None:
        super().__init__(draws, seed, shuffle=True, shard=shard, pad=True, seeded=seeded, drop_single=drop_single)
        self.pool = pool

    def order(self) -> list[int]:
        out: list[int] = []
        passes = 0
        while len(out) < self.size and self.pool:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_009 + passes)
            out += torch.randperm(self.pool, generator=generator).tolist()
            passes += 1
        return out[: self.size]


class BalancedSampler(EpochSampler):
    """`data.sampler: balanced`: each epoch draws as many samples as there are, with replacement, every class
    equally likely (torch's WeightedRandomSampler with weights 1 / class count).

    As EpochSampler, the draw is a function of (seed, epoch) alone, `skip` resumes it mid-epoch and `shard`
    splits it across ranks.
    """

    def __init__(
        self,
        labels: Sequence[int],
        seed: int,
        shard: tuple[int, int] = (0, 1),
        seeded: bool = False,
        drop_single: int = 0,
    ) -> None:
        super().__init__(len(labels), seed, shuffle=True, shard=shard, pad=True, seeded=seeded, drop_single=drop_single)
        counts = Counter(labels)
        self.weights = torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.float64)

    def order(self) -> list[int]:
        if self.size == 0:
            return []
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.multinomial(self.weights, self.size, replacement=True, generator=generator).tolist()


def _init_worker(worker_id: int) -> None:
    # Ctrl-C, SIGTERM, SIGHUP, SIGUSR1 are the main process's to handle (it saves and exits); workers must not
    # die of them first (a terminal's Ctrl-C and Slurm's signals reach every process of the job).
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    # torch seeds python's `random` and torch in each worker from the loader's generator; numpy too.
    # (tltool's own augmentation does not use these streams: each draw is seeded by the sampler.)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


@functools.cache
def _stop_workers_at_exit() -> None:
    """Register (once) `_kill_leftover_workers` to run at exit before multiprocessing's own exit handler."""
    import atexit
    import multiprocessing.util  # noqa: F401  (its handler first: atexit runs the last registered first)

    atexit.register(_kill_leftover_workers)


def _kill_leftover_workers() -> None:
    """At exit, stop the daemonic children still running: loader workers of a loader in a reference cycle not yet
    collected.

    multiprocessing's exit handler stops a daemonic child with SIGTERM and then waits for it without a limit; a
    loader worker ignores SIGTERM (`_init_worker`) and only exits once its parent has, so the process would
    wait forever. Here each gets SIGTERM first (as multiprocessing would), and SIGKILL if it is still there
    2 s later: a worker left at exit has no batch anyone will read. (Only at exit, only when such children are
    left: a normal run has freed its loaders by then and pays nothing.)
    """
    import multiprocessing

    children = [p for p in multiprocessing.active_children() if p.daemon]
    if not children:
        return
    if hasattr(signal, "SIGCHLD"):  # (torch's loader handler would raise on a killed worker, mid-way)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for process in children:
        process.terminate()
    for process in children:
        process.join(timeout=2)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset, Slurm or a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_num_workers(setting: int | str) -> int:
    """`data.num_workers` as a number. auto: the CPUs of this process's share of the machine (its cores over
    the processes torchrun started on this node), at most 8; none below 2, where a single worker only adds
    inter-process copies to decoding that competes with compute anyway (MEASURED.md: 630 vs 780 img/s)."""
    if setting != "auto":
        return int(setting)
    share = usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return min(8, share) if share >= 2 else 0


def make_loader(
    samples: Sequence[Sample],
    transform: Any,
    batch_size: int,
    num_workers: int | str,
    seed: int,
    shuffle: bool,
    pin_memory: bool = False,
    balanced: bool = False,
    shard: tuple[int, int] = (0, 1),
    seeded: bool = False,
    draws: int | None = None,
    drop_single: bool = False,
    buffer: int = 1000,
) -> DataLoader:
    """A loader whose order is a function of (seed, epoch); `balanced` draws classes equally often; `draws`
    makes each epoch that many draws from the samples, pass after shuffled pass (`CyclingSampler`).

    `shard=(rank, world)`: this rank's part of each epoch (training loaders, `shuffle`, are padded to
    equal parts; evaluation loaders see each sample exactly once over all ranks). `seeded`: every draw's
    random transform is seeded by the sampler (training and augmented-view loaders). Workers persist
    across epochs (no fork and dataset copy per epoch) and prefetch two batches each; the transform's trailing
    ToDtype / Normalize run once per batch there (`split_batch_tail`: bitwise the same). `drop_single`: an
    epoch part that would end in a batch of one sample leaves it out (training with batch norm; `EpochSampler`).

    Samples of a shard source (`ShardSamples`) are streamed by a `ShardStream` (its order: `tltool.data.shards`;
    `buffer` is its shuffle buffer; its epoch is in shared memory, so its workers persist too). `balanced` and
    `draws` do not apply to shards (the config refuses them).
    """
    single = batch_size if drop_single else 0
    workers = resolve_num_workers(num_workers)
    if workers:
        _stop_workers_at_exit()
    if isinstance(samples, ShardSamples):
        stream = ShardStream(samples, transform, batch_size, seed, shuffle, shard, buffer, seeded, single)
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            pin_memory=pin_memory,
            worker_init_fn=_init_worker if workers else None,
            generator=torch.Generator().manual_seed(seed),
            persistent_workers=workers > 0,
        )
    if draws is not None:
        sampler: EpochSampler = CyclingSampler(len(samples), seed, draws, shard, seeded, drop_single=single)
    elif balanced:
        sampler = BalancedSampler([label for _, label in samples], seed, shard, seeded, drop_single=single)
    else:
        sampler = EpochSampler(len(samples), seed, shuffle, shard, pad=shuffle, seeded=seeded, drop_single=single)
    each, tail = split_batch_tail(transform)
    return DataLoader(
        ImageDataset(samples, each),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skip_bad if tail is None else Then(collate_skip_bad, OnImages(tail)),  # (in the worker)
        pin_memory=pin_memory,
        worker_init_fn=_init_worker if workers else None,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=workers > 0,
    )


def epoch_draws(loader: Any) -> Any:
    """What decides a loader's epoch (its sizes: `shard_size()`, `full_shard_size()`, `dropped()`): the sampler,
    or the ShardStream of a shard source; None for given batches."""
    dataset = getattr(loader, "dataset", None)
    return dataset if isinstance(dataset, ShardStream) else getattr(loader, "sampler", None)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of an epoch's random streams (augmentation, dropout) on a rank; rank 0's is the single process's.

    (The sample order is not rank-specific: every rank draws the same order and takes its shard of it.)
    """
    return seed * 1_000_003 + epoch + rank * 7_919_000_003


def set_loader_epoch(loader: DataLoader, seed: int, epoch: int, skip_batches: int = 0, rank: int = 0) -> None:
    """Make the order and the workers' random streams of this epoch depend on (seed, epoch, rank) only.

    `skip_batches` starts the epoch after that many batches (a run resumed from a mid-epoch checkpoint).
    """
    if isinstance(loader.dataset, ShardStream):
        loader.dataset.set_epoch(epoch, skip_batches)
    elif hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch, skip=skip_batches * loader.batch_size)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed(seed, epoch, rank))


@dataclass
class Stream:
    """A named stream of training batches: images from a folder, cached features, or given batches.

    A loader's order, augmentation and worker seeds are functions of (seed, epoch, position) through its
    sampler; `set_epoch` positions it for an epoch, skipping the batches a mid-epoch checkpoint already did.
    A plain list of batches (the benchmark's) is taken as it is.
    """

    name: str
    loader: Iterable[Any]
    batch_size: int = 1
    seed: int | None = None  # the stream's own seed (None: run.seed)

    def num_batches(self) -> int:
        """Batches this rank draws per epoch."""
        if isinstance(getattr(self.loader, "dataset", None), ShardStream):
            return self.loader.dataset.num_batches()  # type: ignore[attr-defined]
        sampler = getattr(self.loader, "sampler", None)
        if sampler is not None and hasattr(sampler, "shard_size"):
            return math.ceil(sampler.shard_size() / self.batch_size)
        return len(self.loader)  # type: ignore[arg-type]

    def set_epoch(self, seed: int, epoch: int, skip_batches: int, rank: int) -> None:
        if isinstance(self.loader, DataLoader):
            seed = seed if self.seed is None else self.seed
            set_loader_epoch(self.loader, seed, epoch, skip_batches=skip_batches, rank=rank)
