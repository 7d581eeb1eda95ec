"""The config: a tree of frozen, validated pydantic models, loaded from YAML plus dotted overrides.

Every field has a default that works and a docstring; the docstrings are the reference that
`tltool config init`, `tltool config show` and the README print. All problems of a config are
reported at once, each with its dotted key, the bad value and an example of a valid one.

Validating a config imports neither torch nor torchvision. Whether `model.backbone` and `model.weights`
name a torchvision model and its weights is asked of `ModelNames` given to `load_config` (the CLI gives
torchvision's, `tltool.catalog.TORCHVISION_NAMES`): the answer needs torchvision, ~3 s to import.

Past 500 lines on purpose: this file is the contract of every config key, one section class per config
section, each field with its docstring (the docs are generated from it, in config_docs.py); splitting the
sections across files would scatter that one reference. Override parsing and validation are below it; the
YAML file is read by config_yaml.py.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from tltool.config_yaml import read_yaml, yaml_text
from tltool.device import device_problem
from tltool.errors import ConfigError

WEIGHTS_FILE_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")


DURATION_GRAMMAR = 'seconds, or hours/minutes/seconds like "3h30m", "90m", "1.5h", "45s"'


def parse_duration(value: float | int | str) -> float:
    """The seconds of a duration (`run.time_limit`): a number of seconds, or "<n>h<n>m<n>s" with each part
    optional but in that order ("3h30m", "90m", "1.5h", "45s"). Raises ValueError naming the grammar."""
    import re

    seconds = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = r"(\d+(?:\.\d*)?|\.\d+)"
        match = re.fullmatch(rf"(?:{number}h)?(?:{number}m)?(?:{number}s)?", text)
        if re.fullmatch(number, text):
            seconds = float(text)
        elif text and match is not None:
            hours, minutes, secs = (float(part) if part else 0.0 for part in match.groups())
            seconds = hours * 3600 + minutes * 60 + secs
    if seconds is None:
        raise ValueError(f"{value!r} is not a duration: give {DURATION_GRAMMAR}")
    if not 0 < seconds < float("inf"):
        raise ValueError(f"must be more than 0 seconds (got {value!r})")
    return seconds


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        validate_default=True,
        coerce_numbers_to_str=True,
    )


class RunConfig(_Section):
    name: str = Field("tltool-run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", examples=["flowers-resnet18"])
    """Name of the run; its files go to `runs/<name>/` unless `run.output_dir` is set."""
    output_dir: str | None = Field(None, examples=["runs/flowers-v2"])
    """Run directory (overrides `runs/<name>`); a second run never silently overwrites a first."""
    seed: int = Field(0, ge=0, examples=[42])
    """Seed for every random choice (split, shuffling, augmentation, head init): same seed, same run."""
    device: str = Field("auto", examples=["cuda:0"])
    """auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps; under torchrun each process uses its local GPU."""
    compile: bool = Field(False, examples=[True])
    """torch.compile the training forward: a slow first step (20-70 s on CPU), then ~1.1-1.2x faster full training."""
    dist_timeout_s: int = Field(1800, ge=10, le=86400, examples=[600])
    """torchrun: seconds a process waits for the others in a collective before the job fails (a rank died or hangs)."""
    time_limit: float | str | None = Field(None, examples=["3h30m"])
    """Wall-clock limit of this process's run: seconds, or "3h30m", "90m", "45s"; it saves and stops (exit 75) in time
    for a last step, evaluation and save; a resume gets the limit again."""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        problem = device_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("time_limit")
    @classmethod
    def _time_limit(cls, value: float | str | None) -> float | str | None:
        if value is not None:
            parse_duration(value)
        return value

    def time_limit_seconds(self) -> float | None:
        return None if self.time_limit is None else parse_duration(self.time_limit)


class DataConfig(_Section):
    train: str | None = Field(None, examples=["data/flowers/train"])
    """Training images: a folder with one sub-folder per class (ImageFolder layout), a .csv/.tsv label file
    (`data.path_column`, `data.label_column`), or WebDataset .tar shards (`shards/train-{000000..000009}.tar`, a
    glob or a URL; written by `tltool shard`; then `data.val` is required). Required."""
    val: str | None = Field(None, examples=["data/flowers/val"])
    """Validation images with the same classes (a folder, a label file or .tar shards); when empty,
    `data.val_split` of train is held out."""
    val_split: float = Field(0.2, gt=0.0, lt=1.0, examples=[0.2])
    """Fraction of each class of `data.train` held out for validation when `data.val` is not set (stratified)."""
    path_column: str = Field("path", min_length=1, examples=["filename"])
    """Label files: the header of the column of image paths (relative to the file's folder, or absolute)."""
    label_column: str = Field("label", min_length=1, examples=["class"])
    """Label files: the header of the column of class names (one per row, not empty; with `data.task: multilabel`
    a list of them separated by `data.label_delimiter`)."""
    task: Literal["multiclass", "multilabel"] = Field("multiclass", examples=["multilabel"])
    """multiclass (one class per image, softmax + cross-entropy) or multilabel (any number of classes per image,
    from a label file: a sigmoid per class + binary cross-entropy; mAP and F1 at 0.5 in metrics.jsonl)."""
    label_delimiter: str = Field("|", min_length=1, max_length=1, examples=[";"])
    """data.task: multilabel: the character between the labels of one image in the label column (e.g. red|square);
    every image needs at least one label."""
    classes: list[str] | None = Field(None, examples=[["cat", "dog"]])
    """The class order (output index of each class): exactly the classes of `data.train`; default: sorted names."""
    image_size: int | None = Field(None, ge=8, le=4096, examples=[224])
    """Side of the square crop fed to the network; default: the pretrained weights' own crop size (often 224)."""
    resize_size: int | None = Field(None, ge=8, le=4096, examples=[256])
    """Shorter side is resized to this before the centre crop (eval); default: weights' preset, or image_size."""
    mean: tuple[float, float, float] | None = Field(None, examples=[[0.485, 0.456, 0.406]])
    """Per-channel normalization mean (RGB, 0-1 scale); default: the weights' preset (ImageNet)."""
    std: tuple[float, float, float] | None = Field(None, examples=[[0.229, 0.224, 0.225]])
    """Per-channel normalization std (RGB, 0-1 scale); default: the weights' preset (ImageNet)."""
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = Field(None, examples=["bilinear"])
    """Resize interpolation; default: the weights' preset."""
    batch_size: int = Field(32, ge=1, le=65536, examples=[64])
    """Images per training step and process; under torchrun the global batch is this x the number of processes."""
    num_workers: int | Literal["auto"] = Field("auto", examples=[4])
    """DataLoader worker processes that decode images: auto (this process's CPUs, at most 8; 0 below 2) or N."""
    augment: Literal["none", "light", "standard", "randaugment", "trivialaugment", "augmix"] = Field(
        "light", examples=["trivialaugment"]
    )
    """Train augmentation: none (eval transform), light (random crop 60-100% + flip), standard (crop 25-100%, flip,
    colour), or standard's crop and flip + a torchvision policy: randaugment, trivialaugment, augmix."""
    random_erasing: float = Field(0.0, ge=0.0, le=1.0, examples=[0.25])
    """Probability that a training image gets a random box erased (after normalization); 0 is off."""
    mixup_alpha: float = Field(0.0, ge=0.0, le=100.0, examples=[0.2])
    """MixUp: each mixed batch blends images and labels with a Beta(alpha, alpha) weight; 0 is off."""
    cutmix_alpha: float = Field(0.0, ge=0.0, le=100.0, examples=[1.0])
    """CutMix: each mixed batch pastes a box of another image, labels by area (Beta(alpha, alpha)); 0 is off."""
    mix_prob: float = Field(1.0, ge=0.0, le=1.0, examples=[0.5])
    """Probability that a training batch is mixed (MixUp or CutMix, one of the two at random when both are set)."""
    on_bad_image: Literal["skip", "error"] = Field("skip", examples=["error"])
    """An unreadable image is skipped with a warning (skip) or stops the run before training (error)."""
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0, examples=[0.05])
    """Stop before training when more than this fraction of the images is unreadable."""
    sampler: Literal["shuffle", "balanced"] = Field("shuffle", examples=["balanced"])
    """Training order: shuffle (each image once an epoch), balanced (drawn with replacement, classes equally often)."""
    shuffle_buffer: int = Field(1000, ge=0, le=10_000_000, examples=[5000])
    """Sharded `data.train` (`.tar` shards, `tltool shard`): samples each process holds to shuffle its stream
    (0 or 1: shard order only). The order is seeded per epoch, so a resume continues it exactly."""

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if len(value) < 2 or not all(name.strip() for name in value):
            raise ValueError("must list at least 2 class names, none of them empty")
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"lists {', '.join(repeated)} more than once")
        return value

    @model_validator(mode="after")
    def _columns(self) -> DataConfig:
        if self.path_column == self.label_column:
            raise ValueError(f"data.path_column and data.label_column are both {self.path_column!r}: name two columns")
        return self

    @property
    def mixing(self) -> bool:
        """Whether training batches are mixed (MixUp or CutMix)."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0


class ModelConfig(_Section):
    backbone: str = Field("resnet18", examples=["mobilenet_v3_small"])
    """A torchvision classification model name, or timm/<name>[.tag] (`tltool models`; timm: `tltool[timm]`)."""
    weights: str = Field("DEFAULT", examples=["IMAGENET1K_V1"])
    """none, a weights name (DEFAULT; torchvision's IMAGENET1K_V1, ...), a state_dict file, or a tltool checkpoint."""
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0, examples=[0.2])
    """Dropout before the new classification head."""

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, value: str, info: ValidationInfo) -> str:
        names = _model_names(info)
        problem = names.backbone_problem(value) if names else None
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str, info: ValidationInfo) -> str:
        backbone = info.data.get("backbone")
        names = _model_names(info)
        if names is None or backbone is None or weights_is_file(value) or value.lower() == "none":
            return value
        problem = names.weights_problem(backbone, value)
        if problem is not None:
            raise ValueError(problem)
        return value


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1, le=100000, examples=[20])
    """Number of passes over the training set."""
    freeze: str | list[str] = Field("backbone", examples=["backbone"])
    """backbone (train only the new head), none (train everything), or a list of module-name prefixes."""
    optimizer: Literal["sgd", "adam", "adamw"] = Field("adamw", examples=["sgd"])
    """Optimizer of the trainable parameters."""
    optimizer_impl: Literal["auto", "fused", "foreach", "loop"] = Field("auto", examples=["loop"])
    """Kernel of the step: auto (fused where torch has one for the device: 2-6x faster on CPU), fused, foreach, loop."""
    lr: float = Field(1e-3, gt=0.0, le=100.0, examples=[3e-4])
    """Peak learning rate (after warmup)."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0, examples=[0.9])
    """Momentum of sgd (beta1 is not changed for adam/adamw)."""
    weight_decay: float = Field(1e-4, ge=0.0, le=10.0, examples=[0.01])
    """Weight decay (decoupled for adamw)."""
    scheduler: Literal["none", "cosine", "step", "onecycle"] = Field("cosine", examples=["step"])
    """LR schedule after warmup, stepped every optimizer step: none, cosine, step, onecycle."""
    step_size: int = Field(10, ge=1, examples=[5])
    """Epochs between LR decays (scheduler: step)."""
    step_gamma: float = Field(0.1, gt=0.0, le=1.0, examples=[0.5])
    """LR factor at each decay (scheduler: step)."""
    warmup_epochs: float = Field(0.0, ge=0.0, examples=[1])
    """Linear LR warmup from 0, in epochs (fractions allowed)."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, examples=[0.1])
    """Label smoothing of the cross-entropy loss."""
    grad_clip_norm: float | None = Field(None, gt=0.0, examples=[1.0])
    """Clip the global gradient norm to this value (off when empty)."""
    accumulate_steps: int = Field(1, ge=1, le=4096, examples=[4])
    """Accumulate gradients over this many batches before each optimizer step."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", examples=["bf16"])
    """auto: bf16 on CUDA (else fp16); on CPU with bf16 hardware bf16 to train non-depthwise nets, else fp32."""
    early_stopping_patience: int | None = Field(None, ge=1, examples=[5])
    """Stop after this many epochs without improvement of `checkpoint.monitor` (off when empty)."""
    channels_last: Literal["auto", "on", "off"] = Field("auto", examples=["off"])
    """Memory layout of conv nets: channels_last is faster on CPU and CUDA (auto: on except for transformers)."""
    grad_checkpointing: bool = Field(False, examples=[True])
    """Keep only each backbone stage's input and recompute the rest in the backward: less activation memory
    for about one more forward per step; the same gradients and batch-norm statistics (tltool/gradckpt.py)."""
    feature_cache: Literal["auto", "on", "off"] = Field("auto", examples=["off"])
    """Frozen backbone: compute its features once and train the head on them (auto: on when augment is none)."""
    feature_cache_views: int = Field(1, ge=1, le=1000, examples=[5])
    """With augmentation, cache this many augmented views per image and cycle them over the epochs."""
    feature_cache_memory_mb: int = Field(4096, ge=0, examples=[1024])
    """Cached features larger than this are memory-mapped from their file instead of held in RAM."""
    feature_cache_dir: str | None = Field(None, examples=["/scratch/tltool-features"])
    """Folder of frozen features kept for later runs (empty: $TLTOOL_CACHE_DIR/features, else ~/.cache/tltool/...)."""
    feature_cache_max_mb: int | None = Field(None, ge=0, examples=[2048])
    """Size budget of that folder; least recently used out first (empty: $TLTOOL_CACHE_MAX_MB, else 10240; 0: none)."""
    feature_engine: Literal["auto", "eager", "compile", "onnxruntime"] = Field("auto", examples=["onnxruntime"])
    """What runs the frozen backbone to extract cached features: eager, compile (torch.compile), onnxruntime, or auto
    (onnxruntime on CPU at fp32 from 1,000 images if 1.1x faster than eager on its check, else eager); each is
    checked against eager on 2 batches first."""
    unfreeze_at_epoch: int | None = Field(None, ge=1, examples=[4])
    """Two-phase: epochs before N train the head only (train.freeze: backbone), from epoch N on the whole backbone."""
    unfreeze_schedule: dict[int, int | Literal["all"]] | None = Field(None, examples=[{3: 1, 5: 2, 7: "all"}])
    """Gradual unfreezing, {epoch: N or all}: from that epoch on, the last N stages of the backbone (or all) train."""
    unfreeze_warmup_epochs: float | None = Field(None, ge=0.0, examples=[1])
    """Linear LR warmup of each part of the backbone from the epoch it opens (empty: train.warmup_epochs)."""
    bn_policy: Literal["train", "frozen"] = Field("train", examples=["frozen"])
    """Batch norm of a training backbone: train (statistics update), frozen (eval mode; its affine weights learn)."""
    backbone_lr_mult: float = Field(1.0, gt=0.0, le=100.0, examples=[0.1])
    """Discriminative LR: the backbone trains at train.lr x this (the head at train.lr)."""
    layer_lr_decay: float = Field(1.0, gt=0.0, le=1.0, examples=[0.7])
    """Layer-wise LR decay: each backbone stage further from the head trains at the LR of the one above x this."""
    regularization: Literal["none", "l2sp"] = Field("none", examples=["l2sp"])
    """none (weight decay), or l2sp: alpha/2 sum (w - w0)^2 on the backbone + beta/2 sum w^2 on the head, no decay."""
    l2sp_alpha: float = Field(0.1, ge=0.0, le=100.0, examples=[0.01])
    """L2-SP strength pulling the backbone toward its starting (pretrained) weights w0."""
    l2sp_beta: float = Field(0.01, ge=0.0, le=100.0, examples=[0.001])
    """L2-SP plain L2 strength on the new head."""
    sync_batchnorm: bool = Field(False, examples=[True])
    """torchrun on GPUs: batch-norm statistics of the global batch (SyncBatchNorm), not of each process's part."""
    class_weights: Literal["none", "balanced"] | list[float] = Field("none", examples=["balanced"])
    """Loss weight per class: none, balanced (n_images / (n_classes x images of the class)), or one number per class."""
    head_init: Literal["random", "probe"] = Field("random", examples=["probe"])
    """New head's start: random, or probe (LP-FT): `tltool baseline`'s linear probe on the frozen train features."""
    wise_alpha: float | Literal["auto"] | None = Field(None, examples=[0.5])
    """WiSE-FT: checkpoints/wise.pt = (1-a) x start + a x fine-tuned weights; auto picks a on held-out train images."""
    cotuning_weight: float = Field(0.0, ge=0.0, le=100.0, examples=[2.3])
    """Co-Tuning (You et al. 2020): the pretrained classifier trains on as a second head against p(source class |
    target class), estimated once from the training images; this term's weight (0: off). The backbone must train."""
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0, examples=[0.9998])
    """Keep an exponential moving average of the weights, ema = d x ema + (1-d) x w after every optimizer step
    (batch-norm statistics too), evaluated every epoch as val_*_ema (off when empty)."""
    calibrate: bool = Field(False, examples=[True])
    """Temperature scaling at the end of training: fit one T on the val split's logits (min NLL), store it in
    last.pt and best.pt; eval, predict and exports then divide the logits by T (argmax unchanged)."""

    @field_validator("feature_cache", "channels_last", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare on/off as a boolean.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("feature_engine", mode="before")
    @classmethod
    def _feature_engine(cls, value: Any) -> Any:
        engines = ("auto", "eager", "compile", "onnxruntime")
        if isinstance(value, str) and value not in engines:
            close = difflib.get_close_matches(value.lower(), engines, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ValueError(f"unknown engine; {hint}one of {', '.join(engines)}")
        return value

    @field_validator("freeze")
    @classmethod
    def _freeze(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and value not in ("backbone", "none"):
            raise ValueError("must be backbone, none, or a list of module-name prefixes")
        if isinstance(value, list) and not all(value):
            raise ValueError("module-name prefixes must not be empty")
        return value

    @field_validator("class_weights", mode="before")
    @classmethod
    def _class_weights_words(cls, value: Any) -> Any:
        if value is None:  # YAML `null`
            return "none"
        if isinstance(value, str) and value not in ("none", "balanced"):
            raise ValueError("must be none, balanced, or a list of one weight per class")
        return value

    @field_validator("class_weights")
    @classmethod
    def _class_weights(cls, value: str | list[float]) -> str | list[float]:
        if isinstance(value, list) and (not value or not all(w > 0 and w < float("inf") for w in value)):
            raise ValueError("a list of class weights needs one positive number per class")
        return value

    @field_validator("wise_alpha", mode="before")
    @classmethod
    def _wise_alpha(cls, value: Any) -> Any:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if value not in (None, "auto") and not (number and 0.0 <= value <= 1.0):
            raise ValueError("must be a number from 0 (the starting weights) to 1 (the fine-tuned ones), or auto")
        return value

    @field_validator("unfreeze_schedule")
    @classmethod
    def _unfreeze_schedule(cls, value: dict[int, int | str] | None) -> dict[int, int | str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("give at least one epoch: stages entry, or leave it empty (null)")
        epochs = sorted(value)
        if epochs[0] < 1:
            raise ValueError("epochs count from 1")
        counts = [value[e] for e in epochs]
        if "all" in counts[:-1]:
            raise ValueError("'all' can only be the stages of the last epoch")
        numbers = [c for c in counts if c != "all"]
        if any(n < 1 for n in numbers) or any(b <= a for a, b in zip(numbers, numbers[1:], strict=False)):
            raise ValueError("stages must be at least 1 and grow from epoch to epoch (each entry opens more)")
        return {e: value[e] for e in epochs}

    @model_validator(mode="after")
    def _unfreeze_plan(self) -> TrainConfig:
        plan = "train.unfreeze_at_epoch" if self.unfreeze_at_epoch is not None else None
        if self.unfreeze_schedule is not None:
            if plan:
                raise ValueError("set train.unfreeze_at_epoch or train.unfreeze_schedule, not both")
            plan = "train.unfreeze_schedule"
        if plan is None:
            return self
        if self.freeze != "backbone":
            raise ValueError(f"{plan} opens a frozen backbone: it needs train.freeze: backbone (got {self.freeze!r})")
        last = self.unfreeze_at_epoch if self.unfreeze_at_epoch is not None else max(self.unfreeze_schedule or [0])
        if last > self.epochs:
            raise ValueError(f"{plan} opens at epoch {last}, after the last epoch (train.epochs {self.epochs})")
        return self


class CheckpointConfig(_Section):
    monitor: Literal[
        "val_acc1", "val_acc5", "val_loss", "val_acc1_ema", "val_acc5_ema", "val_loss_ema", "val_map", "val_map_ema"
    ] = Field("val_acc1", examples=["val_loss"])
    """Metric that picks `best.pt` and drives early stopping (accuracies, val_map: higher is better; loss: lower); a
    *_ema metric (train.ema_decay) makes the EMA weights the model of the run's checkpoints; val_map (the macro
    mean average precision) and val_map_ema (the EMA weights') need data.task: multilabel."""
    save_best: bool = Field(True, examples=[False])
    """Keep `checkpoints/best.pt`, the epoch with the best monitored metric."""
    every_n_steps: int | None = Field(None, ge=1, examples=[500])
    """Also save `last.pt` every this many optimizer steps within an epoch (a resume continues from that batch)."""


class AdaptConfig(_Section):
    """Feature-based domain adaptation: unlabelled images of the target domain next to the labelled ones."""

    unlabeled: str | None = Field(None, examples=["data/target_unlabeled"])
    """A folder of unlabelled target-domain images (any depth, no class folders needed); each training step draws
    a batch of them beside the labelled batch (the same batch size)."""
    bn_stats: Literal["source", "target"] = Field("source", examples=["target"])
    """target: batch-norm statistics re-estimated on the unlabelled images (AdaBN, Li et al. 2016); each domain is
    normalized with its own during training (a backbone that trains updates each from its own domain's batches)
    and the saved model carries the target's."""
    method: Literal["none", "mcc", "dann"] = Field("none", examples=["mcc"])
    """The adaptation loss on the unlabelled images: mcc (Minimum Class Confusion, Jin et al. 2020) or dann
    (domain-adversarial training with a gradient-reversal layer, Ganin et al. 2016; the backbone must train)."""
    weight: float = Field(1.0, ge=0.0, le=100.0, examples=[0.5])
    """Weight of the adaptation loss term."""
    warmup: Literal["ganin", "none"] = Field("ganin", examples=["none"])
    """ganin: the adaptation ramps in as 2 / (1 + exp(-10 p)) - 1 over training progress p (the term's weight for
    mcc, the gradient-reversal coefficient for dann); none: full strength from the first step."""
    mcc_temperature: float = Field(2.5, gt=0.0, le=100.0, examples=[3.0])
    """MCC's softmax temperature (the paper's and TLlib's default: 2.5)."""
    dann_hidden: int = Field(1024, ge=8, le=8192, examples=[256])
    """Width of the domain discriminator's two hidden layers (Linear-BN-ReLU twice, then one logit)."""

    @model_validator(mode="after")
    def _needs_images(self) -> AdaptConfig:
        if self.unlabeled is None and (self.method != "none" or self.bn_stats == "target"):
            raise ValueError("adapt.method and adapt.bn_stats=target need adapt.unlabeled (a folder of target images)")
        return self


class SourceConfig(_Section):
    """Instance-based transfer: a labelled source dataset trained on beside the target's (co-training)."""

    train: str | None = Field(None, examples=["data/source/train"])
    """An ImageFolder of labelled source images; each step draws a batch of them beside the labelled batch. Its
    classes may equal the target's (one head) or differ (a head of its own, trained and saved with the run)."""
    weight: float = Field(1.0, ge=0.0, le=100.0, examples=[0.3])
    """Weight of the source images' cross-entropy term."""
    select: Literal["all", "nearest"] = Field("all", examples=["nearest"])
    """nearest: keep only the source images nearest to the target training images in the pretrained feature
    space, `select_k` per target image (selective joint fine-tuning, Ge & Yu 2017); all: every source image."""
    select_k: int = Field(10, ge=1, le=10_000, examples=[50])
    """With select=nearest: the source images kept per target training image (their union is used)."""
    class_weights: Literal["none", "target_prior"] = Field("none", examples=["target_prior"])
    """target_prior: weigh each source class by how often the model predicts it on the target training images,
    re-estimated at the start of every epoch from the second on and scaled to a maximum of 1 (PADA, Cao et al.
    2018): source classes the target lacks fade out."""

    @model_validator(mode="after")
    def _needs_source(self) -> SourceConfig:
        if self.train is None and (self.select != "all" or self.class_weights != "none"):
            raise ValueError("source.select and source.class_weights need source.train (a folder of class folders)")
        return self


class DistillConfig(_Section):
    """Knowledge distillation (Hinton et al. 2015) from a trained model: relation-based transfer."""

    teacher: str | None = Field(None, examples=["runs/big/checkpoints/best.pt"])
    """A tltool checkpoint with the same classes (e.g. a big fine-tuned model) whose softened predictions the
    model learns to match, on the labelled images and, with adapt.unlabeled, on the unlabelled ones too."""
    weight: float = Field(1.0, ge=0.0, le=100.0, examples=[0.5])
    """Weight of the distillation term (T^2 KL(teacher || student) at the temperature below)."""
    temperature: float = Field(4.0, gt=0.0, le=100.0, examples=[2.0])
    """Softmax temperature of both models' predictions in the distillation term."""


class LogConfig(_Section):
    progress: bool = Field(True, examples=[False])
    """Show a progress bar per epoch (never when the output is not a terminal, or with --quiet)."""
    tensorboard: bool = Field(False, examples=[True])
    """Write TensorBoard scalars and hyper-parameters to `<run>/tensorboard` (`tensorboard --logdir runs`)."""
    report: bool = Field(False, examples=[True])
    """Write `<run>/report/` (plots and report.html, as `tltool report`) at the end of the run."""
    mlflow: bool = Field(False, examples=[True])
    """Log the run to MLflow (`pip install 'tltool[mlflow]'`): config as params, each metrics.jsonl record as metrics
    per epoch, tags, summary.json and the report as artifacts. Store: `$MLFLOW_TRACKING_URI`, else
    `<runs>/mlruns/mlflow.db` (SQLite) beside the run directory; a resumed run continues its MLflow run."""
    mlflow_experiment: str = Field("tltool", min_length=1, examples=["flowers"])
    """The MLflow experiment the run is logged in (created when missing); the MLflow run is named after `run.name`."""
    mlflow_checkpoints: bool = Field(False, examples=[True])
    """With `log.mlflow`, also upload checkpoints/last.pt, best.pt (and wise.pt) as artifacts at the end of the run."""


class Config(_Section):
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


# --- model names ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelNames:
    """The name checks of `model.backbone` and `model.weights`: each says why a name is wrong, or None."""

    backbone_problem: Callable[[str], str | None]
    """Why a backbone name is unknown (with the closest names), or None."""
    weights_problem: Callable[[str, str], str | None]
    """Why (backbone, weights name) is not one of the backbone's weights, or None (files and none not asked)."""


def _model_names(info: ValidationInfo) -> ModelNames | None:
    """The ModelNames this validation was given (`build_config(..., names=)`), or None: names unchecked."""
    return (info.context or {}).get("model_names")


def weights_is_file(weights: str) -> bool:
    """True when `model.weights` names a file rather than `none` or a torchvision weights name."""
    return weights.lower().endswith(WEIGHTS_FILE_SUFFIXES) or "/" in weights or "\\" in weights


# --- loading ----------------------------------------------------------------------------------------


def iter_fields(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[tuple[str, Any, str, Any]]:
    """Yield (dotted key, default, docstring, example) for every leaf field of the config."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from iter_fields(annotation, key + ".")
        else:
            example = info.examples[0] if info.examples else None
            doc = " ".join((info.description or "").split())  # (a docstring over several lines: one line)
            yield key, info.get_default(call_default_factory=True), doc, example


def all_keys() -> list[str]:
    return [key for key, *_ in iter_fields()]


def _field_info(loc: Sequence[Any]):
    """The FieldInfo of a (section, field) location, or None."""
    model: type[BaseModel] = Config
    info = None
    for part in loc:
        if not isinstance(part, str) or part not in model.model_fields:
            return info
        info = model.model_fields[part]
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return info


def _did_you_mean(loc: Sequence[Any]) -> str:
    """Suggestion for an unknown key at `loc` (same section first, then the same leaf name elsewhere)."""
    keys = all_keys()
    dotted = ".".join(str(p) for p in loc)
    if len(loc) == 1:
        candidates = list(Config.model_fields)
    else:
        parent = ".".join(str(p) for p in loc[:-1]) + "."
        candidates = [k for k in keys if k.startswith(parent)]
    close = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.6)
    if not close:
        leaf = str(loc[-1])
        close = [k for k in keys if k.endswith("." + leaf)] or difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else "see `tltool config init` for every key"


def did_you_mean(key: str) -> str:
    """The suggestion for an unknown dotted key, e.g. "did you mean 'train.lr'?" (as the config's own errors say)."""
    return _did_you_mean(key.split("."))


def _format_errors(error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        loc = [p for p in item["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function")))]
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{dotted}: unknown key; {_did_you_mean(loc)}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        info = _field_info(loc)
        example = ""
        if info is not None and info.examples:
            example = f"; e.g. {loc[-1]}: {yaml.safe_dump(info.examples[0], default_flow_style=True).strip()}"
            example = example.removesuffix("\n...").removesuffix(" ...")
        got = item.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{dotted}: {message}{got_text}{example}")
    return lines


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn `a.b=value` strings into a nested dict; values are read as YAML (`3`, `1e-4`, `[a, b]`, `null`)."""
    known = set(all_keys())
    tree: dict[str, Any] = {}
    problems = []
    for text in overrides:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"{text!r}: an override is KEY=VALUE, e.g. train.epochs=3")
            continue
        if key not in known:
            problems.append(f"{key}: unknown key; {_did_you_mean(key.split('.'))}")
            continue
        try:
            value = yaml_text(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    if problems:
        raise ConfigError(f"{len(problems)} bad override(s)", "fix them and run again", details=problems)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _value_kinds(annotation: Any) -> set[str]:
    """What a field's annotation accepts, coarsely: bool, number, str, none, literal, list, dict, model, any."""
    origin = get_origin(annotation)
    if origin in (Union, UnionType):
        return set().union(*(_value_kinds(arg) for arg in get_args(annotation)))
    if origin is Literal:
        return {"literal"}
    if origin in (list, tuple):
        return {"list"}
    if origin is dict:
        return {"dict"}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {"model"}
    return {bool: {"bool"}, int: {"number"}, float: {"number"}, str: {"str"}, type(None): {"none"}}.get(
        annotation, {"any"}
    )


def _element_annotations(annotation: Any, value: Any) -> list[tuple[str, Any, Any]]:
    """(index or key, annotation, item) of a list/tuple/dict value under a list/tuple/dict annotation."""
    for member in get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,):
        origin, args = get_origin(member), get_args(member)
        if origin is list and isinstance(value, list) and args:
            return [(f"[{i}]", args[0], item) for i, item in enumerate(value)]
        if origin is tuple and isinstance(value, list | tuple) and args:
            items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
            return [(f"[{i}]", item_type, item) for i, (item_type, item) in enumerate(zip(items, value, strict=False))]
        if origin is dict and isinstance(value, dict) and len(args) == 2:
            return [(f"[{k}]", args[1], item) for k, item in value.items()]
    return []


def strict_scalar_problems(data: Any, model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, problem) for booleans where numbers belong and numbers or strings where booleans belong.

    pydantic's lax mode would take `epochs: true` as 1 and `save_best: 0` or `"no"` as false: a typo or a
    YAML 1.1 surprise (`on`, `yes`) would run silently with a value nobody wrote.
    """
    if not isinstance(data, dict):
        return []
    problems: list[tuple[str, str]] = []
    for name, info in model.model_fields.items():
        if name in data:
            problems += _scalar_problems(data[name], info.annotation, f"{prefix}{name}")
    return problems


def _scalar_problems(value: Any, annotation: Any, dotted: str) -> list[tuple[str, str]]:
    kinds = _value_kinds(annotation)
    if "any" in kinds:
        return []
    if "model" in kinds:
        model = next(a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel))
        return strict_scalar_problems(value, model, dotted + ".")
    if isinstance(value, bool) and "bool" not in kinds and "number" in kinds:
        return [(dotted, f"must be a number, not {str(value).lower()} (a YAML boolean)")]
    if "bool" in kinds and kinds <= {"bool", "none"} and not isinstance(value, bool) and value is not None:
        return [(dotted, f"must be true or false, not {value!r}")]
    problems = []
    for index, item_annotation, item in _element_annotations(annotation, value):
        problems += _scalar_problems(item, item_annotation, f"{dotted}{index}")
    return problems


def build_config(data: dict[str, Any], source: str = "config", names: ModelNames | None = None) -> Config:
    """Validate a plain dict into a Config, reporting every problem at once (the model names too, given `names`).

    Booleans and numbers are strict (`strict_scalar_problems`): `epochs: true` is refused, not read as 1.
    """
    strict = strict_scalar_problems(data)
    lines = [f"{dotted}: {problem}{_example(dotted)}" for dotted, problem in strict]
    try:
        config = Config.model_validate(data, context={"model_names": names})
    except ValidationError as exc:
        flagged = tuple(f"{dotted}:" for dotted, _ in strict)  # one line per key: the strict one
        lines += [line for line in _format_errors(exc) if not line.startswith(flagged)]
    if not lines:
        return config
    raise ConfigError(
        f"{source} has {len(lines)} problem{'s' if len(lines) > 1 else ''}", "fix them and run again", details=lines
    )


def _example(dotted: str) -> str:
    """ "; e.g. key: value" from the field's first example, as the other config problems end."""
    info = _field_info(dotted.split("[")[0].split("."))
    if info is None or not info.examples:
        return ""
    text = yaml.safe_dump(info.examples[0], default_flow_style=True).strip().removesuffix("\n...").removesuffix(" ...")
    return f"; e.g. {dotted.split('[')[0].split('.')[-1]}: {text}"


def load_config(path: str | Path | None, overrides: Sequence[str] = (), names: ModelNames | None = None) -> Config:
    """Load a YAML file (or only defaults when `path` is None), apply dotted overrides and validate.

    With `names` (e.g. `tltool.catalog.TORCHVISION_NAMES`) the backbone and weights names are checked too,
    among the other problems; without, they are left to whoever builds the model.
    """
    data = read_yaml(path) if path is not None else {}
    data = _merge(data, parse_overrides(overrides))
    return build_config(data, source=str(path) if path is not None else "config", names=names)
