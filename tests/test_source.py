"""Co-training on a labelled source dataset: the nearest-image selection, PADA's class weights, own or shared
head, and a source stream that resumes bitwise mid-epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tltool.session as session_module
from conftest import make_dataset, run_overrides, write_config
from tltool.checkpoint import load_checkpoint
from tltool.cli import app
from tltool.config import load_config
from tltool.session import build_session
from tltool.source import select_nearest, target_prior
from tltool.train import finetune


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def source_same(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The target's three classes, other images."""
    return make_dataset(tmp_path_factory.mktemp("source") / "same", classes=3, per_class=6, size=24, seed=11)


@pytest.fixture(scope="module")
def source_other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five classes of their own (class_0 ... class_4 under other names)."""
    root = make_dataset(tmp_path_factory.mktemp("source") / "other", classes=5, per_class=4, size=24, seed=12)
    for index, folder in enumerate(sorted(root.iterdir())):
        folder.rename(root / f"src_{index}")
    return root


def run(tmp_path: Path, name: str, dataset: Path, *extra: str, resume: str | None = None) -> dict:
    return finetune(load_config(None, run_overrides(tmp_path / name, dataset, *extra)), resume=resume, quiet=True)


def test_select_nearest_keeps_each_target_images_nearest_sources() -> None:
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    source = torch.tensor([[0.9, 0.1, 0.0], [0.0, 2.0, 0.1], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.7, 0.7, 0.0]])
    assert select_nearest(target, source, 1) == [0, 1]
    assert select_nearest(target, source, 2) == [0, 1, 4]  # (4 is second nearest to both: counted once)
    assert select_nearest(target, source, 10) == [0, 1, 2, 3, 4]


def test_target_prior_is_the_mean_prediction_over_its_maximum() -> None:
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1]])
    torch.testing.assert_close(target_prior(probabilities), torch.tensor([1.0, 0.5, 1 / 6]))


def test_a_source_with_the_targets_classes_shares_the_head(tmp_path: Path, dataset: Path, source_same: Path) -> None:
    summary = run(tmp_path, "r", dataset, f"source.train={source_same}", "source.weight=0.5", "train.epochs=1")
    assert summary["loss_terms"] == ["ce", "source"] and "source co-training (all" in summary["method"]
    assert summary["source"]["shares_head"] and summary["source"]["images"] == 18
    saved = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert [g["name"] for g in saved.optimizer["param_groups"]] == ["head"]
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["loss_terms"]["source"] > 0


def test_a_source_with_other_classes_gets_its_own_head_that_is_not_exported(
    tmp_path: Path, dataset: Path, source_other: Path
) -> None:
    summary = run(tmp_path, "r", dataset, f"source.train={source_other}", "train.epochs=1")
    assert not summary["source"]["shares_head"] and summary["source"]["classes"] == 5
    saved = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert [g["name"] for g in saved.optimizer["param_groups"]] == ["head", "source"]
    assert saved.loss_terms["source"]["module"]["1.weight"].shape == (5, 512)
    assert not any("source" in key for key in saved.model)  # the model is the target's alone
    assert saved.model["head.1.weight"].shape == (3, 512)


def test_nearest_selection_keeps_fewer_source_images(tmp_path: Path, dataset: Path, source_other: Path) -> None:
    summary = run(tmp_path, "r", dataset, f"source.train={source_other}", "source.select=nearest",
                  "source.select_k=1", "train.epochs=1")  # fmt: skip
    assert summary["source"]["scanned"] == 20 and 1 <= summary["source"]["images"] < 20


def test_the_target_prior_is_the_heads_mean_prediction_on_the_target_images(
    tmp_path: Path, dataset: Path, source_same: Path
) -> None:
    cfg = load_config(None, run_overrides(tmp_path / "r", dataset, f"source.train={source_same}",
                                          "source.class_weights=target_prior"))  # fmt: skip
    session = build_session(cfg, quiet=True)
    session.start()
    assert session.inputs.cached
    with torch.no_grad():
        session.model.eval()
        expected = target_prior(session.model.head(session.cache.train.features[0]).softmax(dim=1))
    torch.testing.assert_close(session._source_prior(), expected)


def test_a_source_stream_with_pada_weights_resumes_bitwise_mid_epoch(
    tmp_path: Path, dataset: Path, source_other: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = (f"source.train={source_other}", "source.class_weights=target_prior", "train.epochs=3",
             "checkpoint.every_n_steps=3", "data.batch_size=6")  # fmt: skip
    straight = run(tmp_path, "straight", dataset, *extra)
    weights = straight["source"]["class_weights"]
    assert len(weights) == 5 and max(weights) == 1.0 and min(weights) < 1.0
    real_save, saves = session_module.save_atomic, []

    def crash(payload, path):
        saves.append(path)
        real_save(payload, path)
        if payload["epoch"] == 2 and payload["epoch_progress"] is not None:  # mid epoch 3
            raise Crash()

    monkeypatch.setattr(session_module, "save_atomic", crash)
    with pytest.raises(Crash):
        run(tmp_path, "resumed", dataset, *extra)
    monkeypatch.setattr(session_module, "save_atomic", real_save)
    resumed = run(tmp_path, "resumed", dataset, *extra, resume="auto")
    assert resumed["source"]["class_weights"] == weights
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for key, value in a.model.items():
        assert torch.equal(b.model[key], value), key
    for key, value in a.loss_terms["source"]["module"].items():
        assert torch.equal(b.loss_terms["source"]["module"][key], value), key


def test_source_bad_inputs_are_one_line_errors(tmp_path: Path, dataset: Path, cli) -> None:
    for message, extra in {
        "source.train folder /no/such does not exist": ("source.train=/no/such",),
        "need source.train": ("source.select=nearest",),
    }.items():
        run_dir = tmp_path / "run"
        config = write_config(tmp_path / "c.yaml", run_overrides(run_dir, dataset, *extra))
        result = cli.invoke(app, ["finetune", str(config)])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
        assert not run_dir.exists()


def test_a_resumed_run_keeps_the_source_images_it_selected(
    tmp_path: Path, dataset: Path, source_other: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """source.select=nearest chooses with the backbone as built at the start; a resumed run whose backbone has
    trained since reuses that choice (kept in the checkpoint's fingerprint) instead of choosing again, and ends
    bitwise where the uninterrupted run does."""
    import tltool.source as source_module

    extra = (f"source.train={source_other}", "source.select=nearest", "source.select_k=1", "train.freeze=none",
             "train.lr=0.05")  # fmt: skip
    straight = run(tmp_path, "straight", dataset, *extra, "train.epochs=2")
    calls = []
    real = source_module.select_nearest
    monkeypatch.setattr(source_module, "select_nearest", lambda *a: calls.append(1) or real(*a))
    real_save = session_module.save_atomic

    def crash(payload, path):  # (stopped after its first epoch's checkpoint: the backbone has trained since)
        real_save(payload, path)
        if payload["epoch"] == 1:
            raise Crash()

    monkeypatch.setattr(session_module, "save_atomic", crash)
    with pytest.raises(Crash):
        run(tmp_path, "resumed", dataset, *extra, "train.epochs=2")
    monkeypatch.setattr(session_module, "save_atomic", real_save)
    assert calls == [1]
    chosen = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt").data_fingerprint["source_selection"]
    assert 0 < chosen.numel() < 20 and chosen.dtype == torch.int64  # (k=1 of the 20 source images per target)
    resumed = run(tmp_path, "resumed", dataset, *extra, "train.epochs=2", resume="auto")
    assert calls == [1]  # (not chosen again by the trained backbone)
    assert resumed["source"] == straight["source"]
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert torch.equal(b.data_fingerprint["source_selection"], chosen)
    for key, value in a.model.items():
        assert torch.equal(b.model[key], value), key
