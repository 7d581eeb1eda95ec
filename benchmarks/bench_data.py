"""Shards vs a folder of the same images: the scan at start and images/s through the training loader.

    python benchmarks/bench_data.py            # 2,000 JPEGs of 64 px, shards of 250 (make bench-data)
    python benchmarks/bench_data.py --quick    # 600 images
    python benchmarks/bench_data.py --size 224 # larger images: decoding outweighs reading the tars

Generated photo-like JPEGs (quality 90) in 10 class folders, then `tltool shard` of that folder
(`write_shards`, no val split). Measured, files in the OS cache (one untimed pass first):
- scan: what a run does before its first step: folder = `scan_source` + the header check of every file
  (`file_problem`, as `scan_data`); shards = `scan_shards` (each tar's headers, the .cls members read).
- images/s: one epoch of `make_loader(..., shuffle=True, seeded=True)` with the train transform of
  data.augment=light (crop 7/8 of --size), batch 32, for each worker count; the best of the repeats. Folder = ImageDataset
  + EpochSampler; shards = ShardStream (shuffle buffer 1000; each worker reads the rank's shards and decodes
  its own batches).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tltool.data import make_loader, scan_shards, scan_source, set_loader_epoch, train_transform  # noqa: E402
from tltool.data.folders import file_problem  # noqa: E402
from tltool.data.shards import write_shards  # noqa: E402
from tltool.data.transforms import Preprocess  # noqa: E402


def write_images(root: Path, count: int, size: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        folder = root / f"class_{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.stack([128 + 90 * np.sin(2 * np.pi * (x * rng.uniform(0.5, 2) + rng.uniform())),
                         128 + 90 * np.cos(2 * np.pi * (y * rng.uniform(0.5, 2) + rng.uniform())),
                         128 + 90 * np.sin(2 * np.pi * (x + y))], axis=-1)  # fmt: skip
        base += rng.normal(0, 8, base.shape)
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def scan_folder_checked(root: Path):
    classes, samples = scan_source(root, "data.train")
    return classes, [s for s in samples if file_problem(s[0]) is None]


def epoch_rate(samples, workers: int, repeats: int, size: int) -> float:
    transform = train_transform(Preprocess(image_size=size * 7 // 8, resize_size=size), "light", 0.0)
    loader = make_loader(samples, transform, 32, workers, seed=0, shuffle=True, seeded=True)
    best = float("inf")
    for epoch in range(repeats + 1):
        set_loader_epoch(loader, 0, epoch)
        seconds, count = timed(lambda: sum(len(batch[1]) for batch in loader if batch is not None))
        assert count == len(samples), (count, len(samples))
        if epoch:  # (the first pass warms the OS cache and the worker start-up paths)
            best = min(best, seconds)
    return len(samples) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (the transform crops 7/8 of it)")
    args = parser.parse_args()
    count = 600 if args.quick else 2000
    repeats = 2 if args.quick else 3
    torch.set_num_threads(1)
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {count} JPEGs of {args.size} px")
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "images", Path(tmp) / "shards"
        write_images(root, count, args.size)
        seconds, _ = timed(lambda: write_shards(root, out, shard_size=250))
        print(f"tltool shard: {seconds:.2f} s ({count / seconds:.0f} images/s)")
        pattern = str(out / "train-*.tar")
        scan_folder_checked(root), scan_shards(pattern, "data.train")  # (OS cache)
        folder_scan, (_, folder_samples) = timed(lambda: scan_folder_checked(root))
        shard_scan, (_, shard_samples) = timed(lambda: scan_shards(pattern, "data.train"))
        print(f"scan at start: folder {folder_scan * 1000:.0f} ms, shards {shard_scan * 1000:.0f} ms")
        print(f"{'workers':>7}  {'folder img/s':>12}  {'shards img/s':>12}  {'shards/folder':>13}")
        for workers in (0, 2):
            folder_rate = epoch_rate(folder_samples, workers, repeats, args.size)
            shard_rate = epoch_rate(shard_samples, workers, repeats, args.size)
            print(f"{workers:>7}  {folder_rate:>12.0f}  {shard_rate:>12.0f}  {shard_rate / folder_rate:>13.2f}")


if __name__ == "__main__":
    main()
