"""What a dataset holds: its layout, each split's classes and files, the image headers, exact duplicates.

The walk is the one training does (`tltool.data.scan_folder`, `tltool.data.image_problem`); nothing is decoded
unless `--deep` asks for it (then each image is decoded as training decodes it).
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from tltool.data import IMAGE_EXTENSIONS, is_visible, load_image, scan_folder
from tltool.data.folders import file_header, walk_images
from tltool.data.labelfile import SHOWN, label_counts, read_label_file, split_labels
from tltool.doctor.findings import FileInfo, Finding, SplitReport
from tltool.errors import DataError

# Folder names of the splits, in order of preference (the first one found is used).
# What a failed decode raises (DecompressionBombError is not an OSError; load_image turns the warning into one).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning)
SPLIT_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "dev"),
    "test": ("test", "testing"),
}


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


def scan_split(name: str, folder: Path, key: str) -> tuple[SplitReport, list[str], Finding | None]:
    """The class counts of one split folder, as training's `scan_folder` sees it: its classes (`_class_folders`)
    each walked once by `walk_images` (the walk also gives the links doctor reports).

    `scan_folder` refuses a folder with an empty class; doctor records the empty ones instead (and takes
    `scan_folder`'s words for a folder without classes).
    """
    report = SplitReport(name=name, path=str(folder))
    classes = _class_folders(folder)
    if not classes:
        try:
            scan_folder(folder, key)
        except DataError as exc:
            return report, [], Finding("no_classes", exc.what, exc.fix)
    walks = {c: walk_images(folder / c) for c in classes}  # (each class walked once, as scan_folder walks it)
    for walk in walks.values():
        report.repeated_links += [str(p) for p in walk.repeated]
        report.outside_links += [str(p) for p in walk.outside]
    files_by_class = {c: [str(f) for f in walk.images] for c, walk in walks.items()}
    report.class_counts = {c: len(files) for c, files in files_by_class.items()}
    report.empty_classes = [c for c, files in files_by_class.items() if not files]
    report.ignored_files, report.loose_images = _ignored_files(folder, classes)
    return report, [f for files in files_by_class.values() for f in files], None


def scan_label_split(
    name: str, file: Path, key: str, path_column: str, label_column: str, label_delimiter: str | None = None
) -> tuple[SplitReport, list[str], list[Finding], list[Finding]]:
    """One split given as a label file, read as training reads it (`tltool.data.read_label_file`): its report,
    its images, and the problems and warnings of its rows, every one of them (training stops at the first).

    `label_delimiter` (data.task: multilabel): each label cell is a list of classes; the class counts are then
    positives (an image counts for each of its classes, `label_counts`) and `label_sets` the images per set."""
    report = SplitReport(name=name, path=str(file), delimiter=label_delimiter)
    try:
        labels = read_label_file(file, key, path_column, label_column, label_delimiter=label_delimiter)
    except DataError as exc:
        return report, [], [Finding("label_file", exc.what, exc.fix, [str(file)])], []
    report.unlabelled_rows = len(labels.empty_labels)
    if label_delimiter is None:
        report.labels = {row.path: row.label for row in labels.rows}
        report.class_counts = dict(sorted(Counter(report.labels.values()).items()))
    else:
        report.labels = {
            row.path: label_delimiter.join(split_labels(row.label, label_delimiter)) for row in labels.rows
        }
        report.class_counts = dict(sorted(label_counts(labels).items()))
        report.images = len(labels.rows)
        sets = Counter(report.labels.values())
        report.label_sets = dict(sorted(sets.items(), key=lambda item: (-item[1], item[0])))
    problems, warnings = [], []
    lines = ", ".join
    if labels.empty_paths:
        problems.append(
            Finding(
                "empty_paths",
                f"{name}: {len(labels.empty_paths)} row(s) of {file} have no path (line "
                f"{lines(map(str, labels.empty_paths[:SHOWN]))}{', ...' if len(labels.empty_paths) > SHOWN else ''})",
                "fill in the image path of each row or delete the row",
                [str(file)],
            )
        )
    if labels.empty_labels:
        problems.append(
            Finding(
                "empty_labels",
                f"{name}: {len(labels.empty_labels)} row(s) of {file} have an empty label (line "
                f"{lines(map(str, labels.empty_labels[:SHOWN]))}{', ...' if len(labels.empty_labels) > SHOWN else ''})",
                "give every image its class name, or delete the rows of unlabelled images"
                if label_delimiter is None
                else f"give every image at least one class name (separated by {label_delimiter!r}), or delete the rows",
                [str(file)],
            )
        )
    if labels.missing:
        problems.append(
            Finding(
                "missing_files",
                f"{name}: {len(labels.missing)} image(s) listed in {file} do not exist, e.g. "
                + lines(f"{row.path} (line {row.line})" for row in labels.missing[:SHOWN]),
                f"fix the paths (relative ones are taken from {file.parent}) or delete those rows",
                [row.path for row in labels.missing],
            )
        )
    if labels.repeated:
        problems.append(
            Finding(
                "repeated_rows",
                f"{name}: {len(labels.repeated)} image(s) are listed more than once in {file}, e.g. "
                + lines(f"{p} (lines {', '.join(map(str, n))})" for p, n in list(labels.repeated.items())[:SHOWN]),
                "list each image once, with its one class",
                list(labels.repeated),
            )
        )
    if labels.hidden:
        warnings.append(
            Finding(
                "hidden_files",
                f"{name}: {len(labels.hidden)} row(s) of {file} name hidden files and are left out, e.g. "
                + lines(row.path for row in labels.hidden[:SHOWN]),
                "delete those rows (hidden files such as ._name.jpg are not images)",
                [row.path for row in labels.hidden],
            )
        )
    if not labels.rows and not problems:
        problems.append(Finding("no_classes", f"{name}: {file} lists no images", "add a row per image", [str(file)]))
    return report, list(report.labels), problems, warnings


def _class_folders(folder: Path) -> list[str]:
    """The visible sub-folders of a split folder (its classes), as `scan_folder` lists them."""
    if not folder.is_dir():
        return []
    return sorted(e.name for e in folder.iterdir() if e.is_dir() and is_visible(e))


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


def inspect_file(path: str, deep: bool = False) -> FileInfo:
    """Size, header problem, and (for a readable image) size/mode/format from the header.

    With `deep` the whole image is decoded as training decodes it (`load_image`): a truncated or corrupt
    file passes the header check but fails here, and is counted as unreadable.
    """
    problem, size, header = file_header(path)  # a FIFO or a device is reported as what it is, never opened
    if problem is not None:  # (the header's one read: nothing is decoded)
        return FileInfo(path, size, problem)
    info = FileInfo(path, size, None, *header)
    if deep:
        try:
            load_image(path)
        except DECODE_ERRORS as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return FileInfo(path, size, f"cannot be decoded ({reason})", decode_failed=True)
    return info


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_duplicates(infos: Iterable[FileInfo], workers: int = 8) -> list[list[str]]:
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


def scan_shard_split(name: str, pattern: str, key: str) -> tuple[SplitReport, list[Finding], list[Finding]]:
    """One split given as WebDataset shards (`data.train=shards/train-{000000..000009}.tar`): every shard read as
    training's scan reads it (`tltool.data.shards.shard_samples`: headers and the .cls members, no image bytes),
    each shard's samples and class counts, and a problem per shard that the scan would stop at (unreadable, a
    sample without .cls or without an image, a .cls that is no class index, no sample), all of them.

    A pattern that names no file (or a missing webdataset package) is a DataError: there is nothing to report.
    Paths of a brace range that do not exist are a warning: the scan leaves them out without a word.
    """
    from braceexpand import braceexpand  # (a dependency of webdataset, as in data/shards.py)

    from tltool.data.shards import ShardError, class_names_for, expand_shards, is_remote, shard_samples

    report = SplitReport(name=name, path=pattern)
    urls = expand_shards(pattern, key)
    warnings = []
    missing = [
        item
        for item in braceexpand(pattern)
        if not is_remote(item) and not glob.has_magic(item) and not os.path.isfile(item)
    ]
    if missing:
        warnings.append(
            Finding(
                "missing_shards",
                f"{name}: {len(missing)} of the {len(missing) + len(urls)} shard(s) that {pattern} names do not exist "
                f"and are left out, e.g. {missing[0]}",
                "fix the brace range to the shards there are (or write the missing ones)",
                missing,
            )
        )
    labels: Counter[int] = Counter()
    problems: list[Finding] = []
    for url in urls:
        try:
            rows = shard_samples(url, key)
            if not rows:
                raise ShardError(
                    "empty", f"{key}: shard {url} holds no sample", "remove it from the pattern or rewrite it"
                )
        except ShardError as exc:
            report.shards.append({"path": url, "samples": None, "problem": exc.code})
            problems.append(Finding(f"shard_{exc.code}", f"{name}: {exc.what}", exc.fix, [url]))
            continue
        counts = Counter(label for _, label in rows)
        labels.update(counts)
        report.shards.append({"path": url, "samples": len(rows), "problem": None})
    try:
        names = class_names_for(urls, set(labels), key, None)
    except DataError as exc:  # (classes.json unreadable, or an index past its names)
        problems.append(Finding("shard_classes", f"{name}: {exc.what}", exc.fix, [pattern]))
        names = [str(i) for i in range(max(labels, default=-1) + 1)]
    report.class_counts = {names[i]: labels[i] for i in sorted(labels)}  # (in class index order)
    return report, problems, warnings
