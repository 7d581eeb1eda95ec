"""Write scikit-learn's handwritten digits as an ImageFolder: a few labelled images per class, the rest val.

    python scripts/make_digits.py [--out data/digits] [--train-per-class 10] [--seed 0]

The 1,797 digits are real 8x8 scans (values 0-16) that ship inside scikit-learn, so nothing is
downloaded. Each becomes an 8x8 greyscale PNG (0-16 scaled to 0-255) named after its index in the
dataset: `<out>/train/<digit>/<index>.png` for a seeded choice of `--train-per-class` images per digit,
`<out>/val/<digit>/<index>.png` for all the others.

The folder is generated, never user data: when it already holds exactly the expected files (same names,
same bytes) nothing is written; otherwise it is rebuilt from scratch. A folder that holds anything this
script would not have written (another file type, another layout) is refused rather than deleted.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np


def png_bytes(scan: np.ndarray) -> bytes:
    """One scan (floats 0-16, the digits' 8x8 counts of ink) as the bytes of an 8-bit greyscale PNG."""
    from PIL import Image

    pixels = np.clip(np.rint(scan * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def expected_files(train_per_class: int, seed: int) -> dict[str, bytes]:
    """Relative path (`train/3/17.png`) -> PNG bytes of every file the folder should hold."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images, digits.target
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    for digit in sorted(set(targets.tolist())):
        indices = np.flatnonzero(targets == digit)
        if train_per_class >= len(indices):
            raise ValueError(
                f"digit {digit} has {len(indices)} images; --train-per-class {train_per_class} leaves none for val"
            )
        chosen = set(rng.choice(indices, size=train_per_class, replace=False).tolist())
        for index in indices.tolist():
            split = "train" if index in chosen else "val"
            files[f"{split}/{digit}/{index}.png"] = png_bytes(images[index])
    return files


def _entries(out: Path) -> list[Path]:
    """Everything under `out` but hidden entries (`.DS_Store`), which tltool's ImageFolder scan ignores too."""
    return [path for path in out.rglob("*") if not any(p.startswith(".") for p in path.relative_to(out).parts)]


def _existing_files(out: Path) -> dict[str, Path]:
    return {path.relative_to(out).as_posix(): path for path in _entries(out) if not path.is_dir()}


def _looks_generated(out: Path, files: dict[str, bytes]) -> bool:
    """True when every entry under `out` fits the layout of `files` (so it may be deleted).

    That is: each folder is one that `files` has (or a parent of one), each file an `<index>.png` in such a
    folder, and nothing is a link. Another seed or count of the same generator passes; user data does not.
    """
    folders = {parent.as_posix() for name in files for parent in Path(name).parents if parent.parts}
    for path in _entries(out):
        relative = path.relative_to(out)
        if path.is_symlink():
            return False
        if path.is_dir():
            if relative.as_posix() not in folders:
                return False
        elif not (path.suffix == ".png" and path.stem.isdigit() and relative.parent.as_posix() in folders):
            return False
    return True


def write_generated(out: str | Path, files: dict[str, bytes], script: str) -> bool:
    """Make the generated folder `out` hold exactly `files` (relative path -> bytes); True when it wrote.

    When `out` already holds exactly these files (same names, same bytes) nothing is written, so a re-run
    keeps every file's timestamp. Otherwise the folder is written beside `out` and swapped in, so an
    interrupted run never leaves a half-written dataset. A folder holding anything that `script` would not
    have written is refused (FileExistsError) rather than deleted.
    """
    out = Path(out)
    if out.is_dir():
        existing = _existing_files(out)
        if existing.keys() == files.keys() and all(existing[n].read_bytes() == data for n, data in files.items()):
            return False
        if not _looks_generated(out, files):
            raise FileExistsError(f"{out} holds files that {script} did not write; remove it or pick another --out")
    elif out.exists():
        raise FileExistsError(f"{out} exists and is not a folder; remove it or pick another --out")

    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    try:
        for name, data in files.items():
            path = temp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if out.exists():
            shutil.rmtree(out)
        os.replace(temp, out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return True


def write_digits(out: str | Path = "data/digits", train_per_class: int = 10, seed: int = 0) -> dict:
    """Make `out` hold the digits ImageFolder; returns what it holds and whether anything was written."""
    files = expected_files(train_per_class, seed)
    return {
        "out": str(out),
        "train": sum(name.startswith("train/") for name in files),
        "val": sum(name.startswith("val/") for name in files),
        "classes": len({name.split("/")[1] for name in files}),
        "written": write_generated(out, files, "make_digits.py"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/digits", help="output folder (default: data/digits)")
    parser.add_argument("--train-per-class", type=int, default=10, help="labelled training images per digit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice of training images")
    args = parser.parse_args(argv)
    if args.train_per_class < 1:
        parser.error("--train-per-class must be at least 1")
    return report(
        lambda: write_digits(args.out, args.train_per_class, args.seed),
        lambda s: f"{s['out']}: {s['classes']} classes, {s['train']} train / {s['val']} val 8x8 PNGs",
    )


def report(write: Callable[[], dict], describe: Callable[[dict], str]) -> int:
    """Run a folder writer for the command line: print what the folder holds (exit 0) or one error line (2).

    `write()` returns a summary with `written`; `describe(summary)` says what the folder holds.
    """
    try:
        summary = write()
    except ImportError as exc:
        print(
            f"error: {exc.name or exc} is not installed (the digits come from scikit-learn, the fonts with "
            "matplotlib) — make install (or pip install -e '.[demo]')",
            file=sys.stderr,
        )
        return 2
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state = "written" if summary["written"] else "already up to date"
    print(f"{describe(summary)} ({state})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
