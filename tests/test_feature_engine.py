"""train.feature_engine (engines.py): each engine's features match eager PyTorch's, the engine is part of the feature
store's key, a parity failure falls back (auto) or errors (named), auto's rule, and extraction with loader workers
gives bitwise the features of extraction without them."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from tests.conftest import make_dataset, run_overrides
from tltool import engines
from tltool.config import load_config
from tltool.data import Preprocess, eval_transform, make_loader, scan_folder
from tltool.engines import Engine, EngineError, choose_engine, parity_limit
from tltool.errors import ConfigError
from tltool.extraction import extract
from tltool.models import build_model
from tltool.train import finetune


def tiny_backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).eval()


def resnet_backbone() -> nn.Module:
    cfg = load_config(None, ["model.backbone=resnet18", "model.weights=none", "data.image_size=32"])
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.data, 3).model.backbone.eval()


def _engine(backbone: nn.Module, name: str, requested: str | None = None, warned: list | None = None) -> Engine:
    warn = (warned if warned is not None else []).append
    return Engine(backbone, torch.device("cpu"), "fp32", name, requested or name, warn)


@pytest.mark.parametrize(
    ("name", "make"),
    [("onnxruntime", resnet_backbone), ("onnxruntime", tiny_backbone), ("compile", tiny_backbone)],
)
def test_engine_features_equal_eager_within_tolerance(one_thread, name, make) -> None:
    backbone = make()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    engine = _engine(backbone, name)
    with torch.inference_mode():
        reference = backbone(images)
    for _ in range(3):  # past the parity batches: the engine itself runs
        out = engine(images)
        assert engine.used == name
        assert (out - reference).abs().max().item() <= parity_limit(reference, "fp32")
    assert engine.checked == engines.PARITY_BATCHES
    assert engine.max_diff is not None and engine.max_diff <= parity_limit(reference, "fp32")


def _wrong_engine(monkeypatch) -> None:
    """onnxruntime's graph replaced by one whose features are off by 0.5."""

    def broken(backbone, device, example):
        return lambda images: backbone(images) + 0.5

    monkeypatch.setattr(engines, "_onnxruntime", broken)


def test_parity_failure_errors_when_named(one_thread, monkeypatch) -> None:
    _wrong_engine(monkeypatch)
    engine = _engine(tiny_backbone(), "onnxruntime")
    with pytest.raises(EngineError, match="differ from eager PyTorch's by 0.5") as info:
        engine(torch.randn(2, 3, 16, 16))
    assert info.value.exit_code == 2 and "set train.feature_engine to eager or auto" in info.value.message()


def test_parity_failure_falls_back_to_eager_under_auto(one_thread, monkeypatch) -> None:
    _wrong_engine(monkeypatch)
    backbone, warned = tiny_backbone(), []
    engine = _engine(backbone, "onnxruntime", requested="auto", warned=warned)
    images = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        reference = backbone(images)
    assert torch.equal(engine(images), reference)  # the failed batch: eager's features
    assert engine.used == "eager" and engine.fallback == "failed its parity check"
    assert torch.equal(engine(images), reference)
    assert len(warned) == 1 and warned[0].startswith("warning: the onnxruntime engine's features differ")
    assert "\n" not in warned[0]


def test_auto_keeps_an_engine_only_when_it_measured_faster(one_thread, monkeypatch) -> None:
    def slow(backbone, device, example):
        def run(images):
            time.sleep(0.05)
            return backbone(images)

        return run

    monkeypatch.setattr(engines, "_onnxruntime", slow)
    images = torch.randn(2, 3, 16, 16)
    auto = _engine(tiny_backbone(), "onnxruntime", requested="auto")
    named = _engine(tiny_backbone(), "onnxruntime")
    for _ in range(engines.PARITY_BATCHES):
        auto(images), named(images)
    assert auto.speedup < 1 and auto.used == "eager" and auto.fallback.startswith("ran at 0.")
    assert named.used == "onnxruntime"  # a named engine runs as named


def test_auto_rule(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    small, large = engines.AUTO_ONNX_MIN_IMAGES - 1, engines.AUTO_ONNX_MIN_IMAGES
    assert choose_engine("auto", small, cpu, "fp32") == "eager"
    assert choose_engine("auto", large, cpu, "fp32") == "onnxruntime"
    assert choose_engine("auto", 10**6, cuda, "bf16") == "eager"  # (no engine measured on a GPU)
    assert choose_engine("auto", large, cpu, "bf16") == "eager"  # (ORT runs fp32: not what was asked)
    assert choose_engine("auto", large, cpu, "fp32", distributed=True) == "eager"
    assert choose_engine("compile", 1, cpu, "fp32") == "compile"  # a named engine is used as named
    many = engines.AUTO_ONNX_MIN_IMAGES_IN_WORKERS
    assert many > large  # (eager in the loader's workers is faster: the export pays off later)
    assert choose_engine("auto", large, cpu, "fp32", eager_in_workers=True) == "eager"
    assert choose_engine("auto", many - 1, cpu, "fp32", eager_in_workers=True) == "eager"
    assert choose_engine("auto", many, cpu, "fp32", eager_in_workers=True) == "onnxruntime"
    monkeypatch.setattr(engines, "onnxruntime_available", lambda: False)
    assert choose_engine("auto", large, cpu, "fp32") == "eager"


def test_unknown_engine_did_you_mean() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.feature_engine=onnxrunttime"])
    assert "train.feature_engine: unknown engine; did you mean onnxruntime?" in "\n".join(info.value.details)


def test_workers_give_bitwise_the_same_features(one_thread, tmp_path) -> None:
    _, samples = scan_folder(make_dataset(tmp_path / "data", per_class=5, size=20, suffix=".jpg"))
    backbone, transform = tiny_backbone(), eval_transform(Preprocess(16, 18))
    results = []
    for workers in (0, 2):
        loader = make_loader(samples, transform, 4, workers, seed=0, shuffle=False)
        results.append(extract(backbone, loader, torch.device("cpu"), "fp32"))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[0][1].tolist() == [label for _, label in samples]  # the samples' order


def test_engine_is_part_of_the_key(one_thread, tmp_path) -> None:
    data = make_dataset(tmp_path / "data", per_class=4, size=24)

    def run(name: str, engine: str) -> dict:
        cfg = load_config(
            None, run_overrides(tmp_path / name, data, "train.epochs=1", f"train.feature_engine={engine}")
        )
        return finetune(cfg, quiet=True)["feature_cache"]

    eager = run("a", "eager")
    assert eager["reused"] == [] and eager["engine"]["used"] == "eager"
    onnx = run("b", "onnxruntime")
    assert onnx["reused"] == []  # another engine misses the store
    assert onnx["engine"]["chosen"] == "onnxruntime" and onnx["engine"]["used"] == "onnxruntime"
    assert onnx["engine"]["max_diff_from_eager"] is not None
    assert run("c", "eager")["reused"] == ["train", "val"] and run("d", "onnxruntime")["reused"] == ["train", "val"]
    assert run("e", "auto")["engine"]["chosen"] == "eager"  # 12 images: below auto's threshold


def test_auto_fallback_in_a_run(one_thread, tmp_path, monkeypatch, capsys) -> None:
    _wrong_engine(monkeypatch)
    monkeypatch.setattr(engines, "AUTO_ONNX_MIN_IMAGES", 1)
    monkeypatch.setattr(engines, "AUTO_ONNX_MIN_IMAGES_IN_WORKERS", 1)
    data = make_dataset(tmp_path / "data", per_class=4, size=24)
    cfg = load_config(None, run_overrides(tmp_path / "run", data, "train.epochs=1"))
    engine = finetune(cfg, quiet=True)["feature_cache"]["engine"]
    assert engine == {**engine, "requested": "auto", "chosen": "onnxruntime", "used": "eager"}
    assert "extracting with eager PyTorch instead" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [0, 2])
def test_auto_weighs_onnxruntime_against_eager_as_it_would_run_here(one_thread, tmp_path, monkeypatch, workers) -> None:
    """finetune and baseline tell auto whether eager would extract in the loader's workers (a worker per CPU)."""
    import tltool.baseline as baseline_module
    import tltool.extraction as extraction_module
    import tltool.features as features_module

    monkeypatch.setattr(extraction_module, "usable_cpus", lambda: 2)
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs.get("eager_in_workers", args[5] if len(args) > 5 else False))
        return choose_engine(*args, **kwargs)

    monkeypatch.setattr(features_module, "choose_engine", recording)
    monkeypatch.setattr(baseline_module, "choose_engine", recording)
    data = make_dataset(tmp_path / "data", per_class=4, size=24)
    cfg = load_config(None, run_overrides(tmp_path / "run", data, "train.epochs=1", f"data.num_workers={workers}"))
    finetune(cfg, quiet=True)
    baseline_module.extract_features(cfg, quiet=True)
    assert seen == [workers == 2] * 2
