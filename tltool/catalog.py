"""`tltool models`: the torchvision backbones (timm's with a `timm/` pattern), their weights, what tltool supports.

Everything comes from torchvision's own records (`weights.meta`), so the list is exactly what the installed
torchvision offers: parameter count, GFLOPS at the weights' input size, the ImageNet-1K accuracy torchvision
measured, and whether tltool's head table (new classifier) and stage table (partial unfreezing) know the
architecture. No model is built and no weights file is read: the whole catalogue takes well under a second.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import math
import shutil
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torchvision

from tltool import models as tltool_models
from tltool import stages
from tltool.config import ModelNames
from tltool.errors import ModelError

_GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class CatalogEntry:
    """One (backbone, weights) pair; a backbone without pretrained weights has one entry with weights "none"."""

    model: str
    family: str
    weights: str
    default: bool
    num_params: int | None
    gflops: float | None
    acc1: float | None
    acc5: float | None
    image_size: int | None
    min_size: int | None
    file_size_mb: float | None
    head: str | None
    stages: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_names(pattern: str | None = None) -> list[str]:
    """Sorted torchvision classification model names that match `pattern`.

    A pattern with glob characters (`resnet*`, `*_v2_?`) is matched whole, fnmatch-style; any other pattern
    is a substring (`mobilenet`); both ignore case. No match is a user error with the closest names.
    """
    names = sorted(torchvision.models.list_models(module=torchvision.models))
    if not pattern:
        return names
    wanted = pattern.lower()
    if any(char in wanted for char in _GLOB_CHARACTERS):
        matched = [name for name in names if fnmatch.fnmatchcase(name, wanted)]
    else:
        matched = [name for name in names if wanted in name]
    if not matched:
        close = difflib.get_close_matches(wanted, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "run `tltool models` for the full list"
        raise ModelError(f"no torchvision model matches {pattern!r}", f"{hint} (globs work too: 'resnet*')")
    return matched


def backbone_problem(backbone: str) -> str | None:
    """Why `model.backbone` is not a torchvision classification model (with the closest names), or None."""
    names = model_names()
    if backbone in names:
        return None
    close = difflib.get_close_matches(backbone, names, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see `tltool models` or torchvision docs"
    return f"unknown torchvision classification model; {hint}"


def weights_problem(backbone: str, weights: str) -> str | None:
    """Why `model.weights` is not a weights name of `backbone` (DEFAULT or one of its enum's), or None."""
    names = ["DEFAULT", *(w.name for w in torchvision.models.get_model_weights(backbone))]
    if weights in names:
        return None
    return (
        f"not a weights name of {backbone}; valid: none, {', '.join(names)}, or a path to a .pt/.pth/.safetensors file"
    )


TORCHVISION_NAMES = ModelNames(backbone_problem, weights_problem)
"""torchvision's backbones and weights, for `load_config(..., names=TORCHVISION_NAMES)`."""


def any_backbone_problem(backbone: str) -> str | None:
    """`backbone_problem`, or timm's for a `timm/` name (timm is imported only then)."""
    if backbone.startswith("timm/"):
        from tltool import timm_models

        return timm_models.backbone_problem(backbone)
    return backbone_problem(backbone)


def any_weights_problem(backbone: str, weights: str) -> str | None:
    """`weights_problem`, or timm's for a `timm/` backbone."""
    if backbone.startswith("timm/"):
        from tltool import timm_models

        return timm_models.weights_problem(backbone, weights)
    return weights_problem(backbone, weights)


BACKBONE_NAMES = ModelNames(any_backbone_problem, any_weights_problem)
"""Every backbone tltool builds (torchvision's, and timm's as `timm/<name>`): what the CLI and sessions check."""


def family_of(name: str) -> str:
    """The torchvision class a builder returns (`resnet18` -> `ResNet`), the key of tltool's head table.

    Read from the builder's return annotation, which costs nothing; only a builder without one is built,
    on the meta device (no memory, no init). Building all 80 models even on the meta device takes ~8 s
    here, and RegNet's builder cannot run on it at all, so it is the fallback, not the method.
    """
    builder = torchvision.models.get_model_builder(name)
    returned = inspect.signature(builder).return_annotation
    if isinstance(returned, type):
        return returned.__name__
    if isinstance(returned, str) and returned:
        return returned.rsplit(".", 1)[-1]
    try:
        with torch.device("meta"):
            return type(builder(weights=None)).__name__
    except Exception:  # noqa: BLE001 - an unbuildable model is listed as unknown, not a crash of the listing
        return "unknown"


def _stage_supported(name: str, family: str) -> bool:
    # STAGE_TABLE (partial unfreezing by stage) may be keyed by family, like HEAD_TABLE, or by model name.
    table = stages.STAGE_TABLE
    return family in table or name in table


def _imagenet_metric(meta: dict[str, Any], key: str) -> float | None:
    # Weights that were never evaluated as classifiers (VGG16 IMAGENET1K_FEATURES) record nan.
    value = meta.get("_metrics", {}).get("ImageNet-1K", {}).get(key)
    return float(value) if value is not None and not math.isnan(value) else None


def _crop_size(weights: Any) -> int | None:
    """The weights' preset crop size (the input size their GFLOPS and accuracy were measured at)."""
    try:
        return int(weights.transforms().crop_size[0])
    except (AttributeError, TypeError, IndexError):
        return None


def catalog(pattern: str | None = None) -> list[CatalogEntry]:
    """Every (backbone, weights) pair of torchvision matching `pattern`, sorted by model name.

    A pattern that starts with `timm/` lists timm's instead (`timm_models.catalog_rows`): its tags as weights.
    """
    if pattern and pattern.startswith("timm/"):
        from tltool import timm_models

        return [
            CatalogEntry(**row, gflops=None, acc1=None, acc5=None, min_size=None, file_size_mb=None,
                         head="reset_classifier")
            for row in timm_models.catalog_rows(pattern)
        ]  # fmt: skip
    entries = []
    for name in model_names(pattern):
        family = family_of(name)
        head = tltool_models.HEAD_TABLE.get(family)
        stages = _stage_supported(name, family)
        try:
            enum = torchvision.models.get_model_weights(name)
            weights_list = list(enum)
        except (ValueError, KeyError):
            enum, weights_list = None, []
        if not weights_list:
            entries.append(CatalogEntry(name, family, "none", False, None, None, None, None, None, None, None,
                                        head, stages))  # fmt: skip
            continue
        default = enum.DEFAULT if enum is not None and hasattr(enum, "DEFAULT") else None
        for weights in weights_list:
            meta = weights.meta
            min_size = meta.get("min_size")
            entries.append(
                CatalogEntry(
                    model=name,
                    family=family,
                    weights=weights.name,
                    default=weights is default,
                    num_params=int(meta["num_params"]) if "num_params" in meta else None,
                    gflops=float(meta["_ops"]) if "_ops" in meta else None,
                    acc1=_imagenet_metric(meta, "acc@1"),
                    acc5=_imagenet_metric(meta, "acc@5"),
                    image_size=_crop_size(weights),
                    min_size=int(min_size[0]) if min_size else None,
                    file_size_mb=float(meta["_file_size"]) if "_file_size" in meta else None,
                    head=head,
                    stages=stages,
                )
            )
    return entries


# --- the table ---------------------------------------------------------------------------------------


def _params_text(count: int | None) -> str:
    if count is None:
        return "-"
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# (header, how a cell is written, right-aligned, dropped in this order when the table is too wide: 0 = never)
_COLUMNS: list[tuple[str, Any, bool, int]] = [
    ("model", lambda e: e.model, False, 0),
    ("weights", lambda e: e.weights + (" *" if e.default else ""), False, 0),
    ("params", lambda e: _params_text(e.num_params), True, 0),
    ("GFLOPS", lambda e: _number(e.gflops, 2), True, 0),
    ("size", lambda e: "-" if e.image_size is None else str(e.image_size), True, 4),
    ("acc@1", lambda e: _number(e.acc1, 3), True, 0),
    ("acc@5", lambda e: _number(e.acc5, 3), True, 3),
    ("MB", lambda e: _number(e.file_size_mb, 1), True, 2),
    ("family", lambda e: e.family, False, 1),
    ("head", lambda e: "yes" if e.head else "no", False, 0),
    ("stages", lambda e: "yes" if e.stages else "no", False, 0),
]


# Records timm's wheel does not ship (its results tables are in its repository): no column in a timm listing.
_NOT_IN_TIMM = ("GFLOPS", "acc@1", "acc@5", "MB")


def format_catalog(entries: list[CatalogEntry], width: int | None = None) -> str:
    """A plain-text table that fits `width` (default: the terminal's): optional columns go first, then gaps."""
    if width is None:
        width = shutil.get_terminal_size((100, 24)).columns
    cells = [[write(entry) for _, write, _, _ in _COLUMNS] for entry in entries]
    widths = [max(len(header), *(len(row[i]) for row in cells)) for i, (header, *_) in enumerate(_COLUMNS)]
    timm = bool(entries) and entries[0].model.startswith("timm/")
    shown = [i for i, (header, *_) in enumerate(_COLUMNS) if not (timm and header in _NOT_IN_TIMM)]
    gap = 2

    def total() -> int:
        return sum(widths[i] for i in shown) + gap * (len(shown) - 1)

    for _, column in sorted((drop, i) for i, (*_, drop) in enumerate(_COLUMNS) if drop):
        if total() <= width:
            break
        shown.remove(column)
    if total() > width:
        gap = 1

    def line(values: list[str]) -> str:
        parts = []
        for i in shown:
            right = _COLUMNS[i][2]
            parts.append(values[i].rjust(widths[i]) if right else values[i].ljust(widths[i]))
        return (" " * gap).join(parts).rstrip()

    lines = [line([header for header, *_ in _COLUMNS])]
    previous = None
    for entry, row in zip(entries, cells, strict=True):
        if entry.model == previous:  # a model's further weights: its name once is easier to read
            row = ["", *row[1:]]
        previous = entry.model
        lines.append(line(row))
    models = len({entry.model for entry in entries})
    if timm:
        counted = "" if all(e.num_params is not None for e in entries) else " (patterns of up to 60 models)"
        return "\n".join(lines + [
            f"{models} model{'s' if models != 1 else ''}, {len(entries)} weights; weights: timm's pretrained tags, "
            "* = model.weights: DEFAULT",
            "another tag: model.backbone: timm/<model>.<tag>   size: the tag's input size",
            f"params: counted on the meta device{counted}; timm's wheel ships no GFLOPS or ImageNet accuracy",
            "(its results tables: https://github.com/huggingface/pytorch-image-models/tree/main/results)",
            "head: tltool fits a new classifier   stages: timm's group_matcher (unfreezing by stage, layer LR)",
        ])  # fmt: skip
    lines += [
        f"{models} model{'s' if models != 1 else ''}, {len(entries)} weights; * = DEFAULT (model.weights names)",
        "GFLOPS, acc@1 and acc@5 (ImageNet-1K): torchvision's records, at the weights' input size (size)",
        "head: tltool can fit a new classifier   stages: in tltool's stage table (unfreezing by stage)",
        "timm backbones (with timm installed): tltool models 'timm/<pattern>', e.g. 'timm/convnext*'",
    ]
    return "\n".join(lines)
