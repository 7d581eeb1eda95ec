"""`tltool doctor DATA_DIR | TRAIN.csv | 'TRAIN-{0..9}.tar' [--val VAL]`: check a dataset before training, and say
what to fix.

It finds the layout (train/ and val|valid|validation|test folders, or one ImageFolder that tltool splits
with `data.val_split`; or a .csv/.tsv label file, `--val` another for validation, `--task multilabel` for
lists of classes per row; or .tar shards, `--val` the val shards), counts images per class,
and looks for what breaks a run (an empty class, a class in one split only, too many unreadable files; a
label file's missing paths, empty labels, repeated rows) or quietly spoils it (duplicates across splits
inflate val accuracy, heavy imbalance, files that are ignored). It reads the dataset and never writes into
it; the image checks are the ones training runs (`tltool.data.scan_folder`, `tltool.data.read_label_file`,
`tltool.data.image_problem`).

One module per step: `scan` (what the dataset holds), `checks` (what is wrong with it), `text` (the
report); `findings` holds what they pass along. `diagnose` runs them in order.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tltool.data.labelfile import is_label_file
from tltool.data.shards import is_shard_source
from tltool.doctor.checks import (
    check_classes,
    check_delimited_labels,
    check_duplicates,
    check_files,
    check_links,
    check_listed_twice,
    check_multilabel,
    check_unreadable,
    suggest,
)
from tltool.doctor.findings import Diagnosis, Finding, SplitReport
from tltool.doctor.scan import (
    find_duplicates,
    find_layout,
    inspect_file,
    scan_label_split,
    scan_shard_split,
    scan_split,
)
from tltool.doctor.text import bar, format_diagnosis
from tltool.errors import DataError
from tltool.files import path_problem

__all__ = [
    "Diagnosis",
    "Finding",
    "SplitReport",
    "bar",
    "diagnose",
    "find_duplicates",
    "find_layout",
    "format_diagnosis",
]


def _stats(values: Sequence[int]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def diagnose(
    root: str | Path,
    workers: int = 8,
    deep: bool = False,
    val: str | Path | None = None,
    path_column: str = "path",
    label_column: str = "label",
    task: str = "multiclass",
    label_delimiter: str = "|",
) -> Diagnosis:
    """Inspect the dataset at `root` and return every finding (nothing is written anywhere).

    `root` is a folder (class sub-folders, or train/ val/ inside), a .csv/.tsv label file (`val`: the
    validation label file, if any; `path_column`, `label_column`: as data.path_column, data.label_column) or
    .tar shards (a pattern as data.train takes it; `val`: the val shards). With `deep` every image is decoded
    (slower: the whole dataset is read), so truncated and corrupt files that pass the header check are counted
    as unreadable too (shards: the images inside are not opened). `task`, `label_delimiter`: as data.task,
    data.label_delimiter (multilabel: a label file's label cells are lists of classes).
    """
    source = str(root)
    root = Path(root)
    keys = {"train": "data.train", "val": "data.val", "test": "--data"}
    files_by_split: dict[str, list[str]] = {}
    other_folders: list[str] = []
    if task not in ("multiclass", "multilabel"):
        raise DataError(f"--task {task} is not a task", "use multiclass or multilabel (as data.task)")
    if task == "multilabel" and len(label_delimiter) != 1:
        raise DataError(f"--label-delimiter {label_delimiter!r} is not one character", "e.g. --label-delimiter '|'")
    delimiter = label_delimiter if task == "multilabel" else None
    if task == "multilabel" and not is_label_file(root):
        what = "shards hold one class per sample (.cls)" if is_shard_source(source) else "not a .csv or .tsv file"
        raise DataError(
            f"--task multilabel reads a label file, and {source} is {what}",
            "give the label file (a column of paths, a column of classes separated by --label-delimiter)",
        )
    if val is not None and not is_label_file(root) and not is_shard_source(source):
        raise DataError(
            "--val is for a label file or shards dataset",
            "give the train label file (or shards) first: doctor train.csv --val val.csv",
        )
    if is_shard_source(source):
        folders = {"train": source} | ({"val": str(val)} if val is not None else {})
        diagnosis = Diagnosis(root=source, layout="shards", deep=deep)
        for name, pattern in folders.items():
            if not is_shard_source(pattern):
                raise DataError(f"--val {pattern} is not .tar shards", "give the val shards' pattern to --val")
            report, problems, warnings = scan_shard_split(name, pattern, keys[name])
            diagnosis.splits.append(report)
            diagnosis.problems += problems
            diagnosis.warnings += warnings
        if val is None:
            diagnosis.warnings.append(
                Finding(
                    "shards_need_val",
                    "training from shards needs data.val (shards are streamed: no data.val_split is held out)",
                    "give the val shards with --val (tltool shard --val-split writes them)",
                )
            )
    elif is_label_file(root):
        folders = {"train": root} | ({"val": Path(val)} if val is not None else {})
        diagnosis = Diagnosis(root=str(root), layout="labelfile", task=task, deep=deep)
        for name, file in folders.items():
            if not is_label_file(file):
                raise DataError(f"{keys[name]} {file} is not a .csv or .tsv file", "give a label file to --val")
            report, files, problems, warnings = scan_label_split(
                name, file, keys[name], path_column, label_column, delimiter
            )
            diagnosis.splits.append(report)
            files_by_split[name] = files
            diagnosis.problems += problems
            diagnosis.warnings += warnings
        check_listed_twice(diagnosis)
        check_delimited_labels(diagnosis, label_delimiter)
    else:
        problem = path_problem(root, "folder")
        if problem is not None:
            raise DataError(
                f"{root} {problem}", "give the folder of your images (class sub-folders, or train/ val/) or a .csv file"
            )
        layout, folders, other_folders = find_layout(root)
        diagnosis = Diagnosis(root=str(root), layout=layout, deep=deep)
        for name, folder in folders.items():
            report, files, failure = scan_split(name, folder, keys[name])
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
            name: list(pool.map(lambda path: inspect_file(path, deep), files)) for name, files in files_by_split.items()
        }  # per split, in file order
    for report in diagnosis.splits:
        report.unreadable = [(i.path, i.problem) for i in infos.get(report.name, []) if i.problem is not None]

    all_infos = [info for split_infos in infos.values() for info in split_infos]
    diagnosis.decode_failures = sum(info.decode_failed for info in all_infos)
    check_classes(diagnosis)
    check_multilabel(diagnosis)
    training = [info for name in ("train", "val") for info in infos.get(name, [])]
    check_unreadable(diagnosis, training, infos.get("test", []))
    unique = list({info.path: info for info in all_infos}.values())  # (a file two label files list: check_listed_twice)
    check_duplicates(diagnosis, find_duplicates(unique, workers), folders)
    check_files(diagnosis)
    check_links(diagnosis)
    readable = [i for i in all_infos if i.problem is None]
    if readable:
        diagnosis.image_stats = {
            "count": len(readable),
            "width": _stats([i.width for i in readable]),
            "height": _stats([i.height for i in readable]),
            "modes": dict(Counter(i.mode for i in readable).most_common()),
            "formats": dict(Counter(i.format or "?" for i in readable).most_common()),
        }
    suggest(diagnosis, folders, training, path_column, label_column, label_delimiter)
    return diagnosis
