"""Optimizers and learning-rate schedules: named parameter groups, warmup, and per-group warmup restarts.

Every schedule is a pure function of the optimizer step (a LambdaLR), so a resumed run gets the same LR
at every step as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tltool.config import TrainConfig
from tltool.errors import ConfigError

_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def make_optimizer(
    cfg: TrainConfig, groups: list[dict[str, Any]] | dict[str, list[nn.Parameter]]
) -> torch.optim.Optimizer:
    """The optimizer over named groups (dicts with params, name, lr, ...; or name -> params at train.lr).

    `train.optimizer_impl: auto` takes torch's fused kernel where it has one for the parameters' device
    (CPU and CUDA for sgd/adam/adamw): the same update as the per-parameter loop up to float rounding,
    and 2-6x faster on CPU, where torch's default is the loop (BENCHMARKS.md). Groups that an unfreeze
    plan adds later inherit the choice (it is an optimizer default).
    """
    if isinstance(groups, dict):
        groups = [{"params": params, "name": name, "lr": cfg.lr} for name, params in groups.items()]
    kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "sgd":
        kwargs["momentum"] = cfg.momentum
    cls = _OPTIMIZERS[cfg.optimizer]
    impl = cfg.optimizer_impl
    if impl in ("auto", "fused"):
        try:
            return cls(groups, **kwargs, fused=True)
        except RuntimeError as error:  # no fused kernel for this device (or dtype) in this torch
            if impl == "fused":
                raise ConfigError(
                    f"train.optimizer_impl=fused is not available here: {str(error).splitlines()[0]}",
                    "use train.optimizer_impl=auto",
                ) from None
        return cls(groups, **kwargs)  # torch's default: foreach on CUDA-like devices, else the loop
    return cls(groups, **kwargs, foreach=impl == "foreach")


def optimizer_impl(optimizer: torch.optim.Optimizer) -> str:
    """The kernel `optimizer.step()` runs: fused, foreach or loop (for the logs and summary.json)."""
    if optimizer.defaults.get("fused"):
        return "fused"
    foreach = optimizer.defaults.get("foreach")
    if foreach is None:  # torch decides per step: foreach when every tensor is on a device that has it
        params = [p for group in optimizer.param_groups for p in group["params"]]
        foreach = all(p.device.type in _foreach_devices() for p in params)
    return "foreach" if foreach else "loop"


def lr_factor(cfg: TrainConfig, steps_per_epoch: int, opened_at: int | None = None):
    """LR multiplier as a function of the optimizer step: linear warmup, then the schedule.

    A group that opened at step `opened_at` (a part of the backbone an unfreeze plan opened) has its
    own warmup from there, `train.unfreeze_warmup_epochs` long, times the run's schedule.
    """
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    rewarm = cfg.warmup_epochs if cfg.unfreeze_warmup_epochs is None else cfg.unfreeze_warmup_epochs
    ramp = round(rewarm * steps_per_epoch)

    def factor(step: int) -> float:
        if opened_at is not None:
            since = step - opened_at
            return schedule(step) * (min(1.0, max(0.0, (since + 1) / ramp)) if ramp else 1.0)
        if step < warmup:
            return (step + 1) / warmup
        return schedule(step)

    def schedule(step: int) -> float:
        progress = min(1.0, max(0, step - warmup) / max(1, total - warmup))
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.scheduler == "step":
            return cfg.step_gamma ** ((step // steps_per_epoch) // cfg.step_size)
        if cfg.scheduler == "onecycle":  # cosine up from 1/25 over 30% of the steps, then down to 1/1e4
            if progress < 0.3:
                return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * progress / 0.3))
            return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (progress - 0.3) / 0.7))
        return 1.0

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    steps_per_epoch: int,
    opened: dict[str, int] | None = None,
    step: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule of every group (`opened`: group name -> step it opened), positioned at `step`.

    Rebuilt when a plan adds groups: from then on, step `step`'s LRs are as if it had always had them.
    """
    opened = opened or {}
    lambdas = [lr_factor(cfg, steps_per_epoch, opened.get(group.get("name"))) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas, last_epoch=step - 1)


def _foreach_devices() -> list[str]:
    try:
        from torch.optim.optimizer import _get_foreach_kernels_supported_devices

        return _get_foreach_kernels_supported_devices()
    except ImportError:  # (a private helper of torch.optim; its default for CUDA is foreach)
        return ["cuda"]
