"""Dataset folders: ImageFolder scanning, the stratified train/val split, and the images found unusable.

Nothing here writes into the dataset folder. Unreadable images are found before training by a cheap header
check (`tltool.data.images.image_problem`: zero-byte, not an image, decompression bomb); a FIFO, socket or
device named like an image is reported as what it is, never opened. Each folder is walked once by its real
path, so symbolic-link loops add no images.
"""

from __future__ import annotations

import os
import random
import stat
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tltool.config import DataConfig
from tltool.data import verdicts
from tltool.data.fingerprint import folder_listing, make_fingerprint, val_keys
from tltool.data.images import HIDDEN_PREFIXES, IMAGE_EXTENSIONS, is_visible, read_header
from tltool.data.labelfile import data_root, is_label_file, is_multi_hot, label_indices, scan_label_file
from tltool.data.shards import ShardSamples, is_shard_source, scan_shards
from tltool.errors import DataError
from tltool.files import path_problem

Sample = tuple[str, int]


@dataclass
class FolderWalk:
    """What a recursive walk of one folder found: its image files, and the folder links it did not follow again."""

    images: list[Path] = field(default_factory=list)
    repeated: list[Path] = field(default_factory=list)  # links to a folder already walked (a loop, or a second link)
    outside: list[Path] = field(default_factory=list)  # links to a folder outside the walked one (followed)


def walk_images(folder: Path) -> FolderWalk:
    """The image files under `folder` (by extension, recursively, sorted, hidden entries skipped).

    Each folder is walked once, by its real path: a symbolic link back up the tree (a loop) or a second
    link to a folder already walked adds nothing (a loop once multiplied 12 images into 1,452). Links
    are otherwise followed, and those leading outside `folder` are listed for `tltool doctor`.
    """
    walk = FolderWalk()
    root = os.path.realpath(folder)
    seen: set[str] = set()

    def visit(directory: Path) -> None:
        real = os.path.realpath(directory)
        if real in seen:
            walk.repeated.append(directory)
            return
        seen.add(real)
        if directory.is_symlink() and os.path.commonpath([root, real]) != root:
            walk.outside.append(directory)
        with os.scandir(directory) as entries:  # (names and types from the listing: no stat per image)
            listed = sorted((entry.name, entry) for entry in entries if not entry.name.startswith(HIDDEN_PREFIXES))
        for name, entry in listed:
            if _is_dir(entry):
                visit(directory / name)
            elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                walk.images.append(directory / name)

    visit(folder)
    return walk


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether a listed entry is a folder, or a link to one (as Path.is_dir: False when it cannot be stat-ed)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def image_files(folder: Path) -> Iterator[Path]:
    """The image files under `folder`: `walk_images(folder).images` (each folder followed once)."""
    yield from walk_images(folder).images


def file_problem(path: str | Path) -> str | None:
    """Why an image file cannot be used, or None: not a regular file (a FIFO is never opened), or its header.

    Cheap: one stat, then the header (`tltool.data.images.image_problem`); nothing is decoded.
    """
    return file_header(path)[0]


def file_header(path: str | Path) -> tuple[str | None, int, tuple[int, int, str, str | None] | None]:
    """(`file_problem`, size in bytes, the header's (width, height, mode, format) when it has no problem)."""
    try:  # (one stat for the common case, a non-empty regular file; path_problem words anything else)
        info = os.stat(path)
    except OSError:
        return path_problem(Path(path)), 0, None
    if not stat.S_ISREG(info.st_mode):
        return path_problem(Path(path)), 0, None
    if info.st_size == 0:
        return "empty file", 0, None
    problem, header = read_header(path)
    return problem, info.st_size, header


def scan_folder(root: str | Path, key: str = "data.train") -> tuple[list[str], list[Sample]]:
    """ImageFolder layout: class names (sorted sub-folders) and (path, class index) samples.

    Hidden entries (`.DS_Store`, `.ipynb_checkpoints/`) and files that are not images are ignored.
    """
    root = Path(root)
    problem = path_problem(root, "folder")
    if problem is not None:
        raise DataError(f"{key} folder {root} {problem}", f"set {key} to a folder of class sub-folders")
    classes = sorted(e.name for e in root.iterdir() if e.is_dir() and is_visible(e))
    if not classes:
        raise DataError(
            f"{key} folder {root} has no class sub-folders",
            "put the images of each class in a sub-folder named after it (root/cat/1.jpg, root/dog/2.jpg)",
        )
    samples: list[Sample] = []
    empty = []
    for index, name in enumerate(classes):
        files = list(image_files(root / name))
        if not files:
            empty.append(name)
        samples.extend((str(f), index) for f in files)
    if empty:
        raise DataError(
            f"{key}: class folder(s) without images: {', '.join(empty)}",
            f"add images or remove the folder(s) from {root}",
        )
    return classes, samples


def stratified_split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out `fraction` of each class (at least one image where a class has two or more), seeded.

    Multilabel samples are grouped by their label set (the multi-hot target): `fraction` of each set is held
    out, and an image whose label set no other image has stays in train."""
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        items = list(by_class[label])
        rng.shuffle(items)
        count = min(len(items) - 1, max(1, round(len(items) * fraction))) if len(items) > 1 else 0
        val.extend(items[:count])
        train.extend(items[count:])
    return sorted(train), sorted(val)


@dataclass
class DataSplit:
    """The samples of a run: class names and the train / val lists, plus the images found unusable."""

    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    bad: list[tuple[str, str]] = field(default_factory=list)
    root: str = ""  # data.train's folder (a label file's own folder): the fingerprint's paths are relative to it
    listing: dict = field(default_factory=dict)  # "train" (and "val") -> class -> file keys and sizes
    split_from_train: bool = True  # data.val_split held val out of data.train (no data.val)

    def counts(self, which: str) -> Counter:
        return Counter(label for _, label in getattr(self, which))

    def fingerprint(self) -> dict:
        """The checkpoint's `data_fingerprint` of these samples (`tltool.data.fingerprint`)."""
        return make_fingerprint(self.listing, val_keys(self.val, self.root) if self.split_from_train else None)


HEADER_WORKERS = 8  # threads of the header check (Pillow's file reads and stats release the GIL)
HEADER_CHUNK = 256  # files per task: one future per file would cost more than a cached file's header read


def _problems(paths: Sequence[str]) -> list[str | None]:
    return [file_problem(path) for path in paths]


def _map_chunks(function: Callable[[Sequence[str]], list], paths: Sequence[str], workers: int) -> list:
    """`function` over chunks of HEADER_CHUNK paths, on a pool of `workers` threads (1: in this one), joined in
    order."""
    chunks = [paths[i : i + HEADER_CHUNK] for i in range(0, len(paths), HEADER_CHUNK)]
    if workers <= 1 or len(chunks) <= 1:
        return function(paths)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [item for chunk in pool.map(function, chunks) for item in chunk]


def check_images(
    samples: Sequence[Sample], workers: int | None = None, memo: bool = True
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """The samples whose file passes `file_problem`, and (path, why) of those that do not, both in the order of
    `samples`: the same result with any `workers` (1: in this thread; more, HEADER_WORKERS by default: chunks
    of HEADER_CHUNK files checked by a thread pool, their results joined in order).

    `memo`: the verdicts of an identical list of unchanged files checked before are reused (`verdicts`: one stat
    per file instead of a header read), and a new check's verdicts are kept for the next one."""
    workers = HEADER_WORKERS if workers is None else workers
    paths = [path for path, _ in samples]
    key = recalled = None
    if memo and len(paths) >= verdicts.MIN_FILES and verdicts.memo_root() is not None:
        key = verdicts.list_key(paths)
        recalled = verdicts.recall(key)
    if recalled is not None:
        why = dict(recalled)
        problems = [why.get(path) for path in paths]
    else:
        problems = _map_chunks(_problems, paths, workers)
    kept = [sample for sample, problem in zip(samples, problems, strict=True) if problem is None]
    bad = [(path, problem) for path, problem in zip(paths, problems, strict=True) if problem is not None]
    if key is not None and recalled is None:
        verdicts.remember(key, bad)
    return kept, bad


def _drop_bad(samples: list[Sample], bad: list[tuple[str, str]]) -> list[Sample]:
    if isinstance(samples, ShardSamples):  # (streamed: an image that does not decode is skipped in its batch)
        return samples
    kept, found = check_images(samples)
    bad.extend(found)
    return kept


def scan_source(path: str | Path, key: str, cfg: DataConfig | None = None) -> tuple[list[str], list[Sample]]:
    """Class names and samples of a dataset given as a folder of class sub-folders or a .csv/.tsv label file
    (`tltool.data.labelfile`, with `cfg`'s column names) or .tar shards (`tltool.data.shards`: `ShardSamples`,
    streamed): the one place a scan dispatches on the kind."""
    cfg = cfg or DataConfig()
    multilabel = cfg.task == "multilabel"
    if is_shard_source(path):
        if multilabel:
            raise DataError(
                f"data.task: multilabel needs a label file, but {key} {path} is .tar shards (one class per sample)",
                f"set {key} to a .csv/.tsv with a path column and a label column of names separated by "
                f"{cfg.label_delimiter!r}",
            )
        return scan_shards(str(path), key, cfg.classes)
    if is_label_file(path):
        delimiter = cfg.label_delimiter if multilabel else None
        return scan_label_file(path, key, cfg.path_column, cfg.label_column, label_delimiter=delimiter)
    if multilabel:
        raise DataError(
            f"data.task: multilabel needs a label file, but {key} {path} is a folder (one class per image)",
            f"set {key} to a .csv/.tsv with a path column and a label column of names separated by "
            f"{cfg.label_delimiter!r}",
        )
    return scan_folder(path, key)


def ordered_classes(
    classes: list[str], samples: list[Sample], wanted: list[str], key: str, source: str
) -> tuple[list[str], list[Sample]]:
    """Re-index `samples` to the class order `wanted` (data.classes, or the train split's), which must name
    exactly the classes found (a DataError names those only on one side)."""
    if classes == wanted:
        return classes, samples
    missing, extra = sorted(set(wanted) - set(classes)), sorted(set(classes) - set(wanted))
    if missing or extra:
        parts = [
            f"not in {key}: {', '.join(missing)}" if missing else "",
            f"only in {key}: {', '.join(extra)}" if extra else "",
        ]
        raise DataError(
            f"{key} and {source} have different classes ({'; '.join(p for p in parts if p)})",
            f"give {key} exactly the classes of {source}",
        )
    index = {name: wanted.index(name) for name in classes}
    ordered = [(path, _reindexed(label, classes, index, len(wanted))) for path, label in samples]
    return list(wanted), ShardSamples(ordered, samples.shards) if isinstance(samples, ShardSamples) else ordered


def _reindexed(
    label: int | tuple[float, ...], classes: list[str], index: dict[str, int], size: int
) -> int | tuple[float, ...]:
    """A sample's label in another class order (`index`: name -> new index, of `size` classes; a multi-hot
    target is reordered)."""
    if not is_multi_hot(label):
        return index[classes[label]]
    target = [0.0] * size
    for i in label_indices(label):
        target[index[classes[i]]] = 1.0
    return tuple(target)


def scan_data(cfg: DataConfig, seed: int) -> DataSplit:
    """Find the classes and samples of `cfg`, split train/val, and check the images' headers.

    data.train / data.val are each a folder of class sub-folders or a label file (`scan_source`); the class
    order is sorted, or `data.classes`.
    """
    if not cfg.train:
        raise DataError("data.train is not set", "set data.train to a folder of class sub-folders or a .csv file")
    class_names, train = scan_source(cfg.train, "data.train", cfg)
    if cfg.classes is not None:
        class_names, train = ordered_classes(class_names, train, list(cfg.classes), "data.train", "data.classes")
    root = data_root(cfg.train)
    listing = {"train": folder_listing(root, class_names, train)}
    if len(class_names) < 2:  # (a classifier of one class is "100%" right without learning anything)
        kind = "label file" if is_label_file(cfg.train) else "folder"
        raise DataError(
            f"data.train {kind} {cfg.train} has a single class ({class_names[0]}): a classifier needs at least 2",
            "add images of another class (e.g. the images that are not " + class_names[0] + ")",
        )
    if cfg.val:
        val_classes, val = scan_source(cfg.val, "data.val", cfg)
        if sorted(val_classes) != sorted(class_names):
            only_train = sorted(set(class_names) - set(val_classes))
            only_val = sorted(set(val_classes) - set(class_names))
            raise DataError(
                f"data.train and data.val have different classes (only in train: {only_train or 'none'}; "
                f"only in val: {only_val or 'none'})",
                "give both the same classes (class sub-folders, or labels)",
            )
        _, val = ordered_classes(val_classes, val, class_names, "data.val", "data.train")
        listing["val"] = folder_listing(data_root(cfg.val), class_names, val)
    else:
        train, val = stratified_split(train, cfg.val_split, seed)
        if not val:
            raise DataError(
                "data.val_split leaves no validation images (every class has a single image)",
                "add images or give data.val",
            )
    bad: list[tuple[str, str]] = []
    train = _drop_bad(train, bad)
    val = _drop_bad(val, bad)
    split = DataSplit(class_names, train, val, bad, root, listing, split_from_train=not cfg.val)
    total = len(train) + len(val) + len(bad)
    if bad:
        shown = "; ".join(f"{p}: {why}" for p, why in bad[:3]) + ("; ..." if len(bad) > 3 else "")
        if cfg.on_bad_image == "error":
            raise DataError(
                f"{len(bad)} unreadable image(s): {shown}", "fix or remove them, or set data.on_bad_image=skip"
            )
        if len(bad) / total > cfg.max_bad_fraction:
            raise DataError(
                f"{len(bad)} of {total} images are unreadable ({len(bad) / total:.1%} > data.max_bad_fraction "
                f"{cfg.max_bad_fraction}): {shown}",
                "fix or remove them, or raise data.max_bad_fraction",
            )
        for path, why in bad:
            print(f"warning: skipping {path}: {why}", file=sys.stderr)
    present = {i for _, label in train for i in label_indices(label)}
    missing = [class_names[i] for i in range(len(class_names)) if i not in present]
    if missing:
        raise DataError(f"no usable training images for class(es) {', '.join(missing)}", "add images")
    return split


def scan_eval_folder(
    root: str | Path,
    class_names: list[str],
    path_column: str = "path",
    label_column: str = "label",
    label_delimiter: str | None = None,
) -> list[Sample]:
    """Samples of an evaluation folder or label file (with the run's column names), labelled with the
    checkpoint's class indices (`label_delimiter`: a multilabel run's, multi-hot over the checkpoint's classes)."""
    if is_shard_source(root):
        if label_delimiter is not None:
            raise DataError(
                f"--data {root} is .tar shards (one class per sample), but the checkpoint is a multilabel model",
                f"give a .csv/.tsv label file whose labels are separated by {label_delimiter!r}",
            )
        classes, samples = scan_shards(str(root), "--data")
        return ordered_classes(classes, samples, class_names, "--data", "the model")[1]
    if is_label_file(root):
        classes, samples = scan_label_file(root, "--data", path_column, label_column, False, label_delimiter)
    elif label_delimiter is not None:
        raise DataError(
            f"--data {root} is a folder, but the checkpoint is a multilabel model",
            f"give a .csv/.tsv label file whose labels are separated by {label_delimiter!r}",
        )
    else:
        classes, samples = scan_folder(root, "--data")
    unknown = sorted(set(classes) - set(class_names))
    if unknown:
        raise DataError(
            f"{root} has classes the model does not know: {', '.join(unknown)}",
            f"its classes are: {', '.join(class_names)}",
        )
    index = {name: class_names.index(name) for name in classes}
    kept, bad = check_images(samples)
    for path, problem in bad:
        print(f"warning: skipping {path}: {problem}", file=sys.stderr)
    return [(path, _reindexed(label, classes, index, len(class_names))) for path, label in kept]
