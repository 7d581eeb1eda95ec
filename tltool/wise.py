"""WiSE-FT weights (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models").

theta(alpha) = (1 - alpha) * theta0 + alpha * theta_ft, where theta0 is the model at the start of
fine-tuning (the pretrained backbone and the initial head: the linear probe's under `train.head_init:
probe`) and theta_ft the fine-tuned model. Between the two, the interpolated model often keeps more of the
pretrained features' robustness than theta_ft while losing little of its accuracy.

A run with `train.wise_alpha` set keeps theta0 in every checkpoint (`Checkpoint.initial_model`), so any of
its checkpoints can be interpolated later (`tltool eval|export --wise-alpha A`, through
`trained.open_trained`). Every floating-point entry of the state_dict is interpolated, the batch-norm
running means and variances included: they move along the same straight line as the weights, and are not
re-estimated on data. Integer entries (batch norm's `num_batches_tracked`) are theta_ft's.

This module is the arithmetic only (no data, no evaluation): `wise_run.py` chooses alpha and writes the
end-of-run `checkpoints/wise.pt`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tltool.checkpoint import Checkpoint
from tltool.errors import CheckpointError, ConfigError


def initial_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """theta0: a CPU copy of `model`'s state_dict, taken before the first step (training changes the model)."""
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


def check_alpha(alpha: float, what: str = "--wise-alpha") -> None:
    """A ConfigError unless 0 <= alpha <= 1 (0: the starting weights, 1: the fine-tuned ones)."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(
            f"{what} {alpha:g} is outside [0, 1]",
            "give 0 (the starting weights) to 1 (the fine-tuned ones), e.g. 0.5",
        )


def interpolate(initial: dict[str, Any], finetuned: dict[str, Any], alpha: float) -> dict[str, torch.Tensor]:
    """theta(alpha) = (1 - alpha) * initial + alpha * finetuned, entry by entry (integer entries: finetuned's).

    Written as the paper's formula, not as torch.lerp: alpha 0 then gives `initial` and alpha 1 `finetuned`
    exactly, and alpha 0.5 the exact elementwise midpoint.
    """
    out = {}
    for name, end in finetuned.items():
        if end.is_floating_point():
            out[name] = (1.0 - alpha) * initial[name].to(end.dtype) + alpha * end
        else:
            out[name] = end.clone()
    return out


def wise_weights(checkpoint: Checkpoint, alpha: float, path: str | Path) -> dict[str, torch.Tensor]:
    """theta(alpha) of the tltool checkpoint at `path`: a one-line error for a bad alpha or a missing theta0."""
    check_alpha(alpha)
    if checkpoint.initial_model is None:
        raise CheckpointError(
            f"{path} holds no starting weights (theta0) to interpolate with --wise-alpha",
            "use best.pt or last.pt of a run trained with train.wise_alpha set (1 keeps the weights as trained)",
        )
    return interpolate(checkpoint.initial_model, checkpoint.model, alpha)
