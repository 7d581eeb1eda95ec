"""Backbones: any torchvision classifier, its pretrained weights loaded safely, and a new head (timm's: timm_models.py).

The model is a `TransferModel` with `.backbone` (the torchvision network whose own head slot is an
`nn.Identity`, so it returns features) and `.head` (dropout + a new linear layer for our classes). The
head slot of each architecture family comes from `HEAD_TABLE`, keyed by the torchvision class name.
"""

from __future__ import annotations

import os
import re
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from tltool.checkpoint import Checkpoint, as_checkpoint, is_tltool_checkpoint, safe_load, state_dict_mismatch
from tltool.config import DataConfig, ModelConfig, weights_is_file
from tltool.data import Preprocess
from tltool.errors import CheckpointError, ConfigError, ModelError

# Where each family keeps its ImageNet classifier ("classifier.-1" = last layer of that Sequential).
HEAD_TABLE: dict[str, str] = {
    "AlexNet": "classifier.-1",
    "ConvNeXt": "classifier.-1",
    "DenseNet": "classifier",
    "EfficientNet": "classifier.-1",
    "GoogLeNet": "fc",
    "Inception3": "fc",
    "MaxVit": "classifier.-1",
    "MNASNet": "classifier.-1",
    "MobileNetV2": "classifier.-1",
    "MobileNetV3": "classifier.-1",
    "RegNet": "fc",
    "ResNet": "fc",
    "ShuffleNetV2": "fc",
    # SqueezeNet's head is a 1x1 conv before ReLU + global pooling; with it removed the backbone
    # returns the pooled 512-d features (its last Fire module already ends in a ReLU).
    "SqueezeNet": "classifier.1",
    "SwinTransformer": "head",
    "VGG": "classifier.-1",
    "VisionTransformer": "heads.head",
}

# Families whose architecture depends on the input size (the builder needs it).
_SIZE_ARGUMENT = {"vit_": "image_size", "maxvit_": "input_size"}


class TransferModel(nn.Module):
    """A feature extractor (`backbone`) and a new classification head (`head`)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        # Kept by the unfreeze plan (transfer.py): a frozen backbone needs no autograd graph (less memory and time).
        self.frozen_backbone = False
        # Temperature scaling (tltool.calibration): forward returns logits / temperature. 1.0 in training; a
        # calibrated checkpoint's T is set by trained.open_trained, so eval, predict and exports all apply it.
        self.temperature = 1.0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's output (without an autograd graph while the backbone is frozen)."""
        if self.frozen_backbone:
            with torch.no_grad():
                return self.backbone(images)
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(images))
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits


@dataclass
class BuiltModel:
    """What `build_model` returns: the model, how to rebuild it, and the weights' preprocessing."""

    model: TransferModel
    arch: dict[str, Any]
    preprocess: Preprocess
    weights_source: str
    notes: list[str] = field(default_factory=list)
    # The pretrained classifier, kept as Co-Tuning's source head (build_model(keep_source_head=True)); never
    # part of `model`, so never exported.
    source_head: nn.Linear | None = None


def make_head(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(p=dropout), nn.Linear(in_features, num_classes))


def _split_path(path: str) -> tuple[str, str]:
    parent, _, leaf = path.rpartition(".")
    return parent, leaf


def _get_slot(net: nn.Module, path: str) -> nn.Module:
    parent, leaf = _split_path(path)
    owner = net.get_submodule(parent) if parent else net
    return owner[int(leaf)] if leaf.lstrip("-").isdigit() else getattr(owner, leaf)


def _set_slot(net: nn.Module, path: str, module: nn.Module) -> None:
    parent, leaf = _split_path(path)
    owner = net.get_submodule(parent) if parent else net
    if leaf.lstrip("-").isdigit():
        owner[int(leaf)] = module
    else:
        setattr(owner, leaf, module)


def _slot_state_prefix(net: nn.Module, path: str) -> str:
    """The state_dict key prefix of a head slot (resolving negative indices)."""
    parent, leaf = _split_path(path)
    if leaf.lstrip("-").isdigit():
        owner = net.get_submodule(parent)
        leaf = str(int(leaf) % len(owner))
    return f"{parent}.{leaf}." if parent else f"{leaf}."


def head_path(net: nn.Module) -> str:
    family = type(net).__name__
    if family not in HEAD_TABLE:
        raise ModelError(
            f"tltool has no head table entry for {family}",
            f"supported families: {', '.join(sorted(HEAD_TABLE))}",
        )
    return HEAD_TABLE[family]


def _in_features(slot: nn.Module) -> int:
    if isinstance(slot, nn.Linear):
        return slot.in_features
    if isinstance(slot, nn.Conv2d):
        return slot.in_channels
    raise ModelError(f"unexpected head layer {type(slot).__name__}", "report this as a tltool bug")


def _weights_enum(backbone: str, name: str):
    enum = torchvision.models.get_model_weights(backbone)
    return enum.DEFAULT if name == "DEFAULT" else enum[name]


def _arch_kwargs(backbone: str, weights, image_size: int) -> dict[str, Any]:
    """Constructor arguments that torchvision's builder would set for these weights."""
    kwargs: dict[str, Any] = {}
    if weights is not None:
        kwargs["num_classes"] = len(weights.meta["categories"])
    if backbone in ("googlenet", "inception_v3"):
        # The pretrained files hold the auxiliary classifiers; they are dropped after loading.
        kwargs.update(transform_input=weights is not None, aux_logits=weights is not None, init_weights=True)
        if weights is not None:
            kwargs["init_weights"] = False
    for prefix, argument in _SIZE_ARGUMENT.items():
        if backbone.startswith(prefix):
            size = weights.meta["min_size"][0] if weights is not None else image_size
            if weights is not None and image_size != size:
                raise ConfigError(
                    f"{backbone} with weights {weights.name} needs data.image_size {size}, got {image_size}",
                    f"set data.image_size={size}",
                )
            kwargs[argument] = size if argument == "image_size" else (size, size)
    return kwargs


def hub_file(url: str) -> Path:
    """Where torch.hub keeps (and looks for) the file of a weights URL."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _torchvision_state_dict(weights) -> dict[str, torch.Tensor]:
    """The weights' state_dict from the torch hub cache (downloaded if missing), read with weights_only."""
    path = hub_file(weights.url)
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=None, progress=True)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ModelError(
                f"cannot download {weights} ({reason}) and it is not in the torch hub cache",
                f"put the file {path.name} from {weights.url} at {path} "
                "(offline: copy it from a machine with internet), or set model.weights=none",
            ) from None
    return safe_load(path, what="torchvision weights file")


def _densenet_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Old DenseNet files name layers 'norm.1' where the modules are now 'norm1' (as torchvision fixes it).
    pattern = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
    )
    return {(m.group(1) + m.group(2) if (m := pattern.match(k)) else k): v for k, v in state_dict.items()}


def _load_into(net: nn.Module, state_dict: dict[str, torch.Tensor], source: str, skip_prefix: str = "") -> None:
    """Load `state_dict` strictly, except the keys under `skip_prefix` (the old head)."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if skip_prefix:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(skip_prefix)}
    expected = {k: v for k, v in net.state_dict().items() if not (skip_prefix and k.startswith(skip_prefix))}
    # Files saved before batch norm counted its batches lack num_batches_tracked; torch fills it in.
    missing = sorted(k for k in set(expected) - set(state_dict) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        k for k in set(expected) & set(state_dict) if tuple(expected[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        if wrong_shape:
            first = wrong_shape[0]
            parts.append(f"{first} is {list(state_dict[first].shape)} in the file, {list(expected[first].shape)} here")
        raise ModelError(
            f"{source} does not fit this architecture: {'; '.join(parts)}",
            "check model.backbone matches the weights file",
        )
    net.load_state_dict(state_dict, strict=False)


def _load_weights(
    net: nn.Module,
    factory: Callable[[], nn.Module],
    state_dict: dict[str, torch.Tensor],
    source: str,
    skip_prefix: str = "",
) -> nn.Module:
    """`_load_into` an `_uninitialized` net; the rare net with a tensor the file does not fill (a non-persistent
    buffer) is built again by `factory` with its real init and loaded the same way."""
    _load_into(net, state_dict, source, skip_prefix)
    loaded = {k.removeprefix("module.") for k in state_dict}
    if _fill_unloaded(net, loaded, skip_prefix):
        return net
    net = factory()
    _load_into(net, state_dict, source, skip_prefix)
    return net


def _drop_aux(net: nn.Module) -> None:
    if hasattr(net, "aux1"):
        net.aux_logits, net.aux1, net.aux2 = False, None, None
    if hasattr(net, "AuxLogits"):
        net.aux_logits, net.AuxLogits = False, None


def _uninitialized(factory: Callable[[], nn.Module]) -> nn.Module:
    """`factory()`'s module with uninitialized memory in place of its random initialization, for weights that are
    loaded next: torchvision's init is pure waste then and costs, on 2 cores, 0.07 s for MobileNetV2, 0.74 s for
    ResNet-50, 1.5 s for ConvNeXt-T, 2.2 s for ViT-B/16 in every command that builds a model. Built on the meta
    device (shapes only), then given empty CPU storage. Whoever uses it must fill every tensor: `_fill_unloaded`.
    """
    with torch.device("meta"):
        net = factory()
    return net.to_empty(device="cpu")


def _fill_unloaded(net: nn.Module, loaded: set[str], ignore_prefix: str = "") -> bool:
    """After loading `loaded` (state_dict keys) into an `_uninitialized` module: zero the batch counters an old file
    lacked (as torch's init would have them) and say whether every other tensor was loaded. False (a buffer that
    is not in state_dict, a key the file lacked): the caller builds the module with its real init instead."""
    persistent = set(net.state_dict())
    names = [name for name, _ in net.named_parameters()] + [name for name, _ in net.named_buffers()]
    complete = True
    for name in names:
        if name in loaded or (ignore_prefix and name.startswith(ignore_prefix)):
            continue
        if name in persistent and name.endswith("num_batches_tracked"):
            net.get_buffer(name).zero_()
        else:
            complete = False
    return complete


def build_model(
    cfg: ModelConfig,
    data_cfg: DataConfig,
    num_classes: int,
    class_names: list[str] | None = None,
    keep_source_head: bool = False,
) -> BuiltModel:
    """Build `cfg.backbone` with `cfg.weights` and a new head for `num_classes` classes.

    The preprocessing is the weights' own preset (or the source checkpoint's) with the config's overrides.
    `keep_source_head` (Co-Tuning) keeps the weights' own classifier as `BuiltModel.source_head`, or raises
    when the weights have none (a tltool checkpoint, none, a file without it) or it is not a Linear layer.
    A `timm/` backbone is built by `timm_models.build_model` (timm is imported only then).
    """
    if cfg.backbone.startswith("timm/"):
        from tltool import timm_models

        return timm_models.build_model(cfg, data_cfg, num_classes, class_names, keep_source_head)
    backbone = cfg.backbone
    weights_name = cfg.weights
    enum = None
    source_ckpt: Checkpoint | None = None
    notes: list[str] = []
    if weights_is_file(weights_name):
        loaded = safe_load(weights_name, what="model.weights file")
        if is_tltool_checkpoint(loaded):
            source_ckpt = as_checkpoint(loaded, weights_name)
            source_backbone = source_ckpt.arch["backbone"]
            if source_backbone != backbone:
                raise CheckpointError(
                    f"{weights_name} is a {source_backbone} checkpoint but model.backbone is {backbone}",
                    f"set model.backbone={source_backbone}",
                )
    elif weights_name.lower() != "none":
        enum = _weights_enum(backbone, weights_name)

    if source_ckpt is not None:
        preset = Preprocess.from_dict(source_ckpt.preprocess)
        weights_source = f"tltool checkpoint {weights_name}"
    elif enum is not None:
        preset = Preprocess.from_transforms(enum.transforms())
        weights_source = f"torchvision {enum}"
    else:
        preset = Preprocess()
        weights_source = weights_name if weights_is_file(weights_name) else "none (random init)"
    preprocess = preset.with_config(data_cfg)
    if source_ckpt is not None:
        kwargs = dict(source_ckpt.arch["kwargs"])
    else:
        kwargs = _arch_kwargs(backbone, enum, preprocess.image_size)

    def factory() -> nn.Module:
        return torchvision.models.get_model(backbone, weights=None, **kwargs)

    # Weights loaded into every tensor (torchvision's, or a state_dict file): no random init first.
    loads_weights = enum is not None or (source_ckpt is None and weights_is_file(weights_name))
    net = _uninitialized(factory) if loads_weights else factory()
    slot_path = head_path(net)
    slot_prefix = _slot_state_prefix(net, slot_path)

    if enum is not None:
        state_dict = _torchvision_state_dict(enum)
        if backbone.startswith("densenet"):
            state_dict = _densenet_keys(state_dict)
        net = _load_weights(net, factory, state_dict, f"torchvision weights {enum}")
        _drop_aux(net)
        if "aux_logits" in kwargs:
            kwargs["aux_logits"] = False
    elif source_ckpt is None and weights_is_file(weights_name):
        state_dict = loaded
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(state_dict, dict) and isinstance(state_dict.get(wrapper), dict):
                state_dict = state_dict[wrapper]
        if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise ModelError(
                f"{weights_name} holds no state_dict of tensors",
                "save the weights with torch.save(model.state_dict(), path)",
            )
        net = _load_weights(net, factory, state_dict, weights_name, skip_prefix=slot_prefix)
        notes.append(f"loaded backbone weights from {weights_name}")

    in_features = _in_features(_get_slot(net, slot_path))
    source_head = None
    if keep_source_head:
        file_state = None
        if enum is None and source_ckpt is None and weights_is_file(weights_name):
            file_state = {k.removeprefix("module."): v for k, v in state_dict.items()}
        source_head = _pretrained_classifier(net, slot_path, slot_prefix, cfg, source_ckpt, file_state)
    _set_slot(net, slot_path, nn.Identity())
    model = TransferModel(net, make_head(in_features, num_classes, cfg.head_dropout))
    check_input_size(model, backbone, preprocess.image_size)

    if source_ckpt is not None:
        backbone_state = {
            k.removeprefix("backbone."): v for k, v in source_ckpt.model.items() if k.startswith("backbone.")
        }
        _load_into(model.backbone, backbone_state, weights_name)
        same_classes = class_names is not None and list(source_ckpt.class_names) == list(class_names)
        if same_classes:
            head_state = {k.removeprefix("head."): v for k, v in source_ckpt.model.items() if k.startswith("head.")}
            model.head.load_state_dict(head_state)
            notes.append(f"reused backbone and head of {weights_name} (same classes)")
        else:
            notes.append(f"reused backbone of {weights_name}; new head for {num_classes} classes")

    arch = {
        "backbone": backbone,
        "kwargs": kwargs,
        "num_classes": num_classes,
        "head_dropout": cfg.head_dropout,
        "in_features": in_features,
    }
    return BuiltModel(model, arch, preprocess, weights_source, notes, source_head)


COTUNING_FIX = "or set train.cotuning_weight=0"


def _pretrained_classifier(
    net: nn.Module,
    slot_path: str,
    slot_prefix: str,
    cfg: ModelConfig,
    source_ckpt: Checkpoint | None,
    file_state: dict[str, torch.Tensor] | None,
) -> nn.Linear:
    """The classifier the weights were trained with (Co-Tuning's source head), or a ConfigError saying why not."""
    slot = _get_slot(net, slot_path)
    need = "train.cotuning_weight needs the pretrained classifier"
    if not isinstance(slot, nn.Linear):
        raise ConfigError(
            f"{need}, but {cfg.backbone}'s is a {type(slot).__name__}, not a Linear layer",
            f"use a backbone whose classifier is a Linear layer (resnet, mobilenet, efficientnet, ...) {COTUNING_FIX}",
        )
    if source_ckpt is not None:
        raise ConfigError(
            f"{need}, but model.weights {cfg.weights} is a tltool checkpoint, which keeps only its own head",
            f"set model.weights to the backbone's torchvision weights (e.g. DEFAULT) {COTUNING_FIX}",
        )
    if cfg.weights.lower() == "none":
        raise ConfigError(f"{need}, but model.weights is none", f"set model.weights (e.g. DEFAULT) {COTUNING_FIX}")
    if file_state is None:  # torchvision weights: loaded into the slot with the rest
        return slot
    weight, bias = (file_state.get(slot_prefix + name) for name in ("weight", "bias"))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != slot.in_features:
        raise ConfigError(
            f"{need}, but model.weights {cfg.weights} holds no {slot_prefix}weight of shape [classes, "
            f"{slot.in_features}] (its classifier was left out)",
            f"give the weights file with the classifier, or torchvision weights (e.g. DEFAULT) {COTUNING_FIX}",
        )
    head = nn.Linear(slot.in_features, weight.shape[0], bias=isinstance(bias, torch.Tensor))
    with torch.no_grad():
        head.weight.copy_(weight)
        if isinstance(bias, torch.Tensor):
            head.bias.copy_(bias)
    return head


def check_input_size(model: TransferModel, backbone: str, image_size: int) -> None:
    """One eval-mode forward of a blank image: a too-small input fails here with a clear message."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, AssertionError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{backbone} cannot take {image_size}px inputs ({first})",
            "raise data.image_size (e.g. 64 for alexnet, 75 for inception_v3, 224 for maxvit_t)",
        ) from None
    finally:
        model.train(was_training)


def model_from_arch(arch: dict[str, Any]) -> TransferModel:
    """An untrained TransferModel of the architecture a checkpoint records (no weights are read)."""
    if arch["backbone"].startswith("timm/"):
        from tltool import timm_models

        return timm_models.model_from_arch(arch)
    try:
        net = torchvision.models.get_model(arch["backbone"], weights=None, **arch["kwargs"])
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(
            f"cannot rebuild the checkpoint's architecture: {exc}", "use a tltool checkpoint of this version"
        ) from None
    _drop_aux(net)
    _set_slot(net, head_path(net), nn.Identity())
    return TransferModel(net, make_head(arch["in_features"], arch["num_classes"], arch["head_dropout"]))


def built_from_checkpoint(checkpoint: Checkpoint) -> BuiltModel:
    """The BuiltModel of a run being resumed: its architecture and weights, no source weights read."""
    model = load_trained_model(checkpoint)
    return BuiltModel(
        model,
        dict(checkpoint.arch),
        Preprocess.from_dict(checkpoint.preprocess),
        str(checkpoint.weights_source),
    )


def load_trained_model(checkpoint: Checkpoint) -> TransferModel:
    """The trained model of a (safely loaded) tltool checkpoint, in eval mode on CPU.

    `tltool.trained.open_trained` is what the commands call: it also moves it to a device and keeps the
    checkpoint's preprocessing and run config beside it.
    """
    torchvision_arch = not checkpoint.arch["backbone"].startswith("timm/")
    model = _uninitialized(lambda: model_from_arch(checkpoint.arch)) if torchvision_arch else None
    if model is None:
        model = model_from_arch(checkpoint.arch)
    mismatch = state_dict_mismatch(model.state_dict(), checkpoint.model, "the checkpoint")
    if mismatch is not None:
        raise CheckpointError(
            f"checkpoint weights do not fit its {checkpoint.arch.get('backbone', '?')} architecture: {mismatch}",
            "use the checkpoint as tltool wrote it (its weights were changed or come from another run)",
        )
    model.load_state_dict(checkpoint.model)
    if torchvision_arch and not _fill_unloaded(model, set(checkpoint.model)):
        model = model_from_arch(checkpoint.arch)
        model.load_state_dict(checkpoint.model)
    return model.eval()


def count_parameters(model: TransferModel) -> dict[str, dict[str, int]]:
    out = {}
    for part in ("backbone", "head"):
        params = list(getattr(model, part).parameters())
        out[part] = {
            "total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
        }
    return out
