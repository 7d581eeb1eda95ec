"""The frozen-feature cache: a frozen backbone's output never changes, so compute it once.

The textbook loop recomputes the backbone every epoch; with the backbone frozen and a deterministic
train transform (`data.augment: none`), one forward pass per image is enough and every epoch after the
first trains only the head. With augmentation, `train.feature_cache_views: K` caches K augmented views
of each image and epoch e trains on view e mod K. Features stay in memory, or go to the run directory
(memory-mapped) past `train.feature_cache_memory_mb`, under a key that hashes everything they depend on,
so a stale cache is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tltool import __version__
from tltool.adapt import using_bn_stats
from tltool.checkpoint import safe_load, save_atomic
from tltool.config import Config
from tltool.data import (
    CyclingSampler,
    EpochSampler,
    Preprocess,
    Sample,
    eval_transform,
    is_shard_source,
    make_loader,
    train_transform,
)
from tltool.device import autocast
from tltool.distributed import all_gather_objects, any_rank, barrier, current, shard_bounds
from tltool.transfer import freezes_backbone


def cache_applies(cfg: Config) -> bool:
    """Whether `train.feature_cache` turns the cache on for a run whose backbone starts frozen.

    (Whether the backbone is frozen in a given epoch is the unfreeze plan's answer: `UnfreezePlan.head_only`.)
    """
    mode = cfg.train.feature_cache
    if mode == "off" or not freezes_backbone(cfg.train) or cfg.distill.teacher:  # (a teacher needs the images)
        return False
    if is_shard_source(cfg.data.train) or is_shard_source(cfg.data.val):  # (streamed: no random access to cache)
        return False
    if mode == "on":  # (config.py refuses `on` with data.mixup_alpha / cutmix_alpha)
        return True
    if cfg.data.mixing:  # auto: MixUp / CutMix blend images, which a cache of features cannot serve
        return False
    return deterministic_train_transform(cfg) or cfg.train.feature_cache_views > 1  # auto


def deterministic_train_transform(cfg: Config) -> bool:
    return cfg.data.augment == "none" and cfg.data.random_erasing == 0


def mixing_turns_cache_off(cfg: Config) -> bool:
    """Whether `train.feature_cache: auto` would cache this run's features but for MixUp / CutMix (a note)."""
    mode, data = cfg.train.feature_cache, cfg.data
    if mode != "auto" or not data.mixing or not freezes_backbone(cfg.train) or cfg.distill.teacher:
        return False
    return deterministic_train_transform(cfg) or cfg.train.feature_cache_views > 1


def views_for(cfg: Config) -> int:
    """Deterministic transforms give one view; augmented ones K."""
    return 1 if deterministic_train_transform(cfg) else cfg.train.feature_cache_views


def cache_key(cfg: Config, weights_source: str, preprocess: Preprocess, samples: Sequence[Sample], kind: str) -> str:
    """A hash of everything the cached features depend on (files by path, size and mtime)."""
    digest = hashlib.sha256()
    files = []
    for path, label in samples:
        stat = os.stat(path)
        files.append((path, label, stat.st_size, stat.st_mtime_ns))
    weights_file = cfg.model.weights
    weights_stat = list(os.stat(weights_file)[6:9]) if os.path.isfile(weights_file) else None
    recipe = {
        "kind": kind,
        "backbone": cfg.model.backbone,
        "weights": cfg.model.weights,
        "weights_source": weights_source,
        "weights_stat": weights_stat,
        "preprocess": preprocess.to_dict(),
        "augment": cfg.data.augment if kind != "val" else "none",
        **({"random_erasing": cfg.data.random_erasing} if cfg.data.random_erasing and kind != "val" else {}),
        "views": views_for(cfg) if kind != "val" else 1,
        "bn_stats": cfg.adapt.bn_stats if kind == "unlabeled" else "source",
        "seed": cfg.run.seed,
        "precision": cfg.train.precision,
        "tltool": __version__,
        "torch": str(torch.__version__),
    }
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    digest.update(json.dumps(files).encode())
    return digest.hexdigest()[:24]


class FeatureDataset(Dataset):
    """(features, label) of one view of the cache; `view` selects which one an epoch uses."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels, self.view = features, labels, 0

    def __len__(self) -> int:
        return len(self.labels)  # (a multilabel run's labels are N x classes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[self.view, index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # One indexing op per batch instead of one per sample: the head trains at memory speed.
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.features[self.view, index], self.labels[index]


def _as_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The collate of a FeatureDataset batch: `__getitems__` already returns it whole."""
    return batch


@dataclass
class FeatureCache:
    """Cached backbone outputs of the train (K views) and val sets, with loaders over them."""

    train: FeatureDataset
    val: FeatureDataset
    train_loader: DataLoader
    val_loader: DataLoader
    extract_seconds: float
    location: str
    # The other streams' features (adapt.unlabeled, source.train), K views as train, by stream name, and their
    # loaders: one batch per training batch (CyclingSampler).
    extras: dict[str, FeatureDataset] = field(default_factory=dict)
    extra_loaders: dict[str, DataLoader] = field(default_factory=dict)

    def set_epoch(self, epoch: int) -> None:
        for part in (self.train, *self.extras.values()):
            part.view = epoch % part.features.shape[0]


@torch.inference_mode()
def extract(
    backbone: nn.Module,
    loader: DataLoader,
    device: torch.device,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (float32, on CPU) and labels of every image of `loader`, in order.

    A batch whose images all failed to decode is skipped, so `labels` may be shorter than the dataset.
    """
    backbone.eval()
    features, labels = [], []
    for batch in loader:
        if batch is None:
            continue
        images, targets = batch
        with autocast(device, precision):
            out = backbone(images.to(device, non_blocking=True))
        features.append(out.float().cpu())
        labels.append(targets)
    if not features:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)


def _extract_views(
    backbone: nn.Module,
    samples: Sequence[Sample],
    transform: Any,
    views: int,
    cfg: Config,
    device: torch.device,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K views of every sample: (views, N, D) features and (N,) labels; undecodable images are dropped.

    Under torchrun each rank extracts a contiguous shard and the shards are gathered in rank order, so
    every rank ends with the features of the whole set, in the same order as a single process.
    """
    world = current()
    start, stop = shard_bounds(len(samples), world)
    all_features, labels = [], None
    for view in range(views):
        # View v's augmentation: each draw seeded from (seed, v, position), never from the training RNG.
        loader = make_loader(
            samples[start:stop],
            transform,
            cfg.data.batch_size,  # (the batch the user sized memory for: a larger one raises the peak)
            cfg.data.num_workers,
            seed=cfg.run.seed * 7_919 + view,
            shuffle=False,
            pin_memory=device.type == "cuda",
            seeded=True,
        )
        features, view_labels = extract(backbone, loader, device, precision)
        if labels is None:
            labels = view_labels
        elif len(view_labels) != len(labels):  # an image that decoded once but not twice: be strict
            raise RuntimeError("images changed while their features were extracted")
        all_features.append(features)
    part = (torch.stack(all_features), labels)
    if not world.enabled:
        return part
    shards = [shard for shard in all_gather_objects(part) if shard[1].numel()]
    if not shards:
        return torch.zeros(views, 0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat([f for f, _ in shards], dim=1), torch.cat([lab for _, lab in shards])


def _store(tensors: dict[str, torch.Tensor], directory: Path, key: str, budget_mb: int) -> tuple[dict, str]:
    """Keep the features in memory, or on disk (memory-mapped) when they exceed the budget.

    Under torchrun rank 0 writes the file; the other ranks map it once it is there (a shared run directory)
    and keep their gathered copy in memory where they cannot see it.
    """
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if size <= budget_mb * 2**20:
        return tensors, "memory"
    path = directory / f"{key}.pt"
    if current().is_main:
        save_atomic(tensors, path)
    barrier()
    if not path.is_file():
        return tensors, "memory"
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True), str(path)


def _load_stored(directory: Path, key: str) -> dict | None:
    """The stored features of `key`; under torchrun only when every rank finds them (else all extract)."""
    path = directory / f"{key}.pt"
    found = path.is_file()
    if current().enabled:
        found = not any_rank(not found)[0]
    if not found:
        return None
    return safe_load(path, what="feature cache")


def build_cache(
    cfg: Config,
    model: nn.Module,
    weights_source: str,
    preprocess: Preprocess,
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    device: torch.device,
    precision: str,
    cache_dir: Path,
    extras: dict[str, tuple[Sequence[Sample], int, dict[str, torch.Tensor] | None]] | None = None,
) -> FeatureCache:
    """Extract (or reuse from `cache_dir`) the train and val features and wrap them in loaders.

    `extras`: the other streams (adapt.unlabeled, source.train) by name: (samples, the stream's seed, the
    batch-norm statistics to extract them with, or None for the backbone's own); K views as train.
    """
    start = time.perf_counter()
    views = views_for(cfg)
    parts = {}
    location = "memory"
    augmented = train_transform(preprocess, cfg.data.augment, cfg.data.random_erasing)  # (train and the extras)
    kinds = [
        ("train", train_samples, augmented, views, None),
        ("val", val_samples, eval_transform(preprocess), 1, None),
    ]
    for name, (samples, _, stats) in (extras or {}).items():
        kinds.append((name, samples, augmented, views, stats))
    for kind, samples, transform, count, stats in kinds:
        key = cache_key(cfg, weights_source, preprocess, samples, kind)
        stored = _load_stored(cache_dir, key)
        if stored is None:
            with using_bn_stats(model.backbone, stats):
                features, labels = _extract_views(model.backbone, samples, transform, count, cfg, device, precision)
            stored, where = _store({"features": features, "labels": labels}, cache_dir, key,
                                   cfg.train.feature_cache_memory_mb)  # fmt: skip
        else:
            where = str(cache_dir / f"{key}.pt")
        if where != "memory":
            location = str(cache_dir)
        parts[kind] = FeatureDataset(stored["features"], stored["labels"])
    # Every rank holds all the features; its samplers pick its shard of each epoch, as with images.
    shard = current().shard
    train_loader = DataLoader(
        parts["train"],
        batch_size=cfg.data.batch_size,
        sampler=EpochSampler(len(parts["train"]), cfg.run.seed, shuffle=True, shard=shard, pad=True),
        collate_fn=_as_batch,
        generator=torch.Generator().manual_seed(cfg.run.seed),
    )
    val_loader = DataLoader(
        parts["val"],
        batch_size=max(cfg.data.batch_size, 256),
        sampler=EpochSampler(len(parts["val"]), cfg.run.seed, shuffle=False, shard=shard, pad=False),
        collate_fn=_as_batch,
    )
    cache = FeatureCache(parts["train"], parts["val"], train_loader, val_loader, 0.0, location)
    for name, (_, seed, _) in (extras or {}).items():
        cache.extras[name] = parts[name]
        cache.extra_loaders[name] = DataLoader(
            parts[name],
            batch_size=cfg.data.batch_size,
            sampler=CyclingSampler(len(parts[name]), seed, len(parts["train"]), shard=shard),
            collate_fn=_as_batch,
        )
    cache.extract_seconds = time.perf_counter() - start
    return cache
