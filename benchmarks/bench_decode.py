"""JPEG/PNG decoding to an RGB uint8 tensor: PIL as tltool does it vs torchvision.io, time and pixels.

    python benchmarks/bench_decode.py            # 64, 256 and 512 px (make bench-decode), ~10 s
    python benchmarks/bench_decode.py --quick    # fewer images and repeats, ~5 s

On generated photo-like images (smooth gradients, edges and noise; JPEG quality 90, PNG), per image:
(a) pil:        `tltool.data.load_image` (EXIF orientation, RGB conversion, bomb check) + `pil_to_tensor`
(b) tvio:       `torchvision.io.decode_image(read_file(path), mode=ImageReadMode.RGB)`
(c) tvio->PIL:  (b) then back to a PIL image (`Image.fromarray`), what a drop-in `load_image` that still
                returns PIL (as the PIL transforms and callers expect) would cost.
Times are the median over repeats of the mean per image, files in the OS cache, one thread. The pixel
columns compare (b) with (a): max and mean absolute difference over all images of the row.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from torchvision.io import ImageReadMode, decode_image, read_file  # noqa: E402
from torchvision.transforms.v2.functional import pil_to_tensor  # noqa: E402

from tltool.data import load_image  # noqa: E402

# torchvision 0.29 deprecates torchvision.io's image decoders (in favour of TorchCodec) and warns on each call.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")


def photo_like(size: int, rng: np.random.Generator) -> np.ndarray:
    """An HxWx3 uint8 image with gradients, a few hard-edged shapes and sensor-like noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack(
        [
            128 + 90 * np.sin(2 * np.pi * (x * rng.uniform(0.5, 2) + rng.uniform())),
            128 + 90 * np.cos(2 * np.pi * (y * rng.uniform(0.5, 2) + rng.uniform())),
            128 + 90 * np.sin(2 * np.pi * ((x + y) * rng.uniform(0.5, 2))),
        ],
        axis=-1,
    )
    for _ in range(4):  # rectangles with sharp edges: the JPEG blocks and PNG filters get real work
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 8, size // 2, 2)
        base[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 255, 3)
    base += rng.normal(0, 8, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def make_files(root: Path, fmt: str, size: int, count: int) -> list[Path]:
    rng = np.random.default_rng(size * 7 + len(fmt))
    files = []
    for i in range(count):
        path = root / f"{fmt}-{size}-{i}.{fmt}"
        image = Image.fromarray(photo_like(size, rng))
        if fmt == "jpg":
            image.save(path, quality=90)
        else:
            image.save(path)
        files.append(path)
    return files


def decode_pil(path: Path) -> torch.Tensor:
    return pil_to_tensor(load_image(path))


def decode_tvio(path: Path) -> torch.Tensor:
    return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)


def decode_tvio_to_pil(path: Path) -> Image.Image:
    return Image.fromarray(decode_tvio(path).permute(1, 2, 0).numpy())


def per_image_ms(fn, files: list[Path], repeats: int) -> float:
    for path in files[:2]:  # warm-up
        fn(path)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in files:
            fn(path)
        times.append((time.perf_counter() - start) / len(files))
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512])
    args = parser.parse_args()
    torch.set_num_threads(1)  # decoding is single-threaded in both; keep torch's pool out of the way
    import PIL
    import torchvision

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, Pillow {PIL.__version__}"
    )
    print(
        f"{'format':<6} {'px':>4} {'KB':>6} {'pil ms':>8} {'tvio ms':>8} {'speed-up':>8} {'tvio->PIL':>9}"
        f" {'max|d|':>6} {'mean|d|':>8}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("jpg", "png"):
            for size in args.sizes:
                count = max(4, (8 if args.quick else 40) * 64 // size)
                repeats = 3 if args.quick else 7
                files = make_files(Path(tmp), fmt, size, count)
                for path in files:  # into the OS cache
                    path.read_bytes()
                max_diff, total, pixels = 0, 0, 0
                for path in files:
                    a, b = decode_pil(path), decode_tvio(path)
                    if a.shape != b.shape:
                        raise SystemExit(f"{path.name}: shapes differ, PIL {tuple(a.shape)} vs tvio {tuple(b.shape)}")
                    diff = (a.int() - b.int()).abs()
                    max_diff = max(max_diff, int(diff.max()))
                    total, pixels = total + int(diff.sum()), pixels + diff.numel()
                pil = per_image_ms(decode_pil, files, repeats)
                tvio = per_image_ms(decode_tvio, files, repeats)
                tvio_pil = per_image_ms(decode_tvio_to_pil, files, repeats)
                kb = statistics.mean(p.stat().st_size for p in files) / 1024
                row = (fmt, size, kb, pil, tvio, pil / tvio, tvio_pil, max_diff, total / pixels)
                rows.append(row)
                print(
                    f"{fmt:<6} {size:>4} {kb:>6.1f} {pil:>8.3f} {tvio:>8.3f} {pil / tvio:>7.2f}x {tvio_pil:>9.3f}"
                    f" {max_diff:>6} {total / pixels:>8.4f}",
                    flush=True,
                )
    print(
        "decode: "
        + " ".join(f"{fmt}{size}_speedup={speedup:.2f}" for fmt, size, _, _, _, speedup, *_ in rows)
        + f" max_abs_diff={max(r[7] for r in rows)}"
    )


if __name__ == "__main__":
    main()
