"""Shards vs a folder of the same images: the scan at start and images/s through the training loader; and
the start-up at scale: `scan_data` and `tltool doctor` on 10^4..10^6 files.

    python benchmarks/bench_data.py            # 2,000 JPEGs of 64 px, shards of 250 (make bench-data)
    python benchmarks/bench_data.py --quick    # 600 images
    python benchmarks/bench_data.py --size 224 # larger images: decoding outweighs reading the tars
    python benchmarks/bench_data.py --scale          # start-up at 10^4, 10^5, 10^6 files (make bench-data SCALE=1)
    python benchmarks/bench_data.py --scale --quick  # 10^4 and 10^5 files only

Generated photo-like JPEGs (quality 90) in 10 class folders, then `tltool shard` of that folder
(`write_shards`, no val split). Measured, files in the OS cache (one untimed pass first):
- scan: what a run does before its first step: folder = `scan_source` + the header check of every file
  (`file_problem`, as `scan_data`); shards = `scan_shards` (each tar's headers, the .cls members read).
- images/s: one epoch of `make_loader(..., shuffle=True, seeded=True)` with the train transform of
  data.augment=light (crop 7/8 of --size), batch 32, for each worker count; the best of the repeats. Folder = ImageDataset
  + EpochSampler; shards = ShardStream (shuffle buffer 1000; each worker reads the rank's shards and decodes
  its own batches).

--scale: N tiny files (one 8x8 PNG made once, its bytes written N times with the file's index appended after
the PNG's end, so no two files are identical but all have one size) in 100 class folders in a temporary
folder on local disk (skipped, with a message, when the disk lacks twice their blocks). Each count is timed
with the files in the OS cache (the generation just wrote them): `scan_data` (data.val_split 0.1) in total
and in its parts (the walk: `scan_source`; the split; the header check: `check_images`, serial and with the
thread pool, also with the files' pages dropped from the OS cache first, "cold"; the fingerprint:
`folder_listing`), `scan_data` again with the header check's verdicts remembered (a repeated run, sweep trial
or eval on unchanged files: `tltool.data.verdicts`), then `tltool doctor`'s `diagnose` (a size collision makes it
hash every file for duplicates: its worst case, timed apart as `find_duplicates`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tltool.config import DataConfig  # noqa: E402
from tltool.data import make_loader, scan_shards, scan_source, set_loader_epoch, train_transform  # noqa: E402
from tltool.data.fingerprint import folder_listing  # noqa: E402
from tltool.data.folders import check_images, file_problem, scan_data, stratified_split  # noqa: E402
from tltool.data.shards import write_shards  # noqa: E402
from tltool.data.transforms import Preprocess  # noqa: E402
from tltool.doctor import diagnose  # noqa: E402
from tltool.doctor.scan import find_duplicates, inspect_file  # noqa: E402


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


@contextlib.contextmanager
def patched_env(name: str, value: str):
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


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


def write_tiny_files(root: Path, count: int, classes: int = 100) -> None:
    """`count` 8x8 PNGs in `classes` folders: one encoding, its bytes written per file with the index appended
    after the PNG's end (Pillow reads the header as before; no two files are the same bytes)."""
    buffer = __import__("io").BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buffer, format="PNG")
    png = buffer.getvalue()
    folders = [root / f"class_{c:03d}" for c in range(classes)]
    for folder in folders:
        folder.mkdir(parents=True)
    for i in range(count):
        with open(folders[i % classes] / f"{i:07d}.png", "wb") as handle:
            handle.write(png + i.to_bytes(4, "little"))


def evict(paths: list[str]) -> None:
    """Drop these files' pages from the OS cache (written back first): their next read comes from the disk.
    Only their data: the folders and inodes stay cached, as after a first `ls`."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def scale_row(root: Path, count: int, workers: int) -> dict[str, float]:
    """Seconds of each part of the start-up on `count` files (see the module's docstring)."""
    cfg = DataConfig(train=str(root), val_split=0.1)
    row: dict[str, float] = {}
    row["walk"], (classes, samples) = timed(lambda: scan_source(root, "data.train", cfg))
    row["split"], (train, val) = timed(lambda: stratified_split(samples, 0.1, 0))
    # (memo=False: every row reads the headers; the verdicts memo is timed in its own row below)
    row["header 1 thread"], _ = timed(lambda: check_images(train + val, workers=1, memo=False))
    row[f"header {workers} threads"], (_, bad) = timed(lambda: check_images(train + val, workers=workers, memo=False))
    assert not bad, bad[:3]
    for threads in (1, workers):  # (the files' pages out of the OS cache: each header read goes to the disk)
        evict([path for path, _ in samples])
        row[f"header {threads} thread{'s' if threads > 1 else ''}, cold"], _ = timed(
            lambda n=threads: check_images(train + val, workers=n, memo=False)
        )
    row["fingerprint"], _ = timed(lambda: folder_listing(str(root), classes, samples))
    # (an empty verdicts memo: a first run, then a repeated one)
    with tempfile.TemporaryDirectory() as memo, patched_env("TLTOOL_CACHE_DIR", memo):
        row["scan_data"], split = timed(lambda: scan_data(cfg, 0))
        row["scan_data, repeated (verdicts remembered)"], again = timed(lambda: scan_data(cfg, 0))
    assert len(split.train) + len(split.val) == count and again.train == split.train
    row["doctor"], diagnosis = timed(lambda: diagnose(root, workers=workers))
    assert sum(diagnosis.splits[0].class_counts.values()) == count
    infos = [inspect_file(path) for path, _ in samples]
    row["doctor: find_duplicates"], _ = timed(lambda: find_duplicates(infos, workers))
    return row


def scale(quick: bool, workers: int) -> None:
    counts = (10_000, 100_000) if quick else (10_000, 100_000, 1_000_000)
    load = os.getloadavg()
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, "
          f"header check with {workers} threads")  # fmt: skip
    rows: dict[int, dict[str, float]] = {}
    for count in counts:
        with tempfile.TemporaryDirectory() as tmp:
            need = 2 * count * os.statvfs(tmp).f_bsize + (1 << 30)  # (a block per file and its folder entry, +1 GiB)
            free = shutil.disk_usage(tmp).free
            if free < need:
                print(f"{count:,} files: skipped, {free / 2**30:.1f} GiB free in {tmp}, {need / 2**30:.1f} needed")
                continue
            seconds, _ = timed(lambda n=count: write_tiny_files(Path(tmp) / "images", n))
            print(f"{count:,} files written in {seconds:.1f} s")
            rows[count] = scale_row(Path(tmp) / "images", count, workers)
    if not rows:
        return
    print(f"{'seconds (per 10^5 files)':<26}" + "".join(f"{f'{c:,} files':>22}" for c in rows))
    for part in next(iter(rows.values())):
        cells = "".join(f"{rows[c][part]:>10.2f} ({rows[c][part] / c * 1e5:>7.2f})   " for c in rows)
        print(f"{part:<26}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (the transform crops 7/8 of it)")
    parser.add_argument("--scale", action="store_true", help="scan_data and doctor at 10^4..10^6 files")
    parser.add_argument("--workers", type=int, default=8, help="--scale: threads of the header check and doctor")
    args = parser.parse_args()
    if args.scale:
        scale(args.quick, args.workers)
        return
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
