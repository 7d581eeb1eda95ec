"""Device names and choices: the one grammar of run.device and --device, what `auto` picks, and that a run uses it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

import tltool.device as device_module
from conftest import run_overrides
from tltool.cli import app
from tltool.config import build_config, load_config
from tltool.device import (
    DEVICE_NAMES,
    check_device,
    cpu_has_native_bf16,
    device_problem,
    has_depthwise_convs,
    resolve_device,
    resolve_precision,
)
from tltool.errors import ConfigError
from tltool.train import finetune

CPU = torch.device("cpu")
ACCEPTED = ["auto", "cpu", "mps", "cuda", "cuda:0", "cuda:1", "cuda:12"]
REFUSED = ["gpu", "CPU", "Cuda", " cpu", "cpu ", "", "cuda:", "cuda0", "cuda:-1", "cuda:x", "cuda:1:2", "mps:0", "tpu"]
UNKNOWN = f"unknown device name; use {DEVICE_NAMES}"
# Every command with a --device flag, and arguments that would fail later: the flag is checked first.
FLAG_COMMANDS = [
    ["eval", "missing.pt"],
    ["export", "missing.pt"],
    ["predict", "missing.pt", "x.jpg"],
    ["report", "r"],
    ["serve", "missing.pt"],
]


# ids=repr: a bare `cuda` id would be a keyword, and conftest skips tests with the keyword `cuda` on CPU machines.
@pytest.mark.parametrize("name", ACCEPTED, ids=repr)
def test_accepted_device_names(name: str) -> None:
    assert device_problem(name) is None
    assert check_device(name, "--device") == name
    assert build_config({"run": {"device": name}}).run.device == name


@pytest.mark.parametrize("name", REFUSED, ids=repr)
def test_refused_device_names_get_one_sentence_from_the_config_and_from_every_flag(name: str) -> None:
    assert device_problem(name) == UNKNOWN
    with pytest.raises(ConfigError) as config_error:
        build_config({"run": {"device": name}})
    assert f"run.device: {UNKNOWN} (got {name!r})" in config_error.value.message()
    for source in ("run.device", "--device"):
        with pytest.raises(ConfigError) as exc:
            check_device(name, source)
        assert exc.value.message() == f"error: {source} {name!r} is not a device — {UNKNOWN}"
        with pytest.raises(ConfigError) as exc:
            resolve_device(name, source)
        assert exc.value.message() == f"error: {source} {name!r} is not a device — {UNKNOWN}"
    for command in FLAG_COMMANDS:
        result = CliRunner().invoke(app, [*command, "--device", name])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert result.stderr.strip().splitlines() == [f"error: --device {name!r} is not a device — {UNKNOWN}"]


def test_a_device_that_is_not_there_is_named_as_the_user_wrote_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    expected = {
        ("cuda", "run.device"): "run.device=cuda but no CUDA device is available — set run.device=cpu or auto",
        ("cuda:1", "--device"): "--device cuda:1 but no CUDA device is available — use --device cpu or auto",
        ("mps", "run.device"): "run.device=mps but MPS is not available — set run.device=cpu or auto",
        ("mps", "--device"): "--device mps but MPS is not available — use --device cpu or auto",
    }
    for (name, source), message in expected.items():
        with pytest.raises(ConfigError) as exc:
            resolve_device(name, source)
        assert exc.value.message() == f"error: {message}"
    assert resolve_device("auto") == CPU and resolve_device("cpu", "--device") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError) as exc:
        resolve_device("cuda:2", "--device")
    assert exc.value.message() == "error: --device cuda:2 but only 2 CUDA device(s) exist — use cuda:0 ... cuda:1"


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
