"""The whole run's config, `Config`: the sections together and the rules that span two of them."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import Field, model_validator

from tltool.config.sections import (
    AdaptConfig,
    CheckpointConfig,
    DataConfig,
    DistillConfig,
    LogConfig,
    ModelConfig,
    RunConfig,
    Section,
    SourceConfig,
    TrainConfig,
)


class Config(Section):
    """A whole tltool run."""

    run: RunConfig = Field(default_factory=RunConfig)
    """Name, directory, seed and device of the run."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Where the images are and how they are preprocessed."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The backbone, its pretrained weights and the new head."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """The training loop."""
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)
    """Domain adaptation from unlabelled target images."""
    source: SourceConfig = Field(default_factory=SourceConfig)
    """A labelled source dataset to co-train on."""
    distill: DistillConfig = Field(default_factory=DistillConfig)
    """Knowledge distillation from a trained tltool checkpoint."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """What is kept of the run."""
    log: LogConfig = Field(default_factory=LogConfig)
    """What is shown while training."""

    @model_validator(mode="after")
    def _unlabeled_used(self) -> Config:
        adapt = self.adapt
        if adapt.unlabeled and adapt.method == "none" and adapt.bn_stats == "source" and not self.distill.teacher:
            raise ValueError(
                "adapt.unlabeled is set but nothing uses it: set adapt.method (mcc, dann), adapt.bn_stats or "
                "distill.teacher"
            )
        return self

    @model_validator(mode="after")
    def _mixing_needs_images(self) -> Config:
        if self.data.mixing and self.train.feature_cache == "on":
            raise ValueError(
                "train.feature_cache: on cannot serve data.mixup_alpha / data.cutmix_alpha (mixing blends images, "
                "the cache holds features): set train.feature_cache to auto or off, or turn mixing off"
            )
        return self

    @model_validator(mode="after")
    def _shards_stream(self) -> Config:
        data = self.data
        if not (str(data.train or "").strip().lower().endswith(".tar")):  # (data.shards.is_shard_source)
            return self
        if not data.val:
            raise ValueError(
                "data.train is .tar shards, which stream: data.val_split cannot hold images out of them: set data.val "
                "(tltool shard --val-split 0.2 writes val-*.tar)"
            )
        if data.sampler == "balanced":
            raise ValueError("data.sampler: balanced needs random access, which .tar shards do not give: use shuffle")
        if self.train.feature_cache == "on":
            raise ValueError("train.feature_cache: on cannot cache streamed .tar shards: set it to auto or off")
        return self

    @model_validator(mode="after")
    def _cotuning_weights(self) -> Config:
        if self.train.cotuning_weight > 0 and self.model.weights.lower() == "none":
            raise ValueError(
                "train.cotuning_weight needs the pretrained classifier of model.weights, but model.weights is none: "
                "set model.weights (e.g. DEFAULT) or train.cotuning_weight=0"
            )
        return self

    @model_validator(mode="after")
    def _ema_monitored(self) -> Config:
        if self.checkpoint.monitor.endswith("_ema") and self.train.ema_decay is None:
            raise ValueError(
                f"checkpoint.monitor={self.checkpoint.monitor} needs train.ema_decay (e.g. 0.9998), or monitor "
                f"{self.checkpoint.monitor.removesuffix('_ema')}"
            )
        return self

    @model_validator(mode="after")
    def _multilabel_keys(self) -> Config:
        if self.data.task != "multilabel":
            if self.checkpoint.monitor in ("val_map", "val_map_ema"):
                raise ValueError(
                    f"checkpoint.monitor={self.checkpoint.monitor} needs data.task: multilabel (or monitor "
                    f"{self.checkpoint.monitor.replace('map', 'acc1')})"
                )
            return self
        refused = [key for key, value in multilabel_refused(self).items() if value]
        if refused:
            raise ValueError(
                f"data.task: multilabel does not work with {', '.join(refused)} (softmax-based or single-label "
                "methods): unset them, or use data.task: multiclass"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-safe dict with every default filled in."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def multilabel_refused(cfg: Config) -> dict[str, bool]:
    """The keys a multilabel run refuses (each True when set): they assume one class per image (softmax)."""
    train = cfg.train
    return {
        "data.mixup_alpha/cutmix_alpha": cfg.data.mixing,
        "data.sampler=balanced": cfg.data.sampler == "balanced",
        "train.label_smoothing": train.label_smoothing > 0,
        "train.cotuning_weight": train.cotuning_weight > 0,
        "train.head_init=probe": train.head_init == "probe",
        "train.wise_alpha": train.wise_alpha is not None,
        "train.calibrate": train.calibrate,
        "adapt.method": cfg.adapt.method != "none",
        "adapt.unlabeled": bool(cfg.adapt.unlabeled),
        "distill.teacher": bool(cfg.distill.teacher),
        "source.train": bool(cfg.source.train),
    }
