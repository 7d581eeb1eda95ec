"""`train.ema_decay`: an exponential moving average (EMA) of the weights, as timm's and torchvision's `--model-ema`.

After every optimizer step (not every micro-batch under train.accumulate_steps) the averaged copy moves toward
the trained weights, `ema = d x ema + (1 - d) x w`, batch-norm running statistics included
(`torch.optim.swa_utils.AveragedModel(..., use_buffers=True)`). As AveragedModel does, the first update copies
the weights (the average starts at the weights after step 1, not at the pretrained or random start); there is
no warmup. Integer buffers (batch norm's `num_batches_tracked`) are copied, not averaged.

What is averaged: the head alone when the backbone never trains (train.freeze=backbone without an unfreeze
plan: its parameters and frozen batch-norm statistics are constants, so the EMA of the whole model would be the
same backbone at twice the memory and a per-step pass over every backbone tensor); otherwise the whole model
from the first step (with an unfreeze plan the backbone's average stays exactly its constant value until the
backbone opens: lerp(a, a, w) = a).

The session evaluates the EMA beside the raw weights every epoch (`val_loss_ema`, `val_acc1_ema`, `val_acc5_ema`; a
multilabel run's also `val_map_ema`, `val_f1_micro_ema`, `val_f1_macro_ema`; on cached features when the feature
cache serves the epoch), saves its state in every checkpoint (`Checkpoint.ema`: the averaged model's full
state_dict and `n_averaged`) and restores it on resume, so a resumed run's EMA is bitwise the uninterrupted one's.
When checkpoint.monitor is an EMA metric the EMA weights are the run's model: they are the `model` of last.pt and
best.pt (so eval, report, predict, export, distill.teacher and model.weights take them with no flag),
`Checkpoint.weights` is "ema", and the weights the optimizer trains are kept in `Checkpoint.raw_model` for a
resume. Under torchrun every rank averages its own unwrapped model (identical on every rank: the gradients are
all-reduced); rank 0 saves it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from tltool.errors import CheckpointError, ConfigError
from tltool.models import TransferModel

EMA_METRICS = ("val_loss_ema", "val_acc1_ema", "val_acc5_ema")


def ema_multi_avg_fn(decay: float):
    """AveragedModel's `multi_avg_fn`: torch's `get_ema_multi_avg_fn(decay)` for floating tensors (a foreach
    lerp, ema + (1 - d)(w - ema)); integer buffers (`num_batches_tracked`) are copied, where torch's would be
    averaged in floating point and truncated back."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], _n: Any) -> None:
        if averaged[0].is_floating_point() or averaged[0].is_complex():  # (grouped by dtype: all alike)
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        else:
            torch._foreach_copy_(averaged, current)

    return update


class WeightEMA:
    """The EMA of a TransferModel's weights (of its head only when `head_only`), on the model's device."""

    def __init__(self, model: TransferModel, decay: float, head_only: bool) -> None:
        self.model, self.decay, self.head_only = model, decay, head_only
        # (n_averaged stays a CPU tensor: AveragedModel reads it every update, which on a GPU would be a sync)
        self.averaged = AveragedModel(self._source(), multi_avg_fn=ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.requires_grad_(False)

    def _source(self) -> nn.Module:
        return self.model.head if self.head_only else self.model

    @property
    def steps(self) -> int:
        """The optimizer steps averaged so far."""
        return int(self.averaged.n_averaged)

    def update(self) -> None:
        """One EMA step toward the model's current weights (call after each optimizer step)."""
        self.averaged.update_parameters(self._source())

    def module(self, cached: bool) -> nn.Module:
        """The EMA model to evaluate: its head for cached backbone features (`cached`), else the whole model
        (with a head-only EMA: the live, frozen backbone under the averaged head)."""
        if cached:
            return self.averaged.module if self.head_only else self.averaged.module.head
        if self.head_only:
            view = TransferModel(self.model.backbone, self.averaged.module)
            view.frozen_backbone = True
            return view
        return self.averaged.module

    def state_dict(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The EMA model's full state_dict (CPU), keyed as the model's; `weights` are the model's own as the
        checkpoint saves them (a head-only EMA takes its backbone from them)."""
        own = {k: v.detach().cpu() for k, v in self.averaged.module.state_dict().items()}
        if self.head_only:
            return {**weights, **{f"head.{k}": v for k, v in own.items()}}
        return own

    def checkpoint_state(self, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        """`Checkpoint.ema`: the averaged model, how many steps it averaged, its decay."""
        return {"model": self.state_dict(weights), "n_averaged": self.steps, "decay": self.decay}

    def restore(self, state: dict[str, Any] | None) -> None:
        """Load a checkpoint's `ema` (a CheckpointError when it holds none)."""
        if not state:
            raise CheckpointError(
                "the checkpoint to resume holds no EMA of the weights although its config sets train.ema_decay",
                "resume from the run's checkpoints/last.pt as tltool wrote it",
            )
        saved = state["model"]
        if self.head_only:
            saved = {k.removeprefix("head."): v for k, v in saved.items() if k.startswith("head.")}
        self.averaged.module.load_state_dict(saved)
        self.averaged.n_averaged.fill_(int(state["n_averaged"]))


def build_ema(cfg: Any, model: TransferModel, backbone_trains: bool, adabn: bool) -> WeightEMA | None:
    """The run's EMA (None without train.ema_decay). `backbone_trains`: the unfreeze plan ever opens it.

    A backbone that trains under AdaBN (adapt.bn_stats=target) is refused: the live model's batch-norm buffers
    hold the source domain's statistics between steps (the target's are swapped in per batch), so their
    average would be the wrong domain's.
    """
    decay = cfg.train.ema_decay
    if decay is None:
        return None
    if adabn and backbone_trains:
        raise ConfigError(
            "train.ema_decay with adapt.bn_stats=target and a backbone that trains is not supported (the EMA "
            "would average the source domain's batch-norm statistics)",
            "keep the backbone frozen (the EMA then averages the head), or drop train.ema_decay",
        )
    return WeightEMA(model, decay, head_only=not backbone_trains)


def ema_metrics(val: dict[str, Any]) -> dict[str, float]:
    """The EMA's evaluation as metrics.jsonl keys (a multilabel run's also val_map_ema, val_f1_micro_ema,
    val_f1_macro_ema)."""
    from tltool.multilabel import MULTILABEL_METRICS

    multilabel = {f"val_{key}_ema": val[key] for key in MULTILABEL_METRICS if key in val}
    return {"val_loss_ema": val["loss"], "val_acc1_ema": val["acc1"], "val_acc5_ema": val["acc5"], **multilabel}
