"""What `tltool doctor` reports: the findings, what each split holds, and the whole diagnosis."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Finding:
    """One thing doctor found: a machine-readable code, what it is, how to fix it, and the files involved."""

    code: str
    message: str
    fix: str = ""
    paths: list[str] = field(default_factory=list)


@dataclass
class SplitReport:
    """What one split folder holds: images per class, unreadable files, files that tltool ignores."""

    name: str
    path: str
    class_counts: dict[str, int] = field(default_factory=dict)
    empty_classes: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    ignored_files: dict[str, int] = field(default_factory=dict)
    loose_images: int = 0
    repeated_links: list[str] = field(default_factory=list)  # folder links not followed again (loops)
    outside_links: list[str] = field(default_factory=list)  # folder links that lead outside the split folder
    labels: dict[str, str] = field(default_factory=dict, repr=False)  # a label file's images -> class (not in JSON)
    # data.task: multilabel (a label file whose label cells list classes separated by `delimiter`): class_counts
    # are positives (an image counts for each of its classes), labels[path] its classes joined in sorted order.
    delimiter: str | None = field(default=None, repr=False)
    images: int | None = None  # multilabel: the images (class_counts sum the positives)
    label_sets: dict[str, int] = field(default_factory=dict)  # multilabel: images per set of classes, most first
    unlabelled_rows: int = 0  # label file rows with no class name (multilabel: no name between the delimiters)
    shards: list[dict[str, Any]] = field(default_factory=list)  # shards: each one's path, samples and problem

    @property
    def num_images(self) -> int:
        return self.images if self.images is not None else sum(self.class_counts.values())

    def classes_of(self, path: str) -> list[str]:
        """The class(es) of one of this split's images: its label file row, or its class folder."""
        if not self.labels:
            return [Path(path).relative_to(self.path).parts[0]]
        label = self.labels[path]
        return label.split(self.delimiter) if self.delimiter is not None else [label]

    def class_path(self, name: str) -> str:
        """Where a class lives, for a finding's paths: its folder, or the label file (or shards) that list it."""
        if self.labels or self.shards or Path(self.path).is_file():
            return self.path
        return str(Path(self.path) / name)

    def usable_counts(self) -> dict[str, int]:
        """Images per class that pass the header check (what training would keep)."""
        bad = Counter(name for path, _ in self.unreadable for name in self.classes_of(path))
        return {name: count - bad[name] for name, count in self.class_counts.items()}


@dataclass
class Diagnosis:
    """Everything `tltool doctor` found. `problems` break training; `warnings` are worth a look."""

    root: str
    layout: str  # "splits" (train/ + val/...), "single" (one ImageFolder, split by data.val_split), "labelfile",
    # "shards" (.tar shards: data/shards.py)
    task: str = "multiclass"  # data.task: "multilabel" reads each label cell as a list of classes
    splits: list[SplitReport] = field(default_factory=list)
    classes_only_in: dict[str, list[str]] = field(default_factory=dict)
    imbalance_ratio: float | None = None
    duplicates_within: list[list[str]] = field(default_factory=list)
    duplicates_across: list[list[str]] = field(default_factory=list)
    image_stats: dict[str, Any] = field(default_factory=dict)
    deep: bool = False  # every image decoded (`--deep`), not only its header read
    decode_failures: int = 0  # images whose header was fine but that failed to decode (with `deep`)
    problems: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def split(self, name: str) -> SplitReport | None:
        return next((s for s in self.splits if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (`tltool doctor --json`)."""
        out = asdict(self)
        for split, report in zip(out["splits"], self.splits, strict=True):
            del split["labels"], split["delimiter"]
            split["num_images"] = report.num_images
            split["unreadable"] = [{"path": p, "reason": why} for p, why in report.unreadable]
        out["ok"] = self.ok
        return out


@dataclass
class FileInfo:
    """One image file as doctor read it: size, header problem, and (when readable) size, mode and format."""

    path: str
    size: int
    problem: str | None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    format: str | None = None
    decode_failed: bool = False  # the header was fine, decoding the image was not (`--deep`)
