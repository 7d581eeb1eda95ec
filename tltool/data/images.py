"""Image files: which extensions are images, a cheap header check, and decoding to RGB.

The same decoding serves training, `tltool eval`, `tltool predict` and `tltool doctor`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# Images with more pixels than this are refused unread (Pillow's own decompression-bomb limit).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white


HIDDEN_PREFIXES = (".", "__MACOSX", "__pycache__")  # names every scan skips


def is_visible(path: Path) -> bool:
    """False for the entries every scan skips: hidden files and folders, `__MACOSX`, `__pycache__`."""
    return not path.name.startswith(HIDDEN_PREFIXES)


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
    except OSError as exc:
        return f"unreadable ({exc})"
    return header_problem(path)


def header_problem(path: str | Path) -> str | None:
    """`image_problem` of a file known to be a non-empty regular file: what its header says, or None."""
    return read_header(path)[0]


def read_header(path: str | Path) -> tuple[str | None, tuple[int, int, str, str | None] | None]:
    """(problem, None) or (None, (width, height, mode, format)) from one read of the header of a non-empty
    regular file (`tltool doctor` reports the header; the scan only needs the problem)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            header = (width, height, image.mode, image.format)
    except Image.DecompressionBombError:
        return "too many pixels (decompression bomb)", None
    except UnidentifiedImageError:
        return "not an image", None
    except (OSError, SyntaxError, ValueError) as exc:
        return f"unreadable ({exc})", None
    if width * height > MAX_PIXELS:
        return f"too many pixels ({width}x{height}, decompression bomb?)", None
    if width < 1 or height < 1:
        return "no pixels", None
    return None, header


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
