"""`tltool baseline`: what the frozen features alone give, so a user sees what fine-tuning adds.

The backbone (with the configured weights) runs once over the train and val images, with the eval
transform, exactly as the frozen-feature cache does. On those features three classic read-outs are fitted:

- a linear probe: multinomial logistic regression on standardized features, full-batch L-BFGS, with its
  L2 penalty picked from a small grid;
- a kNN classifier: cosine similarity on L2-normalized features, votes weighted by exp(cos / 0.07) (the
  weighted kNN of Wu et al. 2018 and DINO), k picked from a small grid;
- the nearest class mean (cosine to each class's mean feature), which has nothing to pick.

With `data.task: multilabel` only the probe runs, as one logistic regression per class (binary cross-entropy),
its penalty picked by held-out mAP and scored as finetune's val (mAP, F1 at 0.5, exact match).

Every choice (penalty, k) is made on a stratified, seeded 20% of the *train* features held out from the
fit, then the read-out is refitted on all train features; the val split is only ever scored, never used to
choose, so its numbers are honest and comparable with `tltool finetune`'s val_acc1 (the same split).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tltool.config import Config
from tltool.engines import Engine, choose_engine, eager_engine, engine_precision
from tltool.errors import DataError
from tltool.files import check_writable, write_text_atomic

if TYPE_CHECKING:
    from tltool.data import Preprocess, Sample


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


HOLDOUT_FRACTION = 0.2
L2_GRID = (10.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4)  # strongest first: each fit warm-starts the next
K_GRID = (1, 3, 5, 10, 20)
KNN_TEMPERATURE = 0.07
DEFAULT_L2 = 1e-3  # used only when no train image can be held out (every class has one image)
DEFAULT_K = 5
# L-BFGS iterations per grid fit (each warm-started from the previous, stronger penalty) and for the refit.
# Separable features (common: D ~ 512-2048 for a few thousand images) never converge at weak penalties;
# the cap keeps a probe to seconds there, and the held-out score judges the capped fit, not an ideal one.
GRID_MAX_ITER = 100
REFIT_MAX_ITER = 300
CHUNK_ELEMENTS = 2**24  # similarity rows computed at once: 64 MiB of float32


@dataclass
class FeatureSet:
    """Backbone features (float32, one row per image) and labels of the train and val splits."""

    train: torch.Tensor
    train_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    num_classes: int
    class_names: list[str]
    info: dict[str, Any]


def extract_features(cfg: Config, quiet: bool = False) -> FeatureSet:
    """Scan the data, build the configured backbone and run it over train and val (eval transform).

    The same pieces as the feature cache (`tltool.extraction.extract` over `make_loader`), but both splits
    use the eval transform: a baseline of augmented views would measure the augmentation, not the features.
    """
    from tltool.data import scan_data
    from tltool.device import resolve_device, resolve_precision, use_channels_last
    from tltool.extraction import eager_in_workers
    from tltool.models import build_model

    start = time.perf_counter()
    split = scan_data(cfg.data, cfg.run.seed)
    device = resolve_device(cfg.run.device)
    precision = resolve_precision(cfg.train.precision, device)
    # Seeded, and without touching the caller's RNG: with model.weights=none the features are random-init ones.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        built = build_model(cfg.model, cfg.data, len(split.class_names), split.class_names)
    backbone = built.model.backbone.to(device).eval()
    if use_channels_last(cfg.train.channels_last, built.model):
        backbone.to(memory_format=torch.channels_last)
    # train.feature_engine as `tltool finetune` chooses it for a frozen run on the same images (auto counts train
    # and val), so the baseline and the run share the feature store's entries whichever ran first.
    name = choose_engine(cfg.train.feature_engine, len(split.train) + len(split.val), device, precision,
                         eager_in_workers=eager_in_workers(cfg, device))  # fmt: skip
    engine = Engine(backbone, device, engine_precision(name, precision), name, cfg.train.feature_engine, _stderr)
    parts = {
        kind: frozen_features(
            cfg, backbone, built.preprocess, samples, device, precision, kind, quiet, built.weights_source, engine
        )
        for kind, samples in (("train", split.train), ("val", split.val))
    }
    seconds = time.perf_counter() - start
    info = {
        "backbone": cfg.model.backbone,
        "weights": built.weights_source,
        "dim": int(parts["train"][0].shape[1]),
        "train_images": len(parts["train"][1]),  # (a multilabel run's labels are N x classes)
        "val_images": len(parts["val"][1]),
        "image_size": built.preprocess.image_size,
        "transform": "eval (resize + centre crop) for train and val",
        "device": str(device),
        "precision": precision,
        "extract_seconds": seconds,
        "engine": engine.describe(),
    }
    return FeatureSet(*parts["train"], *parts["val"], len(split.class_names), list(split.class_names), info)


def frozen_features(
    cfg: Config,
    backbone: nn.Module,
    preprocess: Preprocess,
    samples: Sequence[Sample],
    device: torch.device,
    precision: str,
    kind: str,
    quiet: bool = False,
    weights_source: str = "",
    engine: Engine | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32 on CPU, labels) of `samples` through `backbone` with the eval transform, run by
    `engine` (train.feature_engine's; eager when None).

    What the read-outs fit (here) and what LP-FT's probe head is fitted on (tltool.lpft): one extraction,
    reused from (and kept in) the feature store as `tltool finetune`'s eval-transform features are: a
    baseline after a frozen run on the same images, or the run after the baseline, runs no backbone
    (`train.feature_cache: off` skips the store). `kind` names the images in the progress bar and in the
    error when none could be read.
    """
    from tltool.data import eval_transform, make_loader
    from tltool.device import use_channels_last
    from tltool.extraction import extract
    from tltool.features import cache_key, entry_meta
    from tltool.featurestore import module_digest, open_store

    engine = engine or eager_engine(backbone, device, precision)

    def build() -> dict[str, torch.Tensor]:
        loader = make_loader(
            samples,
            eval_transform(preprocess),
            max(cfg.data.batch_size, 64),
            cfg.data.num_workers,
            seed=cfg.run.seed,
            shuffle=False,
            pin_memory=device.type == "cuda",
        )
        show = not quiet and cfg.log.progress
        bar = tqdm(loader, desc=f"features ({kind})", leave=False, disable=None if show else True, file=sys.stderr)
        features, labels = extract(backbone, bar, device, engine.precision, engine)
        if labels.numel() == 0:
            raise DataError(f"no {kind} image could be read", "check the dataset with `tltool doctor`")
        return {"features": features.flatten(1).unsqueeze(0), "labels": labels}

    store = None
    if cfg.train.feature_cache != "off":
        store = open_store(cfg.train.feature_cache_dir, cfg.train.feature_cache_max_mb)
    if store is None:
        stored = build()
    else:
        layout = use_channels_last(cfg.train.channels_last, backbone)
        key = cache_key(cfg, module_digest(backbone), preprocess, samples, kind, engine.precision, device.type, layout,
                        augmented=False, engine=engine.name)  # fmt: skip
        meta = entry_meta(cfg, weights_source, samples, kind, engine.precision, augmented=False, engine=engine.name)
        stored = store.fetch(key, meta, build, memory_bytes=2**62).tensors
    # extract() runs in inference mode; a clone made outside it can take part in autograd (the probe).
    return stored["features"][0].clone(), stored["labels"].clone()


# --- shared pieces ---------------------------------------------------------------------------------


def holdout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, seeded (fit, held-out) index split of the train features used for every choice.

    Per class `round(n * fraction)` indices, at least one and never all (as data.stratified_split does),
    so a class with a single image is only fitted on. Multi-hot labels (N x classes) are grouped by label set.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    fit, held = [], []
    groups = labels.unique(dim=0) if labels.dim() == 2 else labels.unique(sorted=True).tolist()
    for label in groups:
        members = torch.nonzero((labels == label).all(dim=1) if labels.dim() == 2 else labels == label).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        count = min(members.numel() - 1, max(1, round(members.numel() * fraction))) if members.numel() > 1 else 0
        held.append(members[:count])
        fit.append(members[count:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose true label is among the `k` highest scores (k capped at the class count)."""
    if labels.numel() == 0:
        return float("nan")
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def _pick(grid: list[dict[str, Any]], key: str = "holdout_acc1") -> dict[str, Any]:
    """The grid row with the best held-out top-1 (multilabel: mAP); ties go to the better tie-break score, then
    the later row."""
    return max(reversed(grid), key=lambda row: (row[key], row["tiebreak"]))


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The probe's data term: cross-entropy, or for multi-hot labels (N x classes) binary cross-entropy per class
    (one-vs-rest logistic regression)."""
    if labels.dim() == 2:
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    return F.cross_entropy(logits, labels)


# --- linear probe ----------------------------------------------------------------------------------


def feature_stats(reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature (mean, std) of `reference` that `standardize` uses (a constant feature gets std 1)."""
    mean = reference.mean(dim=0)
    std = reference.std(dim=0, unbiased=False)
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def standardize(reference: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Zero mean, unit variance per feature with `reference`'s statistics (constant features left at 0).

    The penalty grid then means the same for every backbone, whatever the scale of its features.
    """
    mean, std = feature_stats(reference)
    return [(x - mean) / std for x in (reference, *others)]


def fit_logistic(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    l2: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = REFIT_MAX_ITER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS: minimizes mean cross-entropy + l2/2 * |W|^2
    (multi-hot labels: one logistic regression per class, mean binary cross-entropy).

    The bias is not penalized. In scikit-learn's terms this is LogisticRegression(C=1 / (l2 * n)).
    Returns (weight (D, K), bias (K,)), detached.
    """
    dim = features.shape[1]
    weight = torch.zeros(dim, num_classes, device=features.device) if init is None else init[0].clone()
    bias = torch.zeros(num_classes, device=features.device) if init is None else init[1].clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _loss(features @ weight + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


@dataclass
class Probe:
    """A fitted linear probe: scores = ((x - mean) / std) @ weight + bias, on raw backbone features x."""

    weight: torch.Tensor  # (D, K)
    bias: torch.Tensor  # (K,)
    mean: torch.Tensor  # (D,): the train features' statistics (feature_stats)
    std: torch.Tensor  # (D,)
    l2: float  # the penalty chosen (DEFAULT_L2 when no image could be held out)
    grid: list[dict[str, Any]]  # one row per penalty tried: l2, holdout_acc1, holdout_loss
    holdout_images: int  # train images held out to choose the penalty (0: none could be)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """The probe's decision scores (logits) of raw backbone features, (N, D) -> (N, K)."""
        return ((features - self.mean) / self.std) @ self.weight + self.bias

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same map as one nn.Linear's (weight (K, D), bias (K,)): W' = W / std, b' = b - W' . mean."""
        weight = self.weight / self.std[:, None]
        return weight.T.contiguous(), self.bias - self.mean @ weight


def fit_probe(
    train: torch.Tensor, train_labels: torch.Tensor, num_classes: int, seed: int, grid: Sequence[float] = L2_GRID
) -> Probe:
    """Pick the L2 penalty on a held-out 20% of the train features, then refit on all of them.

    Only train features are seen: `tltool baseline` scores the result on val, LP-FT starts a head from it.
    Multi-hot labels: the penalty with the best held-out mAP (multilabel.metrics).
    """
    multilabel = train_labels.dim() == 2
    fit_index, held_index = holdout_split(train_labels, HOLDOUT_FRACTION, seed)
    rows: list[dict[str, Any]] = []
    if held_index.numel():
        fit_x, held_x = standardize(train[fit_index], train[held_index])
        fit_y, held_y = train_labels[fit_index], train_labels[held_index]
        previous = None
        for l2 in sorted(grid, reverse=True):  # strong to weak penalty: warm starts converge fast
            previous = fit_logistic(fit_x, fit_y, num_classes, l2, init=previous, max_iter=GRID_MAX_ITER)
            logits = held_x @ previous[0] + previous[1]
            loss = _loss(logits, held_y).item()
            score = {"holdout_map": _map(logits, held_y)} if multilabel else {
                "holdout_acc1": topk_accuracy(logits, held_y, 1)}  # fmt: skip
            rows.append({"l2": l2, **score, "holdout_loss": loss, "tiebreak": -loss, "solution": previous})
        best = _pick(rows, "holdout_map" if multilabel else "holdout_acc1")
        chosen, init = best["l2"], best["solution"]
    else:
        chosen, init = DEFAULT_L2, None
    mean, std = feature_stats(train)
    # Warm start from the chosen grid fit: all-train statistics differ little from the fit fold's.
    weight, bias = fit_logistic((train - mean) / std, train_labels, num_classes, chosen, init=init)
    table = [{k: v for k, v in row.items() if k not in ("tiebreak", "solution")} for row in rows]
    return Probe(weight, bias, mean, std, chosen, table, int(held_index.numel()))


def linear_probe(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    val: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    seed: int,
    grid: Sequence[float] = L2_GRID,
) -> dict[str, Any]:
    """Pick the L2 penalty on held-out train features, refit on all of train, score val."""
    start = time.perf_counter()
    probe = fit_probe(train, train_labels, num_classes, seed, grid)
    logits = probe.scores(val)
    if val_labels.dim() == 2:  # multilabel: one-vs-rest, scored as finetune's val (multilabel.metrics at 0.5)
        from tltool.multilabel import metrics

        scores = metrics(logits.cpu(), val_labels.cpu())
        return {
            "method": "linear probe: one-vs-rest logistic regression (L-BFGS, binary cross-entropy) on standardized "
            "features",
            "l2": probe.l2,
            "C": 1.0 / (probe.l2 * train.shape[0]),
            "val_map": scores["map"],
            "val_f1_micro": scores["f1_micro"],
            "val_f1_macro": scores["f1_macro"],
            "val_acc1": scores["exact_match"],
            "val_acc5": scores["label_accuracy"],
            "val_loss": _loss(logits, val_labels).item(),
            "chosen_by": "held-out 20% of train (mAP)" if probe.grid else "default (no train image could be held out)",
            "grid": probe.grid,
            "seconds": time.perf_counter() - start,
        }
    return {
        "method": "linear probe: multinomial logistic regression (L-BFGS) on standardized features",
        "l2": probe.l2,
        "C": 1.0 / (probe.l2 * train.shape[0]),
        "val_acc1": topk_accuracy(logits, val_labels, 1),
        "val_acc5": topk_accuracy(logits, val_labels, 5),
        "val_loss": F.cross_entropy(logits, val_labels).item(),
        "chosen_by": "held-out 20% of train" if probe.grid else "default (no train image could be held out)",
        "grid": probe.grid,
        "seconds": time.perf_counter() - start,
    }


def _map(logits: torch.Tensor, labels: torch.Tensor) -> float:
    from tltool.multilabel import metrics

    return metrics(logits.detach().cpu(), labels.cpu())["map"]


# --- kNN and nearest class mean ----------------------------------------------------------------------


def neighbours(bank: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` most cosine-similar rows of `bank` for each query: (similarities, indices), best first.

    Both inputs must already be L2-normalized; queries go in chunks so memory stays bounded.
    """
    k = min(k, bank.shape[0])
    chunk = max(1, CHUNK_ELEMENTS // max(1, bank.shape[0]))
    values, indices = [], []
    for begin in range(0, queries.shape[0], chunk):
        top = (queries[begin : begin + chunk] @ bank.T).topk(k, dim=1)
        values.append(top.values)
        indices.append(top.indices)
    if not values:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(values), torch.cat(indices)


def knn_vote(
    similarities: torch.Tensor,
    indices: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float = KNN_TEMPERATURE,
) -> torch.Tensor:
    """Class scores of the first `k` neighbours: each votes exp((cos - 1) / T) for its class.

    exp(cos / T) as in DINO's weighted kNN; the "- 1" only rescales every vote by the same factor so large
    similarities cannot overflow.
    """
    weights = torch.exp((similarities[:, :k] - 1.0) / temperature)
    scores = torch.zeros(similarities.shape[0], num_classes, device=similarities.device)
    return scores.scatter_add_(1, bank_labels[indices[:, :k]], weights)


def knn(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    val: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    seed: int,
    grid: Sequence[int] = K_GRID,
) -> dict[str, Any]:
    """Pick k on held-out train features (neighbours from the rest), then vote over all of train for val."""
    start = time.perf_counter()
    train, val = F.normalize(train, dim=1), F.normalize(val, dim=1)
    fit_index, held_index = holdout_split(train_labels, HOLDOUT_FRACTION, seed)
    rows: list[dict[str, Any]] = []
    if held_index.numel():
        fit_labels, held_labels = train_labels[fit_index], train_labels[held_index]
        usable = sorted({min(k, fit_index.numel()) for k in grid})
        similarities, indices = neighbours(train[fit_index], train[held_index], max(usable))
        for k in usable:
            scores = knn_vote(similarities, indices, fit_labels, num_classes, k)
            # Ties go to the larger k (more votes, less variance): the grid is ascending, _pick keeps the last.
            rows.append({"k": k, "holdout_acc1": topk_accuracy(scores, held_labels, 1), "tiebreak": 0.0})
        chosen = _pick(rows)["k"]
    else:
        chosen = min(DEFAULT_K, train.shape[0])
    similarities, indices = neighbours(train, val, chosen)
    scores = knn_vote(similarities, indices, train_labels, num_classes, chosen)
    return {
        "method": f"weighted kNN: cosine on L2-normalized features, votes exp(cos/{KNN_TEMPERATURE})",
        "k": chosen,
        "metric": "cosine",
        "temperature": KNN_TEMPERATURE,
        "val_acc1": topk_accuracy(scores, val_labels, 1),
        "val_acc5": topk_accuracy(scores, val_labels, 5),
        "chosen_by": "held-out 20% of train" if rows else "default (no train image could be held out)",
        "grid": [{"k": row["k"], "holdout_acc1": row["holdout_acc1"]} for row in rows],
        "seconds": time.perf_counter() - start,
    }


def nearest_class_mean(
    train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor, num_classes: int
) -> dict[str, Any]:
    """Cosine similarity to each class's mean (L2-normalized) train feature; nothing to choose."""
    start = time.perf_counter()
    train, val = F.normalize(train, dim=1), F.normalize(val, dim=1)
    sums = torch.zeros(num_classes, train.shape[1], device=train.device).index_add_(0, train_labels, train)
    scores = val @ F.normalize(sums, dim=1).T
    return {
        "method": "nearest class mean: cosine to each class's mean L2-normalized feature",
        "val_acc1": topk_accuracy(scores, val_labels, 1),
        "val_acc5": topk_accuracy(scores, val_labels, 5),
        "seconds": time.perf_counter() - start,
    }


# --- the command -------------------------------------------------------------------------------------


def run_baseline(
    cfg: Config, json_path: str | None = None, quiet: bool = False, echo: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """`tltool baseline`: features once, then the three read-outs; writes nothing but `json_path` if given.

    An unwritable `json_path` (read-only folder, a path through a file, a full disk) is one line, checked
    before the features are extracted; the file is written atomically."""
    if json_path:  # before the extraction: an unwritable --json fails in a moment, not after it
        check_writable(Path(json_path))
    features = extract_features(cfg, quiet=quiet)
    if echo is not None and not quiet:
        info = features.info
        echo(
            f"features: {info['backbone']} ({info['weights']}), {info['dim']}-d, {info['train_images']} train / "
            f"{info['val_images']} val images, {info['extract_seconds']:.1f} s on {info['device']} {info['precision']}"
            + (f" ({info['engine']['used']})" if info["engine"]["used"] != "eager" else "")
        )
    device = torch.device(features.info["device"])
    # The read-outs are small dense algebra: on the run's device (fast on a GPU), in float32.
    train, val = features.train.to(device), features.val.to(device)
    train_labels, val_labels = features.train_labels.to(device), features.val_labels.to(device)
    args = (train, train_labels, val, val_labels, features.num_classes)
    multilabel = cfg.data.task == "multilabel"
    holdout_count = holdout_split(features.train_labels, HOLDOUT_FRACTION, cfg.run.seed)[1].numel()
    result = {
        "method": "baseline",
        "features": features.info,
        "num_classes": features.num_classes,
        "selection": {
            "holdout_fraction": HOLDOUT_FRACTION,
            "holdout_images": int(holdout_count),
            "seed": cfg.run.seed,
            "note": "penalty and k chosen on held-out train features; val only scored",
        },
        "linear_probe": linear_probe(*args, seed=cfg.run.seed),
        # (multilabel: the linear probe only; kNN votes and class means assume one class per image)
        "knn": None if multilabel else knn(*args, seed=cfg.run.seed),
        "nearest_class_mean": None if multilabel else nearest_class_mean(*args),
    }
    if json_path:
        write_text_atomic(Path(json_path), json.dumps(_finite(result), indent=2) + "\n")
    return result


def _finite(value: Any) -> Any:
    """JSON has no NaN: a metric that could not be measured becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def format_baseline(result: dict[str, Any]) -> str:
    """The read-outs side by side: val top-1 / top-5 and seconds, with what was chosen."""
    probe, neighbour, mean = result["linear_probe"], result["knn"], result["nearest_class_mean"]
    if "val_map" in probe:  # multilabel: the probe alone
        info = result["features"]
        return (
            f"linear probe (l2={probe['l2']:g}, C={probe['C']:.3g}, one-vs-rest) on frozen features: val mAP "
            f"{probe['val_map']:.4f}, F1 micro {probe['val_f1_micro']:.3f}, macro {probe['val_f1_macro']:.3f}, "
            f"exact match {probe['val_acc1']:.1%}  {probe['seconds']:.1f} s\n"
            f"feature extraction {info['extract_seconds']:.1f} s; l2 chosen by mAP on "
            f"{result['selection']['holdout_images']} held-out train images, the {info['val_images']} val images "
            "only scored"
        )
    rows = [
        (f"linear probe (l2={probe['l2']:g}, C={probe['C']:.3g})", probe),
        (f"kNN (k={neighbour['k']}, cosine)", neighbour),
        ("nearest class mean (cosine)", mean),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'read-out on frozen features':<{width}}  val top-1   top-5    time"]
    for name, row in rows:
        lines.append(f"{name:<{width}}  {row['val_acc1']:9.1%}  {row['val_acc5']:6.1%}  {row['seconds']:4.1f} s")
    selection = result["selection"]
    info = result["features"]
    lines.append(
        f"feature extraction {info['extract_seconds']:.1f} s; l2 and k chosen on {selection['holdout_images']} "
        f"held-out train images (seed {selection['seed']}), the {info['val_images']} val images only scored"
    )
    return "\n".join(lines)
