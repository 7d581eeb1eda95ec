"""`tltool doctor DATA_DIR`: check a dataset before training, and say what to fix.

It finds the layout (train/ and val|valid|validation|test folders, or one ImageFolder that tltool splits
with `data.val_split`), counts images per class, and looks for what breaks a run (an empty class, a class in
one split only, too many unreadable files) or quietly spoils it (duplicates across splits inflate val
accuracy, heavy imbalance, files that are ignored). It reads the dataset and never writes into it; the
image checks are the ones training runs (`tltool.data.scan_folder`, `tltool.data.image_problem`).
"""

from __future__ import annotations

import hashlib
import math
import os
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from tltool.config import DataConfig
from tltool.data import IMAGE_EXTENSIONS, image_files, image_problem, is_visible, scan_folder
from tltool.errors import DataError

# Folder names of the splits, in order of preference (the first one found is used).
SPLIT_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "dev"),
    "test": ("test", "testing"),
}
# Largest / smallest class above this is reported as a warning.
IMBALANCE_WARNING = 5.0
# How many paths of one finding the text report shows (the JSON has all of them).
SHOWN_PATHS = 3
BAR_WIDTH = 40
_BLOCKS = " ▏▎▍▌▋▊▉█"


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

    @property
    def num_images(self) -> int:
        return sum(self.class_counts.values())

    def usable_counts(self) -> dict[str, int]:
        """Images per class that pass the header check (what training would keep)."""
        bad = Counter(Path(path).relative_to(self.path).parts[0] for path, _ in self.unreadable)
        return {name: count - bad[name] for name, count in self.class_counts.items()}


@dataclass
class Diagnosis:
    """Everything `tltool doctor` found. `problems` break training; `warnings` are worth a look."""

    root: str
    layout: str  # "splits" (train/ + val/...) or "single" (one ImageFolder, split by data.val_split)
    splits: list[SplitReport] = field(default_factory=list)
    classes_only_in: dict[str, list[str]] = field(default_factory=dict)
    imbalance_ratio: float | None = None
    duplicates_within: list[list[str]] = field(default_factory=list)
    duplicates_across: list[list[str]] = field(default_factory=list)
    image_stats: dict[str, Any] = field(default_factory=dict)
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
            split["num_images"] = report.num_images
            split["unreadable"] = [{"path": p, "reason": why} for p, why in report.unreadable]
        out["ok"] = self.ok
        return out


@dataclass
class _FileInfo:
    path: str
    size: int
    problem: str | None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    format: str | None = None


# --- layout ------------------------------------------------------------------------------------------


def find_layout(root: Path) -> tuple[str, dict[str, Path], list[str]]:
    """("splits", {split: folder}, ignored folders) or ("single", {"train": root}, []).

    Split folders are matched case-insensitively against SPLIT_NAMES. A root with a train folder is a
    split layout when it also has a val/test folder or nothing else; otherwise the root itself is the
    ImageFolder (a class may well be called "test").
    """
    children = {entry.name.lower(): entry for entry in sorted(root.iterdir()) if entry.is_dir() and is_visible(entry)}
    found: dict[str, Path] = {}
    for split, names in SPLIT_NAMES.items():
        for name in names:
            if name in children:
                found[split] = children[name]
                break
    if "train" in found and (len(found) > 1 or len(children) == 1):
        used = {path.name for path in found.values()}
        ignored = sorted(entry.name for entry in children.values() if entry.name not in used)
        return "splits", found, ignored
    return "single", {"train": root}, []


# --- scanning ----------------------------------------------------------------------------------------


def _scan_split(name: str, folder: Path, key: str) -> tuple[SplitReport, list[str], Finding | None]:
    """The class counts of one split folder, through `scan_folder` as training sees it.

    `scan_folder` refuses a folder with an empty class; doctor reports that instead, so on that error
    the classes are listed with the same walk and the empty ones recorded.
    """
    report = SplitReport(name=name, path=str(folder))
    try:
        classes, samples = scan_folder(folder, key)
        files_by_class: dict[str, list[str]] = {c: [] for c in classes}
        for path, label in samples:
            files_by_class[classes[label]].append(path)
    except DataError as exc:
        classes = sorted(e.name for e in folder.iterdir() if e.is_dir() and is_visible(e)) if folder.is_dir() else []
        if not classes:
            return report, [], Finding("no_classes", exc.what, exc.fix)
        files_by_class = {c: [str(f) for f in image_files(folder / c)] for c in classes}
    report.class_counts = {c: len(files) for c, files in files_by_class.items()}
    report.empty_classes = [c for c, files in files_by_class.items() if not files]
    report.ignored_files, report.loose_images = _ignored_files(folder, classes)
    return report, [f for files in files_by_class.values() for f in files], None


def _ignored_files(folder: Path, classes: Sequence[str]) -> tuple[dict[str, int], int]:
    """Files in class folders that are not images by extension (by suffix), and images outside any class."""
    ignored: Counter[str] = Counter()
    for name in classes:
        for directory, dirnames, filenames in os.walk(folder / name):
            dirnames[:] = [d for d in dirnames if is_visible(Path(d))]
            for filename in filenames:
                path = Path(directory, filename)
                if is_visible(path) and path.suffix.lower() not in IMAGE_EXTENSIONS:
                    ignored[path.suffix.lower() or "(no extension)"] += 1
    loose = sum(1 for e in folder.iterdir() if e.is_file() and is_visible(e) and e.suffix.lower() in IMAGE_EXTENSIONS)
    return dict(sorted(ignored.items())), loose


def _inspect(path: str) -> _FileInfo:
    """Size, header problem, and (for a readable image) size/mode/format from the header alone."""
    size = os.stat(path).st_size
    problem = image_problem(path)
    if problem is not None:
        return _FileInfo(path, size, problem)
    try:
        with Image.open(path) as image:  # header only: nothing is decoded
            return _FileInfo(path, size, None, image.size[0], image.size[1], image.mode, image.format)
    except (OSError, SyntaxError, ValueError) as exc:
        return _FileInfo(path, size, f"unreadable ({exc})")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_duplicates(infos: Iterable[_FileInfo], workers: int = 8) -> list[list[str]]:
    """Groups of files with identical bytes (sha256); only files whose size collides are hashed."""
    by_size: dict[int, list[str]] = defaultdict(list)
    for info in infos:
        if info.size > 0:
            by_size[info.size].append(info.path)
    candidates = [path for paths in by_size.values() if len(paths) > 1 for path in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(_sha256, candidates))
    groups: dict[str, list[str]] = defaultdict(list)
    for path, digest in zip(candidates, digests, strict=True):
        groups[digest].append(path)
    return sorted(sorted(paths) for paths in groups.values() if len(paths) > 1)


def _stats(values: Sequence[int]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


# --- the diagnosis -----------------------------------------------------------------------------------


def diagnose(root: str | Path, workers: int = 8) -> Diagnosis:
    """Inspect the dataset at `root` and return every finding (nothing is written anywhere)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root} does not exist", "give the folder of your images (class sub-folders, or train/ val/)")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder", "give the folder of your images (class sub-folders, or train/ val/)")
    layout, folders, other_folders = find_layout(root)
    diagnosis = Diagnosis(root=str(root), layout=layout)
    keys = {"train": "data.train", "val": "data.val", "test": "--data"}
    files_by_split: dict[str, list[str]] = {}
    for name, folder in folders.items():
        report, files, failure = _scan_split(name, folder, keys[name])
        diagnosis.splits.append(report)
        files_by_split[name] = files
        if failure is not None:
            diagnosis.problems.append(Finding(failure.code, failure.message, failure.fix, [str(folder)]))
    if other_folders:
        diagnosis.warnings.append(
            Finding(
                "ignored_folders",
                f"folders beside the splits are not used: {', '.join(other_folders)}",
                "move their images into train/ or val/ if they belong to the dataset",
                [str(root / name) for name in other_folders],
            )
        )

    with ThreadPoolExecutor(max_workers=workers) as pool:
        infos = {
            name: list(pool.map(_inspect, files)) for name, files in files_by_split.items()
        }  # per split, in file order
    for report in diagnosis.splits:
        report.unreadable = [(i.path, i.problem) for i in infos[report.name] if i.problem is not None]

    all_infos = [info for split_infos in infos.values() for info in split_infos]
    _check_classes(diagnosis)
    training = [info for name in ("train", "val") for info in infos.get(name, [])]
    _check_unreadable(diagnosis, training, infos.get("test", []))
    _check_duplicates(diagnosis, find_duplicates(all_infos, workers), folders)
    _check_files(diagnosis)
    readable = [i for i in all_infos if i.problem is None]
    if readable:
        diagnosis.image_stats = {
            "count": len(readable),
            "width": _stats([i.width for i in readable]),
            "height": _stats([i.height for i in readable]),
            "modes": dict(Counter(i.mode for i in readable).most_common()),
            "formats": dict(Counter(i.format or "?" for i in readable).most_common()),
        }
    _suggest(diagnosis, folders, training)
    return diagnosis


def _check_classes(diagnosis: Diagnosis) -> None:
    """Empty classes, classes in one split only, a class without training images, imbalance, tiny classes."""
    for report in diagnosis.splits:
        if report.empty_classes:
            diagnosis.problems.append(
                Finding(
                    "empty_class",
                    f"{report.name}: class folder(s) without images: {', '.join(report.empty_classes)}",
                    f"add images or remove the folder(s) from {report.path}",
                    [str(Path(report.path) / c) for c in report.empty_classes],
                )
            )
    train, val, test = diagnosis.split("train"), diagnosis.split("val"), diagnosis.split("test")
    if train is not None and val is not None and train.class_counts and val.class_counts:
        only_train = sorted(set(train.class_counts) - set(val.class_counts))
        only_val = sorted(set(val.class_counts) - set(train.class_counts))
        diagnosis.classes_only_in = {"train": only_train, "val": only_val}
        if only_train or only_val:
            parts = [
                f"only in train: {', '.join(only_train)}" if only_train else "",
                f"only in val: {', '.join(only_val)}" if only_val else "",
            ]
            diagnosis.problems.append(
                Finding(
                    "one_split_class",
                    "train and val have different classes (" + "; ".join(p for p in parts if p) + ")",
                    "give both splits the same class folders (add the missing ones or remove the extra ones)",
                    [str(Path(train.path) / c) for c in only_train] + [str(Path(val.path) / c) for c in only_val],
                )
            )
    if train is not None and test is not None and train.class_counts and test.class_counts:
        unknown = sorted(set(test.class_counts) - set(train.class_counts))
        diagnosis.classes_only_in["test"] = unknown
        if unknown:
            diagnosis.warnings.append(
                Finding(
                    "test_class_unknown",
                    f"test has classes that train lacks: {', '.join(unknown)} (tltool eval --data refuses them)",
                    "remove them from test or add training images for them",
                    [str(Path(test.path) / c) for c in unknown],
                )
            )
    if train is None or not train.class_counts:
        return
    usable = train.usable_counts()
    unusable = [c for c, n in usable.items() if n == 0 and c not in train.empty_classes]
    if unusable:
        diagnosis.problems.append(
            Finding(
                "no_usable_images",
                f"train: every image of class(es) {', '.join(unusable)} is unreadable",
                "replace the unreadable files with intact copies",
                [str(Path(train.path) / c) for c in unusable],
            )
        )
    counts = {c: n for c, n in usable.items() if n > 0}
    if len(counts) >= 2:
        largest, smallest = max(counts, key=counts.get), min(counts, key=counts.get)
        diagnosis.imbalance_ratio = counts[largest] / counts[smallest]
        if diagnosis.imbalance_ratio > IMBALANCE_WARNING:
            diagnosis.warnings.append(
                Finding(
                    "imbalance",
                    f"train is imbalanced: {largest} has {counts[largest]} images, {smallest} {counts[smallest]} "
                    f"({diagnosis.imbalance_ratio:.1f}x)",
                    "add images of the small classes, and judge the run by per-class recall (tltool eval), "
                    "not accuracy alone",
                )
            )
    if len(counts) == 1:
        diagnosis.problems.append(
            Finding("one_class", "train has a single class: nothing to tell apart", "add a folder per class")
        )
    if diagnosis.layout == "single" or val is None:
        single = sorted(c for c, n in counts.items() if n == 1)
        if single and len(single) == len(counts):
            diagnosis.problems.append(
                Finding(
                    "no_validation_images",
                    "every class has a single image: data.val_split cannot hold any out for validation",
                    "add images, or give a separate validation folder (data.val)",
                )
            )
        elif single:
            diagnosis.warnings.append(
                Finding(
                    "class_without_val",
                    f"class(es) with a single image get no validation image: {', '.join(single)}",
                    "add images of them",
                    [str(Path(train.path) / c) for c in single],
                )
            )


def _unreadable_limit_needed(infos: Sequence[_FileInfo]) -> float | None:
    """The data.max_bad_fraction that would let training skip the unreadable files, when the default is too low."""
    bad = sum(1 for i in infos if i.problem is not None)
    if not infos or bad / len(infos) <= DataConfig().max_bad_fraction:
        return None
    return math.ceil(bad / len(infos) * 100 - 1e-9) / 100  # the smallest limit in hundredths that lets them pass


def _check_unreadable(diagnosis: Diagnosis, training: Sequence[_FileInfo], test: Sequence[_FileInfo]) -> None:
    """Unreadable files: a problem above the default data.max_bad_fraction (training stops), else a warning.

    The fraction is taken over train and val, as training does; a test split only gets a warning.
    """
    bad = [i for i in training if i.problem is not None]
    if bad:
        fraction = len(bad) / len(training)
        listed = _listed([f"{i.path}: {i.problem}" for i in bad])
        needed = _unreadable_limit_needed(training)
        if needed is not None:
            diagnosis.problems.append(
                Finding(
                    "unreadable_files",
                    f"{len(bad)} of {len(training)} images are unreadable ({fraction:.1%}, more than "
                    f"data.max_bad_fraction {DataConfig().max_bad_fraction:g} allows): {listed}",
                    f"remove or replace them, or set data.max_bad_fraction={needed:g} to skip them",
                    [i.path for i in bad],
                )
            )
        else:
            diagnosis.warnings.append(
                Finding(
                    "unreadable_files",
                    f"{len(bad)} of {len(training)} images are unreadable and will be skipped: {listed}",
                    "remove or replace them (data.on_bad_image=error makes any of them stop the run)",
                    [i.path for i in bad],
                )
            )
    bad_test = [i for i in test if i.problem is not None]
    if bad_test:
        diagnosis.warnings.append(
            Finding(
                "unreadable_files",
                f"test: {len(bad_test)} of {len(test)} images are unreadable and will be skipped: "
                + _listed([f"{i.path}: {i.problem}" for i in bad_test]),
                "remove or replace them",
                [i.path for i in bad_test],
            )
        )


def _listed(items: Sequence[str]) -> str:
    return "; ".join(items[:SHOWN_PATHS]) + ("; ..." if len(items) > SHOWN_PATHS else "")


def _split_and_class(path: str, folders: dict[str, Path]) -> tuple[str, str]:
    for name, folder in folders.items():
        try:
            return name, Path(path).relative_to(folder).parts[0]
        except ValueError:
            continue
    return "?", "?"


def _check_duplicates(diagnosis: Diagnosis, groups: list[list[str]], folders: dict[str, Path]) -> None:
    """Exact copies: across splits they leak val into train; within one, they weigh double or clash in label."""
    for group in groups:
        where = [_split_and_class(path, folders) for path in group]
        if len({split for split, _ in where}) > 1:
            diagnosis.duplicates_across.append(group)
        else:
            diagnosis.duplicates_within.append(group)
    clashes = [g for g in groups if len({_split_and_class(p, folders)[1] for p in g}) > 1]
    if diagnosis.duplicates_across:
        count = sum(len(g) - 1 for g in diagnosis.duplicates_across)
        example = " = ".join(diagnosis.duplicates_across[0])
        diagnosis.warnings.append(
            Finding(
                "duplicate_across_splits",
                f"{count} file(s) appear in more than one split (val/test accuracy is inflated), e.g. {example}",
                "delete the copies from val/test (or from train) by hand",
                [p for g in diagnosis.duplicates_across for p in g],
            )
        )
    if diagnosis.duplicates_within:
        count = sum(len(g) - 1 for g in diagnosis.duplicates_within)
        example = " = ".join(diagnosis.duplicates_within[0])
        diagnosis.warnings.append(
            Finding(
                "duplicate_within_split",
                f"{count} file(s) are exact copies of another file in the same split, e.g. {example}",
                "delete the copies by hand (they count twice in training and evaluation)",
                [p for g in diagnosis.duplicates_within for p in g],
            )
        )
    if clashes:
        example = " = ".join(clashes[0])
        diagnosis.warnings.append(
            Finding(
                "duplicate_label_clash",
                f"{len(clashes)} image(s) are filed under different classes, e.g. {example}",
                "keep each image in its one right class folder",
                [p for g in clashes for p in g],
            )
        )


def _check_files(diagnosis: Diagnosis) -> None:
    """Files tltool skips without a word: non-image extensions in class folders, images outside any class."""
    for report in diagnosis.splits:
        if report.ignored_files:
            listed = ", ".join(f"{ext} {n}" for ext, n in report.ignored_files.items())
            diagnosis.warnings.append(
                Finding(
                    "ignored_files",
                    f"{report.name}: {sum(report.ignored_files.values())} file(s) are not used ({listed}); tltool "
                    f"reads {', '.join(IMAGE_EXTENSIONS)}",
                    "convert images in other formats (e.g. HEIC, AVIF) to JPEG or PNG",
                )
            )
        if report.loose_images:
            diagnosis.warnings.append(
                Finding(
                    "loose_images",
                    f"{report.name}: {report.loose_images} image(s) lie directly in {report.path}, outside any class "
                    "folder, and are not used",
                    "move them into the folder of their class",
                )
            )


def _suggest(diagnosis: Diagnosis, folders: dict[str, Path], training: Sequence[_FileInfo]) -> None:
    """The config keys (KEY=VALUE overrides) that point tltool at this dataset."""
    if "train" not in folders:
        return
    if diagnosis.layout == "splits":
        diagnosis.suggestions.append(f"data.train={folders['train']}")
        if "val" in folders:
            diagnosis.suggestions.append(f"data.val={folders['val']}")
        else:
            diagnosis.suggestions.append(f"data.val_split={DataConfig().val_split:g}")
    else:
        diagnosis.suggestions += [f"data.train={folders['train']}", f"data.val_split={DataConfig().val_split:g}"]
    needed = _unreadable_limit_needed(training)
    if needed is not None:
        diagnosis.suggestions.append(f"data.max_bad_fraction={needed:g}")


# --- text --------------------------------------------------------------------------------------------


def bar(value: float, largest: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of unicode blocks, `width` characters for `largest`, in eighths of a character."""
    if largest <= 0 or value <= 0:
        return ""
    eighths = max(1, round(value / largest * width * 8))
    return "█" * (eighths // 8) + (_BLOCKS[eighths % 8] if eighths % 8 else "")


def _finding_lines(finding: Finding, mark: str) -> list[str]:
    lines = [f"  {mark} {finding.message}"]
    if finding.fix:
        lines.append(f"    fix: {finding.fix}")
    return lines


def format_diagnosis(diagnosis: Diagnosis) -> str:
    """The human report: layout, a bar per class and split, image statistics, problems, warnings, suggestions."""
    layout = (
        "splits: " + ", ".join(f"{s.name} = {Path(s.path).name}/" for s in diagnosis.splits)
        if diagnosis.layout == "splits"
        else "one folder of classes (tltool holds out data.val_split of each class for validation)"
    )
    lines = [f"dataset {diagnosis.root}", f"layout  {layout}"]
    for report in diagnosis.splits:
        if not report.class_counts:
            continue
        usable = report.usable_counts()
        bad = {c: report.class_counts[c] - usable[c] for c in report.class_counts}
        ratio = ""
        if report.name == "train" and diagnosis.imbalance_ratio is not None:
            ratio = f", imbalance {diagnosis.imbalance_ratio:.1f}x (largest / smallest class)"
        lines += ["", f"{report.name}: {len(report.class_counts)} classes, {report.num_images} images{ratio}"]
        width = max(len(c) for c in report.class_counts)
        digits = len(str(max(report.class_counts.values())))
        largest = max(report.class_counts.values())
        for name, count in report.class_counts.items():
            note = "  EMPTY" if count == 0 else (f"  ({bad[name]} unreadable)" if bad[name] else "")
            lines.append(f"  {name:<{width}}  {count:>{digits}}  {bar(count, largest)}{note}")
    stats = diagnosis.image_stats
    if stats:
        w, h = stats["width"], stats["height"]
        lines += [
            "",
            f"images  {stats['count']} readable; width {w['min']:g}/{w['median']:g}/{w['max']:g}, "
            f"height {h['min']:g}/{h['median']:g}/{h['max']:g} px (min/median/max)",
            "        modes "
            + ", ".join(f"{m} {n}" for m, n in stats["modes"].items())
            + "; formats "
            + ", ".join(f"{f} {n}" for f, n in stats["formats"].items()),
        ]
    if diagnosis.problems:
        lines += ["", f"problems that break training ({len(diagnosis.problems)}):"]
        for finding in diagnosis.problems:
            lines += _finding_lines(finding, "✗")
    if diagnosis.warnings:
        lines += ["", f"warnings ({len(diagnosis.warnings)}):"]
        for finding in diagnosis.warnings:
            lines += _finding_lines(finding, "!")
    if diagnosis.suggestions:
        lines += ["", "train on it with:", "  tltool finetune CONFIG " + " ".join(diagnosis.suggestions)]
    test = diagnosis.split("test")
    if test is not None and test.class_counts:
        lines.append(
            f"  and measure it after training with: tltool eval runs/<name>/checkpoints/best.pt --data {test.path}"
        )
    if not diagnosis.problems and not diagnosis.warnings:
        lines += ["", "no problems found"]
    return "\n".join(lines)
