"""Label files: a .csv or .tsv with a column of image paths and a column of class names, as a dataset.

`data.train` / `data.val` (and `tltool eval --data`, `tltool doctor`) may name such a file instead of a folder
of class sub-folders. The file is read with the stdlib `csv` module (comma-separated for .csv, tab for .tsv,
UTF-8 with or without a BOM, a header line first); the path column is `data.path_column` (`path`) and the
label column `data.label_column` (`label`). A relative path is taken from the file's folder, an absolute
one as it is.

Reading (`read_label_file`) never stops at the first bad row: it collects every row problem (a path that
does not exist, an empty label or path, a path listed twice, a hidden file) so that `tltool doctor` can
report them all; `LabelFile.check()` turns them into the one-line error training stops with. Rows naming
hidden files (`._x.jpg`, `.ipynb_checkpoints/`) are left out, as a folder scan leaves them out. The samples
come sorted by (class, path), so the order of the rows changes nothing (and the same images give the same
samples as their class folders would). Nothing here opens an image: the header checks are the folder scan's.

Multi-label files (`data.task: multilabel`, `label_delimiter` given): the label column is a list of class names
separated by `data.label_delimiter` (`red|square`); empty items are ignored, a name listed twice counts once,
and a row with no name is an empty label (every image needs at least one). Such a file's samples carry a
multi-hot target: a tuple of floats, 1.0 at each of the image's classes (`multi_hot`), sorted by path.
"""

from __future__ import annotations

import csv
import difflib
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tltool.data.images import HIDDEN_PREFIXES
from tltool.errors import DataError
from tltool.files import path_problem

DELIMITERS = {".csv": ",", ".tsv": "\t"}  # a label file's suffix -> its field separator
SHOWN = 3  # rows or paths an error names before "..."

Sample = tuple[str, int]  # (as tltool.data.folders.Sample, which imports this module)


def split_labels(label: str, delimiter: str | None) -> list[str]:
    """A label cell's class names: itself (single-label), or its non-empty `delimiter`-separated items, each once."""
    if delimiter is None:
        return [label] if label else []
    return sorted({item.strip() for item in label.split(delimiter) if item.strip()})


def multi_hot(names: list[str], index: dict[str, int]) -> tuple[float, ...]:
    """The multi-hot target of an image with classes `names` (1.0 at each one's index in `index`)."""
    target = [0.0] * len(index)
    for name in names:
        target[index[name]] = 1.0
    return tuple(target)


def is_multi_hot(label: object) -> bool:
    """Whether a sample's label is a multi-hot target (a multilabel run's) rather than a class index."""
    return isinstance(label, tuple)


def label_indices(label: int | tuple[float, ...]) -> list[int]:
    """The class indices a sample's label names: its class, or every class its multi-hot target holds."""
    return [i for i, value in enumerate(label) if value] if is_multi_hot(label) else [label]


def is_label_file(path: str | Path) -> bool:
    """Whether `path` names a label file (by its suffix, .csv or .tsv) rather than a folder of class folders."""
    path = Path(path)
    return path.suffix.lower() in DELIMITERS and not path.is_dir()


def data_root(path: str | Path) -> str:
    """The folder a dataset's paths are relative to: a folder itself, a label file's (or .tar shards') folder.

    (The data fingerprint keys each image by its path relative to it.)
    """
    return str(Path(path).parent) if is_label_file(path) or str(path).strip().lower().endswith(".tar") else str(path)


def _shown(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (", ..." if len(items) > SHOWN else "")


@dataclass
class Row:
    """One usable row: the image's path (resolved against the file's folder), its label, its line number."""

    path: str
    label: str
    line: int


@dataclass
class LabelFile:
    """What a label file holds: its usable rows and every row problem found (nothing decided yet)."""

    path: Path
    key: str  # data.train, data.val, --data: what the messages name
    rows: list[Row] = field(default_factory=list)
    missing: list[Row] = field(default_factory=list)  # paths that do not exist
    empty_labels: list[int] = field(default_factory=list)  # line numbers
    empty_paths: list[int] = field(default_factory=list)  # line numbers
    repeated: dict[str, list[int]] = field(default_factory=dict)  # path -> its lines (listed more than once)
    hidden: list[Row] = field(default_factory=list)  # hidden files, left out as folder scans leave them out
    delimiter: str | None = None  # multilabel: the separator of the names in a label cell

    @property
    def folder(self) -> Path:
        return self.path.parent

    def classes(self) -> list[str]:
        """The class names of the usable rows, sorted (as class folders are)."""
        return sorted({name for row in self.rows for name in split_labels(row.label, self.delimiter)})

    def check(self) -> None:
        """Raise the first row problem as a one-line DataError (missing paths name the first few and the count)."""
        where = f"{self.key} {self.path}"
        if self.empty_paths:
            lines = self.empty_paths
            raise DataError(
                f"{where}: {len(lines)} row(s) with an empty path (line {_shown([str(n) for n in lines])})",
                "fill in the image path of each row or delete the row",
            )
        if self.empty_labels:
            lines = self.empty_labels
            raise DataError(
                f"{where}: {len(lines)} row(s) with an empty label (line {_shown([str(n) for n in lines])})",
                "give every image its class name, or delete the rows of unlabelled images"
                if self.delimiter is None
                else f"give every image at least one class name (separated by {self.delimiter!r}), or delete the rows",
            )
        if self.missing:
            named = [f"{row.path} (line {row.line})" for row in self.missing]
            raise DataError(
                f"{where}: {len(self.missing)} of {len(self.missing) + len(self.rows)} listed image(s) do not exist: "
                f"{_shown(named)}",
                f"fix the paths (relative ones are taken from {self.folder}) or delete those rows",
            )
        if self.repeated:
            named = [f"{path} (lines {', '.join(map(str, lines))})" for path, lines in self.repeated.items()]
            raise DataError(
                f"{where}: {len(self.repeated)} image(s) listed more than once: {_shown(named)}",
                "list each image once, with its one class",
            )
        if not self.rows:
            raise DataError(f"{where} lists no images", "add a row per image (path, label) under the header")

    def warn_hidden(self) -> None:
        """The one warning for rows left out because they name hidden files."""
        if self.hidden:
            print(
                f"warning: {self.key} {self.path}: left out {len(self.hidden)} row(s) naming hidden files "
                f"({_shown([row.path for row in self.hidden])}), as a folder scan leaves them out",
                file=sys.stderr,
            )


def _hidden(written: str) -> bool:
    """A path as written in the file names a hidden file, or lies in a hidden folder below the file's own
    (`is_visible`'s names; string work only: a million rows are read in seconds)."""
    parts = written.replace(os.sep, "/").split("/")
    if os.path.isabs(written):
        parts = parts[-1:]
    return any(part.startswith(HIDDEN_PREFIXES) for part in parts if part not in ("", ".", ".."))


def _column_error(file: Path, key: str, what: str, wanted: str, header: list[str], config_key: str, fix_keys: bool):
    """The one line for a missing column: did-you-mean on the header, or what the header looks like."""
    close = difflib.get_close_matches(wanted, header, n=1, cutoff=0.6) or [
        name for name in header if name.strip().lower() == wanted.lower()
    ]
    message = f"{key} {file} has no {what} column {wanted!r} (its header: {', '.join(repr(n) for n in header)})"
    separators = [sep for sep in (";", "\t", ",", "|") if len(header) == 1 and sep in header[0]]
    if separators:
        return DataError(
            message, f"its fields look separated by {separators[0]!r}: tltool reads commas in a .csv, tabs in a .tsv"
        )
    if close and fix_keys:
        return DataError(message, f"did you mean {close[0]!r}? set {config_key}={close[0]}")
    if close:
        return DataError(message, f"did you mean {close[0]!r}? rename it to {wanted!r} (the run's {config_key})")
    if fix_keys:
        return DataError(message, f"set {config_key} to one of its columns (the first line must be the header)")
    return DataError(message, f"name the column {wanted!r} in the first line (the run's {config_key})")


def read_label_file(
    path: str | Path,
    key: str = "data.train",
    path_column: str = "path",
    label_column: str = "label",
    fix_keys: bool = True,
    label_delimiter: str | None = None,
) -> LabelFile:
    """Read a .csv/.tsv label file: a DataError for the file itself (missing, not UTF-8 text, malformed, empty,
    a column missing: did-you-mean on the header); every row problem is collected, not raised.

    `fix_keys`: the fix of a missing column names the config keys (data.path_column / data.label_column);
    otherwise (`tltool eval --data`, which uses the run's column names) the file's header is to be renamed.
    `label_delimiter` (multilabel): each label cell is a list of class names separated by it.
    """
    path = Path(path)
    problem = path_problem(path)
    if problem is not None:
        raise DataError(f"{key} label file {path} {problem}", f"set {key} to a .csv/.tsv file or a folder")
    delimiter = DELIMITERS[path.suffix.lower()]
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter, strict=True)
            header = next(reader, None)
            records = [(reader.line_num, record) for record in reader]
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{key} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})", "save it as UTF-8 CSV"
        ) from None
    except csv.Error as exc:
        raise DataError(f"{key} {path} is not a valid {path.suffix.lower()[1:].upper()} file ({exc})",
                        "fix the quoting on that line") from None  # fmt: skip
    except OSError as exc:
        raise DataError(f"{key} {path} cannot be read ({exc.strerror or exc})", "check its permissions") from None
    if header is None or not any(name.strip() for name in header):
        raise DataError(
            f"{key} {path} is empty",
            f"write a header line ({path_column}{delimiter}{label_column}) and a row per image".replace("\t", "<TAB>"),
        )
    header = [name.strip() for name in header]
    columns = {}
    for what, wanted, config_key in (
        ("path", path_column, "data.path_column"),
        ("label", label_column, "data.label_column"),
    ):
        if wanted not in header:
            raise _column_error(path, key, what, wanted, header, config_key, fix_keys)
        columns[what] = header.index(wanted)

    labels = LabelFile(path, key, delimiter=label_delimiter)
    folder = path.parent
    lines: dict[str, list[int]] = {}
    for line, record in records:
        if not any(value.strip() for value in record):
            continue  # a blank line
        written = record[columns["path"]].strip() if columns["path"] < len(record) else ""
        label = record[columns["label"]].strip() if columns["label"] < len(record) else ""
        if not written:
            labels.empty_paths.append(line)
            continue
        if not split_labels(label, label_delimiter):
            labels.empty_labels.append(line)
            continue
        resolved = os.path.normpath(os.path.join(folder, os.path.expanduser(written)))
        row = Row(resolved, label, line)
        if _hidden(written):
            labels.hidden.append(row)
            continue
        lines.setdefault(resolved, []).append(line)
        if len(lines[resolved]) > 1:
            continue
        if not os.path.exists(resolved):  # (a broken link too; a FIFO or a folder is the header check's)
            labels.missing.append(row)
        else:
            labels.rows.append(row)
    labels.repeated = {p: n for p, n in lines.items() if len(n) > 1}
    return labels


def scan_label_file(
    path: str | Path,
    key: str = "data.train",
    path_column: str = "path",
    label_column: str = "label",
    fix_keys: bool = True,
    label_delimiter: str | None = None,
) -> tuple[list[str], list[Sample]]:
    """A label file as a dataset: class names (sorted labels) and (path, class index) samples sorted by
    (class, path), as `tltool.data.folders.scan_folder` gives a folder's. Any row problem is a DataError.
    With `label_delimiter` (multilabel) the samples are (path, multi-hot target), sorted by path."""
    labels = read_label_file(path, key, path_column, label_column, fix_keys, label_delimiter)
    labels.check()
    labels.warn_hidden()
    classes = labels.classes()
    index = {name: i for i, name in enumerate(classes)}
    if label_delimiter is not None:
        return classes, sorted((row.path, multi_hot(split_labels(row.label, label_delimiter), index))
                               for row in labels.rows)  # fmt: skip
    samples = sorted((row.path, index[row.label]) for row in labels.rows)
    samples.sort(key=lambda sample: sample[1])  # (stable: by class, then path)
    return classes, samples


def label_counts(labels: LabelFile) -> Counter:
    """Rows per class of the usable rows (a multilabel row counts for each of its classes)."""
    return Counter(name for row in labels.rows for name in split_labels(row.label, labels.delimiter))
