"""What trains, and when: freezing, unfreeze plans, discriminative LR per stage.

This module is the one owner of "does the backbone train?": `train.freeze` freezes modules
(`freeze_modules`), and an `UnfreezePlan` opens parts of the backbone at the start of the epochs the
config names. The loop, the feature cache, the precision choice and the summary ask the plan
(`head_only`, `backbone_trains`, `frozen_modules`), never the config. The backbone is cut into *parts*,
each one optimizer group: the whole backbone ("backbone"), or, when a setting needs stages (gradual
unfreezing, layer-wise LR decay), one part per stage of `stages.STAGE_TABLE` ("backbone.layer4"). The
plan records which part opened at which optimizer step: that record travels in the checkpoint, so a
resumed run rebuilds the same groups, in the same order, before the optimizer state is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tltool.config import Config, TrainConfig
from tltool.errors import CheckpointError, ConfigError
from tltool.models import TransferModel
from tltool.stages import backbone_stages, is_module

# --- freezing ----------------------------------------------------------------------------------------


def freeze_modules(model: TransferModel, freeze: str | list[str]) -> list[str]:
    """Freeze what `train.freeze` says and return the names of the frozen modules (kept in eval mode)."""
    if freeze == "none":
        return []
    prefixes = ["backbone"] if freeze == "backbone" else list(freeze)
    names = dict(model.named_modules())
    unknown = [p for p in prefixes if p not in names]
    if unknown:
        import difflib

        hints = []
        for prefix in unknown:
            close = difflib.get_close_matches(prefix, list(names), n=2, cutoff=0.5)
            hints.append(f"{prefix!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ConfigError(
            f"train.freeze names no module: {', '.join(hints)}",
            "use module names as `tltool finetune --dry-run` lists them, e.g. backbone.layer1",
        )
    for prefix in prefixes:
        names[prefix].requires_grad_(False)
    model.frozen_backbone = not any(p.requires_grad for p in model.backbone.parameters())
    return prefixes


def freezes_backbone(cfg: TrainConfig) -> bool:
    """Whether `train.freeze` freezes the whole backbone at the start (before any unfreeze plan opens it)."""
    return cfg.freeze == "backbone" or (isinstance(cfg.freeze, list) and "backbone" in cfg.freeze)


def set_train_mode(model: nn.Module, frozen: list[str]) -> None:
    """model.train(), then the frozen modules back to eval: their batch-norm statistics never move."""
    model.train()
    for name in frozen:
        model.get_submodule(name).eval()


def set_trainable(model: nn.Module, paths: Sequence[str]) -> list[nn.Parameter]:
    """requires_grad_(True) for the modules and parameters named by `paths`; returns their parameters."""
    params: list[nn.Parameter] = []
    for path in paths:
        found = list(model.get_submodule(path).parameters()) if is_module(model, path) else [model.get_parameter(path)]
        for param in found:
            param.requires_grad_(True)
        params += found
    if isinstance(model, TransferModel):
        model.frozen_backbone = not any(p.requires_grad for p in model.backbone.parameters())
    return params


def batch_norm_modules(model: nn.Module, under: str = "backbone") -> list[str]:
    """Names of the batch-norm layers under `under` (what train.bn_policy: frozen keeps in eval mode)."""
    return [
        name
        for name, module in model.named_modules()
        if name.startswith(under + ".") and isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]


def parameter_groups(model: TransferModel) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters, by named group (backbone / head)."""
    groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups["head" if name.startswith("head.") else "backbone"].append(param)
    return {k: v for k, v in groups.items() if v}


@dataclass(frozen=True)
class Part:
    """A piece of the backbone that opens, and trains, as one optimizer group."""

    name: str  # the optimizer group's name: "backbone" or "backbone.<stage>"
    paths: tuple[str, ...]  # module or parameter names in the model ("backbone.layer4")
    lr: float  # peak LR: train.lr x backbone_lr_mult x layer_lr_decay ** (stages between it and the head)


def needs_stages(cfg: TrainConfig) -> str | None:
    """The config key that needs the backbone cut into stages, or None."""
    if cfg.unfreeze_schedule is not None:
        return "train.unfreeze_schedule"
    if cfg.layer_lr_decay != 1.0:
        return "train.layer_lr_decay"
    return None


def backbone_parts(cfg: TrainConfig, model: TransferModel) -> list[Part]:
    """The parts of the backbone, input to output, each with its LR."""
    backbone_lr = cfg.lr * cfg.backbone_lr_mult
    wanted_by = needs_stages(cfg)
    if wanted_by is None:
        return [Part("backbone", ("backbone",), backbone_lr)]
    stages = backbone_stages(model.backbone, wanted_by)
    last = len(stages) - 1
    return [
        Part(f"backbone.{stage.name}", tuple(f"backbone.{p}" for p in stage.paths),
             backbone_lr * cfg.layer_lr_decay ** (last - index))
        for index, stage in enumerate(stages)
    ]  # fmt: skip


class UnfreezePlan:
    """Which parts of the backbone train from which epoch; the optimizer groups they make.

    Without `train.unfreeze_at_epoch` / `train.unfreeze_schedule` nothing opens during the run and the
    plan only groups what `train.freeze` left trainable.
    """

    def __init__(self, cfg: TrainConfig, model: TransferModel, frozen: list[str], backbone: str = "") -> None:
        self.cfg, self.model = cfg, model
        self.parts = backbone_parts(cfg, model)
        self.base_frozen = list(frozen)  # what train.freeze froze (kept in eval mode while nothing opened)
        self.opened: list[dict[str, Any]] = []  # {"part", "step", "epoch"} in the order they opened
        self.entries: list[tuple[int, int]] = []  # (1-based epoch, parts open from the head on)
        if cfg.unfreeze_at_epoch is not None:
            self.entries = [(cfg.unfreeze_at_epoch, len(self.parts))]
        for epoch, count in (cfg.unfreeze_schedule or {}).items():
            if count != "all" and count > len(self.parts):
                raise ConfigError(
                    f"train.unfreeze_schedule opens {count} stages at epoch {epoch}, but {backbone or 'the backbone'}"
                    f" has {len(self.parts)}: {', '.join(p.name.removeprefix('backbone.') for p in self.parts)}",
                    f"open at most {len(self.parts)} stages (or all)",
                )
            self.entries.append((epoch, len(self.parts) if count == "all" else count))
        self._part_of = {}
        for part in self.parts:
            for path in part.paths:
                self._part_of[path] = part.name

    # --- groups ---

    def _group(self, name: str, params: list[nn.Parameter], lr: float) -> dict[str, Any]:
        # L2-SP replaces weight decay (Li et al. 2018): it pulls toward w0 (backbone) and 0 (head) itself.
        decay = 0.0 if self.cfg.regularization == "l2sp" else self.cfg.weight_decay
        return {"params": params, "name": name, "lr": lr, "initial_lr": lr, "weight_decay": decay}

    def part_of(self, param_name: str) -> str:
        """The part of a backbone parameter ("backbone.layer1.0.conv1.weight" -> "backbone.layer1")."""
        prefix = param_name
        while prefix:
            if prefix in self._part_of:
                return self._part_of[prefix]
            prefix = prefix.rpartition(".")[0]
        raise KeyError(param_name)

    def initial_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups of what trains from the start: backbone parts (input to output), then the head."""
        by_part: dict[str, list[nn.Parameter]] = {part.name: [] for part in self.parts}
        head = []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("head."):
                head.append(param)
            else:
                by_part[self.part_of(name)].append(param)
        groups = [self._group(part.name, by_part[part.name], part.lr) for part in self.parts if by_part[part.name]]
        if head:
            groups.append(self._group("head", head, self.cfg.lr))
        return groups

    # --- opening ---

    def open_count(self, epoch: int) -> int:
        """How many parts, from the head down, the plan has open in (0-based) `epoch`."""
        return max((count for start, count in self.entries if start <= epoch + 1), default=0)

    def due(self, epoch: int) -> list[Part]:
        """The parts that open at the start of (0-based) `epoch` (not open yet), from the head down."""
        count = self.open_count(epoch)
        opened = {record["part"] for record in self.opened}
        return [part for part in reversed(self.parts[len(self.parts) - count :]) if part.name not in opened]

    def open(self, parts: Sequence[Part], optimizer: torch.optim.Optimizer, step: int, epoch: int) -> None:
        """Make `parts` trainable and give each its optimizer group; `step` is where their warmup starts."""
        for part in parts:
            params = set_trainable(self.model, part.paths)
            optimizer.add_param_group(self._group(part.name, params, part.lr))
            self.opened.append({"part": part.name, "step": step, "epoch": epoch})

    def opened_steps(self) -> dict[str, int]:
        """Group name -> the optimizer step it opened at (groups trainable from the start are not in it)."""
        return {record["part"]: record["step"] for record in self.opened}

    def backbone_trains(self) -> bool:
        """Some backbone parameter trains now."""
        return any(p.requires_grad for p in self.model.backbone.parameters())

    def backbone_ever_trains(self) -> bool:
        """Some backbone parameter trains now or once the plan opens it (precision auto depends on it)."""
        return self.backbone_trains() or bool(self.entries)

    def head_only(self, epoch: int) -> bool:
        """Nothing of the backbone trains in (0-based) `epoch`: the frozen-feature cache can serve it."""
        return not self.backbone_trains() and self.open_count(epoch) == 0

    def frozen_modules(self) -> list[str]:
        """Modules kept in eval mode after model.train(): the closed parts, and batch norm under bn_policy frozen."""
        if not self.opened:
            frozen = list(self.base_frozen)
        else:
            opened = {record["part"] for record in self.opened}
            names = dict(self.model.named_modules())
            frozen = [path for part in self.parts if part.name not in opened for path in part.paths if path in names]
        if self.cfg.bn_policy == "frozen" and self.backbone_trains():
            covered = tuple(name + "." for name in frozen)
            frozen += [name for name in batch_norm_modules(self.model) if not name.startswith(covered)]
        return frozen

    # --- checkpoint ---

    def state_dict(self) -> dict[str, Any]:
        return {"opened": [dict(record) for record in self.opened]}

    def restore(self, state: dict[str, Any] | None, optimizer: torch.optim.Optimizer) -> None:
        """Reopen what the checkpoint's run had opened, in its order (before its optimizer state is loaded)."""
        parts = {part.name: part for part in self.parts}
        for record in (state or {}).get("opened", []):
            if record["part"] not in parts:
                raise CheckpointError(
                    f"the checkpoint opened {record['part']}, which this model's plan does not have",
                    "resume with the original config",
                )
            self.open([parts[record["part"]]], optimizer, int(record["step"]), int(record["epoch"]))

    # --- description ---

    def opens_at(self) -> dict[str, int]:
        """Part name -> the 1-based epoch the plan opens it (parts trainable from the start: 1)."""
        out = {}
        for start, count in self.entries:
            for part in self.parts[len(self.parts) - count :]:
                out.setdefault(part.name, start)
        return out

    def group_table(self) -> list[str]:
        """The --dry-run table: every optimizer group the run will have, its size, LR and first epoch."""
        opens = self.opens_at()
        rows = []
        for group in self.initial_groups():
            rows.append((group["name"], sum(p.numel() for p in group["params"]), group["lr"], 1))
        present = {row[0] for row in rows}
        for part in self.parts:
            if part.name in opens and part.name not in present:
                size = sum(_numel(self.model, path) for path in part.paths)
                rows.append((part.name, size, part.lr, opens[part.name]))
        width = max(len(row[0]) for row in rows)
        decay = 0.0 if self.cfg.regularization == "l2sp" else self.cfg.weight_decay
        lines = [f"groups     {'name':<{width}} {'params':>12} {'peak lr':>9} {'wd':>7}  trains from"]
        height = {part.name: index for index, part in enumerate(self.parts)} | {"head": len(self.parts)}
        for name, size, lr, epoch in sorted(rows, key=lambda row: (row[3], -height[row[0]])):
            lines.append(f"           {name:<{width}} {size:>12,} {lr:>9.2e} {decay:>7g}  epoch {epoch}")
        return lines


def _numel(model: nn.Module, path: str) -> int:
    try:
        return sum(p.numel() for p in model.get_submodule(path).parameters())
    except AttributeError:
        return model.get_parameter(path).numel()


# --- what the run did -----------------------------------------------------------------------------------


def describe_method(cfg: Config, frozen: list[str]) -> str:
    """One line for summary.json: the transfer method and what was added to it."""
    train = cfg.train
    if train.unfreeze_at_epoch is not None:
        text = f"two-phase (unfreeze at epoch {train.unfreeze_at_epoch})"
    elif train.unfreeze_schedule is not None:
        steps = ", ".join(
            f"epoch {epoch}: {'all' if count == 'all' else f'last {count}'}"
            for epoch, count in train.unfreeze_schedule.items()
        )
        text = f"gradual unfreezing ({steps})"
    elif train.freeze == "backbone":
        text = "frozen backbone"
    elif train.freeze == "none":
        text = "full fine-tune"
    else:
        text = f"partial fine-tune (frozen: {frozen})"
    if train.head_init == "probe":
        text += " + LP-FT (head from the linear probe)"
    if train.wise_alpha is not None:
        alpha = "chosen on held-out train images" if train.wise_alpha == "auto" else f"{train.wise_alpha:g}"
        text += f" + WiSE-FT (alpha {alpha})"
    backbone_trains = train.freeze != "backbone" or train.unfreeze_at_epoch or train.unfreeze_schedule
    if backbone_trains and (train.backbone_lr_mult != 1.0 or train.layer_lr_decay != 1.0):
        text += f" + discriminative LR (backbone x{train.backbone_lr_mult:g}"
        text += f", layer decay {train.layer_lr_decay:g})" if train.layer_lr_decay != 1.0 else ")"
    if backbone_trains and train.bn_policy == "frozen":
        text += " + frozen batch norm"
    if train.regularization == "l2sp":
        text += f" + L2-SP (alpha {train.l2sp_alpha:g}, beta {train.l2sp_beta:g})"
    if train.class_weights != "none":
        text += f" + class weights ({train.class_weights if isinstance(train.class_weights, str) else 'given'})"
    if cfg.data.sampler == "balanced":
        text += " + balanced sampler"
    adapt = cfg.adapt
    if adapt.bn_stats == "target":
        text += " + AdaBN (target batch-norm statistics)"
    if adapt.method == "mcc":
        text += f" + MCC on unlabelled target images (weight {adapt.weight:g}, T {adapt.mcc_temperature:g})"
    elif adapt.method == "dann":
        text += f" + DANN on unlabelled target images (weight {adapt.weight:g})"
    if cfg.source.train:
        text += f" + source co-training ({cfg.source.select}, weight {cfg.source.weight:g}"
        text += ", target-prior class weights)" if cfg.source.class_weights == "target_prior" else ")"
    if train.cotuning_weight > 0:
        text += f" + Co-Tuning (pretrained classifier, weight {train.cotuning_weight:g})"
    if cfg.distill.teacher:
        text += (
            f" + distillation from {cfg.distill.teacher} (weight {cfg.distill.weight:g}, T {cfg.distill.temperature:g})"
        )
    return text


def transfer_summary(
    cfg: Config, plan: UnfreezePlan, optimizer: torch.optim.Optimizer, weight: torch.Tensor | None
) -> dict[str, Any]:
    """The method's details for summary.json: what opened when, each group's peak LR, the loss terms."""
    return {
        "opened": plan.state_dict()["opened"],
        "groups": {group["name"]: group["initial_lr"] for group in optimizer.param_groups},
        "bn_policy": cfg.train.bn_policy,
        "regularization": cfg.train.regularization,
        "l2sp": {"alpha": cfg.train.l2sp_alpha, "beta": cfg.train.l2sp_beta}
        if cfg.train.regularization == "l2sp"
        else None,
        "class_weights": weight.tolist() if weight is not None else None,
        "sampler": cfg.data.sampler,
    }
