"""`tltool doctor` on multilabel label files (`--task multilabel`) and on WebDataset shards: each report's
numbers on a small generated case, the findings, the exit codes and the one-line errors."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_dataset
from tltool.cli import app
from tltool.doctor import diagnose, format_diagnosis

# Each image's label cell (red|striped and striped|red are one label set; "red|" is red; "|" and "" no label).
ROWS = {
    "a": "red|striped",
    "b": "red",
    "c": "green|plain",
    "d": "red|plain",
    "e": "red|",
    "f": "|",
    "g": "",
    "h": "striped|red",
}


def write_rows(folder: Path, rows: dict[str, str], name: str = "labels.csv", delimiter: str = "|") -> Path:
    lines = ["path,label"] + [
        f"{folder.name}/{image}/000.png,{label.replace('|', delimiter)}" for image, label in rows.items()
    ]
    (folder.parent / name).write_text("\n".join(lines) + "\n")
    return folder.parent / name


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """img/<a..h>/000.png: one 8 px image per row (make_dataset's class folders, used as plain files)."""
    root = tmp_path_factory.mktemp("doctor_ml") / "img"
    make_dataset(root, classes=1, per_class=1, size=8)
    for image in ROWS:
        shutil.copytree(root / "class_0", root / image)
    shutil.rmtree(root / "class_0")
    return root


def doctor(*args: str):
    return CliRunner().invoke(app, ["doctor", *map(str, args)])


def one_line_error(result) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# --- multilabel --------------------------------------------------------------------------------------------


def test_multilabel_counts_positives_label_sets_unlabelled_rows_and_few_positives(images: Path) -> None:
    labels = write_rows(images, ROWS)
    result = doctor(labels, "--task", "multilabel", "--json")
    assert result.exit_code == 2, result.output  # rows without a label break training
    data = json.loads(result.stdout)
    assert data["task"] == "multilabel"
    train = data["splits"][0]
    # an image counts for each of its classes: red a b d e h, striped a h, plain c d, green c
    assert train["class_counts"] == {"green": 1, "plain": 2, "red": 5, "striped": 2}
    assert train["num_images"] == 6  # images, not positives (11)
    assert train["label_sets"] == {"red": 2, "red|striped": 2, "green|plain": 1, "plain|red": 1}
    assert train["unlabelled_rows"] == 2  # f ("|") and g ("")
    problems = {p["code"]: p for p in data["problems"]}
    assert problems.keys() == {"empty_labels"} and "2 row(s)" in problems["empty_labels"]["message"]
    warnings = {w["code"]: w for w in data["warnings"]}
    assert "green (1), plain (2), striped (2)" in warnings["few_positives"]["message"]  # red has 5: not few
    assert "red" not in warnings["few_positives"]["message"].split(":")[-1].replace("(", " ").split()
    assert "labels_hold_delimiter" not in warnings
    assert "data.task=multilabel" in data["suggestions"]
    error = one_line_error(doctor(labels, "--task", "multilabel"))
    assert error.startswith("error: 1 problem in")


def test_the_text_report_shows_positives_label_sets_and_rows_without_label(images: Path) -> None:
    labels = write_rows(images, {k: v for k, v in ROWS.items() if v.strip("|")}, "clean.csv")
    diagnosis = diagnose(labels, task="multilabel")
    assert diagnosis.ok  # (few positives: warnings only)
    text = format_diagnosis(diagnosis)
    assert "train: 4 classes, 6 images, 4 label sets" in text and "positives per class" in text
    assert "label sets (images):" in text and "     2  red|striped" in text and "     1  green|plain" in text
    assert "rows with no label" not in text
    assert "data.task=multilabel" in text
    assert diagnose(write_rows(images, ROWS), task="multilabel").split("train").unlabelled_rows == 2
    assert "rows with no label: 2" in format_diagnosis(diagnose(write_rows(images, ROWS), task="multilabel"))


def test_a_val_file_without_a_class_and_a_class_every_image_has_are_warned(images: Path) -> None:
    train = write_rows(images, {"a": "red|striped", "b": "red", "c": "red|green", "d": "red|striped"}, "t.csv")
    val = write_rows(images, {"e": "red|striped", "h": "red"}, "v.csv")
    diagnosis = diagnose(train, val=val, task="multilabel")
    warnings = {w.code: w for w in diagnosis.warnings}
    assert (
        "class(es) green" in warnings["no_val_positives"].message and "val_map" in warnings["no_val_positives"].message
    )
    assert "red" in warnings["no_negatives"].message and "striped" not in warnings["no_negatives"].message
    assert diagnosis.split("val").class_counts == {"red": 2, "striped": 1}


def test_a_custom_delimiter_and_the_single_label_read_of_a_multilabel_file(images: Path) -> None:
    labels = write_rows(images, {k: v for k, v in ROWS.items() if v.strip("|")}, "semi.csv", delimiter=";")
    diagnosis = diagnose(labels, task="multilabel", label_delimiter=";")
    assert diagnosis.split("train").class_counts == {"green": 1, "plain": 2, "red": 5, "striped": 2}
    assert "data.label_delimiter=';'" in diagnosis.suggestions
    # read as multiclass (the default), a|b is one class: said, with the switch that reads it as two
    plain = diagnose(write_rows(images, {k: v for k, v in ROWS.items() if v.strip("|")}, "pipes.csv"))
    assert "red|striped" in plain.split("train").class_counts and "striped|red" in plain.split("train").class_counts
    warning = {w.code: w for w in plain.warnings}["labels_hold_delimiter"]
    assert warning.message.startswith("5 label(s) hold '|'")  # (red| too) and "--task multilabel" in warning.fix


def test_bad_multilabel_options_are_one_line(images: Path, tmp_path: Path) -> None:
    labels = write_rows(images, ROWS)
    assert "not a .csv or .tsv" in one_line_error(doctor(images, "--task", "multilabel"))
    assert "--task several is not a task" in one_line_error(doctor(labels, "--task", "several"))
    assert "not one character" in one_line_error(doctor(labels, "--task", "multilabel", "--label-delimiter", "||"))


# --- shards -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 6 images, 20% val: 15 train samples in shards of 5 (train-000000..2), 3 val (val-000000)."""
    pytest.importorskip("webdataset")
    from tltool.data.shards import write_shards

    root = tmp_path_factory.mktemp("doctor_shards")
    folder = make_dataset(root / "images", classes=3, per_class=6, size=8)
    write_shards(folder, root / "shards", shard_size=5, val_split=0.2, seed=0)
    return root / "shards"


def test_shards_are_listed_with_their_samples_and_classes(shards: Path) -> None:
    index = json.loads((shards / "shards.json").read_text())
    train, val = f"{shards}/train-{{000000..000002}}.tar", f"{shards}/val-*.tar"
    result = doctor(train, "--val", val, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["layout"] == "shards" and data["ok"] and not data["warnings"]
    report, held = data["splits"]
    assert [s["samples"] for s in report["shards"]] == [5, 5, 5] and report["num_images"] == index["train"]["samples"]
    assert report["class_counts"] == {"class_0": 5, "class_1": 5, "class_2": 5}  # (names from classes.json)
    assert held["class_counts"] == {"class_0": 1, "class_1": 1, "class_2": 1} and len(held["shards"]) == 1
    assert data["suggestions"] == [f"data.train='{train}'", f"data.val='{val}'"]
    text = doctor(train, "--val", val).stdout
    assert "train: 3 classes, 15 images" in text and "3 shard(s)" in text and "train-000001.tar" in text
    alone = doctor(train, "--json")  # (training from shards needs data.val: a warning, not a problem)
    assert alone.exit_code == 0 and [w["code"] for w in json.loads(alone.stdout)["warnings"]] == ["shards_need_val"]


def test_shards_without_cls_unreadable_or_missing_are_each_reported(shards: Path, tmp_path: Path) -> None:
    for name in ("train-000000.tar", "train-000001.tar", "classes.json"):
        shutil.copy(shards / name, tmp_path / name)
    with tarfile.open(tmp_path / "train-000002.tar", "w") as tar:  # an image member and no .cls
        data = (shards / "classes.json").read_bytes()
        info = tarfile.TarInfo("000000099.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (tmp_path / "train-000003.tar").write_bytes(b"not a tar at all" * 100)
    pattern = f"{tmp_path}/train-{{000000..000004}}.tar"  # train-000004.tar does not exist
    result = doctor(pattern, "--json")
    assert result.exit_code == 2, result.output
    data = json.loads(result.stdout)
    shards_seen = {Path(s["path"]).name: (s["samples"], s["problem"]) for s in data["splits"][0]["shards"]}
    assert shards_seen == {
        "train-000000.tar": (5, None),
        "train-000001.tar": (5, None),
        "train-000002.tar": (None, "no_label"),
        "train-000003.tar": (None, "unreadable"),
    }
    assert sum(data["splits"][0]["class_counts"].values()) == 10  # the two good shards' samples
    assert {p["code"] for p in data["problems"]} == {"shard_no_label", "shard_unreadable"}
    missing = {w["code"]: w for w in data["warnings"]}["missing_shards"]
    assert missing["paths"] == [str(tmp_path / "train-000004.tar")] and "1 of the 5" in missing["message"]
    assert one_line_error(doctor(pattern)).startswith("error: 2 problems in")


def test_a_pattern_that_names_no_shard_is_one_line(tmp_path: Path, shards: Path) -> None:
    assert "matches no file" in one_line_error(doctor(f"{tmp_path}/train-{{000000..000001}}.tar"))
    assert "not .tar shards" in one_line_error(doctor(f"{shards}/train-000000.tar", "--val", str(tmp_path)))
    assert "--val is for a label file or shards" in one_line_error(doctor(tmp_path, "--val", "v.csv"))
    line = one_line_error(doctor(f"{shards}/train-000000.tar", "--task", "multilabel"))
    assert "shards hold one class per sample" in line


def tar_with(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_bad_cls_an_empty_shard_and_a_class_index_past_classes_json_are_problems(tmp_path: Path) -> None:
    pytest.importorskip("webdataset")
    (tmp_path / "classes.json").write_text('["cat", "dog"]')
    tar_with(tmp_path / "a-0.tar", {"x1.png": b"png", "x1.cls": b"1", "x2.png": b"png", "x2.cls": b"0"})
    tar_with(tmp_path / "a-1.tar", {"y1.png": b"png", "y1.cls": b"dog"})
    tar_with(tmp_path / "a-2.tar", {})
    data = json.loads(doctor(f"{tmp_path}/a-*.tar", "--json").stdout)
    assert [(s["samples"], s["problem"]) for s in data["splits"][0]["shards"]] == [(2, None), (None, "bad_label"),
                                                                                   (None, "empty")]  # fmt: skip
    assert data["splits"][0]["class_counts"] == {"cat": 1, "dog": 1}
    assert {p["code"] for p in data["problems"]} == {"shard_bad_label", "shard_empty"}
    tar_with(tmp_path / "a-1.tar", {"y1.png": b"png", "y1.cls": b"5"})  # (classes.json names 2 classes)
    (tmp_path / "a-2.tar").unlink()
    result = doctor(f"{tmp_path}/a-*.tar", "--json")
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert [p["code"] for p in data["problems"]] == ["shard_classes"] and "out of range" in data["problems"][0][
        "message"
    ]
