"""The stages of a backbone, input to output: what gradual unfreezing opens and layer-wise LR decay scales.

`STAGE_TABLE` names each torchvision family's stages; `backbone_stages` cuts a built backbone into them
and checks that every parameter, batch norm and dropout lies in exactly one (transfer.py builds its
optimizer groups from them). A timm backbone's stages come from timm's own grouping (`timm_stages`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from tltool.errors import ConfigError, ModelError

# The stages of each family's backbone, from the input to the output: what gradual unfreezing opens one
# at a time from the head down, and what layer-wise LR decay scales. Where torchvision groups its blocks
# (ResNet layerK, EfficientNet/ConvNeXt/Swin features.K, DenseNet blocks, RegNet trunk blocks), a stage is
# that group; MobileNets, MNASNet and ViT are split per block. An entry is a part or "name=part+part"
# (one stage of several parts); a part is a module or parameter path ("layer1", "class_token"), a range
# of children ("layers.0-7"), "path.*" (each child of path is a stage of its own) or "path|Class" (the
# children of path in stages that each end with a Class module, as VGG's blocks end with a max-pool). An
# entry that starts with "+" joins the stage before it. Every backbone parameter, batch norm and dropout
# is in exactly one stage (tests/test_transfer.py checks it for every torchvision model).
STAGE_TABLE: dict[str, list[str]] = {
    "AlexNet": ["features|MaxPool2d", "fc6=classifier.0-2", "fc7=classifier.3-5"],
    "ConvNeXt": ["stem=features.0", "stage1=features.1", "stage2=features.2-3", "stage3=features.4-5",
                 "stage4=features.6-7+classifier.0"],
    "DenseNet": ["stem=features.conv0+features.norm0", "block1=features.denseblock1+features.transition1",
                 "block2=features.denseblock2+features.transition2",
                 "block3=features.denseblock3+features.transition3", "block4=features.denseblock4+features.norm5"],
    "EfficientNet": ["features.*", "+classifier.0"],
    "GoogLeNet": ["stem=conv1+conv2+conv3", "inception3=inception3a+inception3b",
                  "inception4=inception4a+inception4b+inception4c+inception4d+inception4e",
                  "inception5=inception5a+inception5b+dropout"],
    "Inception3": ["stem=Conv2d_1a_3x3+Conv2d_2a_3x3+Conv2d_2b_3x3+Conv2d_3b_1x1+Conv2d_4a_3x3",
                   "mixed5=Mixed_5b+Mixed_5c+Mixed_5d", "mixed6=Mixed_6a+Mixed_6b+Mixed_6c+Mixed_6d+Mixed_6e",
                   "mixed7=Mixed_7a+Mixed_7b+Mixed_7c+dropout"],
    "MaxVit": ["stem", "blocks.*", "pre_logits=classifier.2-4"],
    "MNASNet": ["stem=layers.0-7", "layers.8", "layers.9", "layers.10", "layers.11", "layers.12", "layers.13",
                "last_conv=layers.14-16+classifier.0"],
    "MobileNetV2": ["features.*", "+classifier.0"],
    "MobileNetV3": ["features.*", "pre_logits=classifier.0-2"],
    "RegNet": ["stem", "trunk_output.*"],
    "ResNet": ["stem=conv1+bn1", "layer1", "layer2", "layer3", "layer4"],
    "ShuffleNetV2": ["conv1", "stage2", "stage3", "stage4", "conv5"],
    "SqueezeNet": ["features|MaxPool2d", "+classifier.0"],
    "SwinTransformer": ["stem=features.0", "stage1=features.1", "stage2=features.2-3", "stage3=features.4-5",
                        "stage4=features.6-7+norm"],
    "VGG": ["features|MaxPool2d", "fc6=classifier.0-2", "fc7=classifier.3-5"],
    "VisionTransformer": ["stem=conv_proj+class_token+encoder.pos_embedding+encoder.dropout", "encoder.layers.*",
                          "+encoder.ln"],
}  # fmt: skip


@dataclass(frozen=True)
class Stage:
    """One stage of a backbone: its name and the module or parameter paths (relative to the backbone) it holds."""

    name: str
    paths: tuple[str, ...]


def is_module(net: nn.Module, path: str) -> bool:
    try:
        net.get_submodule(path)
    except AttributeError:
        return False
    return True


def _exists(net: nn.Module, path: str) -> bool:
    if is_module(net, path):
        return True
    try:
        net.get_parameter(path)
    except AttributeError:
        return False
    return True


def _children(net: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    return [(f"{path}.{name}", child) for name, child in net.get_submodule(path).named_children()]


def _table_error(family: str, entry: str, path: str) -> ModelError:
    return ModelError(f"stage table entry {entry!r} of {family}: {path} is not in the model", "report this as a bug")


def _entry_stages(net: nn.Module, family: str, entry: str) -> list[Stage]:
    """The stages one STAGE_TABLE entry stands for (see the table's comment for the forms)."""
    name, _, parts = entry.rpartition("=")
    if parts.endswith(".*"):
        path = parts[:-2]
        if not is_module(net, path):
            raise _table_error(family, entry, path)
        return [Stage(child, (child,)) for child, _ in _children(net, path)]
    if "|" in parts:
        path, _, kind = parts.partition("|")
        if not is_module(net, path):
            raise _table_error(family, entry, path)
        stages, current = [], []
        for child, module in _children(net, path):
            current.append(child)
            if type(module).__name__ == kind:
                stages.append(current)
                current = []
        if current:
            stages.append(current)
        return [Stage(_range_name(group), tuple(group)) for group in stages]
    paths: list[str] = []
    for part in parts.split("+"):
        match = re.fullmatch(r"(.+)\.(\d+)-(\d+)", part)
        expanded = [f"{match[1]}.{i}" for i in range(int(match[2]), int(match[3]) + 1)] if match else [part]
        for path in expanded:
            if not _exists(net, path):
                raise _table_error(family, entry, path)
        paths += expanded
    return [Stage(name or parts, tuple(paths))]


def _range_name(paths: list[str]) -> str:
    """features.0, features.1, features.2 -> features.0-2."""
    if len(paths) == 1:
        return paths[0]
    return f"{paths[0]}-{paths[-1].rpartition('.')[2]}"


def backbone_stages(net: nn.Module, wanted_by: str = "a stage-based setting") -> list[Stage]:
    """The stages of a backbone (the torchvision network with its head slot emptied), input to output.

    `wanted_by` names the config key that needs them, for the error when the family has no table entry.
    """
    family = type(net).__name__
    if type(net).__module__.startswith("timm."):  # (timm's ResNet, ConvNeXt, ... are not torchvision's)
        return _checked(net, f"timm {family}", timm_stages(net, wanted_by))
    if family not in STAGE_TABLE:
        raise ConfigError(
            f"{wanted_by} needs the stages of the backbone, and tltool's stage table has no entry for {family}",
            f"stage tables exist for: {', '.join(sorted(STAGE_TABLE))}; "
            "or use train.unfreeze_at_epoch / train.backbone_lr_mult, which need no stages",
        )
    stages: list[Stage] = []
    for entry in STAGE_TABLE[family]:
        found = _entry_stages(net, family, entry.removeprefix("+"))
        if entry.startswith("+"):
            if not stages:
                raise _table_error(family, entry, "(no stage before it)")
            paths = [p for stage in found for p in stage.paths]
            stages[-1] = Stage(stages[-1].name, stages[-1].paths + tuple(paths))
        else:
            stages += found
    # A stage without parameters (a lone pooling layer) has nothing to open or to scale.
    stages = [s for s in stages if any(True for path in s.paths for _ in _parameters_of(net, path))]
    return _checked(net, family, stages)


def _checked(net: nn.Module, family: str, stages: list[Stage]) -> list[Stage]:
    """`stages`, after checking that every parameter of `net` is in exactly one of them."""
    owners: dict[str, str] = {}
    for stage in stages:
        for path in stage.paths:
            for param_name in _parameters_of(net, path):
                if param_name in owners:
                    raise ModelError(
                        f"stage table of {family}: {param_name} is in {owners[param_name]} and {stage.name}",
                        "report this as a bug",
                    )
                owners[param_name] = stage.name
    missing = [n for n, _ in net.named_parameters() if n not in owners]
    if missing:
        raise ModelError(
            f"stage table of {family} leaves {len(missing)} parameter(s) out ({', '.join(missing[:3])})",
            "report this as a bug",
        )
    return stages


def _parameters_of(net: nn.Module, path: str) -> list[str]:
    """Names (relative to `net`) of the parameters under a module or parameter path."""
    if is_module(net, path):
        return [f"{path}.{name}" for name, _ in net.get_submodule(path).named_parameters()]
    return [path]


# --- timm: the model's own grouping ---------------------------------------------------------------------


def timm_stages(net: nn.Module, wanted_by: str = "a stage-based setting") -> list[Stage]:
    """The stages of a timm backbone, from timm's own grouping: `group_matcher(coarse=True)`.

    timm's matcher is what its layer-wise LR decay uses: the stem, then each stage (CNNs) or block (ViTs),
    with what follows the last (a final norm) joined to it. Each group's parameters are gathered into the
    fewest module paths that hold only that group (so a closed stage's batch norms stay in eval mode): a
    whole `layer1` or `stages.2` where it can, single parameters (a ViT's `cls_token`) where a module is
    shared. A stage is named by the path its modules share, else `stem` (the first) or its paths.
    """
    if not callable(getattr(net, "group_matcher", None)):
        raise ConfigError(
            f"{wanted_by} needs the stages of the backbone, and timm's {type(net).__name__} has no group_matcher",
            "use train.unfreeze_at_epoch / train.backbone_lr_mult, which need no stages",
        )
    from timm.models import group_parameters

    group_of = group_parameters(net, net.group_matcher(coarse=True), reverse=True)
    paths: dict[int, list[str]] = {}

    def cover(module: nn.Module, prefix: str) -> None:
        groups = {group_of[f"{prefix}{name}"] for name, _ in module.named_parameters()}
        if len(groups) == 1:
            paths.setdefault(groups.pop(), []).append(prefix.rstrip("."))
            return
        for name, _ in module.named_parameters(recurse=False):
            paths.setdefault(group_of[f"{prefix}{name}"], []).append(f"{prefix}{name}")
        for name, child in module.named_children():
            if any(True for _ in child.parameters()):
                cover(child, f"{prefix}{name}.")

    cover(net, "")
    stages: list[Stage] = []
    for index, group in enumerate(sorted(paths)):
        members = tuple(paths[group])
        stages.append(Stage(_timm_stage_name(members, index), members))
    names = [stage.name for stage in stages]
    if len(set(names)) != len(names):  # (never seen; the optimizer groups need distinct names)
        stages = [Stage(f"group{index}", stage.paths) for index, stage in enumerate(stages)]
    return [stage for stage in stages if any(True for path in stage.paths for _ in _parameters_of(net, path))]


def _timm_stage_name(paths: tuple[str, ...], index: int) -> str:
    """layer1 -> layer1; (stages.1.downsample, stages.1.blocks) -> stages.1; (conv1, bn1) -> stem; head -> pre_logits"""
    common = paths[0].split(".")
    for path in paths[1:]:
        parts = path.split(".")
        length = 0
        while length < min(len(common), len(parts)) and common[length] == parts[length]:
            length += 1
        common = common[:length]
    if common == ["head"]:  # timm's own head without its classifier (a ConvNeXt's norm): not tltool's head
        return "pre_logits"
    if common:
        return ".".join(common)
    if index == 0:
        return "stem"
    return "+".join(paths) if len(paths) <= 3 else f"{paths[0]}+...+{paths[-1]}"
