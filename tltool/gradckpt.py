"""Activation checkpointing by backbone stage (train.grad_checkpointing): less memory, one more forward.

Each stage of `stages.backbone_stages` (torchvision's table, timm's `group_matcher`) keeps only its input
during the forward and recomputes its activations in the backward (`torch.utils.checkpoint.checkpoint`,
`use_reentrant=False`: DDP-safe, works with autocast, channels_last and inputs that need no grad).

The recompute runs the stage's batch norms in train mode a second time, which would update their running
statistics (and `num_batches_tracked`) twice per step: other statistics than without checkpointing, and a
resume that is no longer exact. The recompute therefore runs in a context that snapshots the stage's
batch-norm buffers on entry and copies them back on exit (also when torch stops a recompute early), so the
buffers end each step bitwise as without checkpointing. Dropout's random draws are replayed by
`preserve_rng_state`. timm's own `set_grad_checkpointing()` has no such hook: with timm 1.0.31 a timm
resnet18's batch norms count num_batches_tracked=2 after one step. So timm backbones are wrapped here too,
by timm's own stage groups.

The wrapping replaces the module's `forward` on the instance only: parameter and buffer names, the
state_dict, checkpoints and exports are unchanged, and a deepcopy (the EMA's copy) stays consistent. A stage
is checkpointed only while it trains (grad enabled and a parameter of it requires grad): a frozen stage, a
closed stage of an unfreeze plan, evaluation and the feature cache run it plainly.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tltool.stages import backbone_stages, is_module

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def batch_norm_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The running statistics of every batch norm in `module` (what a recompute must not move)."""
    buffers = []
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            buffers += [getattr(sub, name) for name in BN_BUFFERS if getattr(sub, name, None) is not None]
    return buffers


@contextmanager
def buffers_kept(buffers: list[torch.Tensor]) -> Iterator[None]:
    """Run the block, then put `buffers` back to their values on entry (in place, bitwise)."""
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)


def _trains(module: nn.Module) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(self).forward.__get__(self)
    if not _trains(self):
        return forward(*args, **kwargs)
    buffers = batch_norm_buffers(self) if self.training else []

    def contexts() -> tuple[Any, Any]:
        return nullcontext(), buffers_kept(buffers)

    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, context_fn=contexts, **kwargs)


def checkpoint_module(module: nn.Module) -> None:
    """Make `module` checkpoint its forward while it trains (its state_dict keys unchanged)."""
    module.forward = types.MethodType(_checkpointed_forward, module)


def is_checkpointed(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _checkpointed_forward


def enable_grad_checkpointing(backbone: nn.Module) -> list[str]:
    """Checkpoint every stage of `backbone`, module by module; return the module paths wrapped.

    A stage of several parts ("stem=conv1+bn1") has each module checkpointed on its own; a parameter path
    (a ViT's class token) is not a module and needs nothing.
    """
    wrapped = []
    for stage in backbone_stages(backbone, "train.grad_checkpointing"):
        for path in stage.paths:
            if is_module(backbone, path):
                checkpoint_module(backbone.get_submodule(path))
                wrapped.append(path)
    return wrapped
