"""The values the sections' validators read: durations, and the name checks of `model.backbone`/`model.weights`.

Validating a config imports neither torch nor torchvision. Whether `model.backbone` and `model.weights`
name a torchvision model and its weights is asked of `ModelNames` given to `load_config` (the CLI gives
torchvision's, `tltool.catalog.TORCHVISION_NAMES`): the answer needs torchvision, ~3 s to import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationInfo

WEIGHTS_FILE_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")


DURATION_GRAMMAR = 'seconds, or hours/minutes/seconds like "3h30m", "90m", "1.5h", "45s"'


def parse_duration(value: float | int | str) -> float:
    """The seconds of a duration (`run.time_limit`): a number of seconds, or "<n>h<n>m<n>s" with each part
    optional but in that order ("3h30m", "90m", "1.5h", "45s"). Raises ValueError naming the grammar."""
    import re

    seconds = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = r"(\d+(?:\.\d*)?|\.\d+)"
        match = re.fullmatch(rf"(?:{number}h)?(?:{number}m)?(?:{number}s)?", text)
        if re.fullmatch(number, text):
            seconds = float(text)
        elif text and match is not None:
            hours, minutes, secs = (float(part) if part else 0.0 for part in match.groups())
            seconds = hours * 3600 + minutes * 60 + secs
    if seconds is None:
        raise ValueError(f"{value!r} is not a duration: give {DURATION_GRAMMAR}")
    if not 0 < seconds < float("inf"):
        raise ValueError(f"must be more than 0 seconds (got {value!r})")
    return seconds


@dataclass(frozen=True)
class ModelNames:
    """The name checks of `model.backbone` and `model.weights`: each says why a name is wrong, or None."""

    backbone_problem: Callable[[str], str | None]
    """Why a backbone name is unknown (with the closest names), or None."""
    weights_problem: Callable[[str, str], str | None]
    """Why (backbone, weights name) is not one of the backbone's weights, or None (files and none not asked)."""


def model_names(info: ValidationInfo) -> ModelNames | None:
    """The ModelNames this validation was given (`build_config(..., names=)`), or None: names unchecked."""
    return (info.context or {}).get("model_names")


def weights_is_file(weights: str) -> bool:
    """True when `model.weights` names a file rather than `none` or a torchvision weights name."""
    return weights.lower().endswith(WEIGHTS_FILE_SUFFIXES) or "/" in weights or "\\" in weights
