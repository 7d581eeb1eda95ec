"""Data-parallel training under torchrun, on CPU with two gloo processes.

The end-to-end tests launch the real `torchrun --nproc_per_node 2 -m tltool finetune` (or `tltool finetune
--nproc 2`) on a tiny dataset. A 2-process run with batch B sees exactly the samples of a 1-process run with
batch 2B at every step (each rank takes every second index of the same order), so with a frozen backbone
(no batch statistics) their losses and weights agree to float precision.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_dataset, run_overrides, run_torchrun, write_config
from tltool.checkpoint import load_checkpoint, save_atomic
from tltool.cli import app
from tltool.config import load_config
from tltool.data import BalancedSampler, EpochSampler
from tltool.distributed import World, launch, shard_bounds
from tltool.train import finetune

# Per-process batch 4 on 2 processes against batch 8 in one; no dropout, no augmentation.
DDP = ("train.feature_cache=off", "data.batch_size=4", "train.epochs=2")
ONE = ("train.feature_cache=off", "data.batch_size=8", "train.epochs=2")

# A launcher that makes rank 1 fail at the start of epoch 2 (after epoch 1 was saved), as a test of how
# the job ends: TLTOOL_TEST_FAULT=raise raises there; =kill SIGKILLs the process on torchrun's first attempt;
# =interrupt sends it (and only it) a SIGINT.
FAULTY_LAUNCHER = """
import os, signal, sys
import tltool.train as train

original = train.train_one_epoch

def faulty(*args, **kwargs):
    state = args[0].state
    fault = os.environ["TLTOOL_TEST_FAULT"]
    if os.environ["RANK"] == "1" and state.epoch == 1:
        if fault == "raise":
            raise RuntimeError("injected failure on rank 1")
        if fault == "kill" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "interrupt":  # Ctrl-C reaching this rank only
            os.kill(os.getpid(), signal.SIGINT)
    return original(*args, **kwargs)

train.train_one_epoch = faulty
from tltool.cli import main
sys.argv = ["tltool", *sys.argv[1:]]
main()
"""


# --- samplers and shards ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 7, 10])
@pytest.mark.parametrize("world", [2, 3])
def test_training_shards_are_padded_strides_of_one_order(size: int, world: int) -> None:
    single = EpochSampler(size, seed=3)
    single.set_epoch(5)
    order = list(single)
    shards = []
    for rank in range(world):
        sampler = EpochSampler(size, seed=3, shard=(rank, world), pad=True)
        sampler.set_epoch(5)
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1]) == (-(-size // world) if size else 0)
    # Interleaved back, the shards are the single process's order (extended by its own start).
    merged = [shards[r][i] for i in range(len(shards[0])) for r in range(world)]
    assert merged[:size] == order
    assert merged[size:] == (order * world)[: len(merged) - size]


def test_training_shard_skip_resumes_each_rank_mid_epoch() -> None:
    for rank in range(2):
        full = EpochSampler(11, seed=0, shard=(rank, 2))
        full.set_epoch(1)
        skipped = EpochSampler(11, seed=0, shard=(rank, 2))
        skipped.set_epoch(1, skip=4)
        assert list(skipped) == list(full)[4:] and len(skipped) == len(full) - 4


def test_evaluation_shards_see_each_sample_once() -> None:
    parts = [list(EpochSampler(11, seed=0, shuffle=False, shard=(r, 3), pad=False)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))
    assert [len(p) for p in parts] == [4, 4, 3]


def test_balanced_sampler_shards_one_draw() -> None:
    labels = [0] * 9 + [1]
    whole = BalancedSampler(labels, seed=1)
    parts = [BalancedSampler(labels, seed=1, shard=(r, 2)) for r in range(2)]
    merged = [parts[r].indices()[i] for i in range(5) for r in range(2)]
    assert merged == whole.indices()


def test_shard_bounds_cover_the_set_in_order() -> None:
    bounds = [shard_bounds(10, World(rank, 3)) for rank in range(3)]
    assert bounds == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(1, World(1, 2)) == (1, 1)


# --- end to end ---------------------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    # One thread per process: two processes on two cores (torchrun sets the same when it is unset).
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def torchrun(*args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_torchrun(list(args), env or _env(), timeout)


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def one_and_two_processes(root: Path, data: Path, *extra: str) -> tuple[list[dict], list[dict]]:
    """The same run as one process at batch 8 (root/one) and under torchrun as 2 x 4 (root/two): their
    metrics.jsonl lines (two, one)."""
    finetune(load_config(None, run_overrides(root / "one", data, *ONE, *extra)), quiet=True)
    config = write_config(root / "ddp.yaml", run_overrides(root / "two", data, *DDP, *extra))
    result = torchrun("-m", "tltool", "finetune", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return lines(root / "two"), lines(root / "one")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ddp") / "images")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """The reference: one process, batch 8."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    finetune(load_config(None, run_overrides(run_dir, data, *ONE)), quiet=True)
    return run_dir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory, data: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """torchrun, 2 processes x batch 4."""
    root = tmp_path_factory.mktemp("two")
    config = write_config(root / "ddp.yaml", run_overrides(root / "run", data, *DDP))
    result = torchrun("-m", "tltool", "finetune", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", result


@pytest.mark.slow
def test_two_processes_train_as_one_with_the_global_batch(one_process: Path, two_processes) -> None:
    run_dir, result = two_processes
    two, one = lines(run_dir), lines(one_process)
    assert [r["global_step"] for r in two] == [r["global_step"] for r in one]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc1", "val_acc5"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-6), key
    a, b = (
        load_checkpoint(run_dir / "checkpoints" / "last.pt"),
        load_checkpoint(one_process / "checkpoints" / "last.pt"),
    )
    assert a.model.keys() == b.model.keys()  # the unwrapped model: no "module." prefix
    for key, value in a.model.items():
        torch.testing.assert_close(value, b.model[key], rtol=1e-5, atol=1e-6)
    assert a.world_size == 2 and len(a.rank_states) == 2
    # One set of files, one set of lines: only rank 0 writes and prints.
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "classes.json", "config.yaml",
                                                         "metrics.jsonl", "summary.json"]  # fmt: skip
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert len(lines(run_dir)) == 2
    assert result.stdout.count("epoch 1/2") == 1 and result.stdout.count("best epoch") == 1
    assert "2 processes x batch 4 = global batch 8" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 8


@pytest.mark.slow
def test_ddp_checkpoint_evaluates_and_resumes_in_one_process(two_processes, data: Path, cli, tmp_path: Path) -> None:
    run_dir, _ = two_processes
    report = tmp_path / "eval.json"
    result = cli.invoke(app, ["eval", str(run_dir / "checkpoints" / "last.pt"), "--device", "cpu", "--json",
                              str(report)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["acc1"] == lines(run_dir)[-1]["val_acc1"]
    # An end-of-epoch checkpoint of 2 processes goes on in 1 (a copy of the run, moved to a new directory).
    copy = tmp_path / "copy"
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    checkpoint.config["run"]["output_dir"] = str(copy)
    save_atomic(checkpoint.to_dict(), copy / "checkpoints" / "last.pt")
    (copy / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
    config = write_config(tmp_path / "resume.yaml", run_overrides(copy, data, *DDP[:-1], "train.epochs=3"))
    result = cli.invoke(app, ["finetune", str(config), "--resume", "auto", "--quiet"])
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in lines(copy)] == [1, 2, 3]


def test_mid_epoch_checkpoint_of_another_world_size_is_refused(tmp_path: Path, dataset: Path, cli) -> None:
    run_dir = tmp_path / "run"
    overrides = run_overrides(run_dir, dataset, "train.epochs=1")
    finetune(load_config(None, overrides), quiet=True)
    path = run_dir / "checkpoints" / "last.pt"
    checkpoint = load_checkpoint(path)
    progress = {"batches_done": 1, "loss_sum": 1.0, "correct": 1, "seen": 8, "data_seconds": 0.0, "seconds": 0.1}
    checkpoint = dataclasses.replace(checkpoint, world_size=2, epoch=0, epoch_progress=progress)
    save_atomic(checkpoint.to_dict(), path)
    before = path.read_bytes()
    result = cli.invoke(app, ["finetune", str(write_config(tmp_path / "c.yaml", overrides)), "--resume", "auto"])
    assert result.exit_code == 2
    assert "saved mid-epoch by 2 process(es); this run has 1" in result.output
    assert "Traceback" not in result.output and path.read_bytes() == before


@pytest.mark.slow
def test_nproc_with_the_feature_cache_gives_the_single_process_result(
    one_process: Path, data: Path, tmp_path: Path
) -> None:
    cached = ("train.feature_cache=on", "data.batch_size=4", "train.epochs=2")
    config = write_config(tmp_path / "cache.yaml", run_overrides(tmp_path / "run", data, *cached))
    command = [sys.executable, "-m", "tltool", "finetune", str(config), "--nproc", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("feature cache:") == 1
    two, one = lines(tmp_path / "run"), lines(one_process)
    for key in ("train_loss", "val_loss", "val_acc1"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_a_rank_that_raises_ends_the_job_non_zero_in_bounded_time(data: Path, tmp_path: Path) -> None:
    launcher = tmp_path / "faulty.py"
    launcher.write_text(FAULTY_LAUNCHER)
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "run", data, *DDP, "run.dist_timeout_s=60"))
    start = time.monotonic()
    result = torchrun(str(launcher), "finetune", str(config), env=_env(TLTOOL_TEST_FAULT="raise"), timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - start < 90
    assert "injected failure on rank 1" in result.stderr
    assert len(lines(tmp_path / "run")) == 1  # epoch 1 was saved before the failure, and is intact
    load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")


@pytest.mark.slow
def test_a_killed_rank_restarts_and_the_job_ends_as_an_uninterrupted_one(two_processes, data: Path, tmp_path: Path):
    launcher = tmp_path / "faulty.py"
    launcher.write_text(FAULTY_LAUNCHER)
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "run", data, *DDP))
    result = torchrun("--max-restarts=1", str(launcher), "finetune", str(config), env=_env(TLTOOL_TEST_FAULT="kill"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torchrun restart 1: resuming from checkpoints/last.pt" in result.stdout
    reference, _ = two_processes
    a, b = (
        load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt"),
        load_checkpoint(reference / "checkpoints" / "last.pt"),
    )
    for key, value in a.model.items():
        assert torch.equal(value, b.model[key]), key
    assert [r["val_loss"] for r in lines(tmp_path / "run")] == [r["val_loss"] for r in lines(reference)]


@pytest.mark.slow
def test_bad_inputs_under_nproc_are_one_line_and_exit_2(data: Path, tmp_path: Path) -> None:
    # sync_batchnorm needs CUDA: both processes refuse it before training, and the launcher exits 2.
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "run", data, "train.freeze=none",
                                                             "train.sync_batchnorm=true"))  # fmt: skip
    command = [sys.executable, "-m", "tltool", "finetune", str(config), "--nproc", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=_env())
    assert result.returncode == 2, result.stderr[-3000:]
    assert "train.sync_batchnorm needs CUDA" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_launch_reports_the_first_failure_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failing(args) -> None:
        failure = ProcessFailure(local_rank=1, pid=1, exitcode=-9, error_file="/nonexistent")
        raise ChildFailedError("tltool", {1: failure})

    monkeypatch.setattr("torch.distributed.run.run", failing)
    assert launch(2, ["finetune", "x.yaml"]) == 137  # killed by SIGKILL: 128 + 9


def test_nproc_inside_torchrun_is_refused(cli, tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "run", dataset))
    result = cli.invoke(app, ["finetune", str(config), "--nproc", "2"])
    assert result.exit_code == 2 and "--nproc under torchrun" in result.output


@pytest.mark.slow
def test_a_batch_that_fails_to_decode_on_one_rank_is_skipped_by_all(tmp_path: Path) -> None:
    # Batch 1 per process: the truncated JPEG's batch is empty on its rank, and both ranks skip that step
    # (had only one skipped, the other would wait in the gradient all-reduce until the timeout).
    root = make_dataset(tmp_path / "images", classes=2, per_class=5)
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "class_0" / "cut.jpg")
    data = (root / "class_0" / "cut.jpg").read_bytes()
    (root / "class_0" / "cut.jpg").write_bytes(data[: len(data) // 2])
    val = make_dataset(tmp_path / "val", classes=2, per_class=2, seed=1)
    overrides = run_overrides(tmp_path / "run", root, "train.feature_cache=off", "data.batch_size=1",
                              "train.epochs=1", "run.dist_timeout_s=60", val=val)  # fmt: skip
    config = write_config(tmp_path / "c.yaml", overrides)
    result = torchrun("-m", "tltool", "finetune", str(config), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cut.jpg: cannot decode" in result.stderr
    assert len(lines(tmp_path / "run")) == 1


@pytest.mark.slow
def test_ctrl_c_on_one_rank_stops_all_mid_epoch_and_the_resumed_job_ends_as_an_uninterrupted_one(
    two_processes, data: Path, tmp_path: Path
) -> None:
    launcher = tmp_path / "faulty.py"
    launcher.write_text(FAULTY_LAUNCHER)
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "run", data, *DDP))
    result = torchrun(str(launcher), "finetune", str(config), env=_env(TLTOOL_TEST_FAULT="interrupt"))
    assert result.returncode != 0
    assert "stopped at epoch 2, batch 1" in result.stderr  # both ranks stopped at the same step
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert checkpoint.epoch_progress["batches_done"] == 1 and len(checkpoint.rank_states) == 2
    result = torchrun("-m", "tltool", "finetune", str(config), "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    reference, _ = two_processes
    a = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt").model
    b = load_checkpoint(reference / "checkpoints" / "last.pt").model
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
    assert [r["train_loss"] for r in lines(tmp_path / "run")] == [r["train_loss"] for r in lines(reference)]


@pytest.mark.slow
def test_a_second_stream_trains_with_two_processes_as_with_one_at_twice_the_batch(
    tmp_path_factory: pytest.TempPathFactory, data: Path
) -> None:
    """adapt.unlabeled under torchrun: each rank draws its shard of the unlabelled order, and MCC's class
    confusion is computed over the global batch, so 2 x 4 trains as 1 x 8."""
    root = tmp_path_factory.mktemp("adapt")
    target = make_dataset(root / "target", classes=3, per_class=4, size=24, seed=5)
    extra = (f"adapt.unlabeled={target}", "adapt.method=mcc", "adapt.warmup=none")
    a, b = one_and_two_processes(root, data, *extra)
    one = root / "one"
    for key in ("train_loss", "val_loss", "val_acc1"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-5, abs=1e-6), key
    assert [r["loss_terms"]["mcc"] for r in a] == pytest.approx([r["loss_terms"]["mcc"] for r in b], rel=1e-5)
    two_model = load_checkpoint(root / "two" / "checkpoints" / "last.pt").model
    for key, value in load_checkpoint(one / "checkpoints" / "last.pt").model.items():
        torch.testing.assert_close(two_model[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_cotuning_trains_with_two_processes_as_with_one_at_twice_the_batch(
    tmp_path_factory: pytest.TempPathFactory, data: Path
) -> None:
    """Co-Tuning under torchrun: every rank estimates the same relation (from all training images) and the source
    head's loss is averaged over the global batch, so 2 x 4 trains as 1 x 8."""
    import torchvision

    root = tmp_path_factory.mktemp("cotuning")
    torch.manual_seed(3)
    net = torchvision.models.resnet18(num_classes=7)
    with torch.no_grad():
        net.fc.weight.mul_(20)
    torch.save(net.state_dict(), root / "w.pt")
    # (train.bn_policy=frozen: batch norm statistics of 4 images per rank are not those of 8; the rest must agree)
    extra = (f"model.weights={root / 'w.pt'}", "train.freeze=none", "train.cotuning_weight=2",
             "train.bn_policy=frozen", "data.image_size=16", "data.resize_size=16")  # fmt: skip
    a, b = one_and_two_processes(root, data, *extra)
    one = root / "one"
    for key in ("train_loss", "val_loss", "val_acc1"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4, abs=1e-5), key
    cot = [[r["loss_terms"]["cotuning"] for r in x] for x in (a, b)]
    assert cot[0] == pytest.approx(cot[1], rel=1e-4)
    relation = [load_checkpoint(run / "checkpoints" / "last.pt").loss_terms["cotuning"]["relation"]
                for run in (root / "two", one)]  # fmt: skip
    torch.testing.assert_close(relation[0], relation[1], rtol=1e-5, atol=1e-6)
