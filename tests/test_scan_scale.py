"""Start-up at scale: the threaded header check finds exactly what the serial one finds, and under torchrun one
rank scans the dataset and every rank gets its split (the timings are `make bench-data SCALE=1`'s)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from conftest import make_dataset, run_overrides, run_torchrun
from tltool import distributed
from tltool.config import DataConfig
from tltool.data import folders, verdicts
from tltool.data.folders import check_images, scan_data, scan_folder
from tltool.errors import DataError

# Launched by torchrun: counts scan_data calls per rank in a marker file, builds the session as `tltool
# finetune` does (dry run), and writes the split each rank got; then rank 0 raises a DataError inside
# main_computes and each rank records what it raised.
LAUNCHER = """
import json, os, sys
import tltool.session as session
from tltool import distributed
from tltool.config import load_config
from tltool.errors import DataError

original = session.scan_data

def counted(*args, **kwargs):
    with open(os.environ["SCAN_MARKER"], "a") as handle:
        handle.write(os.environ["RANK"] + "\\n")
    return original(*args, **kwargs)

session.scan_data = counted
built = session.build_session(load_config(None, sys.argv[2:]), dry_run=True, quiet=True)

def failing():
    raise DataError("data.train folder x does not exist", "set data.train to a folder")

try:
    distributed.main_computes(failing)
    error = None
except DataError as exc:
    error = exc.message()
split = built.split
out = {"world": built.world.world_size, "classes": split.class_names, "train": split.train, "val": split.val,
       "bad": split.bad, "fingerprint": split.fingerprint()["digest"], "error": error}
with open(os.path.join(sys.argv[1], os.environ["RANK"] + ".json"), "w") as handle:
    json.dump(out, handle)
distributed.teardown()
"""


def bad_dataset(root: Path) -> Path:
    """3 classes of 12 images with unusable files among them: empty, not an image, a FIFO, a broken link."""
    make_dataset(root, per_class=12, size=16)
    (root / "class_0" / "004b.png").write_bytes(b"")
    (root / "class_1" / "000a.png").write_text("not an image")
    os.mkfifo(root / "class_1" / "007b.png")
    (root / "class_2" / "010b.png").symlink_to(root / "missing.png")
    (root / "class_2" / "011b.jpg").write_bytes(b"\xff\xd8\xff")  # a JPEG's first bytes only
    return root


def test_threaded_check_finds_the_same_bad_files_in_the_same_order(tmp_path: Path, monkeypatch) -> None:
    _, samples = scan_folder(bad_dataset(tmp_path / "images"))
    monkeypatch.setattr(folders, "HEADER_CHUNK", 3)  # 14 chunks of the 41 files, finishing out of order
    monkeypatch.setenv("TLTOOL_NO_CHECK_MEMO", "1")  # (each check reads: no verdicts remembered)
    threads: set[str] = set()
    original = folders.file_problem

    def recorded(path):
        threads.add(threading.current_thread().name)
        return original(path)

    monkeypatch.setattr(folders, "file_problem", recorded)
    serial = check_images(samples, workers=1)
    assert threads == {threading.main_thread().name}
    threads.clear()
    threaded = check_images(samples, workers=4)
    assert threads and threading.main_thread().name not in threads  # (the pool did the work)
    assert threaded == serial
    kept, bad = serial
    assert [Path(p).name for p, _ in bad] == ["004b.png", "000a.png", "007b.png", "010b.png", "011b.jpg"]
    assert [why for _, why in bad][:3] == ["empty file", "not an image", "is a FIFO (named pipe), not a file"]
    assert len(kept) == 36 and kept == [s for s in samples if s[0] not in dict(bad)]


def test_scan_data_checks_with_the_pool_and_stays_as_strict(tmp_path: Path, monkeypatch) -> None:
    root = bad_dataset(tmp_path / "images")
    monkeypatch.setattr(folders, "HEADER_CHUNK", 4)
    monkeypatch.setenv("TLTOOL_NO_CHECK_MEMO", "1")  # (each check reads: no verdicts remembered)
    cfg = DataConfig(train=str(root), on_bad_image="skip", max_bad_fraction=0.5)
    split = scan_data(cfg, 0)
    assert len(split.bad) == 5 and len(split.train) + len(split.val) == 36
    monkeypatch.setattr(folders, "HEADER_WORKERS", 1)  # the serial check finds the same
    original = folders._problems
    calls = []
    monkeypatch.setattr(folders, "_problems", lambda paths: calls.append(len(paths)) or original(paths))
    assert scan_data(cfg, 0).bad == split.bad
    assert len(calls) == 2 and sum(calls) == 41  # (train, then val: each in one call, not in chunks)
    with pytest.raises(DataError, match="5 of 41 images are unreadable"):
        scan_data(DataConfig(train=str(root)), 0)


def test_main_computes_in_one_process_is_the_call() -> None:
    assert distributed.main_computes(lambda: [1, 2]) == [1, 2]
    with pytest.raises(DataError, match="nope"):
        distributed.main_computes(lambda: (_ for _ in ()).throw(DataError("nope", "fix")))


@pytest.mark.slow
def test_under_torchrun_rank_0_scans_and_every_rank_gets_its_split(tmp_path: Path) -> None:
    data = bad_dataset(tmp_path / "images")
    launcher, marker, out = tmp_path / "launch.py", tmp_path / "scans.txt", tmp_path / "out"
    launcher.write_text(LAUNCHER)
    out.mkdir()
    overrides = run_overrides(tmp_path / "run", data, "data.on_bad_image=skip", "data.max_bad_fraction=0.5")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCAN_MARKER": str(marker)}
    result = run_torchrun([str(launcher), str(out), *overrides], env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.read_text().split() == ["0"]  # one scan, by rank 0
    rank0, rank1 = (json.loads((out / f"{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["world"] == 2 and len(rank0["bad"]) == 5 and len(rank0["train"]) + len(rank0["val"]) == 36
    assert rank1 == rank0  # the same classes, split, unusable files and fingerprint, and the same error line
    assert rank0["error"] == "error: data.train folder x does not exist — set data.train to a folder"


@pytest.mark.parametrize(
    "path, root",
    [
        ("data/c/1.png", "data"),
        ("/d/images/c/x.jpg", "/d/images"),
        ("/d/images/sub/../x.jpg", "/d/images"),  # (a label file's path: relpath normalizes it)
        ("/d/images/../other/x.jpg", "/d/images"),
        ("/d/images/./c//x.jpg", "/d/images"),
        ("data/c/1.png", "data/"),
        ("/d/images/c/x.jpg", "/d/images/../images"),
    ],
)
def test_sample_key_is_the_key_of_relpath(path: str, root: str) -> None:
    from tltool.data.fingerprint import path_key, sample_key

    assert sample_key(path, root) == path_key(os.path.relpath(path, root))


def test_eval_scan_skips_the_bad_files_in_order(tmp_path: Path, monkeypatch, capsys) -> None:
    from tltool.data.folders import scan_eval_folder

    root = bad_dataset(tmp_path / "images")
    monkeypatch.setattr(folders, "HEADER_CHUNK", 2)
    samples = scan_eval_folder(root, ["class_2", "class_1", "class_0"])
    assert len(samples) == 36 and {label for path, label in samples if "/class_0/" in path} == {2}
    skipped = [line.split(": ")[1].rsplit("/", 1)[1] for line in capsys.readouterr().err.splitlines()]
    assert skipped == ["004b.png", "000a.png", "007b.png", "010b.png", "011b.jpg"]


def _counting_headers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(verdicts, "MIN_FILES", 1)  # (these lists are small: remembered all the same)
    read: list[str] = []
    real = folders.read_header
    monkeypatch.setattr(folders, "read_header", lambda path: read.append(str(path)) or real(path))
    return read


def test_a_second_check_of_unchanged_files_reads_no_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The header check's verdicts are remembered by the files' identity (verdicts.py): a second check of the
    same files reads no header and gives the same kept samples and the same reasons; a changed file makes the
    next check read every header again and judge the new bytes."""
    root = make_dataset(tmp_path / "data", classes=2, per_class=4, size=16)
    broken = root / "class_1" / "broken.png"
    broken.write_bytes(b"not an image at all")
    _, samples = scan_folder(root)
    read = _counting_headers(monkeypatch)
    first = check_images(samples, workers=1)
    assert len(read) == 9 and first[1] == [(str(broken), "not an image")] and len(first[0]) == 8
    assert list((tmp_path / "tltool_cache" / "checked").glob("*.json"))  # (conftest's TLTOOL_CACHE_DIR)
    read.clear()
    assert check_images(samples, workers=4) == first and read == []

    good = root / "class_0" / "000.png"
    good.write_bytes(b"garbage now, another size")  # (a new size: another identity)
    read.clear()
    kept, bad = check_images(samples, workers=1)
    assert len(read) == 9 and bad == [(str(good), "not an image"), (str(broken), "not an image")] and len(kept) == 7
    os.utime(broken, ns=(broken.stat().st_atime_ns, broken.stat().st_mtime_ns + 10**9))  # (only the mtime)
    read.clear()
    check_images(samples, workers=1)
    assert len(read) == 9


def test_the_memo_can_be_off_or_unusable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_dataset(tmp_path / "data", classes=2, per_class=3, size=16)
    _, samples = scan_folder(root)
    read = _counting_headers(monkeypatch)
    for _ in range(2):
        check_images(samples, memo=False)
    assert len(read) == 12  # (doctor's way: every header each time)
    monkeypatch.setenv("TLTOOL_NO_CHECK_MEMO", "1")
    read.clear()
    check_images(samples), check_images(samples)
    assert len(read) == 12
    monkeypatch.delenv("TLTOOL_NO_CHECK_MEMO")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("TLTOOL_CACHE_DIR", str(blocker))  # (the memo folder cannot be made: not an error)
    read.clear()
    assert check_images(samples)[0] == samples and check_images(samples)[0] == samples
    assert len(read) == 12


def test_a_second_run_reads_no_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_dataset(tmp_path / "data", classes=2, per_class=6, size=16)
    monkeypatch.setattr(verdicts, "MIN_FILES", 1)
    config = DataConfig(train=str(data), val_split=0.25)
    first = scan_data(config, seed=0)
    read = _counting_headers(monkeypatch)
    second = scan_data(config, seed=0)
    assert read == [] and (second.train, second.val) == (first.train, first.val)
    scan_data(config, seed=1)  # (another split: other lists, checked again)
    assert len(read) == 12


def test_small_lists_are_not_recorded_and_old_records_are_pruned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_dataset(tmp_path / "data", classes=2, per_class=3, size=16)
    _, samples = scan_folder(root)
    records = tmp_path / "tltool_cache" / "checked"
    check_images(samples)  # (6 files: fewer than MIN_FILES)
    assert not records.exists() or not list(records.iterdir())
    monkeypatch.setattr(verdicts, "MIN_FILES", 1)
    monkeypatch.setattr(verdicts, "MAX_RECORDS", 3)
    for count in range(1, 7):  # six different lists: six records written, the three newest kept
        check_images(samples[:count])
        os.utime(next(iter(sorted(records.iterdir(), key=lambda p: p.stat().st_mtime_ns)[-1:])),
                 ns=(10**18 + count, 10**18 + count))  # fmt: skip
    kept = sorted(records.iterdir())
    assert len(kept) == 3
    assert {verdicts.list_key([p for p, _ in samples[:n]]) + ".json" for n in (4, 5, 6)} == {p.name for p in kept}
