"""The config's sections: one frozen pydantic model per YAML section, each field with its default and docstring.

Every field has a default that works, an example and a docstring; the docstrings are the reference that
`tltool config init`, `tltool config keys`, the README and configs/schema.json print (read from the source
on demand by `keys.field_docs`, not at import). Together the sections are the contract of every key, so
they stay in one file; the whole run, `Config`, and the rules across sections are in root.py.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from tltool.config.values import model_names, parse_duration, weights_is_file
from tltool.device import device_problem


class Section(BaseModel):
    """The base of every section (and of `Config`): unknown keys refused, frozen, defaults validated too.

    No `use_attribute_docstrings`: it would read every class's source at import (~50 ms of each command);
    `keys.field_docs` reads the field docstrings when a document needs them.
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_default=True,
        coerce_numbers_to_str=True,
    )


class RunConfig(Section):
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


class DataConfig(Section):
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


class ModelConfig(Section):
    backbone: str = Field("resnet18", examples=["mobilenet_v3_small"])
    """A torchvision classification model name, or timm/<name>[.tag] (`tltool models`; timm: `tltool[timm]`)."""
    weights: str = Field("DEFAULT", examples=["IMAGENET1K_V1"])
    """none, a weights name (DEFAULT; torchvision's IMAGENET1K_V1, ...), a state_dict file, or a tltool checkpoint."""
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0, examples=[0.2])
    """Dropout before the new classification head."""

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, value: str, info: ValidationInfo) -> str:
        names = model_names(info)
        problem = names.backbone_problem(value) if names else None
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str, info: ValidationInfo) -> str:
        backbone = info.data.get("backbone")
        names = model_names(info)
        if names is None or backbone is None or weights_is_file(value) or value.lower() == "none":
            return value
        problem = names.weights_problem(backbone, value)
        if problem is not None:
            raise ValueError(problem)
        return value


class TrainConfig(Section):
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
    (onnxruntime on CPU at fp32 from 1,000 images, 2,500 where eager runs in the loader's workers, if 1.1x faster
    than eager on its check, else eager); each is checked against eager on 2 batches first."""
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


class CheckpointConfig(Section):
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
    max_save_overhead: float | None = Field(0.1, gt=0.0, le=1.0, examples=[0.25])
    """At most about this share of the run goes to end-of-epoch saves: an epoch's end writes last.pt only when the
    time since the last save is at least (1 - f) / f times that save's (0.1: 9 times). Epochs longer than that save
    every time; a frozen backbone's head epochs on cached features (milliseconds, a save tens) save every few
    epochs. The final epoch and a stop always save (every epoch does when every_n_steps is set), best.pt always
    holds the best epoch, and a crash loses at most the epochs since the last save. null: every epoch's end."""


class AdaptConfig(Section):
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


class SourceConfig(Section):
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


class DistillConfig(Section):
    """Knowledge distillation (Hinton et al. 2015) from a trained model: relation-based transfer."""

    teacher: str | None = Field(None, examples=["runs/big/checkpoints/best.pt"])
    """A tltool checkpoint with the same classes (e.g. a big fine-tuned model) whose softened predictions the
    model learns to match, on the labelled images and, with adapt.unlabeled, on the unlabelled ones too."""
    weight: float = Field(1.0, ge=0.0, le=100.0, examples=[0.5])
    """Weight of the distillation term (T^2 KL(teacher || student) at the temperature below)."""
    temperature: float = Field(4.0, gt=0.0, le=100.0, examples=[2.0])
    """Softmax temperature of both models' predictions in the distillation term."""


class LogConfig(Section):
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
