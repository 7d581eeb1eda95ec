"""Write a domain-shift pair for transfer benchmarks: printed digits (source) -> handwritten digits (target).

    python scripts/make_domains.py [--out data/domains] [--seed 0] [--source-per-class 200]
                                   [--labels-per-class 5] [--test-fraction 0.5]

Nothing is downloaded; both domains are 8x8 greyscale PNGs of the same kind of values.

target  scikit-learn's 1,797 handwritten digit scans (UCI optdigits): each is a 32x32 binary bitmap of a
        handwritten digit, cut into 4x4 blocks, each block's count of ink pixels (0-16) one pixel. A seeded,
        stratified split per digit: `--test-fraction` of the scans go to `target/test/<digit>/` (used only for
        the final number), `--labels-per-class` of the rest to `target/train/<digit>/` (the few labels), and
        all the others to `target/unlabeled/<index>.png`, without class folders.
source  printed digits rendered with the TrueType fonts that ship inside matplotlib (DejaVu Sans / Serif /
        Mono and STIX in four weights and slants each, Computer Modern roman, bold, sans, typewriter and
        italic), made the way optdigits made its scans: the glyph with a random stroke weight and rotation
        (+-12 degrees), scaled to a random 85-100% of the 32 px height and a random width (x0.7-1.2), placed
        with +-2 px of jitter, thresholded to a 32x32 bitmap with a few random pixels flipped, then
        counted in 4x4 blocks. `--source-per-class` images per digit in `source/train/<digit>/`, the fonts
        taken in turn.

So the two domains share the format and the pixel statistics' kind (counts 0-16, digits filling the
height), and differ in what the benchmark is about: printed glyphs against handwriting, its slants,
open loops and strokes. The source alone gets a real but far from perfect score on the target.

Deterministic: the same arguments write the same bytes (each source image from its own seeded generator,
the fonts in a fixed order; on one installation, as font rasterization may differ between FreeType
versions). Idempotent like make_digits.py, whose writer it uses: when the folder already holds exactly
these files nothing is written; a folder holding anything this script would not write is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_digits import png_bytes, report, write_generated  # noqa: E402

# The fonts whose digits are ordinary lining figures (cmmi10's are old-style; the STIX size/non-Unicode
# fonts, cmsy10 and cmex10 hold no digits; the "Display" DejaVu files only a few glyphs).
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmti10.ttf",
)
BITMAP = 32  # optdigits' bitmap side; its 4x4 blocks give the 8x8 scans
BLOCK = 4
FONT_PX = 96  # glyphs are drawn large, then transformed and scaled down to the bitmap
CLASSES = tuple(str(digit) for digit in range(10))


def font_paths() -> list[Path]:
    """The FONTS that this matplotlib ships, in FONTS' order (an error when fewer than half are there)."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = [folder / name for name in FONTS if (folder / name).is_file()]
    if len(paths) < len(FONTS) // 2:
        raise FileNotFoundError(f"{folder} holds {len(paths)} of the {len(FONTS)} fonts the source is drawn with")
    return paths


def render_digit(font, digit: int, rng: np.random.Generator) -> np.ndarray:
    """One printed digit as an 8x8 scan of ink counts (0-16), made as optdigits made its handwritten ones.

    `font` is a PIL FreeTypeFont at FONT_PX; `rng` draws the stroke weight, rotation, size, aspect, position
    and the flipped pixels.
    """
    from PIL import Image, ImageDraw

    side = FONT_PX * 2
    canvas = Image.new("L", (side, side), 0)
    stroke = int(rng.integers(0, 6))  # 0-5 px at 96 px: from the font's own weight to about twice it
    ImageDraw.Draw(canvas).text(
        (side // 2, side // 2), str(digit), fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255
    )
    canvas = canvas.rotate(float(rng.uniform(-12.0, 12.0)), resample=Image.Resampling.BILINEAR)
    glyph = canvas.crop(canvas.getbbox())
    height = BITMAP * float(rng.uniform(0.85, 1.0))
    width = min(float(BITMAP), glyph.width * height / glyph.height * float(rng.uniform(0.7, 1.2)))
    size = (max(1, round(width)), max(1, round(height)))
    glyph = glyph.resize(size, Image.Resampling.BILINEAR)
    bitmap = Image.new("L", (BITMAP, BITMAP), 0)
    left = (BITMAP - size[0]) // 2 + int(rng.integers(-2, 3))
    top = (BITMAP - size[1]) // 2 + int(rng.integers(-2, 3))
    bitmap.paste(glyph, (min(max(left, 0), BITMAP - size[0]), min(max(top, 0), BITMAP - size[1])))
    bits = np.asarray(bitmap) >= 128
    bits ^= rng.random(bits.shape) < float(rng.uniform(0.0, 0.02))  # scanner-like specks and gaps
    side_blocks = BITMAP // BLOCK
    return bits.reshape(side_blocks, BLOCK, side_blocks, BLOCK).sum(axis=(1, 3)).astype(np.float64)


def source_files(per_class: int, seed: int) -> dict[str, bytes]:
    """`source/train/<digit>/<n>.png` -> PNG bytes: `per_class` printed digits each, the fonts in turn."""
    from PIL import ImageFont

    fonts = [ImageFont.truetype(str(path), FONT_PX) for path in font_paths()]
    files: dict[str, bytes] = {}
    for digit in range(10):
        for n in range(per_class):
            index = digit * per_class + n
            rng = np.random.default_rng([seed, index])  # one generator per image: the same image for any count
            scan = render_digit(fonts[n % len(fonts)], digit, rng)
            files[f"source/train/{digit}/{index}.png"] = png_bytes(scan)
    return files


def target_files(labels_per_class: int, test_fraction: float, seed: int) -> dict[str, bytes]:
    """The handwritten scans split per digit into `target/test/<digit>/`, `target/train/<digit>/` (the few
    labels) and `target/unlabeled/` (the rest), each named after its index in scikit-learn's dataset."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    for digit in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == digit)).tolist()
        test = round(len(indices) * test_fraction)
        if test < 1 or len(indices) - test <= labels_per_class:
            raise ValueError(
                f"digit {digit} has {len(indices)} scans: --test-fraction {test_fraction} and "
                f"--labels-per-class {labels_per_class} leave no test or no unlabelled scans"
            )
        for position, index in enumerate(indices):
            if position < test:
                name = f"target/test/{digit}/{index}.png"
            elif position < test + labels_per_class:
                name = f"target/train/{digit}/{index}.png"
            else:
                name = f"target/unlabeled/{index}.png"
            files[name] = png_bytes(digits.images[index])
    return files


def expected_files(
    source_per_class: int = 200, labels_per_class: int = 5, test_fraction: float = 0.5, seed: int = 0
) -> dict[str, bytes]:
    """Relative path -> PNG bytes of every file of the pair (the source, then the target's three parts)."""
    return {
        **source_files(source_per_class, seed),
        **target_files(labels_per_class, test_fraction, seed),
    }


def write_domains(
    out: str | Path = "data/domains",
    source_per_class: int = 200,
    labels_per_class: int = 5,
    test_fraction: float = 0.5,
    seed: int = 0,
) -> dict:
    """Make `out` hold the domain pair; returns its folders, image counts and whether anything was written."""
    files = expected_files(source_per_class, labels_per_class, test_fraction, seed)
    out = Path(out)
    parts = {
        "source_train": "source/train/",
        "target_train": "target/train/",
        "target_unlabeled": "target/unlabeled/",
        "target_test": "target/test/",
    }
    summary: dict = {"out": str(out), "classes": len(CLASSES)}
    for key, prefix in parts.items():
        summary[key] = sum(name.startswith(prefix) for name in files)
    summary["written"] = write_generated(out, files, "make_domains.py")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/domains", help="output folder (default: data/domains)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the renderings and of the target split")
    parser.add_argument("--source-per-class", type=int, default=200, help="printed images per digit")
    parser.add_argument("--labels-per-class", type=int, default=5, help="labelled target images per digit")
    parser.add_argument("--test-fraction", type=float, default=0.5, help="share of each digit's scans for test")
    args = parser.parse_args(argv)
    if args.source_per_class < 1 or args.labels_per_class < 1:
        parser.error("--source-per-class and --labels-per-class must be at least 1")
    if not 0.0 < args.test_fraction < 1.0:
        parser.error("--test-fraction must be between 0 and 1")
    return report(
        lambda: write_domains(args.out, args.source_per_class, args.labels_per_class, args.test_fraction, args.seed),
        lambda s: (
            f"{s['out']}: {s['classes']} classes, source/train {s['source_train']} printed; target/train "
            f"{s['target_train']} labelled, target/unlabeled {s['target_unlabeled']}, target/test {s['target_test']}"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
