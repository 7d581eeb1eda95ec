"""WiSE-FT in a run (`train.wise_alpha`): keep theta0, and at the end write `checkpoints/wise.pt`.

`build_session` takes theta0 (`start_wise`: the model after its head is initialized, before the first step,
or the resumed checkpoint's) and, with `auto`, keeps a part of the training images out of training
(`wise_holdout`). At the end of the run `finish_wise` interpolates theta0 with the fine-tuned weights of
best.pt (last.pt when checkpoint.save_best is off), `wise.theta(alpha)`, and writes the result to
`checkpoints/wise.pt`; best.pt and last.pt stay as trained (a resume continues from them, and `tltool eval
--wise-alpha` can try other alphas on them).

`train.wise_alpha: auto` chooses alpha from 0, 0.1, ..., 1 on a stratified, seeded 10% of the training
images (per class round(10%), at least one, never all: `baseline.holdout_split`) that the run never trains
on: the one with the best held-out top-1, ties to the lower held-out loss. Neither val nor test labels are
used to choose; the val split is only scored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tltool import distributed
from tltool.baseline import holdout_split
from tltool.checkpoint import Checkpoint, load_checkpoint, save_atomic
from tltool.config import Config
from tltool.data import DataSplit, Sample, eval_transform, make_loader
from tltool.errors import CheckpointError, DataError
from tltool.evaluate import evaluate
from tltool.models import model_from_arch
from tltool.runlog import say
from tltool.wise import initial_weights, interpolate

if TYPE_CHECKING:
    from tltool.session import TrainingSession

WISE_GRID = tuple(step / 10 for step in range(11))
WISE_HOLDOUT_FRACTION = 0.1


@dataclass
class WiseStart:
    """What WiSE-FT keeps through a run: theta0, and (with `auto`) the train images held out to choose alpha."""

    initial: dict[str, torch.Tensor]
    holdout: list[Sample]


def wise_holdout(cfg: Config, split: DataSplit) -> tuple[DataSplit, list[Sample]]:
    """The split to train on and the train images held out to choose alpha (none unless `wise_alpha: auto`)."""
    if cfg.train.wise_alpha != "auto":
        return split, []
    labels = torch.tensor([label for _, label in split.train], dtype=torch.long)
    keep, held = holdout_split(labels, WISE_HOLDOUT_FRACTION, cfg.run.seed)
    if held.numel() == 0:
        raise DataError(
            "train.wise_alpha=auto holds out train images to choose alpha, and no class has two of them",
            "add train images, or give train.wise_alpha a number (e.g. 0.5)",
        )
    train = [split.train[i] for i in keep.tolist()]
    return dataclasses.replace(split, train=train), [split.train[i] for i in held.tolist()]


def start_wise(cfg: Config, model: nn.Module, resumed: Checkpoint | None, holdout: list[Sample]) -> WiseStart | None:
    """theta0 of the run (None unless `train.wise_alpha` is set): `model` now, or the resumed checkpoint's."""
    if cfg.train.wise_alpha is None:
        return None
    if resumed is None:
        return WiseStart(initial_weights(model), holdout)
    if resumed.initial_model is None:
        raise CheckpointError(
            "the checkpoint to resume holds no starting weights (theta0) for train.wise_alpha",
            "resume from the run's checkpoints/last.pt",
        )
    return WiseStart(dict(resumed.initial_model), holdout)


def choose_alpha(
    model: nn.Module,
    initial: dict[str, Any],
    finetuned: dict[str, Any],
    held_out: Iterable[Any],
    device: torch.device,
    precision: str,
    num_classes: int,
    grid: Sequence[float] = WISE_GRID,
) -> tuple[float, list[dict[str, float]]]:
    """The alpha of `grid` whose theta(alpha) has the best top-1 on the `held_out` batches (ties: lower loss).

    Returns (alpha, one row per alpha: alpha, holdout_acc1, holdout_loss). `model` is overwritten.
    """
    rows = []
    for alpha in grid:
        model.load_state_dict(interpolate(initial, finetuned, alpha))
        metrics = evaluate(model, held_out, device, precision, num_classes)
        rows.append({"alpha": alpha, "holdout_acc1": metrics["acc1"], "holdout_loss": metrics["loss"]})
    best = max(rows, key=lambda row: (row["holdout_acc1"], -row["holdout_loss"]))
    return best["alpha"], rows


def finish_wise(session: TrainingSession) -> dict[str, Any]:
    """Write checkpoints/wise.pt, theta(alpha) of the run's best.pt (or last.pt), and return summary.json's `wise`.

    Every process calls it (the held-out and val images are sharded, their sums all-reduced); rank 0 writes.
    """
    cfg, world, device = session.cfg, session.world, session.device
    num_classes = len(session.split.class_names)
    source = session.checkpoint_dir / ("best.pt" if cfg.checkpoint.save_best else "last.pt")
    distributed.barrier()  # rank 0 wrote it
    checkpoint = load_checkpoint(source)
    initial = session.wise.initial
    model = model_from_arch(checkpoint.arch).to(device)
    entry: dict[str, Any] = {"from": str(source), "batch_norm": "running statistics interpolated as the weights"}
    if cfg.train.wise_alpha == "auto":
        loader = make_loader(
            session.wise.holdout,
            eval_transform(session.built.preprocess),
            cfg.data.batch_size,
            cfg.data.num_workers,
            cfg.run.seed,
            shuffle=False,
            pin_memory=device.type == "cuda",
            shard=world.shard,
        )
        alpha, rows = choose_alpha(model, initial, checkpoint.model, loader, device, session.precision, num_classes)
        how = f"chosen on {len(session.wise.holdout)} held-out train images"
        entry.update(holdout_images=len(session.wise.holdout), grid=rows)
    else:
        alpha, how = float(cfg.train.wise_alpha), "train.wise_alpha"
    weights = interpolate(initial, checkpoint.model, alpha)
    model.load_state_dict(weights)
    val = evaluate(model, session.image_val, device, session.precision, num_classes)
    target = session.checkpoint_dir / "wise.pt"
    if world.is_main:
        # theta(alpha) is the model here; without theta0 it cannot be taken for a fine-tuned model and re-mixed.
        save_atomic(dataclasses.replace(checkpoint, model=weights, initial_model=None).to_dict(), target)
    distributed.barrier()
    finetuned = checkpoint.metrics.get("val_acc1")
    say(
        session.quiet,
        f"WiSE-FT: alpha {alpha:g} ({how}) on {source.name}: val top-1 {val['acc1']:.1%}"
        + (f" (fine-tuned {finetuned:.1%})" if finetuned is not None else "")
        + f" -> {target}",
    )
    entry.update(alpha=alpha, chosen_by=how, checkpoint=str(target), val_acc1=val["acc1"], val_acc5=val["acc5"],
                 val_loss=val["loss"], finetuned_val_acc1=finetuned)  # fmt: skip
    return entry
