"""Instance-based transfer: co-training on a labelled source dataset (`source.*`).

Each training step draws a batch of source images beside the labelled target batch (session.py's `source`
stream); the `source` term of the objective is their cross-entropy, times `source.weight`. When the source
has the target's classes (same names, same order) both share the head; otherwise the source images get a
head of their own (the term's module: its own optimizer group, saved with the run, never exported).

- `source.select: nearest` keeps only the source images nearest to the target training images in the
  pretrained backbone's feature space, `select_k` per target image (selective joint fine-tuning, Ge & Yu,
  CVPR 2017, with the backbone's features in place of their filter-bank histograms).
- `source.class_weights: target_prior` weighs each source class by the model's mean predicted probability
  of it on the target training images, scaled to a maximum of 1 and re-estimated at the start of every
  epoch (PADA, Cao, Ma, Long, Wang, ECCV 2018): classes the target lacks fade out of the source loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tltool.config import Config
from tltool.data import DataSplit, Sample, eval_transform, make_loader, scan_folder
from tltool.data.fingerprint import sample_key, stream_listing
from tltool.errors import DataError
from tltool.extraction import extract
from tltool.models import BuiltModel


@dataclass
class SourceData:
    """The source images a run co-trains on, and how their classes relate to the target's."""

    class_names: list[str]
    samples: list[Sample]  # after selection
    shares_head: bool  # the same classes as the target, in the same order
    scanned: int  # source images before selection
    listing: dict = field(default_factory=dict)  # the data fingerprint's listing of the folder (before selection)
    selection: torch.Tensor | None = None  # source.select=nearest: the kept images' keys (fingerprint.sample_key)


def select_nearest(target: torch.Tensor, source: torch.Tensor, k: int) -> list[int]:
    """The union, sorted, of the `k` source rows nearest (cosine) to each target row."""
    if not len(target) or not len(source):
        return []
    similarity = F.normalize(target.float(), dim=1) @ F.normalize(source.float(), dim=1).T
    nearest = similarity.topk(min(k, source.shape[0]), dim=1).indices
    return sorted(set(nearest.flatten().tolist()))


def target_prior(probabilities: torch.Tensor) -> torch.Tensor:
    """PADA's class weights: the mean predicted probability of each source class on the target images, over
    its maximum (the most predicted class weighs 1)."""
    prior = probabilities.float().mean(dim=0)
    return prior / prior.max().clamp_min(1e-12)


def open_source(
    cfg: Config,
    split: DataSplit,
    built: BuiltModel,
    device: torch.device,
    precision: str,
    selection: torch.Tensor | None = None,
) -> SourceData:
    """Scan source.train and apply source.select (with the backbone as built: pretrained, untrained yet).

    `selection`: a resumed run's kept images (its checkpoint's `SourceData.selection`): the same images again,
    not a new choice by the backbone it has trained since."""
    class_names, samples = scan_folder(cfg.source.train, key="source.train")
    scanned = len(samples)
    listing = stream_listing(cfg.source.train, samples, class_names)
    root = str(cfg.source.train)
    if cfg.source.select == "nearest" and selection is not None:
        keep = set(selection.tolist())
        samples = [sample for sample in samples if sample_key(sample[0], root) in keep]
    elif cfg.source.select == "nearest":
        features = []
        for items in (split.train, samples):
            loader = make_loader(items, eval_transform(built.preprocess), cfg.data.batch_size,
                                 cfg.data.num_workers, cfg.run.seed, shuffle=False)  # fmt: skip
            features.append(extract(built.model.backbone, loader, device, precision)[0])
            if len(features[-1]) != len(items):
                raise DataError(
                    "source.select=nearest: some images could not be decoded, so their features are missing",
                    "run tltool doctor on data.train and source.train and remove the broken files",
                )
        samples = [samples[i] for i in select_nearest(features[0], features[1], cfg.source.select_k)]
    chosen = None
    if cfg.source.select == "nearest":
        chosen = torch.tensor(sorted(sample_key(path, root) for path, _ in samples), dtype=torch.int64)
    return SourceData(class_names, samples, class_names == split.class_names, scanned, listing, chosen)
