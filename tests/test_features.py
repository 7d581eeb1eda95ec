"""The frozen-feature cache changes no result, only the time; views, disk storage, keys and resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import tltool.features as features_module
import tltool.session as session_module
from conftest import run_overrides
from tltool.checkpoint import Checkpoint, load_checkpoint
from tltool.config import load_config
from tltool.data import Preprocess
from tltool.features import cache_applies, cache_key
from tltool.models import build_model
from tltool.train import finetune
from tltool.transfer import freeze_modules


def run(run_dir: Path, train: Path, *extra: str, resume: str | None = None) -> dict:
    return finetune(load_config(None, run_overrides(run_dir, train, *extra)), resume=resume, quiet=True)


def last(run_dir: Path) -> Checkpoint:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_when_the_cache_applies() -> None:
    def applies(*overrides: str) -> bool:
        return cache_applies(load_config(None, list(overrides)))

    assert applies("data.augment=none")
    assert not applies("data.augment=light")
    assert applies("data.augment=light", "train.feature_cache_views=4")
    assert applies("data.augment=light", "train.feature_cache=on")
    assert not applies("data.augment=none", "train.freeze=none")
    assert not applies("data.augment=none", "train.feature_cache=off")
    assert load_config(None, ["train.feature_cache=off"]).train.feature_cache == "off"  # YAML's off is False


@pytest.mark.parametrize("dropout", ["0.0", "0.5"])
def test_cached_and_uncached_runs_give_the_same_head(tmp_path: Path, dataset: Path, dropout: str) -> None:
    extra = ("train.epochs=3", f"model.head_dropout={dropout}", "train.optimizer=sgd")
    cached = run(tmp_path / "cached", dataset, *extra)
    plain = run(tmp_path / "plain", dataset, *extra, "train.feature_cache=off")
    assert cached["feature_cache"] is not None and plain["feature_cache"] is None
    a, b = last(tmp_path / "cached").model, last(tmp_path / "plain").model
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    for x, y in zip(metrics(tmp_path / "cached"), metrics(tmp_path / "plain"), strict=True):
        assert x["val_acc1"] == y["val_acc1"]
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)


def test_augmented_views_are_cycled(tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = features_module.FeatureCache.set_epoch

    def record(self, epoch: int) -> None:
        real(self, epoch)
        seen.append(self.train.view)

    monkeypatch.setattr(features_module.FeatureCache, "set_epoch", record)
    summary = run(tmp_path / "r", dataset, "data.augment=light", "train.feature_cache_views=2", "train.epochs=3")
    assert summary["feature_cache"] is not None
    assert seen == [0, 1, 0]


def test_views_differ_and_come_from_their_own_random_stream(tmp_path: Path, dataset: Path) -> None:
    config = load_config(
        None, run_overrides(tmp_path / "r", dataset, "data.augment=light", "train.feature_cache_views=2")
    )
    built = build_model(config.model, config.data, 3)
    freeze_modules(built.model, "backbone")
    from tltool.data import scan_data

    split = scan_data(config.data, 0)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    cache = features_module.build_cache(config, built.model, built.weights_source, built.preprocess, split.train,
                                        split.val, torch.device("cpu"), "fp32", tmp_path / "cache")  # fmt: skip
    assert torch.equal(torch.get_rng_state(), before)  # extraction leaves the training RNG alone
    views = cache.train.features
    assert views.shape[:2] == (2, len(split.train))
    assert not torch.allclose(views[0], views[1])


@pytest.mark.parametrize("kept", ["store", "run"])
def test_large_caches_are_memory_mapped_and_reused_on_resume(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch, kept: str
) -> None:
    # In the feature store (conftest points TLTOOL_CACHE_DIR at tmp_path/tltool_cache), or, with a store budget
    # of 0 (nothing kept between runs), in the run's own folder.
    extra = ("train.feature_cache_memory_mb=0", *(["train.feature_cache_max_mb=0"] if kept == "run" else []))
    summary = run(tmp_path / "r", dataset, *extra, "train.epochs=1")
    folder = tmp_path / "tltool_cache" / "features" if kept == "store" else tmp_path / "r" / "feature_cache"
    stored = sorted(folder.glob("*.pt"))
    assert len(stored) == 2 and summary["feature_cache"]["location"] == str(folder)
    assert kept == "store" or not list((tmp_path / "tltool_cache" / "features").glob("*.pt"))

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(features_module, "_extract_views", no_extraction)
    resumed = run(tmp_path / "r", dataset, *extra, "train.epochs=2", resume="auto")
    assert last(tmp_path / "r").epoch == 2 and resumed["feature_cache"]["reused"] == ["train", "val"]


def test_the_key_changes_with_files_preprocessing_and_weights(tmp_path: Path, dataset: Path) -> None:
    config = load_config(None, run_overrides(tmp_path / "r", dataset))
    samples = [(str(p), 0) for p in sorted(dataset.rglob("*.png"))[:4]]
    pre = Preprocess(32, 32)
    key = cache_key(config, "none", pre, samples, "train")
    assert key == cache_key(config, "none", pre, samples, "train")
    assert key != cache_key(config, "none", Preprocess(32, 36), samples, "train")
    assert key != cache_key(config, "other", pre, samples, "train")
    # The same (eval) transform for train and val with data.augment none: the same features, one entry.
    assert key == cache_key(config, "none", pre, samples, "val")
    assert key != cache_key(config, "none", pre, samples, "train", precision="bf16")
    copy = tmp_path / "x.png"
    copy.write_bytes(Path(samples[0][0]).read_bytes())
    moved = [(str(copy), 0), *samples[1:]]
    first = cache_key(config, "none", pre, moved, "train")
    os.utime(copy, ns=(1, 1))
    assert first != cache_key(config, "none", pre, moved, "train")  # a touched file: a new key


def test_the_key_names_files_by_absolute_path(tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`data.train: data/x` in one command and `/abs/data/x` in another (the demo's finetune and baseline) are
    the same files: one entry."""
    config = load_config(None, run_overrides(tmp_path / "r", dataset))
    files = sorted(dataset.rglob("*.png"))[:3]
    absolute = [(str(p), 0) for p in files]
    monkeypatch.chdir(dataset.parent)
    relative = [(os.path.relpath(p), 0) for p in files]
    assert not relative[0][0].startswith("/")
    assert cache_key(config, "none", Preprocess(32, 32), relative, "train") == cache_key(
        config, "none", Preprocess(32, 32), absolute, "train"
    )


def test_mid_epoch_resume_with_the_cache(tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = ("train.epochs=3", "checkpoint.every_n_steps=1", "data.batch_size=4", "model.head_dropout=0.3")
    run(tmp_path / "straight", dataset, *extra)
    real_save = session_module.save_atomic
    saves = {"n": 0}

    class Crash(Exception):
        pass

    def crash(payload, path):
        real_save(payload, path)
        saves["n"] += 1
        if saves["n"] == 11:
            raise Crash()

    monkeypatch.setattr(session_module, "save_atomic", crash)
    with pytest.raises(Crash):
        run(tmp_path / "resumed", dataset, *extra)
    monkeypatch.setattr(session_module, "save_atomic", real_save)
    run(tmp_path / "resumed", dataset, *extra, resume="auto")
    a, b = last(tmp_path / "straight").model, last(tmp_path / "resumed").model
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_frozen_backbone_runs_without_autograd(dataset: Path, tmp_path: Path) -> None:
    config = load_config(None, run_overrides(tmp_path / "r", dataset))
    model = build_model(config.model, config.data, 3).model
    freeze_modules(model, "backbone")
    states = []
    model.backbone.register_forward_hook(lambda *args: states.append(torch.is_grad_enabled()))
    out = model.train()(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert states == [False] and model.head[1].weight.grad is not None
