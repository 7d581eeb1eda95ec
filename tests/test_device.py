"""Device and precision choices: what `auto` picks, and that it is what a run uses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torchvision

import tltool.device as device_module
from conftest import run_overrides
from tltool.config import load_config
from tltool.device import cpu_has_native_bf16, has_depthwise_convs, resolve_precision
from tltool.errors import ConfigError
from tltool.train import finetune

CPU = torch.device("cpu")


def test_depthwise_nets_are_recognised() -> None:
    assert has_depthwise_convs(torchvision.models.mobilenet_v3_small())
    assert has_depthwise_convs(torchvision.models.efficientnet_b0())
    assert not has_depthwise_convs(torchvision.models.resnet18())
    assert not has_depthwise_convs(torchvision.models.resnext50_32x4d())  # grouped, not depthwise


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cpu_picks_bf16_only_where_it_is_measured_faster(monkeypatch: pytest.MonkeyPatch, native: bool):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: native)
    resnet, mobilenet = torchvision.models.resnet18(), torchvision.models.mobilenet_v3_small()
    assert resolve_precision("auto", CPU, resnet, backbone_trains=True) == ("bf16" if native else "fp32")
    assert resolve_precision("auto", CPU, resnet, backbone_trains=False) == "fp32"  # frozen features: fp32
    assert resolve_precision("auto", CPU, mobilenet, backbone_trains=True) == "fp32"  # depthwise: slower in bf16
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("fp32", CPU, resnet) == "fp32" and resolve_precision("bf16", CPU, mobilenet) == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        resolve_precision("fp16", CPU, resnet)


def test_native_bf16_is_read_from_the_cpu_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_a_run_uses_and_records_what_auto_picked(tmp_path: Path, dataset: Path) -> None:
    overrides = run_overrides(tmp_path / "run", dataset, "train.freeze=none", "train.epochs=1", "train.precision=auto")
    summary = finetune(load_config(None, overrides), quiet=True)
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    assert summary["precision"] == expected
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["precision"] == expected
    assert math.isfinite(summary["final"]["train_loss"]) and math.isfinite(summary["final"]["val_loss"])
