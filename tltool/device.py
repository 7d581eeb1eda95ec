"""Where and in which precision a run computes: the device names, device resolution and autocast.

This module owns the one grammar of device names (`run.device` and every `--device` flag): `device_problem`
says why a name is not one, `check_device` and `resolve_device` raise the ConfigError that names where it
came from. torch is imported inside the functions that need it, so that validating a config (which checks
`run.device` here) does not import torch (1.5-2 s).
"""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING

from tltool.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def device_problem(name: str) -> str | None:
    """Why `name` is not a device name, or None: the sentence the config and every `--device` flag show."""
    if _DEVICE_NAME.fullmatch(name):
        return None
    return f"unknown device name; use {DEVICE_NAMES}"


def check_device(name: str, source: str = "run.device") -> str:
    """`name` when it is a device name; else a ConfigError that names its `source` (`run.device`, `--device`)."""
    problem = device_problem(name)
    if problem is not None:
        raise ConfigError(f"{source} {name!r} is not a device", problem)
    return name


def _setting(source: str, value: str) -> str:
    """How the user wrote `value` for `source`: `run.device=cuda` (a config key) or `--device cuda` (a flag)."""
    return f"{source} {value}" if source.startswith("-") else f"{source}={value}"


def _use(source: str, value: str) -> str:
    """What to write instead: `set run.device=cpu` or `use --device cpu`."""
    return f"{'use' if source.startswith('-') else 'set'} {_setting(source, value)}"


def _mps_available() -> bool:
    import torch

    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str, source: str = "run.device") -> torch.device:
    """A device name to a torch.device; a bad name, or a device that is not there, is a ConfigError about `source`."""
    import torch

    check_device(name, source)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{_setting(source, name)} but no CUDA device is available", _use(source, "cpu or auto"))
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"{_setting(source, name)} but only {torch.cuda.device_count()} CUDA device(s) exist",
                f"use cuda:0 ... cuda:{torch.cuda.device_count() - 1}",
            )
        return torch.device("cuda", index)
    if name == "mps" and not _mps_available():
        raise ConfigError(f"{_setting(source, name)} but MPS is not available", _use(source, "cpu or auto"))
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def has_depthwise_convs(model: torch.nn.Module) -> bool:
    """Depthwise convolutions (MobileNet, EfficientNet, MNASNet, ShuffleNet, ConvNeXt ...)."""
    import torch

    return any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules())


def resolve_precision(
    name: str, device: torch.device, model: torch.nn.Module | None = None, backbone_trains: bool = True
) -> str:
    """`train.precision` to fp32 / bf16 / fp16 for this device (and, under auto on CPU, this model).

    auto: bf16 on CUDA where supported, else fp16. On a CPU with hardware bf16: bf16 for training a backbone
    without depthwise convolutions (resnet18 full fine-tune 1.8-2.1x faster, same accuracy on the digits
    demo: BENCHMARKS.md), fp32 otherwise: bf16 slows depthwise nets' training (mobilenet_v3_small full
    fine-tune 0.7-0.8x), and frozen bf16 features cost the digits demo 0.7-1.5 points of top-1.
    """
    import torch

    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if name == "auto":
            return "bf16" if bf16 else "fp16"
        if name == "bf16" and not bf16:
            raise ConfigError("this GPU does not support bf16", "set train.precision=fp16 or auto")
        return name
    if name == "auto":
        if device.type != "cpu" or model is None or not cpu_has_native_bf16():
            return "fp32"
        return "bf16" if backbone_trains and not has_depthwise_convs(model) else "fp32"
    if name == "fp16":
        raise ConfigError(f"train.precision=fp16 needs CUDA (device is {device.type})", "use bf16 or fp32")
    return name


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass (a no-op for fp32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


# Families where channels_last buys nothing (attention blocks on (N, L, C) tensors).
_NO_CHANNELS_LAST = ("VisionTransformer", "SwinTransformer", "MaxVit")


def use_channels_last(setting: str, model: torch.nn.Module) -> bool:
    """`train.channels_last` for this model: on, off, or auto (every conv net; measured 1.2-1.6x on CPU)."""
    if setting != "auto":
        return setting == "on"
    backbone = getattr(model, "backbone", model)
    return type(backbone).__name__ not in _NO_CHANNELS_LAST


def host_read_interval(device: torch.device) -> int:
    """Batches between the training loop's reads of device values (running loss, hits, the finite-loss check).

    Every batch on CPU, where a read costs nothing. On an accelerator a read waits for all queued work and
    leaves the device idle while the host prepares the next step, so the loop reads every 32 batches
    (and before every checkpoint and at the end of the epoch): a non-finite loss is then reported up to
    31 batches late, and never saved.
    """
    return 1 if device.type == "cpu" else 32


def sum_dtype(device: torch.device) -> torch.dtype:
    """dtype of running sums kept on `device`: float64 (exact for counts, as a Python float), float32 on MPS."""
    import torch

    return torch.float32 if device.type == "mps" else torch.float64


def configure_backends(device: torch.device) -> None:
    """Fast defaults for a training process on `device`.

    CUDA: cudnn.benchmark (fixed input sizes: pick the fastest convolution once) and TF32 matmuls and
    convolutions on Ampere and newer (10 mantissa bits; the accepted default for training).
    """
    import torch

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
