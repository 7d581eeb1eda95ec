"""MixUp / CutMix of training batches (`data.mixup_alpha`, `data.cutmix_alpha`, `data.mix_prob`).

torchvision's `v2.MixUp` / `v2.CutMix` (one of the two at random, `v2.RandomChoice`, when both are set)
applied by the training loop to each labelled batch after it reaches the device, before the forward. The
random draws (whether the batch is mixed, which of the two, lambda, CutMix's box) come from torch's default CPU
generator, seeded for the batch by (run.seed, epoch, batch index, rank) and put back afterwards: a batch mixes
the same way with any worker count and after a mid-epoch resume (nothing to save), and the main RNG (dropout)
is untouched. Under torchrun each rank mixes its own shard of the global batch, pairing its images among
themselves (v2's pairing: each image with the one before it in the batch, which the sampler has shuffled).

Only the `train` stream is mixed: the adaptation (`adapt.unlabeled`) and `source.train` streams and
evaluation see unmixed images.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2 as T

from tltool.config import DataConfig


class BatchMixer:
    """(images, labels) of a batch -> (mixed images, soft targets (batch, classes), dominant labels)."""

    def __init__(self, cfg: DataConfig, num_classes: int, seed: int) -> None:
        choices = []
        if cfg.mixup_alpha > 0:
            choices.append(T.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
        if cfg.cutmix_alpha > 0:
            choices.append(T.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
        if not choices:
            raise ValueError("BatchMixer needs data.mixup_alpha or data.cutmix_alpha")
        self.mix = choices[0] if len(choices) == 1 else T.RandomChoice(choices)
        self.num_classes, self.prob, self.seed = num_classes, cfg.mix_prob, seed

    def batch_seed(self, epoch: int, index: int, rank: int = 0) -> int:
        """The seed of batch `index` (0-based, in the epoch) of `epoch` on `rank`."""
        return ((self.seed * 1_000_003 + epoch) * 7_919 + index) * 104_729 + rank * 15_485_863 + 1

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, epoch: int, index: int, rank: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(self.batch_seed(epoch, index, rank) % 2**63)
        try:
            if torch.rand(()).item() < self.prob:
                images, targets = self.mix(images, labels)
            else:  # an unmixed batch: its one-hot targets (the same loss as the hard labels)
                targets = torch.nn.functional.one_hot(labels, self.num_classes).float()
        finally:
            generator.set_state(state)
        # Train accuracy counts a hit on the dominant label: the image's own when its share is at least half,
        # else its partner's (v2 pairs each image with the one before it).
        own = targets.gather(1, labels[:, None]).squeeze(1) >= 0.5
        return images, targets, torch.where(own, labels, labels.roll(1, 0))


def make_mixer(cfg: DataConfig, num_classes: int, seed: int) -> BatchMixer | None:
    """The run's batch mixer, or None when mixing is off."""
    return BatchMixer(cfg, num_classes, seed) if cfg.mixing else None
