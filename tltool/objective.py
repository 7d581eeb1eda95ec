"""The loss a run minimizes: a sum of named terms.

Each term is a function of what a training step's forward produced (`StepOutputs`) and returns a
scalar; the objective is their sum, each times its weight. The loop logs every term's mean per epoch
(`loss_terms` in metrics.jsonl: each term's contribution to the objective, weight included), and the
`ce` term's is the epoch's `train_loss`. A term that carries state across a resume (L2-SP's starting
weights) saves it in the checkpoint through `Objective.state_dict()`.

Adding a method's loss: one `Term` in `build_objective` and its config key in tltool/config/sections.py (README,
"Add a loss term").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tltool.adapt import DomainDiscriminator, domain_adversarial_loss, ganin_ramp, mcc_loss, reverse_gradient
from tltool.config import Config
from tltool.cotuning import cotuning_loss, restore_source_head
from tltool.distill import distillation_loss
from tltool.distributed import gather_rows
from tltool.errors import ConfigError
from tltool.models import TransferModel, make_head
from tltool.source import SourceData


@dataclass
class StepOutputs:
    """What one training step's forward produced: the terms' input."""

    logits: torch.Tensor  # (batch, classes), float32: the labelled batch
    labels: torch.Tensor  # (batch,)
    features: torch.Tensor | None = None  # the labelled batch's backbone features (adapting runs)
    unlabeled_logits: torch.Tensor | None = None  # the unlabelled batch's (adapt.unlabeled), float32
    unlabeled_features: torch.Tensor | None = None
    progress: float = 0.0  # how far training is, 0 to 1 (for warm-ups)
    images: torch.Tensor | None = None  # the step's inputs (a teacher's), labelled then unlabelled
    unlabeled_images: torch.Tensor | None = None
    source_logits: torch.Tensor | None = None  # source.train's batch through the shared head (same classes)
    source_features: torch.Tensor | None = None
    source_labels: torch.Tensor | None = None  # in the source's own class indices
    targets: torch.Tensor | None = None  # a mixed batch's soft targets (batch, classes); labels: the dominant ones


@dataclass
class Term:
    """One named part of the objective: `weight * compute(outputs)`.

    A term with trainable parameters of its own (DANN's discriminator) holds them in `module`: the session
    gives them an optimizer group named after the term, wraps them for DDP (`forward`), and saves them.
    """

    name: str
    compute: Callable[[StepOutputs], torch.Tensor]
    weight: float = 1.0
    state: dict[str, Any] = field(default_factory=dict)  # what a resume needs (saved in the checkpoint)
    module: nn.Module | None = None
    forward: nn.Module | None = None  # `module` as the step calls it (DDP-wrapped under torchrun)
    lr_scale: float = 1.0  # `module`'s optimizer group trains at train.lr x this


class Objective:
    """The sum of the run's loss terms; `ce` (the classification loss on the labelled batch) comes first."""

    def __init__(self, terms: Sequence[Term], class_weight: torch.Tensor | None = None) -> None:
        self.terms = list(terms)
        self.names = [term.name for term in self.terms]
        self.class_weight = class_weight  # train.class_weights as the cross-entropy weight (summary.json)

    def __call__(self, outputs: StepOutputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The objective to minimize and each term's contribution to it (weight applied)."""
        values = [term.compute(outputs) if term.weight == 1.0 else term.weight * term.compute(outputs)
                  for term in self.terms]  # fmt: skip
        total = values[0]
        for value in values[1:]:
            total = total + value
        return total, values

    def state_dict(self) -> dict[str, dict[str, Any]]:
        out = {term.name: dict(term.state) for term in self.terms if term.state}
        for term in self.terms:
            if term.module is not None:
                out.setdefault(term.name, {})["module"] = term.module.state_dict()
        return out

    def modules(self) -> dict[str, nn.Module]:
        """The terms' own trainable modules, by term name."""
        return {term.name: term.module for term in self.terms if term.module is not None}

    def term(self, name: str) -> Term | None:
        return next((term for term in self.terms if term.name == name), None)


def build_objective(
    cfg: Config,
    model: TransferModel,
    class_names: list[str],
    labels: Sequence[int],
    device: torch.device,
    saved: dict[str, dict[str, Any]] | None = None,
    in_features: int = 0,
    teacher: nn.Module | None = None,
    source: SourceData | None = None,
    source_head: nn.Module | None = None,
) -> Objective:
    """The run's loss terms, from the config; `saved` is the state of a resumed run's terms; `in_features`
    the width of the backbone's features (DANN's discriminator input); `teacher` distill.teacher's model;
    `source_head` Co-Tuning's pretrained classifier (a resumed run's is rebuilt from `saved`). One builder per
    term, in the order the terms are summed and logged."""
    saved = saved or {}
    supervised, weight = _supervised_term(cfg, class_names, labels, device)
    terms = [supervised]
    if cfg.train.regularization == "l2sp":
        terms.append(_l2sp_term(cfg, model, saved, device))
    if cfg.adapt.method != "none":
        terms.append(_adaptation_term(cfg, saved, in_features, device))
    if source is not None:
        terms.append(_source_term(cfg, source, saved, in_features, device))
    if teacher is not None:
        terms.append(_distill_term(cfg, teacher))
    if cfg.train.cotuning_weight > 0:  # (cotuning.py; the relation of a new run is estimated in session.start)
        terms.append(_cotuning_term(cfg, saved, source_head, device))
    return Objective(terms, class_weight=weight)


def _supervised_term(
    cfg: Config, class_names: list[str], labels: Sequence[int], device: torch.device
) -> tuple[Term, torch.Tensor | None]:
    """`ce` (train.class_weights, label smoothing; soft targets under MixUp/CutMix) or, multilabel, `bce` (the
    class weights as positive weights); with the weight tensor the objective keeps."""
    train = cfg.train
    if cfg.data.task == "multilabel":  # (the config refuses the softmax-based keys: smoothing, mixing, ...)
        pos_weight = pos_weight_tensor(train.class_weights, class_names, labels)
        pos_weight = pos_weight.to(device) if pos_weight is not None else None

        def bce(out: StepOutputs) -> torch.Tensor:
            return multilabel_bce(out.logits, out.labels, pos_weight)

        return Term("bce", bce), pos_weight
    weight = class_weight_tensor(train.class_weights, class_names, labels)
    weight = weight.to(device) if weight is not None else None

    def cross_entropy(out: StepOutputs) -> torch.Tensor:
        if out.targets is not None:  # data.mixup_alpha / cutmix_alpha: the soft form of the same loss
            return soft_cross_entropy(out.logits, out.targets, weight, train.label_smoothing)
        return F.cross_entropy(out.logits, out.labels, weight=weight, label_smoothing=train.label_smoothing)

    return Term("ce", cross_entropy), weight


def _l2sp_term(cfg: Config, model: TransferModel, saved: dict[str, Any], device: torch.device) -> Term:
    """`l2sp`: the distance to the starting backbone (a resumed run's reference is its checkpoint's)."""
    train = cfg.train
    reference = saved.get("l2sp", {}).get("reference") or l2sp_reference(model)
    reference = {name: value.to(device) for name, value in reference.items()}

    def l2sp(out: StepOutputs) -> torch.Tensor:
        return l2sp_penalty(model, reference, train.l2sp_alpha, train.l2sp_beta)

    return Term("l2sp", l2sp, state={"reference": reference})


def _adaptation_term(cfg: Config, saved: dict[str, Any], in_features: int, device: torch.device) -> Term:
    """`mcc` or `dann` on the unlabelled target batch, ramped in by adapt.warmup."""
    adapt = cfg.adapt
    ramp = ganin_ramp if adapt.warmup == "ganin" else (lambda progress: 1.0)
    if adapt.method == "mcc":

        def mcc(out: StepOutputs) -> torch.Tensor:
            if out.unlabeled_logits is None or not out.unlabeled_logits.numel():
                return out.logits.new_zeros(())
            # (over the global batch under torchrun: a class confusion is not a mean over samples)
            return ramp(out.progress) * mcc_loss(gather_rows(out.unlabeled_logits), adapt.mcc_temperature)

        return Term("mcc", mcc, adapt.weight)
    discriminator = DomainDiscriminator(in_features, adapt.dann_hidden).to(device)
    if "module" in saved.get("dann", {}):
        discriminator.load_state_dict(saved["dann"]["module"])
    term = Term("dann", lambda out: out.logits.new_zeros(()), adapt.weight, module=discriminator)

    def dann(out: StepOutputs) -> torch.Tensor:
        if out.unlabeled_features is None or not out.unlabeled_features.numel():
            return out.logits.new_zeros(())
        # (one discriminator pass over both domains: its batch norm sees them together, as in TLlib)
        both = reverse_gradient(torch.cat([out.features, out.unlabeled_features]), ramp(out.progress))
        domain = (term.forward or term.module)(both)
        count = out.features.shape[0]
        return domain_adversarial_loss(domain[:count], domain[count:])

    term.compute = dann
    return term


def _source_term(
    cfg: Config, source: SourceData, saved: dict[str, Any], in_features: int, device: torch.device
) -> Term:
    """`source`: cross-entropy on the labelled source batch, through the target head (the same classes) or a
    head of its own, weighted per class by source.class_weights (target_prior: re-estimated each epoch)."""
    own_head = None if source.shares_head else make_head(in_features, len(source.class_names), cfg.model.head_dropout)
    if own_head is not None:
        own_head = own_head.to(device)
        if "module" in saved.get("source", {}):
            own_head.load_state_dict(saved["source"]["module"])
    state = {}
    if cfg.source.class_weights == "target_prior":  # (re-estimated each epoch by the session)
        prior = saved.get("source", {}).get("class_weights")
        state["class_weights"] = (prior if prior is not None else torch.ones(len(source.class_names))).to(device)
    term = Term("source", lambda out: out.logits.new_zeros(()), cfg.source.weight, state, own_head)

    def source_loss(out: StepOutputs) -> torch.Tensor:
        if out.source_labels is None or not out.source_labels.numel():
            return out.logits.new_zeros(())
        logits = out.source_logits if own_head is None else (term.forward or own_head)(out.source_features)
        weight = term.state.get("class_weights")
        return F.cross_entropy(logits.float(), out.source_labels, weight=weight)

    term.compute = source_loss
    return term


def _distill_term(cfg: Config, teacher: nn.Module) -> Term:
    """`distill`: the teacher's softened predictions on every image of the step."""
    temperature = cfg.distill.temperature

    def distill(out: StepOutputs) -> torch.Tensor:
        # On every image of the step, labelled and unlabelled alike: the teacher needs no label.
        student, images = out.logits, out.images
        if out.unlabeled_logits is not None and out.unlabeled_images is not None:
            student = torch.cat([student, out.unlabeled_logits])
            images = torch.cat([images, out.unlabeled_images])
        return distillation_loss(student, teacher(images), temperature)

    return Term("distill", distill, cfg.distill.weight)


def _cotuning_term(cfg: Config, saved: dict[str, Any], source_head: nn.Module | None, device: torch.device) -> Term:
    """`cotuning`: the pretrained classifier against the relation's row of each label (a resumed run's head and
    relation from its checkpoint), at the backbone's LR."""
    train = cfg.train
    kept = saved.get("cotuning", {})
    head = restore_source_head(kept["module"]) if "module" in kept else source_head
    if head is None:
        raise ValueError("train.cotuning_weight without a source head (build_model(keep_source_head=True))")
    head = head.to(device)
    if "module" in kept:
        head.load_state_dict(kept["module"])
    relation = kept.get("relation")
    state = {"relation": relation.to(device) if relation is not None else None}
    term = Term("cotuning", lambda out: out.logits.new_zeros(()), train.cotuning_weight, state, head,
                lr_scale=train.backbone_lr_mult)  # fmt: skip

    def cotuning(out: StepOutputs) -> torch.Tensor:
        soft_targets = term.state["relation"][out.labels]
        return cotuning_loss((term.forward or head)(out.features), soft_targets)

    term.compute = cotuning
    return term


# --- soft targets (MixUp / CutMix) ----------------------------------------------------------------------


def soft_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy against soft targets t (rows summing to 1), the `ce` term of a mixed batch.

    Label smoothing eps applies to the mixed targets: t' = (1 - eps) t + eps / K (the same as mixing smoothed
    one-hots, since both are linear). Without class weights: mean over samples of -sum_c t'_c log p_c. With class
    weights w: sum_n sum_c w_c t'_nc (-log p_nc) / sum_n sum_c w_c t_nc, each sample weighted by its classes'
    shares. For one-hot t both are exactly F.cross_entropy(logits, labels, weight, label_smoothing).
    """
    log_p = logits.float().log_softmax(dim=1)
    smoothed = targets * (1.0 - label_smoothing) + label_smoothing / logits.shape[1] if label_smoothing else targets
    if weight is None:
        return -(smoothed * log_p).sum(dim=1).mean()
    return -(smoothed * weight * log_p).sum() / (targets * weight).sum()


# --- multilabel (data.task: multilabel) ------------------------------------------------------------------


def multilabel_bce(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The `bce` term: binary cross-entropy with logits, one sigmoid per class, the mean over images and classes:
    mean_{n,c} -[w_c t_nc log s(z_nc) + (1 - t_nc) log(1 - s(z_nc))], w = pos_weight (1 without)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=pos_weight)


def pos_weight_tensor(
    setting: str | list[float], class_names: list[str], labels: Sequence[tuple[float, ...]]
) -> torch.Tensor | None:
    """train.class_weights of a multilabel run, as BCE's pos_weight (the weight of each class's positives):
    balanced = negatives_c / positives_c over the training images; a list: one weight per class."""
    if setting == "none":
        return None
    if setting == "balanced":
        targets = torch.tensor(list(labels), dtype=torch.float64)
        positives = targets.sum(dim=0)
        return ((len(targets) - positives) / positives.clamp(min=1)).float()
    return class_weight_tensor(setting, class_names, [])


# --- L2-SP (Li, Grandvalet, Davoine 2018, "Explicit inductive bias for transfer learning with CNNs") ------


def l2sp_reference(model: TransferModel) -> dict[str, torch.Tensor]:
    """w0: a copy of the backbone's weights at the start of training (saved in the checkpoint for resume)."""
    return {name: param.detach().clone() for name, param in model.backbone.named_parameters(prefix="backbone")}


def l2sp_penalty(model: TransferModel, reference: dict[str, torch.Tensor], alpha: float, beta: float) -> torch.Tensor:
    """alpha/2 * ||w_backbone - w0||^2 + beta/2 * ||w_head||^2 over the trainable parameters (float32)."""
    backbone = torch.zeros((), device=next(model.head.parameters()).device)
    for name, param in model.backbone.named_parameters(prefix="backbone"):
        if param.requires_grad:
            backbone = backbone + (param.float() - reference[name].float()).pow(2).sum()
    head = torch.zeros_like(backbone)
    for param in model.head.parameters():
        if param.requires_grad:
            head = head + param.float().pow(2).sum()
    return alpha / 2 * backbone + beta / 2 * head


# --- class imbalance ------------------------------------------------------------------------------------


def class_weight_tensor(
    setting: str | list[float], class_names: list[str], labels: Sequence[int]
) -> torch.Tensor | None:
    """The cross-entropy `weight` of `train.class_weights`; balanced = n / (n_classes * count_c)."""
    if setting == "none":
        return None
    if setting == "balanced":
        counts = Counter(labels)
        total, classes = len(labels), len(class_names)
        return torch.tensor([total / (classes * counts[c]) for c in range(classes)], dtype=torch.float32)
    if len(setting) != len(class_names):
        raise ConfigError(
            f"train.class_weights has {len(setting)} weights, but the data has {len(class_names)} classes "
            f"({', '.join(class_names[:10])}{' ...' if len(class_names) > 10 else ''})",
            "give one weight per class, in the order of the class folders (sorted), or use balanced",
        )
    return torch.tensor(setting, dtype=torch.float32)
