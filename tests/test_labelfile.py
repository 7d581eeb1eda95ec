"""Label files (issue #16 part 1): a .csv/.tsv of path,label rows is a dataset as a folder of class folders is.

The same images listed in a CSV train to the same weights as in class folders (bitwise, one thread); a
TSV, absolute paths, other column names and `data.classes` read as they say; every bad file is one line,
exit 2; `tltool doctor`, `tltool eval --data`, predict, export and the baseline work on a CSV-trained run;
the data fingerprint covers the file's rows (a relabelled image refuses a resume).
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_dataset, run_overrides, write_config
from tltool.checkpoint import load_checkpoint
from tltool.cli import app
from tltool.config import DataConfig, load_config
from tltool.data import scan_data, scan_label_file
from tltool.doctor import diagnose
from tltool.errors import ConfigError, DataError
from tltool.runstate import resume_data
from tltool.train import finetune


def write_labels(path: Path, root: Path, relative: bool = True, columns=("path", "label"), shuffle: int = 1) -> Path:
    """A label file listing every image under root (rows shuffled): relative to the file's folder, or absolute."""
    images = sorted(root.rglob("*.png"))
    random.Random(shuffle).shuffle(images)
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(columns)
        for image in images:
            written = os.path.relpath(image, path.parent) if relative else image.resolve()
            writer.writerow([str(written), image.parent.name])
    return path


def one_line(result) -> str:
    """The single `error:` line of a failed command (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def run(run_dir: Path, train: Path, *extra: str) -> dict:
    return finetune(load_config(None, run_overrides(run_dir, train, "train.epochs=1", *extra)), quiet=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 18 images as class folders and as a CSV beside them, and a 1-epoch run on each (whole network
    trained, light augmentation: the seeded order and augmentation of every draw must match too)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("labelfile")
    images = make_dataset(root / "images", classes=3, per_class=6, size=16)
    labels = write_labels(root / "train.csv", images)
    extra = ("train.freeze=none", "data.augment=light", "train.feature_cache=off")
    run(root / "run_folders", images, *extra)
    run(root / "run_csv", labels, *extra)
    return {"root": root, "images": images, "csv": labels, "folders_run": root / "run_folders", "run": root / "run_csv"}


def test_a_csv_trains_to_the_same_weights_as_its_class_folders(trained: dict[str, Path], one_thread: None) -> None:
    a = load_checkpoint(trained["folders_run"] / "checkpoints" / "last.pt")
    b = load_checkpoint(trained["run"] / "checkpoints" / "last.pt")
    assert a.class_names == b.class_names == ["class_0", "class_1", "class_2"]
    assert a.model.keys() == b.model.keys()
    for key, value in a.model.items():
        assert torch.equal(value, b.model[key]), key
    timing = ("seconds", "per_second")
    scores = [{k: v for k, v in m.items() if not k.endswith(timing)} for m in (a.metrics, b.metrics)]
    assert scores[0] == scores[1] and "val_loss" in scores[0]  # (the same val split, scored the same)
    # the same samples, the same stratified split: the row order of the file changes nothing
    folders = scan_data(DataConfig(train=str(trained["images"])), seed=0)
    shuffled = write_labels(trained["root"] / "again.csv", trained["images"], shuffle=7)
    assert trained["csv"].read_text() != shuffled.read_text()
    for labels in (trained["csv"], shuffled):
        split = scan_data(DataConfig(train=str(labels)), seed=0)
        assert (split.class_names, split.train, split.val) == (folders.class_names, folders.train, folders.val)


def test_tsv_absolute_paths_other_columns_and_class_order(tmp_path: Path) -> None:
    images = make_dataset(tmp_path / "images", classes=3, per_class=3, size=8)
    elsewhere = tmp_path / "lists" / "deep"
    elsewhere.mkdir(parents=True)
    tsv = write_labels(elsewhere / "train.tsv", images, relative=False, columns=("file", "class"))
    assert "\t" in tsv.read_text() and str(images.resolve()) in tsv.read_text()
    cfg = DataConfig(
        train=str(tsv), path_column="file", label_column="class", classes=["class_2", "class_0", "class_1"]
    )
    split = scan_data(cfg, seed=0)
    assert split.class_names == ["class_2", "class_0", "class_1"]
    assert all(Path(path).parent.name == split.class_names[label] for path, label in split.train + split.val)
    # relative paths are taken from the file's folder, not the working directory
    relative = write_labels(elsewhere / "rel.csv", images)
    assert "../../images/class_0/" in relative.read_text()
    classes, samples = scan_label_file(relative)
    assert classes == ["class_0", "class_1", "class_2"] and len(samples) == 9
    assert all(Path(p).exists() for p, _ in samples)
    # data.classes orders class folders as well, and must name exactly their classes
    assert scan_data(DataConfig(train=str(images), classes=["class_1", "class_0", "class_2"]), 0).class_names[0] == (
        "class_1"
    )
    with pytest.raises(DataError, match="not in data.train: class_9; only in data.train: class_2"):
        scan_data(DataConfig(train=str(images), classes=["class_0", "class_1", "class_9"]), 0)
    with pytest.raises(ConfigError, match="more than once"):
        load_config(None, ["data.classes=[a, b, a]"])
    with pytest.raises(ConfigError, match="name two columns"):
        load_config(None, ["data.label_column=path"])


def test_hidden_rows_are_left_out_and_a_val_file_is_scanned_the_same_way(tmp_path: Path, capsys) -> None:
    images = make_dataset(tmp_path / "images", classes=2, per_class=4, size=8)
    make_dataset(tmp_path / "val", classes=2, per_class=2, size=8, seed=3)
    shutil.copy(images / "class_0" / "000.png", images / "class_0" / "._000.png")
    train = write_labels(tmp_path / "train.csv", images)
    val = write_labels(tmp_path / "val.csv", tmp_path / "val")
    (tmp_path / "val" / "class_1" / "000.png").write_bytes(b"not a png")  # unreadable: skipped, as in a folder
    split = scan_data(DataConfig(train=str(train), val=str(val), max_bad_fraction=0.5), seed=0)
    assert len(split.train) == 8 and len(split.val) == 3 and not split.split_from_train
    assert split.bad == [(str(tmp_path / "val" / "class_1" / "000.png"), "not an image")]
    assert "left out 1 row(s) naming hidden files" in capsys.readouterr().err
    with pytest.raises(DataError, match="1 unreadable image"):
        scan_data(DataConfig(train=str(train), val=str(val), on_bad_image="error"), seed=0)
    assert set(split.fingerprint()["folders"]) == {"train", "val"}


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Each bad label file: (overrides, what its one line must say)."""
    images = make_dataset(tmp_path / "images", classes=2, per_class=4, size=8)
    good = write_labels(tmp_path / "good.csv", images)
    rows = good.read_text().splitlines()
    (tmp_path / "column.csv").write_text("\n".join(["Path,label", *rows[1:]]) + "\n")
    (tmp_path / "missing.csv").write_text(
        "\n".join([*rows, *(f"images/class_0/gone{i}.png,class_0" for i in range(5))]) + "\n"
    )
    (tmp_path / "unlabelled.csv").write_text("\n".join([rows[0], rows[1].split(",")[0] + ",", *rows[2:]]) + "\n")
    (tmp_path / "other.csv").write_text("\n".join(["filename,class", *rows[1:]]) + "\n")
    (tmp_path / "latin1.csv").write_bytes(("\n".join([*rows, "images/caf\u00e9.png,class_0"]) + "\n").encode("latin-1"))
    (tmp_path / "quote.csv").write_text("\n".join([*rows, '"images/class_0/000.png"x,class_0']) + "\n")
    (tmp_path / "twice.csv").write_text("\n".join([*rows, rows[1].rsplit(",", 1)[0] + ",other"]) + "\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("path,label\n")
    (tmp_path / "semicolon.csv").write_text("\n".join(r.replace(",", ";") for r in rows) + "\n")
    val = tmp_path / "val.csv"
    val.write_text("\n".join([rows[0], rows[1].rsplit(",", 1)[0] + ",zebra", *rows[2:4]]) + "\n")
    return {
        "column": (
            ["data.train=column.csv"],
            "has no path column 'path' (its header: 'Path', 'label') — did you mean 'Path'? set data.path_column=Path",
        ),  # fmt: skip
        "other columns": (
            ["data.train=other.csv"],
            "(its header: 'filename', 'class') — set data.path_column to one of its columns",
        ),  # fmt: skip
        "missing": (["data.train=missing.csv"], "5 of 13 listed image(s) do not exist: "),
        "unlabelled": (["data.train=unlabelled.csv"], "1 row(s) with an empty label (line 2)"),
        "not utf-8": (["data.train=latin1.csv"], "latin1.csv is not UTF-8 text"),
        "bad quoting": (["data.train=quote.csv"], "quote.csv is not a valid CSV file"),
        "listed twice": (["data.train=twice.csv"], "1 image(s) listed more than once: "),
        "empty": (["data.train=empty.csv"], "empty.csv is empty — write a header line (path,label)"),
        "header only": (["data.train=header.csv"], "header.csv lists no images"),
        "semicolons": (["data.train=semicolon.csv"], "separated by ';'"),
        "val label": (["data.train=good.csv", "data.val=val.csv"], "only in val: ['zebra']"),
    }


@pytest.mark.parametrize(
    "case",
    ["column", "other columns", "missing", "unlabelled", "not utf-8", "bad quoting", "listed twice", "empty",
     "header only", "semicolons", "val label"],
)  # fmt: skip
def test_bad_label_files_are_one_line_exit_2_and_nothing_written(tmp_path: Path, cli: CliRunner, case: str) -> None:
    overrides, says = bad_inputs(tmp_path)[case]
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "run", tmp_path / "images") + overrides)
    line = one_line(cli.invoke(app, ["finetune", str(config)]))
    assert says in line, line
    if case == "missing":  # the first three named, with their lines, then "..."
        assert line.count("gone") == 3 and "(line 10)" in line and ", ..." in line
    assert not (tmp_path / "run").exists()


def test_doctor_checks_a_label_file(tmp_path: Path, cli: CliRunner) -> None:
    images = make_dataset(tmp_path / "images", classes=3, per_class=6, size=8)
    (images / "class_1" / "broken.png").write_bytes(b"not a png")
    train = write_labels(tmp_path / "train.csv", images)
    text = train.read_text()
    train.write_text(text + "images/class_0/gone.png,class_0\nimages/class_2/000.png,\n")
    val = tmp_path / "val.csv"
    val.write_text("path,label\nimages/class_0/001.png,class_0\nimages/class_1/001.png,lonely\n")
    diagnosis = diagnose(train, val=val)
    assert diagnosis.layout == "labelfile"
    problems = {f.code: f for f in diagnosis.problems}
    assert set(problems) == {"missing_files", "empty_labels", "one_split_class", "unreadable_files"}
    assert problems["missing_files"].paths == [str(tmp_path / "images" / "class_0" / "gone.png")]
    assert "only in val: lonely" in problems["one_split_class"].message
    assert {f.code for f in diagnosis.warnings} >= {"duplicate_across_splits"}  # 001.png in both files
    assert diagnosis.split("train").class_counts == {"class_0": 6, "class_1": 7, "class_2": 6}
    assert diagnosis.split("train").usable_counts()["class_1"] == 6
    result = cli.invoke(app, ["doctor", str(train), "--val", str(val), "--json"])
    assert result.exit_code == 2 and json.loads(result.stdout)["layout"] == "labelfile"
    clean = write_labels(tmp_path / "clean.tsv", images, columns=("file", "y"))
    (images / "class_1" / "broken.png").unlink()
    clean.write_text("\n".join(line for line in clean.read_text().splitlines() if "broken" not in line) + "\n")
    result = cli.invoke(app, ["doctor", str(clean), "--path-column", "file", "--label-column", "y"])
    assert result.exit_code == 0, result.output
    assert "no problems found" in result.stdout and f"data.train={clean}" in result.stdout
    assert "data.path_column=file data.label_column=y" in result.stdout
    result = cli.invoke(app, ["doctor", str(clean)])  # (the report, then the one error line)
    assert result.exit_code == 2 and "has no path column 'path' (its header: 'file', 'y')" in result.stdout


def test_downstream_commands_on_a_csv_trained_run(trained: dict[str, Path], cli: CliRunner, one_thread: None) -> None:
    checkpoint = trained["run"] / "checkpoints" / "last.pt"
    eval_csv = trained["root"] / "eval.csv"
    eval_csv.write_text("path,label\nimages/class_2/000.png,class_2\nimages/class_0/003.png,class_0\n")
    by_csv = cli.invoke(app, ["eval", str(checkpoint), "--data", str(eval_csv), "--json", "a.json"])
    assert by_csv.exit_code == 0, by_csv.output
    subset = trained["root"] / "subset"
    for name in ("class_2/000.png", "class_0/003.png"):
        (subset / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(trained["images"] / name, subset / name)
    by_folder = cli.invoke(app, ["eval", str(checkpoint), "--data", str(subset), "--json", "b.json"])
    assert by_folder.exit_code == 0, by_folder.output
    a, b = json.loads(Path("a.json").read_text()), json.loads(Path("b.json").read_text())
    assert a["num_images"] == 2 and a["acc1"] == b["acc1"] and a["loss"] == b["loss"]
    unknown = trained["root"] / "unknown.csv"
    unknown.write_text("path,label\nimages/class_2/000.png,zebra\n")
    assert "classes the model does not know: zebra" in one_line(cli.invoke(app, ["eval", str(checkpoint), "--data",
                                                                                 str(unknown)]))  # fmt: skip
    renamed = trained["root"] / "renamed.csv"
    renamed.write_text("Path,label\nimages/class_2/000.png,class_2\n")  # (eval reads the run's column names)
    line = one_line(cli.invoke(app, ["eval", str(checkpoint), "--data", str(renamed)]))
    assert "--data" in line and "did you mean 'Path'? rename it to 'path' (the run's data.path_column)" in line
    # eval on the run's own val split (recomputed from the CSV), predict's labels, an export's parity check
    assert cli.invoke(app, ["eval", str(checkpoint)]).exit_code == 0
    predicted = cli.invoke(app, ["predict", str(checkpoint), str(trained["images"] / "class_1" / "000.png"), "--json"])
    assert predicted.exit_code == 0, predicted.output
    assert {p["label"] for p in json.loads(predicted.stdout)[0]["predictions"]} == {"class_0", "class_1", "class_2"}
    exported = cli.invoke(app, ["export", str(checkpoint), "-f", "safetensors", "-o", "m.safetensors"])
    assert exported.exit_code == 0, exported.output


def test_cache_and_baseline_and_the_fingerprint_of_a_label_file(trained: dict[str, Path], one_thread: None) -> None:
    root = trained["root"]
    labels = shutil.copy(trained["csv"], root / "cached.csv")
    summary = run(root / "run_cached", Path(labels))
    assert summary["feature_cache"] is not None  # (head only, no augmentation: the cache serves the run)
    from tltool.baseline import run_baseline

    cfg = load_config(None, run_overrides(root / "unused", Path(labels)))
    assert run_baseline(cfg, quiet=True)["linear_probe"]["val_acc1"] >= 0
    # the fingerprint covers the rows: relabelling one image (same files, same sizes) is a change of the data
    checkpoint = load_checkpoint(root / "run_cached" / "checkpoints" / "last.pt")
    split = scan_data(cfg.data, cfg.run.seed)
    assert resume_data(checkpoint, split, quiet=True) is split
    rows = Path(labels).read_text().splitlines()
    moved = next(i for i, row in enumerate(rows) if row.endswith(",class_0"))
    rows[moved] = rows[moved].replace(",class_0", ",class_1")
    Path(labels).write_text("\n".join(rows) + "\n")
    with pytest.raises(
        DataError, match="the data changed since .*1 image removed in data.train/class_0.*1 image added"
    ):
        resume_data(checkpoint, scan_data(cfg.data, cfg.run.seed), quiet=True)
