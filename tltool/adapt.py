"""Feature-based domain adaptation from unlabelled target images (`adapt.*`).

A run with `adapt.unlabeled` draws, beside each labelled batch (the source domain), a batch of unlabelled
target-domain images (session.py's `unlabeled` stream). `TrainForward` runs both through the model in one
step: one concatenated pass, or, with `adapt.bn_stats: target` (AdaBN), one pass per domain, each with
its own batch-norm statistics. The adaptation losses are terms of the objective (objective.py):

- MCC, Minimum Class Confusion (Jin, Wang, Long, Wang, ECCV 2020): the class confusion of the target
  predictions, weighted by their certainty, off the diagonal (`mcc_loss`).
- DANN, domain-adversarial training (Ganin et al., JMLR 2016): a domain discriminator on the backbone's
  features, trained through a gradient-reversal layer, so the features stop telling the domains apart.
- AdaBN (Li, Wang, Shi, Liu, Hou 2016): the backbone's batch-norm statistics re-estimated on the target
  images (`estimate_bn_stats`); the saved model carries them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tltool.checkpoint import Checkpoint
from tltool.config import Config
from tltool.data import IMAGE_EXTENSIONS, Sample, eval_transform, image_files, make_loader
from tltool.device import autocast
from tltool.errors import ConfigError, DataError
from tltool.models import BuiltModel
from tltool.transfer import UnfreezePlan

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def ganin_ramp(progress: float) -> float:
    """2 / (1 + exp(-10 p)) - 1: 0 at the start of training, about 0.99 halfway, 1 at the end (Ganin et al.)."""
    return 2.0 / (1.0 + math.exp(-10.0 * min(max(progress, 0.0), 1.0))) - 1.0


def mcc_loss(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Minimum Class Confusion of a batch of target logits (B, C).

    Y = softmax(logits / T); each sample's certainty weight W_i = B (1 + exp(-H_i)) / sum_k (1 + exp(-H_k)),
    H_i the entropy of Y_i (weights are not differentiated, as in the authors' code); the class correlation
    C = Y^T diag(W) Y, each row normalized to sum 1; the loss is the sum of the off-diagonal entries over the
    number of classes.
    """
    batch, classes = logits.shape
    probabilities = F.softmax(logits.float() / temperature, dim=1)
    entropy = -(probabilities * torch.log(probabilities + 1e-5)).sum(dim=1).detach()
    weights = 1.0 + torch.exp(-entropy)
    weights = batch * weights / weights.sum()
    confusion = (probabilities * weights[:, None]).T @ probabilities
    confusion = confusion / confusion.sum(dim=1, keepdim=True)
    return (confusion.sum() - confusion.trace()) / classes


class _GradientReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, coefficient: float) -> torch.Tensor:
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coefficient * grad, None


def reverse_gradient(x: torch.Tensor, coefficient: float = 1.0) -> torch.Tensor:
    """The identity forward; the gradient multiplied by -coefficient on the way back (the GRL)."""
    return _GradientReverse.apply(x, coefficient)


class DomainDiscriminator(nn.Module):
    """Features -> one logit (source: 1, target: 0): Linear-BN-ReLU twice, then Linear (TLlib's layout)."""

    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features.float()).squeeze(1)


def domain_adversarial_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 (BCE(d(source), 1) + BCE(d(target), 0)) on the discriminator's logits."""
    return 0.5 * (
        F.binary_cross_entropy_with_logits(source, torch.ones_like(source))
        + F.binary_cross_entropy_with_logits(target, torch.zeros_like(target))
    )


# --- AdaBN --------------------------------------------------------------------------------------------


def batch_norms(module: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def bn_stats(module: nn.Module) -> dict[str, torch.Tensor]:
    """The batch-norm buffers of `module` (copies), keyed as in its state_dict."""
    return {
        f"{name}.{buffer}": getattr(m, buffer).detach().clone()
        for name, m in batch_norms(module).items()
        for buffer in BN_BUFFERS
        if getattr(m, buffer, None) is not None
    }


def load_bn_stats(module: nn.Module, stats: dict[str, torch.Tensor]) -> None:
    """Copy `stats` (from `bn_stats`) into the batch-norm buffers of `module`, in place."""
    norms = batch_norms(module)
    for key, value in stats.items():
        name, _, buffer = key.rpartition(".")
        getattr(norms[name], buffer).copy_(value)


@contextlib.contextmanager
def using_bn_stats(module: nn.Module, stats: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Run with the tensors of `stats` as the batch-norm buffers of `module`; its own come back afterwards.

    The tensors themselves are swapped in, not copied: batch norm in train mode updates `stats` in place
    (domain-specific batch norm: the target's statistics follow the target's batches), and no tensor that
    autograd saved in the forward is modified when the module's own come back.
    """
    if stats is None:
        yield
        return
    norms = batch_norms(module)
    own = {}
    for key, value in stats.items():
        name, _, buffer = key.rpartition(".")
        own[key] = getattr(norms[name], buffer)
        setattr(norms[name], buffer, value)
    try:
        yield
    finally:
        for key, value in own.items():
            name, _, buffer = key.rpartition(".")
            setattr(norms[name], buffer, value)


@torch.no_grad()
def estimate_bn_stats(
    backbone: nn.Module, batches: Iterable[Any], device: torch.device, precision: str
) -> dict[str, torch.Tensor]:
    """AdaBN: the batch-norm statistics of `backbone` on the images of `batches`, its weights untouched.

    Each batch-norm layer's running mean and variance become the plain average over the batches of its
    batch mean and (unbiased) variance, as torch computes with momentum=None; no gradient, dropout off.
    The backbone's own buffers are left as they were; the new ones are returned.
    """
    norms = batch_norms(backbone)
    own, modes = bn_stats(backbone), {name: m.training for name, m in backbone.named_modules()}
    momenta = {name: m.momentum for name, m in norms.items()}
    backbone.eval()
    for m in norms.values():
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    try:
        for batch in batches:
            if batch is None or len(batch[0]) < 2:  # (batch norm in training mode cannot take a single image)
                continue
            with autocast(device, precision):
                backbone(batch[0].to(device, non_blocking=True))
        estimated = bn_stats(backbone)
    finally:
        for name, m in norms.items():
            m.momentum = momenta[name]
        for name, m in backbone.named_modules():
            m.train(modes[name])
        load_bn_stats(backbone, own)
    return estimated


class TrainForward(nn.Module):
    """What a training step with more than one stream computes, as one module (DDP wraps it whole).

    `forward(inputs, unlabeled, source)` returns, for the labelled batch, the unlabelled batch
    (adapt.unlabeled) and the source batch (source.train), their logits and backbone features (None for a
    stream without a batch; no source logits when the source has classes of its own: its head is the
    source term's). `inputs` are images through the whole model, or cached features through its head
    (`head_only`). All batches go through one concatenated pass, except that with `target_stats` (AdaBN)
    the unlabelled images pass the backbone on their own, with the target's batch-norm statistics: as they
    are (a frozen backbone: batch norm in eval mode), or from the batch, with the target's running
    statistics updated in place (a backbone that trains: domain-specific batch norm).
    """

    def __init__(
        self,
        model: nn.Module,
        head_only: bool,
        target_stats: dict[str, torch.Tensor] | None,
        source_shares_head: bool = True,
    ) -> None:
        super().__init__()
        self.model, self.head_only, self.target_stats = model, head_only, target_stats
        self.source_shares_head = source_shares_head

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        return batch if self.head_only else self.model.features(batch)

    def forward(
        self, inputs: torch.Tensor, unlabeled: torch.Tensor | None = None, source: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, ...]:
        parts = [inputs, unlabeled, source]
        sizes = [0 if part is None else part.shape[0] for part in parts]
        if self.target_stats is not None and unlabeled is not None and not self.head_only:
            own = self._features(torch.cat([p for p in (inputs, source) if p is not None]))
            with using_bn_stats(self.model.backbone, self.target_stats):
                target = self._features(unlabeled)
            features = torch.cat([own[: sizes[0]], target, own[sizes[0] :]])
        else:
            features = self._features(torch.cat([p for p in parts if p is not None]))
        heads = sizes[0] + sizes[1] + (sizes[2] if self.source_shares_head else 0)
        logits = self.model.head(features[:heads])
        bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
        out: list[torch.Tensor | None] = []
        for index in range(3):
            start, stop = bounds[index], bounds[index + 1]
            present = sizes[index] > 0
            shares = index < 2 or self.source_shares_head
            out += [logits[start:stop] if present and shares else None, features[start:stop] if present else None]
        return tuple(out)


# --- what a run needs of adaptation ---------------------------------------------------------------


def scan_unlabeled(folder: str) -> list[Sample]:
    """The images of `adapt.unlabeled` (any depth, no class folders), as samples with label -1."""
    root = Path(folder)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"adapt.unlabeled {folder} {what}", "give a folder of target-domain images")
    samples = [(str(path), -1) for path in image_files(root)]
    if not samples:
        raise DataError(
            f"adapt.unlabeled {folder} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})",
            "give a folder of target-domain images, or leave adapt.unlabeled unset",
        )
    return samples


def check_adaptation(cfg: Config, plan: UnfreezePlan) -> None:
    """What the adaptation methods need of what trains (the plan's answer)."""
    if cfg.adapt.method == "dann" and not plan.backbone_ever_trains():
        raise ConfigError(
            "adapt.method=dann needs a backbone that trains: with it frozen the features cannot align",
            "set train.freeze=none (or an unfreeze plan), or use adapt.method=mcc",
        )


def adabn_stats(
    cfg: Config,
    model: nn.Module,
    built: BuiltModel,
    unlabeled: list[Sample],
    resumed: Checkpoint | None,
    device: torch.device,
    precision: str,
) -> dict[str, dict[str, torch.Tensor]]:
    """AdaBN's two sets of batch-norm statistics: the source's (the backbone's own) and the target's.

    A new run estimates the target's on the unlabelled images (every rank on all of them: the same numbers
    everywhere). A resumed one takes both from its checkpoint, whose model carries the target's, and puts
    the source's back in the model: the labelled images are normalized with them during training. (When
    the backbone trains, each set then follows its own domain's batches; under torchrun the target's are
    rank 0's in the checkpoint, as each rank's batch norm sees its own batches.)
    """
    if resumed is not None and resumed.bn_stats:
        stats = {which: {k: v.to(device) for k, v in part.items()} for which, part in resumed.bn_stats.items()}
        load_bn_stats(model.backbone, stats["source"])
        return stats
    batches = make_loader(unlabeled, eval_transform(built.preprocess), cfg.data.batch_size, cfg.data.num_workers,
                          cfg.run.seed, shuffle=False, pin_memory=device.type == "cuda")  # fmt: skip
    return {"source": bn_stats(model.backbone), "target": estimate_bn_stats(model.backbone, batches, device, precision)}
