"""Nothing lost, nothing executed: kills, Ctrl-C, full disks, mid-epoch resume, unsafe and mismatched files."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tltool.checkpoint as checkpoint_module
import tltool.session as session_module
from conftest import make_dataset, run_overrides, write_config
from tltool.checkpoint import TEMP_MARKER, Checkpoint, clean_stale_temps, load_checkpoint, save_atomic
from tltool.config import load_config
from tltool.errors import CheckpointError, ConfigError
from tltool.train import finetune

REPO = Path(__file__).resolve().parents[1]
# A full fine-tune of a small network with dropout and augmentation: every kind of state must be restored.
FULL = ("model.backbone=mobilenet_v3_small", "train.freeze=none", "data.augment=light", "model.head_dropout=0.2",
        "train.optimizer=sgd", "train.warmup_epochs=1")  # fmt: skip


def run(run_dir: Path, train: Path, *extra: str, resume: str | None = None) -> dict:
    return finetune(load_config(None, run_overrides(run_dir, train, *extra)), resume=resume, quiet=True)


def final_state(run_dir: Path) -> tuple[Checkpoint, list[dict]]:
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return checkpoint, lines


def assert_same_run(a_dir: Path, b_dir: Path, exact: bool = True) -> None:
    (a, a_lines), (b, b_lines) = final_state(a_dir), final_state(b_dir)
    for key, value in a.model.items():
        if exact:
            assert torch.equal(value, b.model[key]), key
        else:
            torch.testing.assert_close(value, b.model[key], rtol=1e-4, atol=1e-5)
    assert [r["epoch"] for r in a_lines] == [r["epoch"] for r in b_lines]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc1", "lr", "global_step"):
        left, right = [r[key] for r in a_lines], [r[key] for r in b_lines]
        assert left == right if exact else left == pytest.approx(right, rel=1e-4), key
    for key in ("epoch", "global_step", "best_metric", "best_epoch", "early_stopping", "trainable", "frozen_modules"):
        assert getattr(a, key) == getattr(b, key), key


def cli_command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tltool", "finetune", str(config), *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


class Crash(Exception):
    pass


def test_mid_epoch_checkpoint_resumes_from_the_same_batch(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = (*FULL, "train.epochs=2", "checkpoint.every_n_steps=1", "data.batch_size=4")
    run(tmp_path / "straight", dataset, *extra)
    real_save = session_module.save_atomic
    saves = {"n": 0}

    def crash_after_sixth_save(payload, path):
        real_save(payload, path)
        saves["n"] += 1
        if saves["n"] == 6:  # epoch 1 has 8 batches: this is mid-epoch
            raise Crash()

    monkeypatch.setattr(session_module, "save_atomic", crash_after_sixth_save)
    with pytest.raises(Crash):
        run(tmp_path / "resumed", dataset, *extra)
    monkeypatch.setattr(session_module, "save_atomic", real_save)
    saved = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert saved.epoch == 0 and saved.epoch_progress["batches_done"] == 6 and saved.global_step == 6
    torch.manual_seed(999)  # the process's RNG before resuming must not matter
    run(tmp_path / "resumed", dataset, *extra, resume="auto")
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    # Restored one by one: optimizer (momentum buffers), scheduler, scaler, RNG.
    for index, value in straight.optimizer["state"].items():
        assert torch.equal(value["momentum_buffer"], resumed.optimizer["state"][index]["momentum_buffer"])
    assert straight.scheduler == resumed.scheduler
    assert straight.scaler == resumed.scaler
    assert torch.equal(straight.rng["torch"], resumed.rng["torch"])
    assert straight.rng["python"] == resumed.rng["python"]


@pytest.mark.slow
def test_sigkill_at_a_random_point_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "images", per_class=16)
    extra = [*FULL, "train.epochs=6", "checkpoint.every_n_steps=2", "data.batch_size=4"]
    straight = write_config(tmp_path / "straight.yaml", run_overrides(tmp_path / "straight", data, *extra))
    killed = write_config(tmp_path / "killed.yaml", run_overrides(tmp_path / "killed", data, *extra))
    done = subprocess.run(cli_command(straight, "-q"), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    process = subprocess.Popen(cli_command(killed, "-q"), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    # Kill after a random number of checkpoint writes: mid-epoch, between epochs, or during a save.
    writes, seen, deadline = random.randint(1, 12), None, time.monotonic() + 300
    while writes > 0 and time.monotonic() < deadline and process.poll() is None:
        stamp = last.stat().st_mtime_ns if last.exists() else None
        if stamp != seen:
            seen, writes = stamp, writes - (stamp is not None)
        time.sleep(0.005)
    time.sleep(random.uniform(0.0, 0.05))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    load_checkpoint(last)  # whatever the moment of the kill, last.pt is whole
    done = subprocess.run(
        cli_command(killed, "--resume", "auto", "-q"), env=env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert_same_run(tmp_path / "straight", tmp_path / "killed")
    assert not [p for p in last.parent.iterdir() if TEMP_MARKER in p.name]


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_130_with_the_resume_command(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "images", per_class=16)
    extra = [*FULL, "train.epochs=6", "data.batch_size=4"]
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "run", data, *extra))
    process = subprocess.Popen(cli_command(config), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not metrics.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert f"tltool finetune {config} --resume auto" in stderr and "Traceback" not in stderr
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved.epoch >= 1
    done = subprocess.run(cli_command(config, "--resume", "auto", "-q"), env=env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt").epoch == 6


def test_resume_with_workers_is_within_tolerance(tmp_path: Path, dataset: Path, monkeypatch) -> None:
    extra = ("train.epochs=2", "data.num_workers=2", "checkpoint.every_n_steps=1")
    run(tmp_path / "straight", dataset, *extra)
    real_save = session_module.save_atomic
    saves = {"n": 0}

    def crash_after_second_save(payload, path):
        real_save(payload, path)
        saves["n"] += 1
        if saves["n"] == 2:
            raise Crash()

    monkeypatch.setattr(session_module, "save_atomic", crash_after_second_save)
    with pytest.raises(Crash):
        run(tmp_path / "resumed", dataset, *extra)
    monkeypatch.setattr(session_module, "save_atomic", real_save)
    run(tmp_path / "resumed", dataset, *extra, resume="auto")
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", exact=False)


def test_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    calls = {"n": 0}

    def fsync_fails_on_second_save(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] >= 3:  # save 1: file + best copy; save 2 fails
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(checkpoint_module.os, "fsync", fsync_fails_on_second_save)
    with pytest.raises(CheckpointError) as exc:
        run(tmp_path / "r", dataset, "train.epochs=3")
    monkeypatch.setattr(checkpoint_module.os, "fsync", real_fsync)
    assert "No space left on device" in exc.value.message()
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt").epoch == 1
    assert not [p for p in (tmp_path / "r" / "checkpoints").iterdir() if TEMP_MARKER in p.name]


def test_sigkill_during_a_save_leaves_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    save_atomic({"format_version": 1, "value": torch.ones(3)}, target)
    script = f"""
import os, signal, torch
import tltool.checkpoint as c
def dying_save(obj, handle):
    handle.write(b"half a checkpoint")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
c.torch.save = dying_save
c.save_atomic({{"value": torch.zeros(3)}}, {str(target)!r})
"""
    done = subprocess.run([sys.executable, "-c", script], env=env(), capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert torch.equal(torch.load(target, weights_only=True)["value"], torch.ones(3))
    stale = [p for p in tmp_path.iterdir() if TEMP_MARKER in p.name]
    assert len(stale) == 1
    assert clean_stale_temps(tmp_path) == stale and target.exists()


def test_resume_refuses_another_architecture_or_other_classes(tmp_path: Path, dataset: Path) -> None:
    run(tmp_path / "r", dataset, "train.epochs=1")
    with pytest.raises(ConfigError) as exc:
        run(tmp_path / "r", dataset, "train.epochs=2", "model.backbone=mobilenet_v3_small", resume="auto")
    assert "model.backbone: 'resnet18' in the checkpoint, 'mobilenet_v3_small' now" in exc.value.message()
    other = make_dataset(tmp_path / "four", classes=4, per_class=6)
    overrides = [o for o in run_overrides(tmp_path / "r", dataset, "train.epochs=2") if not o.startswith("data.train")]
    config = load_config(None, [*overrides, f"data.train={dataset}"])
    moved = config.model_copy(update={"data": config.data.model_copy(update={"train": str(other)})})
    with pytest.raises((CheckpointError, ConfigError)) as exc:
        finetune(moved, resume="auto", quiet=True)
    assert "data.train" in exc.value.message() or "classes" in exc.value.message()


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_from_an_unsafe_checkpoint_is_refused(tmp_path: Path, dataset: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    torch.save({"model": Payload(str(marker))}, tmp_path / "r" / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match="refused.*system"):
        run(tmp_path / "r", dataset, resume="auto")
    assert not marker.exists()


def test_stale_temp_files_are_cleaned_at_the_next_start(tmp_path: Path, dataset: Path) -> None:
    run(tmp_path / "r", dataset, "train.epochs=1")
    stale = tmp_path / "r" / "checkpoints" / f".last.pt{TEMP_MARKER}4242"
    stale.write_bytes(b"torn")
    run(tmp_path / "r", dataset, "train.epochs=2", resume="auto")
    assert not stale.exists()


@pytest.mark.parametrize("links", [True, False])
def test_best_checkpoint_is_a_snapshot_that_later_saves_leave_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, links: bool
) -> None:
    if not links:  # a filesystem without hard links: the bytes are copied
        monkeypatch.setattr(checkpoint_module.os, "link", lambda *a: (_ for _ in ()).throw(OSError("no links")))
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    save_atomic({"epoch": 1, "w": torch.ones(3)}, last)
    checkpoint_module.copy_atomic(last, best)
    assert (os.stat(last).st_ino == os.stat(best).st_ino) is links
    save_atomic({"epoch": 2, "w": torch.zeros(3)}, last)  # the next epoch replaces last.pt
    assert torch.load(best, weights_only=True)["epoch"] == 1
    assert torch.load(last, weights_only=True)["epoch"] == 2
    checkpoint_module.copy_atomic(last, best)  # a later best replaces the snapshot
    assert torch.load(best, weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temp files left
