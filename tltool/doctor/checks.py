"""What is wrong with a dataset: the rules that turn the scan into problems, warnings and suggested keys.

A problem breaks training (the check mirrors where training stops); a warning quietly spoils it. Each rule
adds its findings to the Diagnosis; a new rule is one more function here, called by `diagnose`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from tltool.config import DataConfig
from tltool.data import IMAGE_EXTENSIONS
from tltool.doctor.findings import Diagnosis, FileInfo, Finding

# Largest / smallest class above this is reported as a warning.
IMBALANCE_WARNING = 5.0
# How many paths of one finding the text report shows (the JSON has all of them).
SHOWN_PATHS = 3
# Multilabel: a class with fewer positive training images than this is reported (its AP, its threshold and
# what the head learns of it rest on a handful of images).
FEW_POSITIVES = 5


def check_classes(diagnosis: Diagnosis) -> None:
    """Empty classes, classes in one split only, a class without training images, imbalance, tiny classes."""
    for report in diagnosis.splits:
        if report.empty_classes:
            diagnosis.problems.append(
                Finding(
                    "empty_class",
                    f"{report.name}: class folder(s) without images: {', '.join(report.empty_classes)}",
                    f"add images or remove the folder(s) from {report.path}",
                    [report.class_path(c) for c in report.empty_classes],
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
                    [train.class_path(c) for c in only_train] + [val.class_path(c) for c in only_val],
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
                    [test.class_path(c) for c in unknown],
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
                [train.class_path(c) for c in unusable],
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
    if diagnosis.layout != "shards" and (diagnosis.layout == "single" or val is None):  # (shards: data.val needed)
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
                    [train.class_path(c) for c in single],
                )
            )


def _unreadable_limit_needed(infos: Sequence[FileInfo]) -> float | None:
    """The data.max_bad_fraction that would let training skip the unreadable files, when the default is too low."""
    bad = sum(1 for i in infos if i.problem is not None)
    if not infos or bad / len(infos) <= DataConfig().max_bad_fraction:
        return None
    return math.ceil(bad / len(infos) * 100 - 1e-9) / 100  # the smallest limit in hundredths that lets them pass


def check_unreadable(diagnosis: Diagnosis, training: Sequence[FileInfo], test: Sequence[FileInfo]) -> None:
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


def _split_and_class(path: str, folders: dict[str, Path], diagnosis: Diagnosis | None = None) -> tuple[str, str]:
    for report in diagnosis.splits if diagnosis is not None else []:
        if path in report.labels:
            return report.name, report.labels[path]
    for name, folder in folders.items():
        try:
            return name, Path(path).relative_to(folder).parts[0]
        except ValueError:
            continue
    return "?", "?"


def check_duplicates(diagnosis: Diagnosis, groups: list[list[str]], folders: dict[str, Path]) -> None:
    """Exact copies: across splits they leak val into train; within one, they weigh double or clash in label."""
    for group in groups:
        where = [_split_and_class(path, folders, diagnosis) for path in group]
        if len({split for split, _ in where}) > 1:
            diagnosis.duplicates_across.append(group)
        else:
            diagnosis.duplicates_within.append(group)
    clashes = [g for g in groups if len({_split_and_class(p, folders, diagnosis)[1] for p in g}) > 1]
    copies = (
        (
            "duplicate_across_splits",
            diagnosis.duplicates_across,
            "{count} file(s) appear in more than one split (val/test accuracy is inflated), e.g. {example}",
            "delete the copies from val/test (or from train) by hand",
        ),
        (
            "duplicate_within_split",
            diagnosis.duplicates_within,
            "{count} file(s) are exact copies of another file in the same split, e.g. {example}",
            "delete the copies by hand (they count twice in training and evaluation)",
        ),
    )
    for code, found, message, fix in copies:
        if found:
            text = message.format(count=sum(len(g) - 1 for g in found), example=" = ".join(found[0]))
            diagnosis.warnings.append(Finding(code, text, fix, [p for g in found for p in g]))
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


def check_files(diagnosis: Diagnosis) -> None:
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


def check_listed_twice(diagnosis: Diagnosis) -> None:
    """Label files: an image that both train and val list is trained on and scored (val accuracy is inflated)."""
    train, val = diagnosis.split("train"), diagnosis.split("val")
    if train is None or val is None:
        return
    both = sorted(set(train.labels) & set(val.labels))
    if both:
        diagnosis.warnings.append(
            Finding(
                "duplicate_across_splits",
                f"{len(both)} image(s) are listed in both {train.path} and {val.path} (val accuracy is inflated), "
                f"e.g. {both[0]}",
                "delete their rows from one of the two files",
                both,
            )
        )


def suggest(
    diagnosis: Diagnosis,
    folders: dict[str, Path],
    training: Sequence[FileInfo],
    path_column: str = "path",
    label_column: str = "label",
    label_delimiter: str = "|",
) -> None:
    """The config keys (KEY=VALUE overrides) that point tltool at this dataset."""
    if "train" not in folders:
        return
    if diagnosis.layout == "shards":
        diagnosis.suggestions.append(f"data.train='{folders['train']}'")
        if "val" in folders:
            diagnosis.suggestions.append(f"data.val='{folders['val']}'")
        return
    if diagnosis.layout == "labelfile":
        diagnosis.suggestions.append(f"data.train={folders['train']}")
        if "val" in folders:
            diagnosis.suggestions.append(f"data.val={folders['val']}")
        else:
            diagnosis.suggestions.append(f"data.val_split={DataConfig().val_split:g}")
        defaults = DataConfig()
        if path_column != defaults.path_column:
            diagnosis.suggestions.append(f"data.path_column={path_column}")
        if label_column != defaults.label_column:
            diagnosis.suggestions.append(f"data.label_column={label_column}")
        if diagnosis.task == "multilabel":
            diagnosis.suggestions.append("data.task=multilabel")
            if label_delimiter != defaults.label_delimiter:
                diagnosis.suggestions.append(f"data.label_delimiter='{label_delimiter}'")
    elif diagnosis.layout == "splits":
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


def check_links(diagnosis: Diagnosis) -> None:
    """Folder links: a loop (or a second link to one folder) is followed once; links outside the split are used."""
    for report in diagnosis.splits:
        if report.repeated_links:
            diagnosis.warnings.append(
                Finding(
                    "folder_link_loop",
                    f"{report.name}: {len(report.repeated_links)} folder link(s) lead to a folder already read "
                    f"(a loop or a second link), e.g. {report.repeated_links[0]}; each folder is read once",
                    "remove the link(s) (ln -s back up the tree makes a loop)",
                    list(report.repeated_links),
                )
            )
        if report.outside_links:
            diagnosis.warnings.append(
                Finding(
                    "folder_link_outside",
                    f"{report.name}: {len(report.outside_links)} folder link(s) lead outside {report.path}, e.g. "
                    f"{report.outside_links[0]}; their images are used",
                    "copy the images in if the dataset must stand alone (an archive or a copy drops them)",
                    list(report.outside_links),
                )
            )


def _counted(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} ({count})" for name, count in counts.items())


def check_multilabel(diagnosis: Diagnosis) -> None:
    """data.task: multilabel: classes with few positives in train, classes no val image has (no AP, threshold
    0.5), classes every training image has (nothing to tell apart)."""
    if diagnosis.task != "multilabel":
        return
    train, val = diagnosis.split("train"), diagnosis.split("val")
    if train is None or not train.class_counts:
        return
    few = {c: n for c, n in train.usable_counts().items() if 0 < n < FEW_POSITIVES}
    if few:
        diagnosis.warnings.append(
            Finding(
                "few_positives",
                f"train: {len(few)} class(es) with fewer than {FEW_POSITIVES} positive images: {_counted(few)}",
                "add images of them (their AP, their threshold and what the head learns of them rest on these few)",
                [train.path],
            )
        )
    everywhere = sorted(c for c, n in train.class_counts.items() if n == train.num_images)
    if everywhere and train.num_images > 1:
        diagnosis.warnings.append(
            Finding(
                "no_negatives",
                f"train: every image has class(es) {', '.join(everywhere)}: nothing to learn of them",
                "add images without them, or drop them from the label column",
                [train.path],
            )
        )
    if val is not None and val.num_images:
        absent = sorted(set(train.class_counts) - set(val.class_counts))
        if absent:
            diagnosis.warnings.append(
                Finding(
                    "no_val_positives",
                    f"val: no image of class(es) {', '.join(absent)}: their AP is left out of val_map and their "
                    "threshold stays 0.5",
                    f"add val images of them to {val.path}",
                    [val.path],
                )
            )


def check_delimited_labels(diagnosis: Diagnosis, delimiter: str) -> None:
    """A single-label read of a label file whose labels hold the multilabel delimiter (red|striped): each such
    label would be one class of its own."""
    if diagnosis.task == "multilabel":
        return
    joined = sorted({label for report in diagnosis.splits for label in report.labels.values() if delimiter in label})
    if joined:
        diagnosis.warnings.append(
            Finding(
                "labels_hold_delimiter",
                f"{len(joined)} label(s) hold {delimiter!r} and are read as one class each, e.g. {joined[0]}",
                "for several classes per image: tltool doctor ... --task multilabel (and data.task=multilabel); "
                "else ignore this",
            )
        )
