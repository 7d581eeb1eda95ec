"""Data honesty (issue #19): what a run trains on is what it says, and a change of the data is never silent.

A last batch of one under batch norm, the data fingerprint checked on resume, a moved run directory,
decode failures counted per epoch, a single class refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tltool.session as session_module
from conftest import make_dataset, run_overrides, write_config
from tltool.checkpoint import load_checkpoint
from tltool.cli import app
from tltool.config import load_config
from tltool.doctor import diagnose
from tltool.train import finetune


def one_line(result) -> str:
    """The single `error:` line of a failed command (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_a_single_class_is_refused_in_one_line_and_by_doctor(tmp_path: Path, cli: CliRunner) -> None:
    data = make_dataset(tmp_path / "one", classes=1, per_class=6, size=16)
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "run", data))
    line = one_line(cli.invoke(app, ["finetune", str(config)]))
    assert "single class (class_0)" in line and "at least 2" in line
    assert not (tmp_path / "run").exists()  # nothing written
    assert "one_class" in {f.code for f in diagnose(data).problems}
    result = cli.invoke(app, ["doctor", str(data)])
    assert result.exit_code == 2 and "single class" in result.stdout


# --- a moved run directory -------------------------------------------------------------------------------


class Crash(Exception):
    pass


def run(run_dir: Path | str, train: Path, *extra: str, resume: str | None = None) -> dict:
    return finetune(load_config(None, run_overrides(Path(run_dir), train, *extra)), resume=resume, quiet=True)


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a = load_checkpoint(a_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(b_dir / "checkpoints" / "last.pt")
    assert a.epoch == b.epoch and a.global_step == b.global_step
    for key, value in a.model.items():
        assert torch.equal(value, b.model[key]), key
    lines = [
        [json.loads(x)["val_loss"] for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a_dir, b_dir)
    ]
    assert lines[0] == lines[1]


@pytest.mark.slow
def test_a_moved_run_directory_resumes_bitwise(tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_dataset(tmp_path / "images", classes=2, per_class=6, size=16)
    extra = ("train.freeze=none", "train.epochs=2", "data.batch_size=5", "data.image_size=16", "data.resize_size=16")
    run(tmp_path / "straight", data, *extra)
    real_save = session_module.save_atomic

    def crash_after_first_save(payload, path):  # the end of epoch 1
        real_save(payload, path)
        raise Crash()

    monkeypatch.setattr(session_module, "save_atomic", crash_after_first_save)
    with pytest.raises(Crash):
        run("relative_run", data, *extra)  # (run.output_dir relative to the working directory, tmp_path)
    monkeypatch.setattr(session_module, "save_atomic", real_save)
    assert load_checkpoint(tmp_path / "relative_run" / "checkpoints" / "last.pt").epoch == 1
    shutil.copytree(tmp_path / "relative_run", tmp_path / "copied")
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(tmp_path / "relative_run", moved)
    # 1) --resume auto with run.output_dir where the run is now (absolute; it was relative).
    run(moved, data, *extra, resume="auto")
    assert_same_weights(tmp_path / "straight", moved)
    # 2) The config that travelled with the run (naming the old place) and --resume DIR/checkpoints/last.pt.
    copied = tmp_path / "copied"
    result = cli.invoke(
        app, ["finetune", str(copied / "config.yaml"), "--resume", str(copied / "checkpoints" / "last.pt")]
    )
    assert result.exit_code == 0, result.output
    assert f"continuing in {copied}" in result.output
    assert not (tmp_path / "relative_run").exists()  # nothing written at the old place
    assert_same_weights(tmp_path / "straight", copied)
    assert load_checkpoint(copied / "checkpoints" / "last.pt").config["run"]["output_dir"] == str(copied)


# --- a last batch of one under batch norm ---------------------------------------------------------------


def test_a_last_batch_of_one_is_left_out_the_same_way_everywhere() -> None:
    from torch.utils.data import DataLoader

    from tltool.data import CyclingSampler, EpochSampler, Stream

    plain = EpochSampler(9, seed=3)
    sampler = EpochSampler(9, seed=3, drop_single=4)
    for epoch in range(3):
        plain.set_epoch(epoch)
        sampler.set_epoch(epoch)
        assert list(sampler) == list(plain)[:8]  # the epoch's last drawn sample is the one left out
        assert len(sampler) == 8 and sampler.dropped() == 1
    sampler.set_epoch(2, skip=4)  # a resumed epoch: the second batch, and no batch of one after it
    plain.set_epoch(2)
    assert list(sampler) == list(plain)[4:8]
    # No cut when the last batch holds 2 or more, or with a batch size of 1.
    assert len(EpochSampler(10, seed=3, drop_single=4)) == 10 and len(EpochSampler(9, seed=3, drop_single=1)) == 9
    # Under torchrun each rank's padded part is cut alike: 17 samples, 2 ranks -> 9 each -> 8 each.
    parts = [EpochSampler(17, seed=3, shard=(rank, 2), drop_single=4) for rank in range(2)]
    assert [len(p) for p in parts] == [8, 8] and [len(list(p)) for p in parts] == [8, 8]
    # The cycling stream (unlabelled images) drawn beside it is cut the same: equal batch counts.
    cycling = CyclingSampler(5, seed=7, draws=9, drop_single=4)
    assert len(list(cycling)) == 8
    train = Stream("train", DataLoader(list(range(9)), batch_size=4, sampler=sampler), batch_size=4)
    other = Stream("unlabeled", DataLoader(list(range(5)), batch_size=4, sampler=cycling), batch_size=4)
    sampler.set_epoch(0)
    assert train.num_batches() == other.num_batches() == len(list(train.loader)) == len(list(other.loader)) == 2


@pytest.mark.slow
def test_batch_norm_never_sees_a_batch_of_one_and_resumes_exactly(
    tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 3 classes x 4 images: 9 train (one per class held out), batches of 4: 4 + 4 + 1. resnet18 at 32 px has
    # 1x1 maps in its last stage: "Expected more than 1 value per channel when training" on the batch of one.
    data = make_dataset(tmp_path / "images", classes=3, per_class=4, size=32)
    target = make_dataset(tmp_path / "target", classes=1, per_class=5, size=32, seed=4)  # adapt.unlabeled
    extra = ("train.freeze=none", "data.batch_size=4", "train.epochs=2", f"adapt.unlabeled={target}",
             "adapt.bn_stats=target", "adapt.method=mcc", "checkpoint.every_n_steps=1")  # fmt: skip
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "straight", data, *extra))
    result = cli.invoke(app, ["finetune", str(config)])
    assert result.exit_code == 0, result.output
    assert "would end in a batch of one" in result.output and result.output.count("batch of one") == 1
    records = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_images"] for r in records] == [8, 8] and records[-1]["global_step"] == 4
    # A mid-epoch resume (after the first batch of epoch 2) ends with the same weights.
    real_save = session_module.save_atomic
    saves = {"n": 0}

    def crash_after_third_save(payload, path):
        real_save(payload, path)
        saves["n"] += 1
        if saves["n"] == 3:
            raise Crash()

    monkeypatch.setattr(session_module, "save_atomic", crash_after_third_save)
    with pytest.raises(Crash):
        run(tmp_path / "resumed", data, *extra)
    monkeypatch.setattr(session_module, "save_atomic", real_save)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt").epoch_progress["batches_done"] == 1
    run(tmp_path / "resumed", data, *extra, resume="auto")
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")


# --- decode failures counted per epoch -------------------------------------------------------------------


def truncate(path: Path) -> None:
    """Keep the header (the scan's check passes) and cut the pixel data: decoding fails mid-epoch."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
def test_undecodable_images_are_counted_per_epoch_and_reported_once(tmp_path: Path, cli: CliRunner) -> None:
    train = make_dataset(tmp_path / "train", classes=2, per_class=5, size=32)
    val = make_dataset(tmp_path / "val", classes=2, per_class=2, size=32, seed=2)
    target = make_dataset(tmp_path / "target", classes=1, per_class=3, size=32, seed=4)
    for path in (train / "class_0" / "001.png", val / "class_1" / "000.png", target / "class_0" / "002.png"):
        truncate(path)
    extra = (
        "train.freeze=none",
        "data.batch_size=5",
        "train.epochs=2",
        f"adapt.unlabeled={target}",
        "adapt.method=mcc",
    )
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "run", train, *extra, val=val))
    result = cli.invoke(app, ["finetune", str(config)])
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_images"] for r in records] == [{"train": 1, "val": 1}] * 2
    assert [r["train_images"] for r in records] == [9, 9]
    assert result.output.count("skipped (undecodable): 1 train, 1 val") == 2  # the epoch lines
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_in_epochs"] == {"train": 2, "val": 2}
    # Each undecodable file is reported once, whatever the epochs and the unlabelled stream's passes (3 images
    # cycled to 10 draws an epoch: the broken one is drawn 6 times).
    for name in ("train/class_0/001.png", "val/class_1/000.png", "target/class_0/002.png"):
        assert result.stderr.count(f"{tmp_path / name}: cannot decode") == 1, result.stderr


# --- the data fingerprint on resume ----------------------------------------------------------------------


def test_the_fingerprint_says_what_changed(tmp_path: Path) -> None:
    from tltool.config import DataConfig
    from tltool.data import scan_data
    from tltool.data.fingerprint import compare

    data = make_dataset(tmp_path / "images", classes=2, per_class=6, size=16)
    before = scan_data(DataConfig(train=str(data)), seed=0)
    same = scan_data(DataConfig(train=str(data)), seed=0)
    assert before.fingerprint()["digest"] == same.fingerprint()["digest"]
    make_dataset(tmp_path / "extra", classes=1, per_class=3, size=16, seed=9)
    for i, path in enumerate(sorted((tmp_path / "extra" / "class_0").iterdir())):
        shutil.copy(path, data / "class_0" / f"new_{i}.png")
    (data / "class_1" / "005.png").unlink()
    make_dataset(tmp_path / "big", classes=2, per_class=1, size=20, seed=5)
    shutil.copy(tmp_path / "big" / "class_1" / "000.png", data / "class_1" / "000.png")  # same name, other size
    after = scan_data(DataConfig(train=str(data)), seed=0)
    change = compare(before.fingerprint(), after.fingerprint(), {"train": "data.train"})
    assert change.folders_changed
    assert change.parts == [
        "3 images added in data.train/class_0",
        "1 image removed, 1 image resized in data.train/class_1",
    ]
    # class_0's stratified split now draws from 9 images: some images would change side.
    assert sum(change.val_moves) > 0 and "the val split would change" in change.text()
    # The fingerprint keeps 16 bytes per image, not the paths.
    fingerprint = after.fingerprint()
    assert fingerprint["folders"]["train"]["class_0"]["paths"].dtype == torch.int64
    assert fingerprint["folders"]["train"]["class_0"]["paths"].numel() == 9


@pytest.mark.slow
def test_resume_on_changed_data_is_refused_or_keeps_the_val_split(tmp_path: Path, cli: CliRunner) -> None:
    from conftest import tree_checksum
    from tltool.checkpoint import save_atomic
    from tltool.data.fingerprint import sample_key
    from tltool.trained import open_trained

    data = make_dataset(tmp_path / "images", classes=2, per_class=6, size=16)
    extra = ("train.epochs=1", "data.image_size=16", "data.resize_size=16")  # (a frozen backbone: cached features)
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "run", data, *extra))
    assert cli.invoke(app, ["finetune", str(config)]).exit_code == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    saved = load_checkpoint(last).data_fingerprint
    old_val = set(saved["val_split"].tolist())
    assert len(old_val) == 2  # one per class (20% of 6)
    # Unchanged data resumes without a word about it.
    result = cli.invoke(app, ["finetune", str(config), "train.epochs=2", "--resume", "auto"])
    assert result.exit_code == 0 and "data" not in result.stderr, result.output
    # 3 images added to class_0, a val image of class_1 removed: refused in one line, nothing written.
    for i in range(3):
        shutil.copy(data / "class_0" / f"{i:03d}.png", data / "class_0" / f"copy_{i}.png")
    val_1 = next(p for p in (data / "class_1").iterdir() if sample_key(str(p), str(data)) in old_val)
    val_1.unlink()
    before = tree_checksum(tmp_path / "run")
    line = one_line(cli.invoke(app, ["finetune", str(config), "train.epochs=3", "--resume", "auto"]))
    assert "the data changed since" in line and "3 images added in data.train/class_0" in line
    assert "1 image removed in data.train/class_1" in line and "--resume-changed-data" in line
    assert tree_checksum(tmp_path / "run") == before
    assert "only applies to a resumed run" in one_line(
        cli.invoke(app, ["finetune", str(config), "--resume-changed-data"])
    )
    # --resume-changed-data: goes on, keeping the checkpoint's val split (the new images train).
    args = ["finetune", str(config), "train.epochs=3", "--resume", "auto", "--resume-changed-data"]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    text = "keeping the checkpoint's val split (1 val images, 1 of its images gone), 13 train images"
    assert text in result.output, result.output
    kept = load_checkpoint(last).data_fingerprint
    assert set(kept["val_split"].tolist()) == old_val - {sample_key(str(val_1), str(data))}
    # tltool eval / report score the split the run kept, not a fresh split of today's files.
    evaluated = open_trained(last, torch.device("cpu")).run_val_samples()
    assert {sample_key(path, str(data)) for path, _ in evaluated} == set(kept["val_split"].tolist())
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["train_images"] == 13
    # The next resume on this data is the same data: no refusal, and the kept split stays.
    result = cli.invoke(app, ["finetune", str(config), "train.epochs=4", "--resume", "auto"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(last).data_fingerprint["val_split"].tolist() == kept["val_split"].tolist()
    # A checkpoint from before fingerprints resumes, with a note.
    payload = load_checkpoint(last).to_dict()
    payload.pop("data_fingerprint")
    save_atomic(payload, last)
    result = cli.invoke(app, ["finetune", str(config), "train.epochs=5", "--resume", "auto"])
    assert result.exit_code == 0 and "has no data fingerprint" in result.output, result.output


def test_resume_checks_the_unlabeled_and_source_folders_too(tmp_path: Path, cli: CliRunner) -> None:
    """adapt.unlabeled and source.train are in the checkpoint's fingerprint: an image added to either since is
    refused on resume in one line naming the folder (nothing written); --resume-changed-data goes on with it;
    a checkpoint that never recorded them (older) resumes unchecked as before."""
    from conftest import tree_checksum

    data = make_dataset(tmp_path / "images", classes=2, per_class=6, size=16)
    unlabeled = make_dataset(tmp_path / "target", classes=2, per_class=3, size=16, seed=4)
    source = make_dataset(tmp_path / "source", classes=2, per_class=4, size=16, seed=5)
    extra = ("train.epochs=1", "data.image_size=16", "data.resize_size=16", f"adapt.unlabeled={unlabeled}",
             "adapt.method=mcc", f"source.train={source}")  # fmt: skip
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "run", data, *extra))
    assert cli.invoke(app, ["finetune", str(config)]).exit_code == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    streams = load_checkpoint(last).data_fingerprint["streams"]
    assert sorted(streams) == ["adapt.unlabeled", "source.train"]
    assert streams["adapt.unlabeled"]["*"]["paths"].numel() == 6 and sorted(streams["source.train"]) == [
        "class_0", "class_1"]  # fmt: skip
    assert cli.invoke(app, ["finetune", str(config), "train.epochs=2", "--resume", "auto"]).exit_code == 0
    shutil.copy(unlabeled / "class_0" / "000.png", unlabeled / "new.png")
    (source / "class_1" / "000.png").unlink()
    before = tree_checksum(tmp_path / "run")
    line = one_line(cli.invoke(app, ["finetune", str(config), "train.epochs=3", "--resume", "auto"]))
    assert "the data changed since" in line and "1 image added in adapt.unlabeled/*" in line
    assert "1 image removed in source.train/class_1" in line and "--resume-changed-data" in line
    assert tree_checksum(tmp_path / "run") == before
    args = ["finetune", str(config), "train.epochs=3", "--resume", "auto", "--resume-changed-data"]
    result = cli.invoke(app, args)
    assert result.exit_code == 0 and "going on with those folders as they are now" in result.output, result.output
    assert load_checkpoint(last).data_fingerprint["streams"]["adapt.unlabeled"]["*"]["paths"].numel() == 7
    shutil.copy(unlabeled / "class_0" / "001.png", unlabeled / "newer.png")  # (and an older checkpoint's format:)
    payload = load_checkpoint(last).to_dict()
    payload["data_fingerprint"] = {k: v for k, v in payload["data_fingerprint"].items() if not k.startswith("streams")}
    torch.save(payload, last)
    assert cli.invoke(app, ["finetune", str(config), "train.epochs=4", "--resume", "auto"]).exit_code == 0
