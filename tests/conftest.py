"""Shared fixtures: tiny generated ImageFolder datasets with a learnable signal, and run overrides.

Each class has its own colour (plus noise), so "accuracy above chance" after a few steps is a real
assertion. Nothing here reaches the network: tests use `model.weights: none` or weight files they write.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

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
    """Each test runs in its own working directory with an empty torch hub cache and few threads."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
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
