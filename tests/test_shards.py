"""WebDataset shards: `tltool shard`, training from shards, each sample once per epoch (1 process x 2 workers,
2 ranks), the resume semantic (bitwise, and which samples a resumed epoch draws), and the bad inputs."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

import tltool.session as session_module
from conftest import make_dataset, run_overrides, run_torchrun, write_config
from tltool.checkpoint import load_checkpoint
from tltool.cli import app
from tltool.config import load_config
from tltool.data import eval_transform, make_loader, scan_folder, set_loader_epoch
from tltool.data.shards import ShardStream, scan_shards, shuffle_buffer, write_shards
from tltool.data.transforms import Preprocess
from tltool.errors import DataError
from tltool.train import finetune

REPO = Path(__file__).resolve().parents[1]
PATTERN = "train-{000000..000003}.tar"  # 3 classes x 10 images, 20% val: 24 train samples in shards of 7


REAL_DECODE = ShardStream._decode


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shards") / "images", classes=3, per_class=10, size=16)


@pytest.fixture(scope="module")
def shards(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("written") / "shards"
    write_shards(folder, out, shard_size=7, val_split=0.2, seed=0)
    return out


def record_draws(monkeypatch: pytest.MonkeyPatch, log: Path) -> None:
    """Append "epoch name" to `log` for every training sample a ShardStream decodes (loader workers too)."""
    real = REAL_DECODE

    def decode(self, index, sample, seed):
        if self.shuffle:
            with open(log, "a") as handle:
                handle.write(f"{self.epoch} {self.names[index]}\n")
        return real(self, index, sample, seed)

    monkeypatch.setattr(ShardStream, "_decode", decode)


def draws(log: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for line in log.read_text().splitlines():
        epoch, name = line.split(" ", 1)
        out.setdefault(int(epoch), []).append(name)
    return out


def shard_overrides(run_dir: Path, out: Path, *extra: str) -> list[str]:
    items = run_overrides(run_dir, out / PATTERN, *extra, val=out / "val-*.tar")
    return items + ["data.image_size=16", "data.resize_size=16"]


# --- tltool shard ---------------------------------------------------------------------------------------


def test_shard_writes_the_files_bytes_and_classes(folder: Path, shards: Path) -> None:
    classes, samples = scan_folder(folder)
    index = json.loads((shards / "shards.json").read_text())
    assert json.loads((shards / "classes.json").read_text()) == classes == index["classes"]
    assert index["train"]["counts"] == [7, 7, 7, 3] and index["val"]["samples"] == 6
    originals = Counter((Path(path).read_bytes(), label) for path, label in samples)
    written: Counter = Counter()
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name, data in members.items():
            if name.endswith(".png"):
                written[(data, int(members[name[: -len(".png")] + ".cls"]))] += 1
    assert written == originals  # every image once, its bytes as on disk, with its class index


def test_shard_then_train_from_shards_sees_the_same_classes_and_counts(
    folder: Path, tmp_path: Path, cli, one_thread
) -> None:
    out = tmp_path / "cli-shards"
    result = cli.invoke(app, ["shard", str(folder), str(out), "--shard-size", "7", "--val-split", "0.2"])
    assert result.exit_code == 0, result.output
    assert f"data.train={out / PATTERN}" in result.output
    classes, samples = scan_folder(folder)
    train_classes, train = scan_shards(str(out / PATTERN), "data.train")
    val_classes, val = scan_shards(str(out / "val-*.tar"), "data.val")
    assert train_classes == val_classes == classes
    assert Counter(label for _, label in train) + Counter(label for _, label in val) == Counter(
        label for _, label in samples
    )
    summary = finetune(load_config(None, shard_overrides(tmp_path / "run", out, "train.epochs=1")), quiet=True)
    assert json.loads((tmp_path / "run" / "classes.json").read_text()) == classes
    assert summary["epochs_completed"] == 1
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert checkpoint.class_names == classes and checkpoint.global_step == 3  # 24 samples / batch 8
    # eval / report read the run's val shards (streamed in scan order, each image once), or --data shards.
    best = str(tmp_path / "run" / "checkpoints" / "last.pt")
    own, given = cli.invoke(app, ["eval", best]), cli.invoke(app, ["eval", best, "--data", str(out / "val-*.tar")])
    assert own.exit_code == given.exit_code == 0, own.output + given.output
    assert "warning" not in own.output + given.output and "images 6 " in own.output
    assert own.output.splitlines()[1:] == given.output.splitlines()[1:]


def test_a_url_is_scanned_and_streamed_as_the_local_shards(shards: Path, one_thread) -> None:
    classes, local = scan_shards(str(shards / PATTERN), "data.train")
    named, remote = scan_shards(f"file://{shards}/{PATTERN}", "data.train", classes)  # (no classes.json read)
    assert named == classes and [label for _, label in remote] == [label for _, label in local]
    assert [count for _, count in remote.shards] == [count for _, count in local.shards]
    transform = eval_transform(Preprocess(image_size=16, resize_size=16))
    for a, b in zip(
        make_loader(local, transform, 8, 0, seed=1, shuffle=True),
        make_loader(remote, transform, 8, 0, seed=1, shuffle=True),
        strict=True,
    ):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --- the order: once per epoch ----------------------------------------------------------------------------


def test_shuffle_buffer_is_a_seeded_permutation_kept_local() -> None:
    import random

    items = list(range(100))
    a = shuffle_buffer(items, 10, random.Random(1))
    assert sorted(a) == items and a == shuffle_buffer(items, 10, random.Random(1)) and a != items
    # A buffer of 10: the k-th sample out was among the first k + 10 in (streaming, never the whole set).
    assert all(item < k + 10 for k, item in enumerate(a))
    # It is webdataset's own shuffle, run on positions: the order a stream of those samples would get.
    import webdataset as wds

    samples = [{"__key__": str(i)} for i in items]
    streamed = wds.filters.shuffle(bufsize=10, initial=10, rng=random.Random(1))(iter(samples))
    assert [int(s["__key__"]) for s in streamed] == a
    assert shuffle_buffer(items, 0, random.Random(1)) == items


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_take_every_sample_once_per_epoch(shards: Path, world: int) -> None:
    _, samples = scan_shards(str(shards / PATTERN), "data.train")
    orders = []
    for rank in range(world):
        stream = ShardStream(samples, None, 4, seed=3, shuffle=True, shard=(rank, world), buffer=5)
        stream.set_epoch(2)
        orders.append(stream.order())
    assert len({len(o) for o in orders}) == 1  # equal parts: every rank runs the same steps
    drawn = Counter(i for o in orders for i in o)
    padded = -len(samples) % world
    assert set(drawn) == set(range(len(samples))) and sum(drawn.values()) == len(samples) + padded
    assert sum(c - 1 for c in drawn.values()) == padded  # only the padding is drawn twice (none when W divides N)
    stream.set_epoch(3)
    assert stream.order() != orders[-1]  # another epoch, another order


def test_one_process_two_workers_draws_each_sample_once_in_the_workers_free_order(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread
) -> None:
    _, samples = scan_shards(str(shards / PATTERN), "data.train")
    transform = eval_transform(Preprocess(image_size=16, resize_size=16))
    batches = {}
    for workers in (0, 2):
        log = tmp_path / f"draws-{workers}.txt"
        record_draws(monkeypatch, log)
        loader = make_loader(samples, transform, 5, workers, seed=0, shuffle=True, seeded=True, buffer=6)
        for epoch in (0, 1):
            set_loader_epoch(loader, 0, epoch)
            batches[workers, epoch] = list(loader)
        seen = draws(log)
        for epoch in (0, 1):
            assert sorted(seen[epoch]) == sorted(path for path, _ in samples)  # each sample exactly once
        assert seen[0] != seen[1]
    for epoch in (0, 1):
        assert len(batches[0, epoch]) == 5
        for (x0, y0), (x2, y2) in zip(batches[0, epoch], batches[2, epoch], strict=True):
            assert torch.equal(x0, x2) and torch.equal(y0, y2)  # the same batches whatever the workers


@pytest.mark.slow
def test_two_ranks_under_torchrun_draw_each_sample_once_per_epoch(shards: Path, tmp_path: Path) -> None:
    log = tmp_path / "draws.txt"
    wrapper = tmp_path / "recording_tltool.py"
    wrapper.write_text(
        "import sys\nfrom tltool.data.shards import ShardStream\nreal = ShardStream._decode\n"
        "def decode(self, index, sample, seed):\n"
        "    if self.shuffle:\n"
        f"        with open({str(log)!r}, 'a') as f:\n"
        "            f.write(f'{self.epoch} {self.names[index]}\\n')\n"
        "    return real(self, index, sample, seed)\n"
        "ShardStream._decode = decode\n"
        "from tltool.cli import main\nsys.argv = ['tltool', *sys.argv[1:]]\nmain()\n"
    )
    config = write_config(
        tmp_path / "ddp.yaml",
        shard_overrides(tmp_path / "run", shards, "data.batch_size=4", "data.num_workers=1", "train.epochs=2"),
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def reset() -> None:  # (a second attempt, after a hang: see run_torchrun)
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        log.unlink(missing_ok=True)

    result = run_torchrun([str(wrapper), "finetune", str(config)], env, timeout=120, attempts=2, reset=reset)
    assert result.returncode == 0, result.stderr[-3000:]
    _, samples = scan_shards(str(shards / PATTERN), "data.train")
    seen = draws(log)
    for epoch in (0, 1):  # 24 samples over 2 ranks x 1 worker: each drawn exactly once
        assert sorted(seen[epoch]) == sorted(path for path, _ in samples)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt").global_step == 6  # 12 a rank / batch 4


# --- resume ---------------------------------------------------------------------------------------------


def test_mid_epoch_resume_skips_the_recorded_batches_and_equals_the_uninterrupted_run(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread
) -> None:
    extra = ("train.epochs=2", "checkpoint.every_n_steps=1", "data.batch_size=4", "data.augment=light",
             "data.shuffle_buffer=5", "train.freeze=none")  # fmt: skip
    straight_log, resumed_log = tmp_path / "straight.txt", tmp_path / "resumed.txt"
    record_draws(monkeypatch, straight_log)
    finetune(load_config(None, shard_overrides(tmp_path / "straight", shards, *extra)), quiet=True)
    record_draws(monkeypatch, resumed_log)
    real_save = session_module.save_atomic
    saves = {"n": 0}

    def crash_after_fourth_save(payload, path):
        real_save(payload, path)
        saves["n"] += 1
        if saves["n"] == 4:  # epoch 1 has 6 batches of 4: mid-epoch
            raise Crash()

    monkeypatch.setattr(session_module, "save_atomic", crash_after_fourth_save)
    cfg = load_config(None, shard_overrides(tmp_path / "resumed", shards, *extra))
    with pytest.raises(Crash):
        finetune(cfg, quiet=True)
    monkeypatch.setattr(session_module, "save_atomic", real_save)
    saved = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert saved.epoch == 0 and saved.epoch_progress["batches_done"] == 4
    before = len(draws(resumed_log)[0])
    torch.manual_seed(999)
    finetune(cfg, resume="auto", quiet=True)
    straight, resumed = draws(straight_log), draws(resumed_log)
    # The resumed epoch draws exactly the samples after the checkpoint's 4 batches, in the same order.
    assert resumed[0][before:] == straight[0][16:] and resumed[0][:16] == straight[0][:16]
    assert resumed[1] == straight[1]
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for key, value in a.model.items():
        assert torch.equal(value, b.model[key]), key  # bitwise: same order, same augmentation draws


# --- bad input ------------------------------------------------------------------------------------------


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[0]


def test_a_pattern_that_matches_nothing_is_one_line(shards: Path, tmp_path: Path, cli) -> None:
    config = write_config(tmp_path / "c.yaml", shard_overrides(tmp_path / "run", shards))
    bad = f"data.train={shards}/nothing-{{000000..000003}}.tar"
    line = one_line_error(cli.invoke(app, ["finetune", str(config), bad]))
    assert "matches no file" in line and "nothing-{000000..000003}.tar" in line
    assert not (tmp_path / "run").exists()


def test_a_tar_without_cls_is_one_line(tmp_path: Path, shards: Path, cli) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    with tarfile.open(bare / "train-000000.tar", "w") as tar:
        data = (shards / "classes.json").read_bytes()
        info = tarfile.TarInfo("000000001.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"sample without a \.cls label \(000000001\)"):
        scan_shards(str(bare / "train-000000.tar"), "data.train")
    config = write_config(tmp_path / "c.yaml", shard_overrides(tmp_path / "run", shards))
    line = one_line_error(cli.invoke(app, ["finetune", str(config), f"data.train={bare}/train-000000.tar"]))
    assert "without a .cls label" in line and "tltool shard" in line


def test_missing_webdataset_is_one_line_with_the_pip_command(
    tmp_path: Path, shards: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "webdataset", None)
    config = write_config(tmp_path / "c.yaml", shard_overrides(tmp_path / "run", shards))
    assert "pip install 'tltool[shards]'" in one_line_error(cli.invoke(app, ["finetune", str(config)]))
    line = one_line_error(cli.invoke(app, ["shard", str(shards), str(tmp_path / "out")]))
    assert "pip install 'tltool[shards]'" in line and not (tmp_path / "out").exists()


def test_shard_bad_arguments_are_one_line_and_nothing_is_overwritten(folder: Path, tmp_path: Path, cli) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert "already exists" in one_line_error(cli.invoke(app, ["shard", str(folder), str(taken)]))
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert "--shard-size" in one_line_error(
        cli.invoke(app, ["shard", str(folder), str(tmp_path / "a"), "--shard-size", "0"])
    )
    (tmp_path / "empty").mkdir()
    line = one_line_error(cli.invoke(app, ["shard", str(tmp_path / "empty"), str(tmp_path / "b")]))
    assert "no class sub-folders" in line and not (tmp_path / "b").exists()


def test_shards_without_data_val_or_with_a_balanced_sampler_are_config_errors(
    shards: Path, tmp_path: Path, cli
) -> None:
    # (config problems are listed all at once, one line each, under the config's own line)
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "run", shards / PATTERN))
    result = cli.invoke(app, ["finetune", str(config)])
    assert result.exit_code == 2 and "Traceback" not in result.output and "set data.val" in result.output
    val = f"data.val={shards}/val-*.tar"
    result = cli.invoke(app, ["finetune", str(config), val, "data.sampler=balanced"])
    assert result.exit_code == 2 and "data.sampler: balanced needs random access" in result.output
    assert not (tmp_path / "run").exists()


def test_a_loader_worker_reads_only_its_own_samples_images(
    shards: Path, monkeypatch: pytest.MonkeyPatch, one_thread
) -> None:
    """Each of 2 workers reads the image bytes of its own batches' samples only (the others' are seeked past),
    and the batches are those of one worker reading everything."""
    import tltool.data.shards as shards_module

    _, samples = scan_shards(str(shards / PATTERN), "data.train")
    transform = eval_transform(Preprocess(image_size=16, resize_size=16))
    read: list[str] = []
    real = tarfile.TarFile.extractfile

    def counted(self, member):
        read.append(member.name)
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", counted)
    stream = ShardStream(samples, transform, 5, seed=0, shuffle=True, buffer=6)
    batches = {}
    for worker, workers in ((0, 1), (0, 2), (1, 2)):
        info = type("Info", (), {"id": worker, "num_workers": workers})()
        monkeypatch.setattr(shards_module, "get_worker_info", lambda info=info: info)
        read.clear()
        batches[worker, workers] = list(stream)
        images = [name for name in read if not name.endswith(".cls")]
        drawn = sum(len(batch[1]) for batch in batches[worker, workers])
        assert len(images) == drawn, (worker, workers)  # (one image member per sample drawn, none other)
    assert len(batches[0, 2]) + len(batches[1, 2]) == len(batches[0, 1])
    merged = [b for pair in zip(batches[0, 2], batches[1, 2] + [None], strict=False) for b in pair if b is not None]
    for (x, y), (x1, y1) in zip(merged, batches[0, 1], strict=True):
        assert torch.equal(x, x1) and torch.equal(y, y1)
