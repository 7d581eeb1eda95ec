"""The frozen-feature cache: a frozen backbone's output never changes, so compute it once.

The textbook loop recomputes the backbone every epoch; with the backbone frozen and a deterministic
train transform (`data.augment: none`), one forward pass per image is enough and every epoch after the
first trains only the head. With augmentation, `train.feature_cache_views: K` caches K augmented views
of each image and epoch e trains on view e mod K. The features are kept across runs in the feature store
(featurestore.py: `~/.cache/tltool/features`, a size budget, least recently used out first) under a key that
hashes everything they depend on (`cache_key`), so a later run, `tltool baseline` or LP-FT's probe on the same
images with the same backbone reuses them and a stale entry is never used. Features larger than
`train.feature_cache_memory_mb` are memory-mapped from their file instead of held in RAM. Without a usable
store (an unwritable default folder, an entry larger than the whole budget) a run keeps them to itself, in
memory or in its run directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
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
from tltool.device import use_channels_last
from tltool.distributed import all_gather_objects, any_rank, barrier, current, shard_bounds
from tltool.engines import Engine, choose_engine, eager_engine, engine_precision
from tltool.extraction import eager_in_workers, extract
from tltool.featurestore import FeatureStore, Warn, module_digest, open_store, tensor_digest
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
    if mode == "on":  # (the config refuses `on` with data.mixup_alpha / cutmix_alpha)
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


def cache_key(
    cfg: Config,
    weights_id: str,
    preprocess: Preprocess,
    samples: Sequence[Sample],
    kind: str,
    precision: str | None = None,
    device_type: str = "cpu",
    channels_last: bool = False,
    stats: dict[str, torch.Tensor] | None = None,
    augmented: bool | None = None,
    engine: str = "eager",
) -> str:
    """A hash of everything the features of `samples` depend on: the key of the store's entry.

    - The network: the backbone's name and `weights_id`, the identity of its weights (featurestore.module_digest:
      a hash of every weight and buffer, so a weights file rewritten under the same name, a different download
      or a checkpoint's backbone is another key), AdaBN's batch-norm statistics (`stats`) when they replace its
      own; the versions of tltool, torch, torchvision (and timm for timm/ backbones), which build the network.
    - How images become inputs: the preprocessing (size, resize, mean, std, interpolation) and the transform:
      `eval` for val and for a deterministic train transform (the same transform: train and val, finetune and
      `tltool baseline` share entries, and another seed reuses them where data.val fixes the split), else the
      augmentation policy, random erasing, the number of views, the seed and the process count (under
      torchrun each process draws its shard's augmentations) -- only then is `kind` part of the key.
      (`augmented=False`: the eval transform whatever the config says, as `tltool baseline` extracts.)
    - The arithmetic: precision, device type, memory layout (channels_last) and the engine that ran the
      backbone (`train.feature_engine`: eager, compile, onnxruntime), which change the last bits.
    - The images: each file's path, label, size and modification time. One stat per image, no reading
      (0.16-0.21 s per 10,000 files measured on this project's loaded 2-core machine; more on a network file
      system). Not enough when a file's content changes but its size and mtime do not: rewritten within the
      file system's timestamp resolution, or an old mtime restored onto new content of the same size (cp -p,
      rsync -a, tar -x, some sync tools); then run `tltool cache clear`. A content hash would read every
      image on every run (the decode's I/O again).
    """
    digest = hashlib.sha256()
    files = []
    for path, label in samples:
        # (absolute: the same files named relative in one command and absolute in another are one entry)
        where = os.path.abspath(path)
        try:
            stat = os.stat(path)
            files.append((where, label, stat.st_size, stat.st_mtime_ns))
        except OSError:  # (removed since the scan: it fails to decode, and the key is still a function of it)
            files.append((where, label, None, None))
    if augmented is None:
        augmented = kind != "val" and not deterministic_train_transform(cfg)
    transform: Any = "eval"
    if augmented:
        transform = {
            "kind": kind,
            "augment": cfg.data.augment,
            "random_erasing": cfg.data.random_erasing,
            "views": views_for(cfg),
            "seed": cfg.run.seed,
            "world": current().world_size,
        }
    versions = {"tltool": __version__, "torch": str(torch.__version__), "torchvision": torchvision.__version__}
    if cfg.model.backbone.startswith("timm/"):
        versions["timm"] = importlib.metadata.version("timm")
    recipe = {
        "backbone": cfg.model.backbone,
        "weights": weights_id,
        "bn_stats": tensor_digest(stats) if stats else None,
        "preprocess": preprocess.to_dict(),
        "transform": transform,
        "precision": precision or cfg.train.precision,
        "device": device_type,
        "channels_last": channels_last,
        "engine": engine,
        "versions": versions,
    }
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    digest.update(json.dumps(files).encode())
    return digest.hexdigest()[:24]


def transform_name(cfg: Config, kind: str, augmented: bool | None = None) -> str:
    """The transform of a cache entry, as `tltool cache list` shows it."""
    if augmented is False or kind == "val" or deterministic_train_transform(cfg):
        return "eval"
    erasing = f"+erasing {cfg.data.random_erasing}" if cfg.data.random_erasing else ""
    return f"{cfg.data.augment}{erasing} x{views_for(cfg)} seed {cfg.run.seed}"


def entry_meta(
    cfg: Config,
    weights_source: str,
    samples: Sequence[Sample],
    kind: str,
    precision: str,
    augmented: bool | None = None,
    engine: str = "eager",
) -> dict[str, Any]:
    """What `tltool cache list` shows of an entry (not part of its key)."""
    try:
        folder = os.path.commonpath([os.path.dirname(path) for path, _ in samples]) if samples else ""
    except ValueError:  # (paths on different drives)
        folder = ""
    return {
        "kind": kind,
        "backbone": cfg.model.backbone,
        "weights": weights_source,
        "transform": transform_name(cfg, kind, augmented),
        "images": len(samples),
        "data": folder,
        "precision": precision,
        "engine": engine,
    }


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
    store: str | None = None  # the feature store's folder (None: none was usable)
    engine: dict[str, Any] = field(default_factory=dict)  # train.feature_engine: requested, chosen, used, ...
    reused: list[str] = field(default_factory=list)  # the parts (train, val, ...) found there, not extracted

    def set_epoch(self, epoch: int) -> None:
        for part in (self.train, *self.extras.values()):
            part.view = epoch % part.features.shape[0]


def _extract_views(
    backbone: nn.Module,
    samples: Sequence[Sample],
    transform: Any,
    views: int,
    cfg: Config,
    device: torch.device,
    precision: str,
    engine: Engine | None = None,
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
        features, view_labels = extract(backbone, loader, device, precision, engine)
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


def cache_reuse(cache: FeatureCache) -> str:
    """How much of `cache` came from the feature store, for the run's features line."""
    total = 2 + len(cache.extras)
    if cache.store is None:
        text = "; no feature store: extracted for this run"
    elif not cache.reused:
        text = f"; extracted, kept in {cache.store}"
    else:
        text = f"; {len(cache.reused)} of {total} parts reused from {cache.store}"
    return text + engine_note(cache.engine, len(cache.reused) == total)


def engine_note(engine: dict[str, Any], all_reused: bool = False) -> str:
    """Which engine extracted (train.feature_engine), for the run's features line."""
    if not engine:
        return ""
    chosen = engine["chosen"] + (" (auto)" if engine["requested"] == "auto" else "")
    if all_reused:
        return f"; engine {chosen}, not run"
    if engine["used"] != engine["chosen"]:
        return f"; engine {chosen} {engine['fallback']}: eager"
    diff = engine.get("max_diff_from_eager")
    return f"; engine {chosen}" + (f", max diff from eager {diff:.2g}" if diff is not None else "")


def _main_warn(text: str) -> None:
    if current().is_main:
        print(text, file=sys.stderr, flush=True)


def _fetch(
    store: FeatureStore | None,
    key: str,
    meta: dict[str, Any],
    build: Any,
    cache_dir: Path,
    memory_mb: int,
) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, where): "memory", a file they are mapped from, prefixed "reused:" when found, not extracted."""
    stored = _load_stored(cache_dir, key)  # (the run's own folder first: a resumed run of features kept there)
    if stored is not None:
        return stored, "reused:" + str(cache_dir / f"{key}.pt")
    if store is not None:
        got = store.fetch(key, meta, build, memory_mb * 2**20)
        if got.reused:
            return got.tensors, "reused:" + (str(got.path) if got.path else "memory")
        if got.stored:
            return got.tensors, str(got.path) if got.path else "memory"
        return _store(got.tensors, cache_dir, key, memory_mb)  # (larger than the store's whole budget)
    return _store(build(), cache_dir, key, memory_mb)  # (no usable store)


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
    warn: Warn | None = None,
) -> FeatureCache:
    """Reuse the train and val features from the feature store, or extract and store them; wrap them in loaders.

    `extras`: the other streams (adapt.unlabeled, source.train) by name: (samples, the stream's seed, the
    batch-norm statistics to extract them with, or None for the backbone's own); K views as train.
    `cache_dir`: the run's own folder for features the store cannot keep (no usable store, larger than its
    budget) and larger than `train.feature_cache_memory_mb`.
    """
    start = time.perf_counter()
    warn = warn or _main_warn
    store = open_store(cfg.train.feature_cache_dir, cfg.train.feature_cache_max_mb, warn)
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
    weights_id = module_digest(model.backbone)
    layout = use_channels_last(cfg.train.channels_last, model)
    # train.feature_engine: one engine for the parts the backbone's own statistics extract (AdaBN's parts run
    # eager: an exported graph holds the backbone's statistics); auto chooses by how many images it would run.
    images = sum(len(samples) * count for _, samples, _, count, stats in kinds if stats is None)
    name = choose_engine(cfg.train.feature_engine, images, device, precision, current().enabled,
                         eager_in_workers(cfg, device))  # fmt: skip
    engine = Engine(model.backbone, device, engine_precision(name, precision), name, cfg.train.feature_engine,
                    warn)  # fmt: skip
    reused = []
    for kind, samples, transform, count, stats in kinds:
        part_engine = engine if stats is None else eager_engine(model.backbone, device, precision)
        part_precision = part_engine.precision
        key = cache_key(cfg, weights_id, preprocess, samples, kind, part_precision, device.type, layout, stats,
                        engine=part_engine.name)  # fmt: skip

        def build(samples=samples, transform=transform, count=count, stats=stats, part_engine=part_engine,
                  part_precision=part_precision) -> dict[str, torch.Tensor]:  # fmt: skip
            with using_bn_stats(model.backbone, stats):
                features, labels = _extract_views(
                    model.backbone, samples, transform, count, cfg, device, part_precision, part_engine
                )
            return {"features": features, "labels": labels}

        meta = entry_meta(cfg, weights_source, samples, kind, part_precision, engine=part_engine.name)
        stored, where = _fetch(store, key, meta, build, cache_dir, cfg.train.feature_cache_memory_mb)
        if where.startswith("reused"):
            reused.append(kind)
            where = where.partition(":")[2]
        if where != "memory":
            location = str(Path(where).parent)
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
    cache.store, cache.reused = (str(store.root) if store is not None else None), reused
    cache.engine = engine.describe()
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
