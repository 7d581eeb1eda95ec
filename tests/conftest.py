"""Shared fixtures: tiny generated ImageFolder datasets with a learnable signal, and run overrides.

Each class has its own colour (plus noise), so "accuracy above chance" after a few steps is a real
assertion. Nothing here reaches the network: tests use `model.weights: none` or weight files they write.
The trained and exported models that test_export.py and test_predict.py share are made here, once per
session (`export_all`, `export_uint8_all`, `trained_checkpoint`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from tltool.checkpoint import save_atomic
from tltool.cli import app
from tltool.config import load_config
from tltool.data import eval_transform, load_image
from tltool.train import finetune
from tltool.trained import open_trained

COLOURS = [(220, 40, 40), (40, 190, 40), (40, 40, 220), (210, 210, 40), (200, 40, 200)]


def make_dataset(
    root: Path,
    classes: int = 3,
    per_class: int = 12,
    size: int = 24,
    suffix: str = ".png",
    seed: int = 0,
) -> Path:
    """Write root/<class>/<i><suffix>: noisy images whose colour gives the class away."""
    rng = np.random.default_rng(seed)
    for index in range(classes):
        folder = root / f"class_{index}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.array(COLOURS[index % len(COLOURS)], dtype=np.float64) + rng.normal(0, 25, (size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}{suffix}")
    return root


def tree_checksum(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime: proves a run wrote nothing into the dataset."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def run_overrides(run_dir: Path, train: Path, *extra: str, val: Path | None = None) -> list[str]:
    """Overrides for a tiny, fast, deterministic CPU run."""
    items = [
        f"run.output_dir={run_dir}",
        "run.device=cpu",
        f"data.train={train}",
        "data.image_size=32",
        "data.resize_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.augment=none",
        "model.backbone=resnet18",
        "model.weights=none",
        "train.epochs=2",
        "train.lr=0.01",
        # fp32: the exact-equality tests compare runs bit for bit (auto may pick bf16 on a CPU with bf16
        # hardware; test_device.py tests that choice).
        "train.precision=fp32",
        "log.progress=false",
    ]
    if val is not None:
        items.append(f"data.val={val}")
    return items + list(extra)


def write_config(path: Path, overrides: list[str]) -> Path:
    """A YAML config file holding the given dotted overrides."""
    data: dict = {}
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        data.setdefault(section, {})[name] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention 3-class dataset shared by the whole session."""
    return make_dataset(tmp_path_factory.mktemp("dataset") / "images")


@pytest.fixture(scope="session")
def split_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Separate train and val folders with the same classes."""
    root = tmp_path_factory.mktemp("split")
    return make_dataset(root / "train", per_class=10, seed=1), make_dataset(root / "val", per_class=4, seed=2)


@pytest.fixture()
def cli() -> CliRunner:
    return CliRunner()


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own working directory with an empty torch hub cache, an empty feature store (never
    the user's ~/.cache/tltool: a test must not reuse another's features, nor leave its own there) and few threads."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("TLTOOL_CACHE_DIR", str(tmp_path / "tltool_cache"))
    monkeypatch.delenv("TLTOOL_CACHE_MAX_MB", raising=False)
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` need a GPU: without one they are reported as skipped, never silently passed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make test-cuda` on a machine with one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def one_thread(_isolated: None) -> None:
    """One torch thread (after `_isolated`'s two): on a shared 2-core machine, two OpenMP threads of tiny
    forward passes wait on each other's descheduled partner, and each forward took 50x longer."""
    torch.set_num_threads(1)


# --- trained and exported models shared by test_export.py and test_predict.py (made once per session) ------

EXPORT_FORMATS = ("onnx", "torchscript", "exported-program", "safetensors")
EXPORT_SUFFIXES = {
    "onnx": ".onnx",
    "torchscript": ".torchscript.pt",
    "exported-program": ".pt2",
    "safetensors": ".safetensors",
}
_SHARED: dict[str, Any] = {}


def shared(key: str, make: Callable[[], Any]) -> Any:
    """`make()` once per session under `key`: the runs and exports both test files use are costly on 2 cores."""
    if key not in _SHARED:
        _SHARED[key] = make()
    return _SHARED[key]


def shared_dataset(factory: pytest.TempPathFactory) -> Path:
    """3 classes x 8 noisy-colour PNGs of exactly 32x32, so a resize to 32 leaves the pixels as they are."""
    return shared("dataset", lambda: make_dataset(factory.mktemp("export_data") / "images", per_class=8, size=32))


def _calibrate_batchnorm(checkpoint_path: Path, dataset: Path) -> None:
    """Give a randomly initialised network's batch norms the data's statistics, and save the checkpoint again.

    Random mobilenet_v3_small with its default running stats (and batch-norm momentum 0.01) maps every
    image to the same output; "all formats give the same top-1" would then hold trivially.
    """
    trained = open_trained(checkpoint_path)
    model = trained.model
    transform = eval_transform(trained.preprocess)
    images = torch.stack([transform(load_image(p)) for p in sorted(dataset.rglob("*.png"))])
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over this one pass
    model.train()
    with torch.no_grad():
        model(images)
    checkpoint = trained.checkpoint
    checkpoint.model = model.state_dict()
    save_atomic(checkpoint.to_dict(), checkpoint_path)


def trained_checkpoint(backbone: str, factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch run of `backbone` on the shared dataset (32 px, resize 32); its best.pt."""

    def make() -> Path:
        dataset = shared_dataset(factory)
        root = factory.mktemp(f"run_{backbone}")
        overrides = run_overrides(root / backbone, dataset, "train.epochs=1", f"model.backbone={backbone}")
        summary = finetune(load_config(None, overrides), quiet=True)
        path = Path(summary["checkpoints"]["best"] or summary["checkpoints"]["last"])
        if backbone.startswith("mobilenet"):
            _calibrate_batchnorm(path, dataset)
        return path

    return shared(f"checkpoint:{backbone}", make)


@dataclasses.dataclass(frozen=True)
class ExportRun:
    """One `tltool export` through the CLI: its checkpoint, what it printed, and the files it wrote."""

    checkpoint: Path
    output: str
    exit_code: int
    paths: dict[str, Path]


def export_all(backbone: str, factory: pytest.TempPathFactory) -> ExportRun:
    """`tltool export CHECKPOINT --format all` (beside the checkpoint for resnet18, under -o for mobilenet)."""

    def make() -> ExportRun:
        checkpoint = trained_checkpoint(backbone, factory)
        args = ["export", str(checkpoint), "--format", "all"]
        stem = checkpoint.with_name("best")
        if backbone != "resnet18":  # --output with several formats is the shared stem
            stem = factory.mktemp("deploy") / "model"
            args += ["--output", str(stem)]
        result = CliRunner().invoke(app, args)
        paths = {f: stem.with_name(stem.name + EXPORT_SUFFIXES[f]) for f in EXPORT_FORMATS}
        return ExportRun(checkpoint, result.output, result.exit_code, paths)

    return shared(f"export-all:{backbone}", make)


def export_uint8_all(factory: pytest.TempPathFactory) -> ExportRun:
    """resnet18 in every format taking raw uint8 NHWC pixels of any size and returning probabilities."""

    def make() -> ExportRun:
        checkpoint = trained_checkpoint("resnet18", factory)
        stem = factory.mktemp("uint8") / "pixels"
        args = ["export", str(checkpoint), "-f", "all", "-o", str(stem)]
        result = CliRunner().invoke(app, [*args, "--include-preprocessing", "--softmax", "--dynamic-size"])
        paths = {f: stem.with_name(stem.name + EXPORT_SUFFIXES[f]) for f in EXPORT_FORMATS}
        return ExportRun(checkpoint, result.output, result.exit_code, paths)

    return shared("export-uint8-all", make)


def run_torchrun(
    command: list[str],
    env: dict[str, str],
    timeout: float = 240,
    processes: int = 2,
    attempts: int = 1,
    reset: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc-per-node=N *command`, its output captured.

    A run that outlives `timeout` is stopped with where every process of it was: each rank and each of their
    loader workers is sent SIGABRT with Python's faulthandler on (PYTHONFAULTHANDLER), which prints every
    thread's stack to stderr (torchrun's), before they and torchrun are killed; the test fails with them.
    With `attempts` > 1 a timed-out run is instead run again (after `reset()`, which removes what it wrote)
    and its stacks are a warning in the suite's summary; the last attempt's timeout fails. (A DDP run with
    loader workers hung once in CI, with nothing to say where, and not in about 200 runs here.)
    """
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    for attempt in range(1, attempts + 1):
        process = subprocess.Popen(
            [*launcher, *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "PYTHONFAULTHANDLER": "1"},
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
            return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            stacks = _abort_with_stacks(process)
        message = f"torchrun ran past {timeout} s (run {attempt} of {attempts}); its processes' stacks:\n{stacks}"
        if attempt == attempts:
            pytest.fail(message, pytrace=False)
        warnings.warn(message, stacklevel=2)
        if reset is not None:
            reset()
    raise AssertionError("unreachable")


def _abort_with_stacks(process: subprocess.Popen) -> str:
    """Stop a hung torchrun: its ranks and their workers print their stacks (SIGABRT, faulthandler), then all
    are killed. Returns the end of its stderr and stdout."""
    os.kill(process.pid, signal.SIGSTOP)  # (torchrun must not stop the ranks before they print)
    ranks = _descendants(process.pid)  # (each rank is in a session of its own)
    for pid in ranks:  # one at a time: their stacks are not interleaved
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGABRT)
        time.sleep(1)
    for pid in [process.pid, *ranks]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    stdout, stderr = process.communicate()
    return f"{stderr[-12000:]}\nstdout: {stdout[-2000:]}"


def _descendants(root: int) -> list[int]:
    """The processes below `root` (children first), from /proc/PID/stat's parent field: torchrun's ranks and
    their loader workers."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    found, queue = [], [root]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found
