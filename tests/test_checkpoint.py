"""Checkpoints: the Checkpoint dataclass survives a real weights_only file, and files of format 1 still load.

The file is a plain dict (`Checkpoint.to_dict()`); before the dataclass, the writer put exactly the 26
keys of OLD_KEYS in it. Every later key must have a default, so those files keep loading.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tltool.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    load_checkpoint,
    rng_state,
    save_atomic,
    state_dict_mismatch,
)
from tltool.config import load_config
from tltool.data.fingerprint import make_fingerprint
from tltool.errors import CheckpointError
from tltool.models import build_model
from tltool.trained import open_trained

# What runstate.checkpoint_payload wrote before the Checkpoint dataclass (format 1).
OLD_KEYS = (
    "format_version",
    "tltool_version",
    "torch_version",
    "config",
    "class_names",
    "preprocess",
    "arch",
    "weights_source",
    "model",
    "trainable",
    "frozen_modules",
    "optimizer",
    "scheduler",
    "scaler",
    "epoch",
    "global_step",
    "best_metric",
    "best_epoch",
    "early_stopping",
    "epoch_progress",
    "metrics",
    "rng",
    "world_size",
    "rank_states",
    "transfer",
    "l2sp_reference",
)


def assert_same(a: Any, b: Any, where: str = "checkpoint") -> None:
    """Equal values, tensors compared exactly, containers element by element."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b and type(a) is type(b), where


def stepped_state() -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """A model, optimizer and scheduler state after one real step: the tensors and nesting a run saves."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model.state_dict(), optimizer.state_dict(), scheduler.state_dict()


def full_checkpoint() -> Checkpoint:
    """A checkpoint with every field set to something other than its default."""
    model, optimizer, scheduler = stepped_state()
    progress = {"loss_sum": 1.5, "hits": 3, "images": 8, "batches": 1}
    return Checkpoint(
        config={"data": {"train": "data/x", "val_split": 0.2}, "run": {"seed": 3}},
        class_names=["cat", "dog", "eel"],
        preprocess={"image_size": 32, "resize_size": 36, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "x"},
        arch={"backbone": "resnet18", "kwargs": {}, "num_classes": 3, "head_dropout": 0.0, "in_features": 4},
        model=model,
        weights_source="torchvision ResNet18_Weights.IMAGENET1K_V1",
        format_version=FORMAT_VERSION,
        tltool_version="0.1.0",
        torch_version="2.14.1",
        trainable=["0.weight", "0.bias"],
        frozen_modules=["1"],
        optimizer=optimizer,
        scheduler=scheduler,
        scaler={"scale": 1024.0, "growth_tracker": 2},
        epoch=4,
        global_step=17,
        best_metric=0.75,
        best_epoch=3,
        early_stopping={"bad_epochs": 1},
        epoch_progress=progress,
        metrics={"epoch": 4, "val_acc1": 0.7},
        rng=rng_state(),
        world_size=2,
        rank_states=[{"rng": rng_state(), "epoch_progress": progress}, {"rng": rng_state(), "epoch_progress": None}],
        transfer={"opened": ["layer4"], "step": 12},
        l2sp_reference={"0.weight": torch.ones(3, 4)},
        loss_terms={"toy": {"count": torch.tensor(2)}},
        initial_model={"0.weight": torch.zeros(3, 4)},
        data_fingerprint=make_fingerprint(
            {"train": {"cat": {"paths": torch.tensor([-5, 7]), "sizes": torch.tensor([100, 120])}}},
            torch.tensor([7]),
        ),
    )


def test_a_checkpoint_round_trips_through_a_weights_only_file(tmp_path: Path) -> None:
    original = full_checkpoint()
    save_atomic(original.to_dict(), tmp_path / "last.pt")
    raw = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert type(raw) is dict  # the file holds plain data, no tltool class
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert isinstance(loaded, Checkpoint)
    assert_same(loaded.to_dict(), original.to_dict())
    assert loaded.mid_epoch and loaded.rank_state(1)["epoch_progress"] is None


def test_the_file_has_the_26_keys_of_format_1_and_the_later_ones() -> None:
    assert len(set(OLD_KEYS)) == 26
    later = {"loss_terms", "initial_model", "bn_stats", "ema", "weights", "raw_model", "data_fingerprint"}
    later.add("temperature")  # calibration.py
    later.add("thresholds")  # multilabel.threshold_run
    assert set(full_checkpoint().to_dict()) == {*OLD_KEYS, *later}


def test_a_checkpoint_written_before_loss_terms_loads_with_its_default(tmp_path: Path) -> None:
    """The dict of the writer before the dataclass: exactly the 26 keys, no `loss_terms`."""
    old = {key: value for key, value in full_checkpoint().to_dict().items() if key in OLD_KEYS}
    assert len(old) == 26
    torch.save(old, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded.loss_terms is None and loaded.initial_model is None and loaded.bn_stats is None
    assert loaded.ema is None and loaded.weights == "raw" and loaded.resumable() is loaded
    assert loaded.data_fingerprint is None and loaded.temperature is None and loaded.thresholds is None
    assert_same({key: value for key, value in loaded.to_dict().items() if key in OLD_KEYS}, old)


def test_a_minimal_old_checkpoint_loads_with_the_resume_defaults(tmp_path: Path) -> None:
    """Only what eval needs: every resume field takes its default (a fresh run's values)."""
    full = full_checkpoint().to_dict()
    minimal = {key: full[key] for key in ("format_version", "config", "class_names", "preprocess", "arch", "model")}
    torch.save(minimal, tmp_path / "minimal.pt")
    loaded = load_checkpoint(tmp_path / "minimal.pt")
    assert (loaded.epoch, loaded.global_step, loaded.optimizer, loaded.rank_states) == (0, 0, None, None)
    assert loaded.early_stopping == {"bad_epochs": 0} and loaded.weights_source == "checkpoint"
    assert not loaded.mid_epoch


class Payload:
    """A pickle that would run a shell command when loaded unsafely."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_bad_files_are_one_line_checkpoint_errors(tmp_path: Path) -> None:
    newer = full_checkpoint().to_dict() | {"format_version": FORMAT_VERSION + 1}
    torch.save(newer, tmp_path / "newer.pt")
    torch.save({"just": torch.zeros(1)}, tmp_path / "plain.pt")
    torch.save({"model": Payload(str(tmp_path / "pwned"))}, tmp_path / "evil.pt")
    torch.save(newer, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # old format: still read
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, message in (
        ("newer.pt", f"has checkpoint format {FORMAT_VERSION + 1}, newer than this tltool reads"),
        ("legacy.pt", f"has checkpoint format {FORMAT_VERSION + 1}, newer than this tltool reads"),
        ("plain.pt", "is not a valid tltool checkpoint"),
        ("evil.pt", "refused"),
        ("empty.pt", "the file is empty"),
        ("missing.pt", "does not exist"),
    ):
        with pytest.raises(CheckpointError, match=re.escape(message)) as caught:
            load_checkpoint(tmp_path / name)
        assert len(caught.value.message().splitlines()) == 1, name
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("dropped", [("config",), ("preprocess",), ("config", "preprocess")])
def test_a_checkpoint_without_a_required_key_is_a_one_line_error(tmp_path: Path, dropped: tuple[str, ...]) -> None:
    """It has format_version, model, arch and class_names, so it looks like a tltool checkpoint, but cannot be read."""
    full = full_checkpoint().to_dict()
    torch.save({key: value for key, value in full.items() if key not in dropped}, tmp_path / "cut.pt")
    with pytest.raises(
        CheckpointError, match=re.escape(f"not a valid tltool checkpoint (missing {', '.join(dropped)})")
    ) as caught:
        load_checkpoint(tmp_path / "cut.pt")
    assert len(caught.value.message().splitlines()) == 1
    assert "use an intact copy" in caught.value.message()
    # The same file as the source weights of a new run: the same one line.
    cfg = load_config(None, ["data.train=.", "model.backbone=resnet18", f"model.weights={tmp_path / 'cut.pt'}"])
    with pytest.raises(CheckpointError, match=re.escape(f"(missing {', '.join(dropped)})")):
        build_model(cfg.model, cfg.data, 3)


# --- hostile and odd files: every failure is one line, and none suggests weights_only=False ---------------


def hostile_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the one-line error must say)."""
    marker = str(folder / "pwned")
    files: dict[str, tuple[Path, str]] = {}

    def add(name: str, expected: str, write: Any) -> None:
        path = folder / name
        write(path)
        files[name] = (path, expected)

    add("text-t.pt", "it is a text file", lambda p: p.write_text("this is not a checkpoint\n"))
    add("text-a.pt", "it is a text file", lambda p: p.write_text("a = 1\n"))
    add("random.pt", "not a PyTorch file", lambda p: p.write_bytes(bytes(range(256)) * 3))
    add("sidecar.pt.json", "it is a JSON file", lambda p: p.write_text(json.dumps({"format": "onnx"})))
    add("pickle.pt", "refused: a plain Python pickle", lambda p: p.write_bytes(pickle.dumps(Payload(marker))))
    add("payload.pt", "refused: its pickle needs globals that could run code", lambda p: torch.save(
        {"model": Payload(marker)}, p))  # fmt: skip
    add("numpy.pt", "refused", lambda p: torch.save({"w": np.ones(3)}, p))
    add("legacy4.pt", "an old-format torch.save file with pickle protocol 4", lambda p: torch.save(
        {"w": torch.ones(2)}, p, _use_new_zipfile_serialization=False, pickle_protocol=4))  # fmt: skip

    def truncated(path: Path) -> None:
        torch.save({"w": torch.ones(1000)}, path)
        path.write_bytes(path.read_bytes()[:600])

    add("truncated.pt", "truncated or damaged", truncated)

    def other_zip(path: Path) -> None:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("photos/a.txt", "hello")

    add("archive.pt", "a zip archive that is not a PyTorch file", other_zip)
    add("script.pt", "a TorchScript export, not a checkpoint", lambda p: torch.jit.save(
        torch.jit.script(nn.Linear(2, 2)), str(p)))  # fmt: skip
    os.mkfifo(folder / "pipe.pt")
    files["pipe.pt"] = (folder / "pipe.pt", "is a FIFO (named pipe), not a file")
    return files


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
def test_hostile_and_odd_files_are_one_line_and_never_advise_weights_only_false(tmp_path: Path) -> None:
    for name, (path, expected) in hostile_files(tmp_path).items():
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(path)
        message = caught.value.message()
        assert len(message.splitlines()) == 1, (name, message)
        assert expected in message, (name, message)
        assert "weights_only" not in message, (name, message)
    assert not (tmp_path / "pwned").exists()
    # The refused globals are named, so the user knows what the file wanted to run.
    for name in ("pickle.pt", "payload.pt"):
        with pytest.raises(CheckpointError, match="system"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="numpy"):
        load_checkpoint(tmp_path / "numpy.pt")


def small_checkpoint(classes: int = 3) -> Checkpoint:
    """A real (untrained) resnet18 tltool checkpoint at 32 px."""
    cfg = load_config(None, ["data.train=.", "model.backbone=resnet18", "model.weights=none", "data.image_size=32"])
    built = build_model(cfg.model, cfg.data, classes)
    return Checkpoint(
        config=cfg.to_dict(),
        class_names=[f"class_{i}" for i in range(classes)],
        preprocess=built.preprocess.to_dict(),
        arch=built.arch,
        model=built.model.state_dict(),
    )


def test_weights_of_another_architecture_name_the_first_key_and_both_shapes(tmp_path: Path) -> None:
    checkpoint = small_checkpoint()
    checkpoint.model["head.1.weight"] = torch.zeros(5, 512)
    save_atomic(checkpoint.to_dict(), tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError) as caught:
        open_trained(tmp_path / "mixed.pt")
    message = caught.value.message()
    assert len(message.splitlines()) == 1
    assert "head.1.weight is [5, 512] in the checkpoint, [3, 512] in the model" in message, message
    del checkpoint.model["backbone.conv1.weight"]
    save_atomic(checkpoint.to_dict(), tmp_path / "cut.pt")
    with pytest.raises(
        CheckpointError, match=r"backbone.conv1.weight is missing from the checkpoint \(2 keys differ\)"
    ):
        open_trained(tmp_path / "cut.pt")


def test_state_dict_mismatch_orders_and_counts() -> None:
    expected = {"a": torch.zeros(2), "b": torch.zeros(3)}
    assert state_dict_mismatch(expected, {"a": torch.ones(2), "b": torch.ones(3)}) is None
    assert state_dict_mismatch(expected, {"a": torch.ones(2), "b": torch.ones(4), "c": torch.ones(1)}) == (
        "b is [4] in the file, [3] in the model (2 keys differ)"
    )
    assert state_dict_mismatch(expected, ["not", "a", "dict"]) == "the file holds a list, not a state_dict of tensors"
