"""LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution").

`train.head_init: probe`: a new run starts its head from a linear probe of the frozen pretrained features,
then fine-tunes as configured. A random head sends large, arbitrary gradients into the backbone in the first
steps and distorts the features it was chosen for; a head that already classifies does not.

The probe is `tltool baseline`'s, fitted the same way (`baseline.frozen_features`, `baseline.fit_probe`):
the backbone runs once over the training images with the eval transform, then a multinomial logistic
regression is fitted on the standardized features, its L2 penalty chosen on a stratified, seeded 20% of the
*training* features held out from the fit, then refitted on all of them. The val images are never seen.
The standardization is folded into the head's Linear, W' = W / std and b' = b - W' . mean, so before the
first step the model's logits are the probe's decision scores.

Under torchrun every process fits the same probe on all the training images (the weights it starts DDP
with are rank 0's in any case).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from tltool.baseline import Probe, fit_probe, frozen_features
from tltool.config import Config
from tltool.data import DataSplit
from tltool.models import BuiltModel
from tltool.runlog import say


def init_head_from_probe(
    cfg: Config,
    built: BuiltModel,
    split: DataSplit,
    device: torch.device,
    precision: str,
    *,
    resumed: bool,
    dry_run: bool,
    quiet: bool,
) -> Probe | None:
    """Under `train.head_init: probe`, set the new head to the linear probe of `split.train`; the probe, or None.

    Nothing happens for a resumed run (its head comes from the checkpoint) or a dry run (nothing trains).
    `built.model` must already be on `device`; its training mode is left as it was.
    """
    if cfg.train.head_init != "probe" or resumed or dry_run:
        return None
    start = time.perf_counter()
    backbone = built.model.backbone
    training = backbone.training
    features, labels = frozen_features(cfg, backbone, built.preprocess, split.train, device, precision, "train", quiet)
    backbone.train(training)
    # The fit is small dense algebra: on the run's device, in float32 (as `tltool baseline` does).
    probe = fit_probe(features.to(device), labels.to(device), len(split.class_names), cfg.run.seed)
    weight, bias = probe.folded()
    linear: nn.Linear = built.model.head[-1]  # models.make_head: dropout, then this Linear
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    say(
        quiet,
        f"LP-FT: head from the linear probe of {labels.numel()} train images (l2={probe.l2:g}, chosen on "
        f"{probe.holdout_images} of them held out) in {time.perf_counter() - start:.1f} s",
    )
    return probe
