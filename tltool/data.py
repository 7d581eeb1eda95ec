"""Data: ImageFolder scanning and splitting, robust image decoding, transforms and loaders.

Nothing here writes into the dataset folder. Unreadable images are found before training by a cheap
header check (zero-byte, not an image, decompression bomb) and, if one still fails to decode mid-epoch
(a truncated JPEG), it is dropped from its batch instead of breaking it.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from tltool.config import DataConfig
from tltool.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Images with more pixels than this are refused unread (Pillow's own decompression-bomb limit).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white

Sample = tuple[str, int]


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the network's input; travels with the weights and the checkpoint."""

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    @classmethod
    def from_transforms(cls, transforms: Any) -> Preprocess:
        """From a torchvision weights preset (`weights.transforms()`)."""
        return cls(
            image_size=int(transforms.crop_size[0]),
            resize_size=int(transforms.resize_size[0]),
            mean=tuple(float(x) for x in transforms.mean),
            std=tuple(float(x) for x in transforms.std),
            interpolation=transforms.interpolation.value,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        return cls(
            image_size=int(data["image_size"]),
            resize_size=int(data["resize_size"]),
            mean=tuple(float(x) for x in data["mean"]),
            std=tuple(float(x) for x in data["std"]),
            interpolation=str(data["interpolation"]),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    def with_config(self, cfg: DataConfig) -> Preprocess:
        """The weights' preset with what the config overrides."""
        image_size = cfg.image_size or self.image_size
        if cfg.resize_size:
            resize_size = cfg.resize_size
        elif cfg.image_size:  # keep the preset's resize/crop ratio (e.g. 256/224)
            resize_size = round(cfg.image_size * self.resize_size / self.image_size)
        else:
            resize_size = self.resize_size
        if resize_size < image_size:
            raise DataError(
                f"data.resize_size {resize_size} is smaller than data.image_size {image_size}",
                f"set data.resize_size to at least {image_size}",
            )
        return Preprocess(
            image_size=image_size,
            resize_size=resize_size,
            mean=tuple(cfg.mean) if cfg.mean else self.mean,
            std=tuple(cfg.std) if cfg.std else self.std,
            interpolation=cfg.interpolation or self.interpolation,
        )


# --- images ------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16/32-bit scaled (not clipped), alpha composited, CMYK/palette converted."""
    mode = image.mode
    if mode.startswith("I"):  # I;16, I;16B, I (16-bit PNGs), ...: scale the 16-bit range to 8 bits
        array = np.asarray(image, dtype=np.float64)
        array = np.clip(array / 257.0, 0, 255)
        return Image.fromarray(np.round(array).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if array.size and np.nanmax(array) <= 1.0:
            array = array * 255.0
        array = np.clip(np.nan_to_num(array), 0, 255)
        return Image.fromarray(np.round(array).astype(np.uint8), mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return image.convert("RGB")
    return image


def image_problem(path: str | Path) -> str | None:
    """Why an image cannot be used (from its header alone), or None. Cheap: nothing is decoded."""
    try:
        if Path(path).stat().st_size == 0:
            return "empty file"
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        return "too many pixels (decompression bomb)"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"unreadable ({exc})"
    if width * height > MAX_PIXELS:
        return f"too many pixels ({width}x{height}, decompression bomb?)"
    if width < 1 or height < 1:
        return "no pixels"
    return None


def load_image(path: str | Path) -> Image.Image:
    """Decode an image as RGB with its EXIF orientation applied (the same in train, eval and predict)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            if image.size[0] * image.size[1] > MAX_PIXELS:
                raise OSError(f"too many pixels ({image.size[0]}x{image.size[1]})")
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)


# --- folders -----------------------------------------------------------------------------------------


def is_visible(path: Path) -> bool:
    """False for the entries every folder scan skips: hidden files and folders, `__MACOSX`, `__pycache__`."""
    return not path.name.startswith((".", "__MACOSX", "__pycache__"))


def image_files(folder: Path) -> Iterator[Path]:
    """The image files under `folder` (by extension, recursively, sorted, hidden entries skipped)."""
    for entry in sorted(folder.iterdir()):
        if not is_visible(entry):
            continue
        if entry.is_dir():
            yield from image_files(entry)
        elif entry.suffix.lower() in IMAGE_EXTENSIONS:
            yield entry


def scan_folder(root: str | Path, key: str = "data.train") -> tuple[list[str], list[Sample]]:
    """ImageFolder layout: class names (sorted sub-folders) and (path, class index) samples.

    Hidden entries (`.DS_Store`, `.ipynb_checkpoints/`) and files that are not images are ignored.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{key} folder {root} does not exist", f"set {key} to a folder of class sub-folders")
    if not root.is_dir():
        raise DataError(f"{key} {root} is not a folder", f"set {key} to a folder of class sub-folders")
    classes = sorted(e.name for e in root.iterdir() if e.is_dir() and is_visible(e))
    if not classes:
        raise DataError(
            f"{key} folder {root} has no class sub-folders",
            "put the images of each class in a sub-folder named after it (root/cat/1.jpg, root/dog/2.jpg)",
        )
    samples: list[Sample] = []
    empty = []
    for index, name in enumerate(classes):
        files = list(image_files(root / name))
        if not files:
            empty.append(name)
        samples.extend((str(f), index) for f in files)
    if empty:
        raise DataError(
            f"{key}: class folder(s) without images: {', '.join(empty)}",
            f"add images or remove the folder(s) from {root}",
        )
    return classes, samples


def stratified_split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out `fraction` of each class (at least one image where a class has two or more), seeded."""
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        items = list(by_class[label])
        rng.shuffle(items)
        count = min(len(items) - 1, max(1, round(len(items) * fraction))) if len(items) > 1 else 0
        val.extend(items[:count])
        train.extend(items[count:])
    return sorted(train), sorted(val)


@dataclass
class DataSplit:
    """The samples of a run: class names and the train / val lists, plus the images found unusable."""

    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    bad: list[tuple[str, str]] = field(default_factory=list)

    def counts(self, which: str) -> Counter:
        return Counter(label for _, label in getattr(self, which))


def _drop_bad(samples: list[Sample], bad: list[tuple[str, str]]) -> list[Sample]:
    kept = []
    for path, label in samples:
        problem = image_problem(path)
        if problem is None:
            kept.append((path, label))
        else:
            bad.append((path, problem))
    return kept


def scan_data(cfg: DataConfig, seed: int) -> DataSplit:
    """Find the classes and samples of `cfg`, split train/val, and check the images' headers."""
    if not cfg.train:
        raise DataError("data.train is not set", "set data.train to a folder of class sub-folders")
    class_names, train = scan_folder(cfg.train, "data.train")
    if cfg.val:
        val_classes, val = scan_folder(cfg.val, "data.val")
        if val_classes != class_names:
            only_train = sorted(set(class_names) - set(val_classes))
            only_val = sorted(set(val_classes) - set(class_names))
            raise DataError(
                f"data.train and data.val have different classes (only in train: {only_train or 'none'}; "
                f"only in val: {only_val or 'none'})",
                "give both the same class sub-folders",
            )
    else:
        train, val = stratified_split(train, cfg.val_split, seed)
        if not val:
            raise DataError(
                "data.val_split leaves no validation images (every class has a single image)",
                "add images or give data.val",
            )
    bad: list[tuple[str, str]] = []
    train = _drop_bad(train, bad)
    val = _drop_bad(val, bad)
    split = DataSplit(class_names, train, val, bad)
    total = len(train) + len(val) + len(bad)
    if bad:
        shown = "; ".join(f"{p}: {why}" for p, why in bad[:3]) + ("; ..." if len(bad) > 3 else "")
        if cfg.on_bad_image == "error":
            raise DataError(
                f"{len(bad)} unreadable image(s): {shown}", "fix or remove them, or set data.on_bad_image=skip"
            )
        if len(bad) / total > cfg.max_bad_fraction:
            raise DataError(
                f"{len(bad)} of {total} images are unreadable ({len(bad) / total:.1%} > data.max_bad_fraction "
                f"{cfg.max_bad_fraction}): {shown}",
                "fix or remove them, or raise data.max_bad_fraction",
            )
        for path, why in bad:
            print(f"warning: skipping {path}: {why}", file=sys.stderr)
    missing = [class_names[i] for i in range(len(class_names)) if split.counts("train")[i] == 0]
    if missing:
        raise DataError(f"no usable training images for class(es) {', '.join(missing)}", "add images")
    return split


def scan_eval_folder(root: str | Path, class_names: list[str]) -> list[Sample]:
    """Samples of an evaluation folder, labelled with the checkpoint's class indices."""
    classes, samples = scan_folder(root, "--data")
    unknown = sorted(set(classes) - set(class_names))
    if unknown:
        raise DataError(
            f"{root} has classes the model does not know: {', '.join(unknown)}",
            f"its classes are: {', '.join(class_names)}",
        )
    index = {name: class_names.index(name) for name in classes}
    kept = []
    for path, label in samples:
        problem = image_problem(path)
        if problem is None:
            kept.append((path, index[classes[label]]))
        else:
            print(f"warning: skipping {path}: {problem}", file=sys.stderr)
    return kept


# --- transforms and loaders --------------------------------------------------------------------------


def _interpolation(name: str) -> InterpolationMode:
    return InterpolationMode(name)


def eval_transform(pre: Preprocess) -> T.Compose:
    return T.Compose(
        [
            T.Resize(pre.resize_size, interpolation=_interpolation(pre.interpolation), antialias=True),
            T.CenterCrop(pre.image_size),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(pre.mean, pre.std),
        ]
    )


def train_transform(pre: Preprocess, augment: str) -> T.Compose:
    if augment == "none":
        return eval_transform(pre)
    interpolation = _interpolation(pre.interpolation)
    scale = (0.6, 1.0) if augment == "light" else (0.25, 1.0)
    steps: list[Any] = [
        T.RandomResizedCrop(pre.image_size, scale=scale, interpolation=interpolation, antialias=True),
        T.RandomHorizontalFlip(),
    ]
    if augment == "standard":
        steps.append(T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05))
    steps += [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)]
    return T.Compose(steps)


class ImageDataset(Dataset):
    """(path, label) samples through a transform; an image that fails to decode yields None.

    A key may be an index or (index, seed): the random transform of that draw then runs on its own seeded
    stream, so a sample's augmentation depends on (run.seed, epoch, position in the epoch) only, not on the
    number of workers, which worker took it, or the main process's RNG (dropout).
    """

    def __init__(self, samples: Sequence[Sample], transform: Any) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        try:
            image = load_image(path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
            print(f"warning: skipping {path}: cannot decode ({exc})", file=sys.stderr)
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
    """Default collation of the images that decoded; None when none of the batch did."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    images = torch.stack([item[0] for item in batch])
    labels = torch.tensor([item[1] for item in batch], dtype=torch.long)
    return images, labels


class EpochSampler(Sampler[int]):
    """A shuffled order that is a function of (seed, epoch) alone, so a resumed run sees the same order.

    `skip` leaves out the first samples of the epoch's order: a run resumed mid-epoch continues there.
    Under torchrun (`shard=(rank, world)`) each rank takes every world-th index of that one order; with
    `pad` (training) the order is first extended with its own start to a multiple of the world size, as
    torch's DistributedSampler does, so every rank runs the same number of steps. Without `pad`
    (evaluation) no sample is seen twice and ranks may get one fewer.

    `seeded` yields (index, seed) keys instead: the seed of each draw is a function of (seed, epoch, position
    in the epoch's order over all ranks), for ImageDataset's augmentation.
    """

    def __init__(
        self,
        size: int,
        seed: int,
        shuffle: bool = True,
        shard: tuple[int, int] = (0, 1),
        pad: bool = True,
        seeded: bool = False,
    ) -> None:
        self.size, self.seed, self.shuffle, self.epoch, self.skip = size, seed, shuffle, 0, 0
        self.rank, self.world = shard
        self.pad, self.seeded = pad, seeded

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def order(self) -> list[int]:
        """The epoch's order over all ranks."""
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def indices(self) -> list[int]:
        """This rank's part of the epoch's order."""
        order = self.order()
        if self.world == 1:
            return order
        if self.pad and order:
            missing = -len(order) % self.world
            order = order + (order * (missing // len(order) + 1))[:missing]
        return order[self.rank :: self.world]

    def shard_size(self) -> int:
        if self.world == 1:
            return self.size
        if self.pad:
            return math.ceil(self.size / self.world) if self.size else 0
        return len(range(self.rank, self.size, self.world))

    def __iter__(self) -> Iterator[Any]:
        shard = self.indices()
        if not self.seeded:
            return iter(shard[self.skip :])
        base = (self.seed * 1_000_003 + self.epoch) * 2_654_435_761
        # Position k of this rank's shard is position rank + k * world of the epoch's order.
        return iter((shard[k], (base + self.rank + k * self.world) % 2**63) for k in range(self.skip, len(shard)))

    def __len__(self) -> int:
        return max(0, self.shard_size() - self.skip)


class BalancedSampler(EpochSampler):
    """`data.sampler: balanced`: each epoch draws as many samples as there are, with replacement, every class
    equally likely (torch's WeightedRandomSampler with weights 1 / class count).

    As EpochSampler, the draw is a function of (seed, epoch) alone, `skip` resumes it mid-epoch and `shard`
    splits it across ranks.
    """

    def __init__(self, labels: Sequence[int], seed: int, shard: tuple[int, int] = (0, 1), seeded: bool = False) -> None:
        super().__init__(len(labels), seed, shuffle=True, shard=shard, pad=True, seeded=seeded)
        counts = Counter(labels)
        self.weights = torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.float64)

    def order(self) -> list[int]:
        if self.size == 0:
            return []
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.multinomial(self.weights, self.size, replacement=True, generator=generator).tolist()


def _init_worker(worker_id: int) -> None:
    # Ctrl-C is the main process's to handle (it saves and exits); workers must not die of it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # torch seeds python's `random` and torch in each worker from the loader's generator; numpy too.
    # (tltool's own augmentation does not use these streams: each draw is seeded by the sampler.)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


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
) -> DataLoader:
    """A loader whose order is a function of (seed, epoch); `balanced` draws classes equally often.

    `shard=(rank, world)`: this rank's part of each epoch (training loaders, `shuffle`, are padded to
    equal parts; evaluation loaders see each sample exactly once over all ranks). `seeded`: every draw's
    random transform is seeded by the sampler (training and augmented-view loaders). Workers persist
    across epochs (no fork and dataset copy per epoch) and prefetch two batches each.
    """
    if balanced:
        sampler: EpochSampler = BalancedSampler([label for _, label in samples], seed, shard=shard, seeded=seeded)
    else:
        sampler = EpochSampler(len(samples), seed, shuffle=shuffle, shard=shard, pad=shuffle, seeded=seeded)
    workers = resolve_num_workers(num_workers)
    return DataLoader(
        ImageDataset(samples, transform),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skip_bad,
        pin_memory=pin_memory,
        worker_init_fn=_init_worker if workers else None,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=workers > 0,
    )


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of an epoch's random streams (augmentation, dropout) on a rank; rank 0's is the single process's.

    (The sample order is not rank-specific: every rank draws the same order and takes its shard of it.)
    """
    return seed * 1_000_003 + epoch + rank * 7_919_000_003


def set_loader_epoch(loader: DataLoader, seed: int, epoch: int, skip_batches: int = 0, rank: int = 0) -> None:
    """Make the order and the workers' random streams of this epoch depend on (seed, epoch, rank) only.

    `skip_batches` starts the epoch after that many batches (a run resumed from a mid-epoch checkpoint).
    """
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch, skip=skip_batches * loader.batch_size)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed(seed, epoch, rank))
