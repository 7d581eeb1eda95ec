"""`tltool doctor`: every planted problem of a dataset is found, the exit code says whether training breaks."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_dataset, tree_checksum
from tltool.cli import app
from tltool.config import all_keys
from tltool.doctor import bar, diagnose, find_layout, format_diagnosis
from tltool.errors import DataError


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ + valid/ with one of each problem planted (8 px images: only files matter here).

    - valid/class_2 is an empty class folder
    - train/lonely exists in train only
    - train/class_1/broken.jpg is not an image (1 of 50 images: above the default 1% limit)
    - valid/class_0/copy.png is a copy of train/class_0/001.png (leak across splits)
    - train/class_2/again.png is a copy of train/class_2/000.png (duplicate within a split)
    - train/class_1/notes.txt is ignored
    """
    root = tmp_path_factory.mktemp("doctor") / "flowers"
    make_dataset(root / "train", classes=3, per_class=12, size=8, seed=1)
    make_dataset(root / "valid", classes=3, per_class=4, size=8, seed=2)
    for path in (root / "valid" / "class_2").iterdir():
        path.unlink()
    make_dataset(root / "train_only", classes=1, per_class=3, size=8, seed=3)
    shutil.move(root / "train_only" / "class_0", root / "train" / "lonely")
    (root / "train_only").rmdir()
    (root / "train" / "class_1" / "broken.jpg").write_bytes(b"this is not a jpeg")
    shutil.copy(root / "train" / "class_0" / "001.png", root / "valid" / "class_0" / "copy.png")
    shutil.copy(root / "train" / "class_2" / "000.png", root / "train" / "class_2" / "again.png")
    (root / "train" / "class_1" / "notes.txt").write_text("taken on a rainy day")
    return root


def codes(findings) -> dict[str, list]:
    return {f.code: f for f in findings}


def test_layout_and_split_synonyms(tmp_path: Path) -> None:
    for val_name in ("val", "valid", "validation", "Validation"):
        root = tmp_path / val_name
        (root / "train" / "a").mkdir(parents=True)
        (root / val_name / "a").mkdir(parents=True)
        layout, folders, _ = find_layout(root)
        assert layout == "splits" and folders["val"].name == val_name
    single = make_dataset(tmp_path / "single", classes=2, per_class=2, size=8)
    assert find_layout(single) == ("single", {"train": single}, [])
    (tmp_path / "classes" / "train").mkdir(parents=True)  # a class that happens to be called "train"
    (tmp_path / "classes" / "cat").mkdir()
    assert find_layout(tmp_path / "classes")[0] == "single"


def test_doctor_finds_every_planted_problem(broken: Path) -> None:
    before = tree_checksum(broken)
    diagnosis = diagnose(broken)
    assert tree_checksum(broken) == before, "doctor wrote into the dataset"
    assert diagnosis.layout == "splits"
    assert [s.name for s in diagnosis.splits] == ["train", "val"]
    problems, warnings = codes(diagnosis.problems), codes(diagnosis.warnings)
    assert set(problems) == {"empty_class", "one_split_class", "unreadable_files"}
    assert problems["empty_class"].paths == [str(broken / "valid" / "class_2")]
    assert diagnosis.classes_only_in == {"train": ["lonely"], "val": []}
    assert problems["unreadable_files"].paths == [str(broken / "train" / "class_1" / "broken.jpg")]
    assert "data.max_bad_fraction=0.02" in problems["unreadable_files"].fix
    assert diagnosis.duplicates_across == [
        [str(broken / "train" / "class_0" / "001.png"), str(broken / "valid" / "class_0" / "copy.png")]
    ]
    assert diagnosis.duplicates_within == [
        [str(broken / "train" / "class_2" / "000.png"), str(broken / "train" / "class_2" / "again.png")]
    ]
    assert {"duplicate_across_splits", "duplicate_within_split", "ignored_files"} <= set(warnings)
    assert "duplicate_label_clash" not in warnings  # the copies are in the same class
    train = diagnosis.split("train")
    assert train.class_counts == {"class_0": 12, "class_1": 13, "class_2": 13, "lonely": 3}
    assert train.ignored_files == {".txt": 1}
    assert diagnosis.imbalance_ratio == pytest.approx(13 / 3)
    stats = diagnosis.image_stats
    assert stats["count"] == 12 + 12 + 13 + 3 + 4 + 5 + 0
    assert stats["width"] == {"min": 8, "median": 8, "max": 8} and stats["modes"] == {"RGB": stats["count"]}
    # Suggestions are real config keys.
    assert diagnosis.suggestions[:2] == [f"data.train={broken / 'train'}", f"data.val={broken / 'valid'}"]
    assert all(item.split("=", 1)[0] in all_keys() for item in diagnosis.suggestions)


def test_text_report_has_a_bar_per_class_and_each_finding(broken: Path) -> None:
    text = format_diagnosis(diagnose(broken))
    lines = text.splitlines()
    row = next(line for line in lines if line.strip().startswith("lonely"))
    assert "█" in row and " 3 " in row
    assert next(line for line in lines if line.strip().startswith("class_2") and "EMPTY" in line)
    assert "problems that break training (3)" in text and "only in train: lonely" in text
    assert "copy.png" in text and "broken.jpg" in text and "fix:" in text
    assert "tltool finetune CONFIG data.train=" in text


def test_bars_scale_in_eighths() -> None:
    assert bar(10, 10, width=4) == "████"
    assert bar(5, 10, width=4) == "██"
    assert bar(1, 10, width=4) == "▍"  # 3.2 eighths -> 3
    assert bar(0, 10) == "" and bar(1, 1000, width=4) == "▏"  # a non-empty class always shows


def test_cli_exit_codes_and_json(broken: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["doctor", str(broken)])
    assert result.exit_code == 2, result.output
    assert "lonely" in result.stdout and "█" in result.stdout
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: 3 problems") and "Traceback" not in result.output
    result = runner.invoke(app, ["doctor", str(broken), "--json"])
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["layout"] == "splits"
    assert {p["code"] for p in data["problems"]} == {"empty_class", "one_split_class", "unreadable_files"}
    assert data["splits"][0]["unreadable"][0]["reason"] == "not an image"
    clean = make_dataset(tmp_path / "clean", classes=3, per_class=4, size=8)
    result = runner.invoke(app, ["doctor", str(clean)])
    assert result.exit_code == 0, result.output
    assert "no problems found" in result.stdout and "data.val_split=0.2" in result.stdout
    result = runner.invoke(app, ["doctor", str(tmp_path / "missing")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "does not exist" in result.stderr


def test_few_unreadable_files_are_a_warning_and_clashing_labels_are_flagged(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", classes=2, per_class=150, size=8)
    (root / "class_0" / "000.png").write_bytes(b"")  # 1 of 166: below the 1% limit, training skips it
    shutil.copy(root / "class_1" / "005.png", root / "class_0" / "stray.png")
    for path in sorted((root / "class_1").iterdir())[15:]:  # 15 images against 150 usable: imbalanced
        if path.name != "005.png":
            path.unlink()
    diagnosis = diagnose(root)
    assert diagnosis.ok and diagnosis.layout == "single"
    warnings = codes(diagnosis.warnings)
    assert "empty file" in warnings["unreadable_files"].message
    assert diagnosis.imbalance_ratio == pytest.approx(150 / 15) and "imbalance" in warnings
    assert warnings["duplicate_label_clash"].paths == [
        str(root / "class_0" / "stray.png"),
        str(root / "class_1" / "005.png"),
    ]


def test_nothing_to_train_on(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    assert {f.code for f in diagnose(tmp_path / "flat").problems} == {"no_classes"}
    singles = make_dataset(tmp_path / "singles", classes=2, per_class=1, size=8)
    assert "no_validation_images" in {f.code for f in diagnose(singles).problems}
    with pytest.raises(DataError, match="does not exist"):
        diagnose(tmp_path / "nowhere")


def test_deep_decodes_every_image_and_counts_the_truncated_ones(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", classes=2, per_class=6, size=32)
    for name in ("000.png", "001.png"):  # headers intact, pixel data cut: only decoding finds them
        path = root / "class_0" / name
        path.write_bytes(path.read_bytes()[:-200])
    shallow = diagnose(root)
    assert shallow.decode_failures == 0 and not shallow.split("train").unreadable
    assert "headers read; --deep decodes each" in format_diagnosis(shallow)
    deep = diagnose(root, deep=True)
    assert deep.decode_failures == 2
    assert sorted(Path(p).name for p, _ in deep.split("train").unreadable) == ["000.png", "001.png"]
    assert all(why.startswith("cannot be decoded") for _, why in deep.split("train").unreadable)
    assert {f.code for f in deep.problems} == {"unreadable_files"}  # 2 of 12: above the 1% limit
    assert "10 readable (each decoded, 2 failed to decode)" in format_diagnosis(deep)
    result = CliRunner().invoke(app, ["doctor", str(root), "--deep", "--json"])
    assert result.exit_code == 2 and json.loads(result.stdout)["decode_failures"] == 2
    assert CliRunner().invoke(app, ["doctor", str(root)]).exit_code == 0


def test_link_loops_and_links_outside_are_warned_about_and_fifos_named(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", classes=2, per_class=6, size=8)
    (root / "class_0" / "loop").symlink_to(".")
    elsewhere = make_dataset(tmp_path / "elsewhere", classes=1, per_class=2, size=8, seed=5)
    (root / "class_1" / "more").symlink_to(elsewhere / "class_0")
    os.mkfifo(root / "class_1" / "pipe.png")
    diagnosis = diagnose(root)  # a FIFO opened for hashing or decoding would block here
    warnings = codes(diagnosis.warnings)
    assert warnings["folder_link_loop"].paths == [str(root / "class_0" / "loop")]
    assert warnings["folder_link_outside"].paths == [str(root / "class_1" / "more")]
    assert diagnosis.split("train").class_counts == {"class_0": 6, "class_1": 9}
    assert (str(root / "class_1" / "pipe.png"), "is a FIFO (named pipe), not a file") in diagnosis.split(
        "train"
    ).unreadable
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(DataError, match=r"is a FIFO \(named pipe\), not a folder"):
        diagnose(tmp_path / "pipe")
