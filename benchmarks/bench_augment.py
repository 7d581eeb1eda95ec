"""The cost of each `data.augment` value, `data.random_erasing` and MixUp/CutMix, relative to `standard`.

    python benchmarks/bench_augment.py            # make bench-augment, ~1 min
    python benchmarks/bench_augment.py --quick    # fewer images and repeats, ~15 s

(a) Per image: tltool's train transform (`tltool.data.train_transform`, 224 px crop of 256 px photo-like RGB
    images, as a loader worker runs it on a decoded PIL image), each draw seeded as the loader seeds it.
    CPU time of the one thread, per image, median over paired rounds; the ratio (to `standard`) is the median
    of the per-round ratios.
(b) Per batch: `tltool.data.mixing.BatchMixer` on a 32 x 3 x 224 x 224 float batch (the loop's cost before
    the forward, main process), MixUp, CutMix and both.
Ends with one machine-readable line. Ratios only: the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tltool.config import DataConfig  # noqa: E402
from tltool.data import Preprocess, train_transform  # noqa: E402
from tltool.data.mixing import BatchMixer  # noqa: E402

TRANSFORMS = [
    ("none", "none", 0.0),
    ("light", "light", 0.0),
    ("standard", "standard", 0.0),
    ("standard + erasing 0.25", "standard", 0.25),
    ("randaugment", "randaugment", 0.0),
    ("trivialaugment", "trivialaugment", 0.0),
    ("augmix", "augmix", 0.0),
]
MIXERS = [("mixup 0.2", 0.2, 0.0), ("cutmix 1.0", 0.0, 1.0), ("mixup 0.2 or cutmix 1.0", 0.2, 1.0)]


def photo_like(size: int, rng: np.random.Generator) -> Image.Image:
    """Gradients, a few hard-edged boxes and sensor-like noise (the policies' ops see real structure)."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([128 + 90 * np.sin(2 * np.pi * (x * rng.uniform(0.5, 2) + rng.uniform())),
                     128 + 90 * np.cos(2 * np.pi * (y * rng.uniform(0.5, 2) + rng.uniform())),
                     128 + 90 * np.sin(2 * np.pi * ((x + y) * rng.uniform(0.5, 2)))], axis=-1)  # fmt: skip
    for _ in range(4):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 8, size // 2, 2)
        base[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 255, 3)
    base += rng.normal(0, 8, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def seeded(transform, image: Image.Image, seed: int) -> torch.Tensor:
    """One draw as ImageDataset makes it: the default generator seeded for the draw, then put back."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        return transform(image)
    finally:
        generator.set_state(state)


def per_image_ms(transform, images: list[Image.Image], round_: int) -> float:
    """CPU time of this thread per image (one thread: other processes on the machine do not count)."""
    start = time.thread_time()
    for i, image in enumerate(images):
        seeded(transform, image, round_ * 100_003 + i)
    return 1000 * (time.thread_time() - start) / len(images)


def per_batch_ms(mixer: BatchMixer, batch: tuple[torch.Tensor, torch.Tensor], round_: int) -> float:
    start = time.thread_time()
    for index in range(4):
        mixer(*batch, epoch=round_, index=index)
    return 1000 * (time.thread_time() - start) / 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    args = parser.parse_args()
    torch.set_num_threads(1)
    count, repeats = (16, 3) if args.quick else (48, 5)
    rng = np.random.default_rng(0)
    images = [photo_like(256, rng) for _ in range(count)]
    pre = Preprocess(image_size=224, resize_size=256)
    print(f"torch {torch.__version__}, {platform.machine()}, {count} images of 256 px -> 224 px, {repeats} repeats, "
          "1 thread")  # fmt: skip
    # Paired rounds: every transform once per round; the ratio is the median of the per-round ratios.
    transforms = {name: train_transform(pre, augment, erasing) for name, augment, erasing in TRANSFORMS}
    for transform in transforms.values():
        seeded(transform, images[0], 0)  # (warm-up)
    rounds = [{name: per_image_ms(t, images, r) for name, t in transforms.items()} for r in range(repeats)]
    results = {name: statistics.median(row[name] for row in rounds) for name in transforms}
    ratios = {name: statistics.median(row[name] / row["standard"] for row in rounds) for name in transforms}
    base = results["standard"]
    print("\n| data.augment | CPU ms per image | vs standard | CPU ms per batch of 32 |\n|---|---|---|---|")
    for name, ms in results.items():
        print(f"| {name} | {ms:.2f} | {ratios[name]:.2f}x | {32 * ms:.0f} |")
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(32, 3, 224, 224, generator=generator), torch.randint(0, 10, (32,), generator=generator))
    print("\n| mixing (32 x 3 x 224 x 224, mix_prob 1) | CPU ms per batch | vs standard's transform of the batch |")
    print("|---|---|---|")
    mixing = {}
    for name, mixup, cutmix in MIXERS:
        mixer = BatchMixer(DataConfig(mixup_alpha=mixup, cutmix_alpha=cutmix), 10, seed=0)
        mixer(*batch, epoch=0, index=0)
        mixing[name] = statistics.median(per_batch_ms(mixer, batch, r) for r in range(repeats))
        print(f"| {name} | {mixing[name]:.1f} | {mixing[name] / (32 * base):.3f}x |")
    line = " ".join(f"{name.split()[0]}={ratios[name]:.2f}" for name in results if "+" not in name)
    print(f"\nbench-augment: standard_ms={base:.2f} {line} erasing={ratios['standard + erasing 0.25']:.2f} "
          + " ".join(f"{n.split()[0]}_ms={ms:.1f}" for n, ms in list(mixing.items())[:2]))  # fmt: skip


if __name__ == "__main__":
    main()
