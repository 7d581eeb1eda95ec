"""How an image becomes the network's input: the Preprocess record and the eval / train transforms."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from tltool.config import DataConfig
from tltool.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


# Steps that give bitwise the same values on a batch (N, C, H, W) as on each image: elementwise and never random.
BATCHABLE_STEPS = (T.ToDtype, T.Normalize)


def split_batch_tail(transform: Any) -> tuple[Any, Any | None]:
    """`transform` as (the part run on each image, the part run once on the collated batch, or None).

    The trailing ToDtype / Normalize steps of a Compose (the eval transform's, and the train transform's without
    random erasing) run on the whole batch in the loader's worker: one call per batch instead of one per image
    (0.12 of 0.43 ms of a 96 px image's preprocessing at 1 thread; BENCHMARKS.md). Being elementwise, they give
    the batch bitwise the values of the per-image transform; predict, serve and export keep the whole transform.
    """
    if not isinstance(transform, T.Compose):
        return transform, None
    steps = list(transform.transforms)
    k = len(steps)
    while k and isinstance(steps[k - 1], BATCHABLE_STEPS):
        k -= 1
    if k == len(steps):
        return transform, None
    return T.Compose(steps[:k]), T.Compose(steps[k:])


# `data.augment` policies: torchvision's own (transforms.v2), with the settings of torchvision's reference
# training recipe (references/classification/presets.py: RandAugment magnitude 9, AugMix severity 3).
POLICIES = ("randaugment", "trivialaugment", "augmix")


def _policy(name: str, interpolation: InterpolationMode) -> T.Transform:
    # (Their geometric ops take nearest or bilinear only: AugMix runs them on tensors, where bicubic is refused.)
    if interpolation not in (InterpolationMode.NEAREST, InterpolationMode.BILINEAR):
        interpolation = InterpolationMode.BILINEAR
    if name == "randaugment":
        return T.RandAugment(num_ops=2, magnitude=9, interpolation=interpolation)
    if name == "trivialaugment":
        return T.TrivialAugmentWide(interpolation=interpolation)
    return T.AugMix(severity=3, interpolation=interpolation)


def train_transform(pre: Preprocess, augment: str, random_erasing: float = 0.0) -> T.Compose:
    """The training transform of `data.augment` (+ `data.random_erasing` after normalization).

    Every random choice of these transforms (crop, flip, colour, the policies' operations and magnitudes,
    AugMix's Dirichlet weights, the erased box) draws from torch's default CPU generator, never from Python's
    `random` (tests/test_augment.py checks it): ImageDataset's per-draw seeding covers them all.
    """
    if augment == "none":
        steps: list[Any] = list(eval_transform(pre).transforms)
    else:
        interpolation = _interpolation(pre.interpolation)
        scale = (0.6, 1.0) if augment == "light" else (0.25, 1.0)
        steps = [
            T.RandomResizedCrop(pre.image_size, scale=scale, interpolation=interpolation, antialias=True),
            T.RandomHorizontalFlip(),
        ]
        if augment == "standard":
            steps.append(T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05))
        elif augment in POLICIES:  # the crop and flip of standard, then the policy (on the uint8 image)
            steps.append(_policy(augment, interpolation))
        steps += [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)]
    if random_erasing > 0:
        steps.append(T.RandomErasing(p=random_erasing))  # (on the normalized tensor, as the reference recipe)
    return T.Compose(steps)
