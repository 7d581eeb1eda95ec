"""A trained checkpoint opened for inference: where `tltool eval`, `report`, `predict` and `export` start.

`open_trained(path, device)` reads a tltool checkpoint (weights_only), rebuilds its model in eval mode on
`device` and keeps what feeding and judging it takes: the preprocessing, the class names, and the data
config and seed of the run that trained it. `TrainedModel.samples(data)` gives the images to evaluate it
on: a `--data` folder or label file, labelled with the checkpoint's class indices, or the run's own val split,
recomputed with `scan_data` from the run's data config and seed (the same stratified split it trained
with), so eval, report and the export parity check all see the same images.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from tltool.checkpoint import Checkpoint, load_checkpoint
from tltool.config import DataConfig
from tltool.data import Preprocess, Sample, scan_data, scan_eval_folder
from tltool.data.fingerprint import keep_val_split
from tltool.data.labelfile import is_label_file
from tltool.errors import CheckpointError, DataError
from tltool.models import TransferModel, load_trained_model
from tltool.wise import wise_weights


@dataclass(frozen=True)
class TrainedModel:
    """A checkpoint's trained model (eval mode, on `device`) and what it was trained with."""

    path: Path
    checkpoint: Checkpoint
    model: TransferModel
    preprocess: Preprocess
    device: torch.device

    @property
    def class_names(self) -> list[str]:
        return list(self.checkpoint.class_names)

    @property
    def backbone(self) -> str:
        return str(self.checkpoint.arch["backbone"])

    @property
    def data_config(self) -> DataConfig:
        """The run's `data` section: its folders and split, and the batch size and workers eval defaults to."""
        try:
            return DataConfig.model_validate(self.checkpoint.config["data"])
        except (KeyError, TypeError, ValidationError) as exc:
            raise self._config_error("data", exc) from None

    @property
    def multilabel(self) -> bool:
        """Whether the run was data.task: multilabel (a sigmoid per class; labels are multi-hot)."""
        return self.checkpoint.config.get("data", {}).get("task", "multiclass") == "multilabel"

    @property
    def seed(self) -> int:
        """The run's seed: it drew the stratified val split."""
        try:
            return int(self.checkpoint.config["run"]["seed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise self._config_error("run.seed", exc) from None

    def _config_error(self, key: str, exc: Exception) -> CheckpointError:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return CheckpointError(
            f"{self.path} records no usable {key} config ({reason})", "give the images to evaluate with --data DIR"
        )

    def run_split(self, fix: str = "give the images to evaluate with --data DIR") -> tuple[list[Sample], list[Sample]]:
        """The run's (train, val) split, recomputed: a DataError (with `fix`) when its dataset is gone or no
        longer has its classes.

        With the checkpoint's data fingerprint, its own val split (a run continued with --resume-changed-data
        kept the split it started with: the stratified split of today's files may differ).
        """
        split = scan_data(self.data_config, self.seed)
        if split.class_names != self.class_names:
            raise DataError("the dataset recorded in the checkpoint no longer has the checkpoint's classes", fix)
        saved = (self.checkpoint.data_fingerprint or {}).get("val_split")
        if saved is not None and split.split_from_train:
            return keep_val_split(split.train, split.val, saved, split.root)
        return split.train, split.val

    def run_val_samples(self) -> list[Sample]:
        """The run's val split, recomputed (`run_split`)."""
        return self.run_split()[1]

    def samples(self, data: str | None = None, allow_empty: bool = False) -> tuple[list[Sample], str]:
        """The images to evaluate on and where they are: the `data` folder if given, else the run's val split.

        The samples carry the checkpoint's class indices (a `data` folder may hold a subset of its classes).
        No readable image is a DataError, unless `allow_empty` (the export parity check then uses random
        pixels).
        """
        delimiter = self.data_config.label_delimiter if self.multilabel else None
        if data and is_label_file(data):  # (read with the run's column names)
            data_cfg = self.data_config
            samples = scan_eval_folder(data, self.class_names, data_cfg.path_column, data_cfg.label_column, delimiter)
            source = data
        elif data:
            samples, source = scan_eval_folder(data, self.class_names, label_delimiter=delimiter), data
        else:
            data_cfg = self.data_config
            samples, source = self.run_val_samples(), f"val split of {data_cfg.val or data_cfg.train}"
        if not samples and not allow_empty:
            raise DataError(
                f"no images to evaluate in {source}", "give a folder of class sub-folders or a label file with --data"
            )
        return samples, source


def open_trained(
    path: str | Path, device: torch.device | str = "cpu", wise_alpha: float | None = None, calibrated: bool = True
) -> TrainedModel:
    """The trained model of the tltool checkpoint at `path`, in eval mode on `device`.

    A calibrated checkpoint's model divides its logits by the checkpoint's temperature (`calibration.py`),
    unless `calibrated` is False (fitting T needs the raw logits; a distillation teacher keeps its own). With
    `wise_alpha` no temperature is applied: T was fitted for the checkpoint's weights, not theta(alpha).

    With `wise_alpha`, the model is WiSE-FT's theta(alpha) of the checkpoint's starting and fine-tuned weights
    (`wise.wise_weights`: a ConfigError for alpha outside [0, 1], a CheckpointError without theta0).
    Every problem with the file (missing, truncated, unsafe pickle, not a tltool checkpoint, a newer
    format, weights that do not fit its architecture) is a one-line CheckpointError.
    """
    checkpoint = load_checkpoint(path)
    if wise_alpha is not None:
        # (the run's T and thresholds belong to the checkpoint's weights, not to theta(alpha))
        checkpoint = dataclasses.replace(checkpoint, model=wise_weights(checkpoint, wise_alpha, path), thresholds=None)
    device = torch.device(device)
    model = load_trained_model(checkpoint).to(device)
    if calibrated and wise_alpha is None and checkpoint.temperature is not None:
        model.temperature = float(checkpoint.temperature)
    return TrainedModel(Path(path), checkpoint, model, Preprocess.from_dict(checkpoint.preprocess), device)
