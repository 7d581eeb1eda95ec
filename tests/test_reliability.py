"""Nothing lost, nothing executed: kills, Ctrl-C, full disks, mid-epoch resume, unsafe and mismatched files."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tltool.checkpoint as checkpoint_module
import tltool.files as files_module
import tltool.session as session_module
from conftest import make_dataset, run_overrides, write_config
from tltool import distributed
from tltool.checkpoint import TEMP_MARKER, Checkpoint, clean_stale_temps, load_checkpoint, save_atomic
from tltool.cli import app
from tltool.config import load_config
from tltool.errors import CheckpointError, ConfigError, TrainingError
from tltool.evaluate import run_eval
from tltool.files import FileWriteError
from tltool.runstate import (
    append_metrics,
    check_run_directory,
    open_resume,
    prepare_run_directory,
    read_metrics,
    tensor_bytes,
)
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


def torch_writer_enospc(obj: object, handle) -> None:
    """What torch.save does on a full disk: part of the file written, then a RuntimeError around the OSError."""
    handle.write(b"half a checkpoint")
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") from None


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if TEMP_MARKER in p.name]


def test_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = session_module.save_atomic
    saves = {"n": 0}

    def second_save_hits_a_full_disk(payload, path):
        saves["n"] += 1
        if saves["n"] == 2:
            monkeypatch.setattr(checkpoint_module.torch, "save", torch_writer_enospc)
        real_save(payload, path)

    monkeypatch.setattr(session_module, "save_atomic", second_save_hits_a_full_disk)
    with pytest.raises(CheckpointError) as exc:
        run(tmp_path / "r", dataset, "train.epochs=3", "checkpoint.save_best=false")
    message = exc.value.message()
    assert len(message.splitlines()) == 1 and "last.pt: no space left on device" in message, message
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt").epoch == 1
    assert not temp_files(tmp_path / "r")


@pytest.mark.parametrize("cause", ["oserror", "torch-runtime-error", "torch-without-errno"])
def test_every_kind_of_full_disk_is_one_line_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cause: str
) -> None:
    """torch raises a RuntimeError (with or without the OSError in its context), Python an OSError: all one line."""
    target = tmp_path / "last.pt"
    save_atomic({"w": torch.ones(3)}, target)

    def plain_enospc(obj: object, handle) -> None:
        handle.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def bare_torch_failure(obj: object, handle) -> None:
        handle.write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    failing = {"oserror": plain_enospc, "torch-runtime-error": torch_writer_enospc}.get(cause, bare_torch_failure)
    if cause == "torch-without-errno":  # the error names no cause: a nearly full disk says which
        monkeypatch.setattr(files_module.shutil, "disk_usage", lambda path: SimpleNamespace(total=10, used=10, free=0))
    monkeypatch.setattr(checkpoint_module.torch, "save", failing)
    with pytest.raises(CheckpointError) as exc:
        save_atomic({"w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert exc.value.message().splitlines() == [
        f"error: cannot write {target}: no space left on device — "
        "free disk space or fix permissions; the previous checkpoint is untouched"
    ]
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_bug_inside_a_save_is_not_called_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def buggy(obj: object, handle) -> None:
        handle.write(b"half")
        raise RuntimeError("an unrelated bug")

    monkeypatch.setattr(checkpoint_module.torch, "save", buggy)
    with pytest.raises(RuntimeError, match="an unrelated bug"):
        save_atomic({"w": torch.zeros(3)}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []  # its temp file is gone all the same


def can_mount_tmpfs(folder: Path) -> bool:
    """Whether this machine lets an unprivileged user namespace mount a tmpfs (Linux with user namespaces)."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    probe = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"', str(folder)]
    return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


def test_a_real_full_tmpfs_gives_one_line_and_keeps_every_file(tmp_path: Path) -> None:
    """The ENOSPC of a real 256 KiB file system: a checkpoint, config.yaml and a metrics line that do not fit."""
    small = tmp_path / "small"
    small.mkdir()
    if not can_mount_tmpfs(small):
        pytest.skip("cannot mount a tmpfs here (no user namespaces); the injected-error tests cover the writer")
    script = f"""
import os, torch
from tltool.checkpoint import save_atomic
from tltool.errors import TltoolError
from tltool.files import append_durable, write_text_atomic
d = {str(small)!r}
save_atomic({{"w": torch.ones(10)}}, d + "/last.pt")
write_text_atomic(d + "/config.yaml", "epochs: 1\\n")
append_durable(d + "/metrics.jsonl", '{{"epoch": 1}}\\n')
for write in (lambda: save_atomic({{"w": torch.ones(200_000)}}, d + "/last.pt"),
              lambda: write_text_atomic(d + "/config.yaml", "x" * 400_000),
              lambda: append_durable(d + "/metrics.jsonl", "y" * 400_000)):
    try:
        write()
        print("written")
    except TltoolError as exc:
        print(exc.message())
print(torch.load(d + "/last.pt", weights_only=True)["w"].sum().item())
print(open(d + "/config.yaml").read().strip(), open(d + "/metrics.jsonl").read().strip())
print(sorted(os.listdir(d)))
"""
    command = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=256k tmpfs "$0" && exec "$1" -c "$2"']
    done = subprocess.run([*command, str(small), sys.executable, script], env=env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 6 and "Traceback" not in done.stderr, done.stdout + done.stderr
    for line, name in zip(lines[:3], ("last.pt", "config.yaml", "metrics.jsonl"), strict=True):
        assert line.startswith(f"error: cannot write {small}/{name}: no space left on device"), line
    assert lines[3:] == ["10.0", 'epochs: 1 {"epoch": 1}', "['config.yaml', 'last.pt', 'metrics.jsonl']"]


def test_an_unwritable_run_directory_is_one_line_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = load_config(None, [f"run.output_dir={blocker / 'run'}"])
    with pytest.raises(TrainingError, match=re.escape(f"cannot create {blocker / 'run'}: {blocker} is a file, not a")):
        prepare_run_directory(cfg, ["a", "b"], 0, writes=True)
    assert blocker.read_text() == "not a folder"
    # A disk that fills up at config.yaml: one line, and no .config.yaml.tmp-PID left behind.
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}"])
    monkeypatch.setattr(files_module.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(TrainingError) as exc:
        prepare_run_directory(cfg, ["a", "b"], 0, writes=True)
    monkeypatch.undo()
    assert exc.value.message().startswith(f"error: cannot write {tmp_path / 'run' / 'config.yaml'}: no space left")
    assert list((tmp_path / "run").iterdir()) == []


def test_eval_json_to_an_unwritable_place_fails_before_evaluating(tmp_path: Path, cli) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # The checkpoint does not even exist: the --json check comes first, so no evaluation is wasted.
    with pytest.raises(FileWriteError, match="is a file, not a folder"):
        run_eval(tmp_path / "missing.pt", json_path=str(blocker / "metrics.json"))
    result = cli.invoke(app, ["eval", str(tmp_path / "missing.pt"), "--json", str(blocker / "m.json")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output


def test_the_run_directory_is_checked_for_writing_and_room_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = torch.nn.Linear(1000, 250)  # 1,001,000 bytes of weights
    size = tensor_bytes(model.state_dict())
    assert size == 4 * (1000 * 250 + 250)
    check_run_directory(tmp_path / "run", size)  # plenty of room: creates the folder, writes nothing else
    assert list((tmp_path / "run").iterdir()) == []
    monkeypatch.setattr(
        files_module.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=1_500_000)
    )
    with pytest.raises(TrainingError) as exc:
        check_run_directory(tmp_path / "run", size)
    assert exc.value.message().startswith(
        f"error: {tmp_path / 'run'} has 1.5 MB free; saving a checkpoint needs about 2.0 MB"
    )
    check_run_directory(tmp_path / "run", size, copies=1)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(TrainingError, match="is a file, not a folder"):
        check_run_directory(blocker / "run", size)


# --- metrics.jsonl ------------------------------------------------------------------------------------------


def test_a_torn_metrics_line_is_dropped_and_best_pt_is_offered_when_last_pt_is_gone(
    tmp_path: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(tmp_path / "r", dataset, "train.epochs=1")
    metrics = tmp_path / "r" / "metrics.jsonl"
    with open(metrics, "a", encoding="utf-8") as handle:
        handle.write('{"epoch": 2, "train_lo')  # a crash in the middle of epoch 2's line
    run(tmp_path / "r", dataset, "train.epochs=2", resume="auto")
    assert f"warning: {metrics} line 2 is torn" in capsys.readouterr().err
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2]
    # last.pt lost, best.pt kept: the advice is a command that works, not "start without --resume".
    best = tmp_path / "r" / "checkpoints" / "best.pt"
    (tmp_path / "r" / "checkpoints" / "last.pt").unlink()
    with pytest.raises(CheckpointError) as exc:
        run(tmp_path / "r", dataset, "train.epochs=3", resume="auto")
    assert f"--resume {best}" in exc.value.message() and "without --resume" not in exc.value.message()
    with pytest.raises(ConfigError, match=re.escape(f"--resume {best}")):
        run(tmp_path / "r", dataset, "train.epochs=3")
    run(tmp_path / "r", dataset, "train.epochs=3", resume=str(best))
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt").epoch == 3
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2, 3]


def test_a_run_directory_without_checkpoints_says_how_to_start_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
    cfg = load_config(None, [f"run.output_dir={run_dir}"])
    world = distributed.World()
    with pytest.raises(CheckpointError) as resumed:
        open_resume(cfg, "auto", ["a", "b"], world)
    with pytest.raises(ConfigError) as fresh:
        open_resume(cfg, None, ["a", "b"], world)
    for exc in (resumed, fresh):  # neither points at a command that the next one refuses
        fix = exc.value.fix
        assert f"remove {run_dir}" in fix and "run.name" in fix and "--resume" not in fix, fix
    (run_dir / "metrics.jsonl").unlink()
    with pytest.raises(
        CheckpointError, match=r"no checkpoint in .* \(it holds no run\) — start the run without --resume"
    ):
        open_resume(cfg, "auto", ["a", "b"], world)
    assert open_resume(cfg, None, ["a", "b"], world) is None


def test_metrics_damaged_before_the_last_line_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(CheckpointError, match="line 2 is not an epoch record") as exc:
        read_metrics(path)
    assert len(exc.value.message().splitlines()) == 1
    path.write_text('{"epoch": 1}\n\xff\xfe')
    warnings: list[str] = []
    assert read_metrics(path, warnings.append) == [{"epoch": 1}] and "line 2 is torn" in warnings[0]


def test_append_metrics_is_fsynced_and_a_failed_append_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync, real_write = os.fsync, os.write
    monkeypatch.setattr(files_module.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    append_metrics(tmp_path, {"epoch": 1, "val_acc1": 0.5})
    assert synced and read_metrics(tmp_path / "metrics.jsonl") == [{"epoch": 1, "val_acc1": 0.5}]
    before = (tmp_path / "metrics.jsonl").read_bytes()

    def half_then_full(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data[:7]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files_module.os, "write", half_then_full)
    with pytest.raises(TrainingError, match="metrics.jsonl: no space left on device"):
        append_metrics(tmp_path, {"epoch": 2, "val_acc1": 0.6})
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


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
