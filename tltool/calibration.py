"""Calibration: expected calibration error, reliability bins, and temperature scaling (Guo et al. 2017).

A classifier's softmax is *calibrated* when, of the images it labels with confidence p, a fraction p is
right. `expected_calibration_error` measures the gap (torchmetrics' `MulticlassCalibrationError`, l1 norm,
15 equal-width bins of the top-1 confidence); `reliability_bins` gives the same bins for a reliability
diagram (`tltool report`).

Temperature scaling divides the logits by one scalar T > 0 fitted on the validation split: T minimizes the
negative log-likelihood of softmax(logits / T), over log T with L-BFGS, so T stays positive. The argmax
never changes, only the probabilities. T is stored in the checkpoint (`Checkpoint.temperature`) and
applied by the model itself (`TransferModel.temperature`, set by `trained.open_trained`): `tltool eval`,
`report`, `predict` and every export see logits / T. It is fitted by `train.calibrate: true` at the end
of training (`calibrate_run`, for last.pt and best.pt) or by `tltool calibrate CKPT` (`run_calibrate`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tltool.errors import CheckpointError, ConfigError

ECE_BINS = 15
# The fitted T is kept within these bounds: on a val set the model separates perfectly the NLL keeps falling
# as T -> 0 (and on one it gets all wrong as T -> infinity), so the optimum is the bound, said in a warning.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature) (float64)."""
    return F.cross_entropy(logits.double() / temperature, labels).item()


# What eval, report and calibrate say in place of the ECE when the `metrics` extra is not installed.
ECE_NEEDS = "expected calibration error: needs torchmetrics (pip install 'tltool[metrics]')"


def expected_calibration_error(
    probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS, device: torch.device | None = None
) -> float | None:
    """Top-label ECE of N x C probabilities: sum over `bins` equal-width confidence bins of
    (bin's share of images) x |bin's accuracy - bin's mean confidence| (torchmetrics, norm l1).

    None without torchmetrics (the optional `metrics` extra): the callers print `ECE_NEEDS` instead.
    """
    try:
        from torchmetrics.functional.classification import multiclass_calibration_error
    except ImportError:
        return None

    # Probabilities, never logits: torchmetrics takes values outside [0, 1] as logits, so give it what it expects.
    return float(
        multiclass_calibration_error(
            probabilities.float(), labels, num_classes=probabilities.shape[1], n_bins=bins, norm="l1"
        )
    )


@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence bin of a reliability diagram: [lower, upper), its images, accuracy and mean confidence."""

    lower: float
    upper: float
    count: int
    accuracy: float
    confidence: float


def reliability_bins(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[ReliabilityBin]:
    """The bins `expected_calibration_error` sums over (same edges as torchmetrics': a confidence c falls in
    the bin whose upper edge is the first >= c), for the reliability diagram."""
    confidence, predicted = probabilities.double().max(dim=1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = (torch.bucketize(confidence, edges, right=False) - 1).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins)
    hits = torch.bincount(index, weights=correct, minlength=bins)
    sure = torch.bincount(index, weights=confidence, minlength=bins)
    out = []
    for b in range(bins):
        n = int(count[b])
        out.append(
            ReliabilityBin(
                float(edges[b]),
                float(edges[b + 1]),
                n,
                float(hits[b] / n) if n else 0.0,
                float(sure[b] / n) if n else 0.0,
            )
        )
    return out


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 that minimizes the NLL of softmax(logits / T) on (logits, labels), within the bounds above.

    L-BFGS with a strong-Wolfe line search on log T (float64, from T = 1). The NLL is a convex function
    of 1/T, so the minimum is unique; where it lies beyond a bound, the bound is returned.
    """
    if logits.shape[0] == 0:
        raise ConfigError("no validation logits to fit the temperature on", "give images with --data")
    # Clones made here, outside inference mode: evaluate()'s tensors cannot take part in autograd.
    logits, labels = logits.detach().cpu().double().clone(), labels.detach().cpu().clone()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    low, high = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        # Clamped inside the objective too: the line search must not wander to exp(500).
        loss = F.cross_entropy(logits / log_t.clamp(low - 1, high + 1).exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    if log_t.item() <= low:
        return MIN_TEMPERATURE
    if log_t.item() >= high:
        return MAX_TEMPERATURE
    return float(math.exp(log_t.item()))


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and the val NLL/ECE before (the model as it was) and after."""

    temperature: float
    previous_temperature: float | None
    images: int
    nll_before: float
    nll_after: float
    ece_before: float | None  # None without torchmetrics (ECE_NEEDS)
    ece_after: float | None
    data: str = ""
    separable: bool = False  # every image right: the NLL falls all the way to T -> 0

    @property
    def warning(self) -> str | None:
        """Why this T says little, or None."""
        if self.separable:
            return (
                "the model gets every calibration image right, so the NLL only falls as T -> 0 and T says little: "
                "calibrate on more (or harder) images"
            )
        if self.temperature in (MIN_TEMPERATURE, MAX_TEMPERATURE):
            return f"T reached its bound {self.temperature:g}: calibrate on more images"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "previous_temperature": self.previous_temperature,
            "images": self.images,
            "data": self.data,
            "val_nll_before": self.nll_before,
            "val_nll_after": self.nll_after,
            "val_ece_before": self.ece_before,
            "val_ece_after": self.ece_after,
            "warning": self.warning,
        }

    def line(self, name: str) -> str:
        was = f"T was {self.previous_temperature:.4g}; " if self.previous_temperature is not None else ""
        ece = (
            f"ECE {self.ece_before:.4f} -> {self.ece_after:.4f}"
            if self.ece_before is not None and self.ece_after is not None
            else ECE_NEEDS
        )
        text = (
            f"{name}: temperature {self.temperature:.4g} fitted on {self.images} images ({was}val NLL "
            f"{self.nll_before:.4f} -> {self.nll_after:.4f}, {ece})"
        )
        if self.warning:
            text += f"; warning: {self.warning}"
        return text


def calibrate_logits(
    raw_logits: torch.Tensor, labels: torch.Tensor, previous: float | None = None, data: str = ""
) -> Calibration:
    """Fit T on the uncalibrated `raw_logits`; "before" is the model with its `previous` temperature (or none)."""
    temperature = fit_temperature(raw_logits, labels)
    before = previous or 1.0
    raw = raw_logits.double()
    return Calibration(
        temperature=temperature,
        previous_temperature=previous,
        images=int(labels.numel()),
        nll_before=nll(raw, labels, before),
        nll_after=nll(raw, labels, temperature),
        ece_before=expected_calibration_error((raw / before).softmax(dim=1), labels),
        ece_after=expected_calibration_error((raw / temperature).softmax(dim=1), labels),
        data=data,
        separable=bool((raw.argmax(dim=1) == labels).all()),
    )


# --- a checkpoint ------------------------------------------------------------------------------------------


def checkpoint_logits(
    path: str | Path,
    data: str | None = None,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    num_workers: int | None = None,
) -> tuple[Any, torch.Tensor, torch.Tensor, str]:
    """(the Checkpoint, its uncalibrated val logits, labels, where the images are) of a tltool checkpoint."""
    from tltool.evaluate import evaluate_trained
    from tltool.trained import open_trained

    trained = open_trained(path, device, calibrated=False)
    if trained.multilabel:
        raise ConfigError(
            f"{path} is a multilabel model: temperature scaling fits a softmax",
            "leave it uncalibrated (tltool eval chooses per-class thresholds)",
        )
    samples, source = trained.samples(data)
    metrics = evaluate_trained(trained, samples, batch_size, num_workers, per_sample=True)
    outputs = metrics["outputs"]
    return trained.checkpoint, outputs.logits, outputs.labels, source


def save_temperature(checkpoint: Any, temperature: float, target: Path) -> None:
    """Write `checkpoint` with `temperature` to `target` atomically (the old file survives any failure)."""
    from tltool.checkpoint import save_atomic

    save_atomic(dataclasses.replace(checkpoint, temperature=temperature).to_dict(), target)


def run_calibrate(
    checkpoint: str | Path,
    data: str | None = None,
    output: str | Path | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    echo: Callable[[str], None] = print,
) -> Calibration:
    """`tltool calibrate`: fit T on the run's val split (or `data`) and write it into the checkpoint (or `output`).

    Every problem (not a tltool checkpoint, no images, an unwritable target) is one line before anything
    is written; the checkpoint is replaced atomically, so it is either the old file or the new one.
    """
    from tltool.checkpoint import TORCH_SAVE, archive_entries, archive_kind
    from tltool.device import resolve_device
    from tltool.files import check_writable

    source = Path(checkpoint)
    target = Path(output) if output else source
    if output and target.exists() and not (source.exists() and target.samefile(source)):
        entries = archive_entries(target) if target.is_file() else None
        if entries is None or archive_kind(entries) != TORCH_SAVE:  # never replace an image, an export, ...
            raise CheckpointError(f"-o {target} exists and is not a checkpoint", "give a new path, or a .pt to replace")
    check_writable(target, CheckpointError, "give a writable -o path")
    loaded, logits, labels, where = checkpoint_logits(
        source, data, resolve_device(device, "--device"), batch_size, num_workers
    )
    result = calibrate_logits(logits, labels, loaded.temperature, where)
    save_temperature(loaded, result.temperature, target)
    echo(result.line(str(target)))
    return result


def calibrate_run(
    paths: Sequence[Path],
    logits_of: Callable[[Path], tuple[Any, torch.Tensor, torch.Tensor]],
    data: str,
    write: bool,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """`train.calibrate`: fit T for each checkpoint in `paths` (one fit per distinct file) and write it in.

    `logits_of(path)` gives (Checkpoint, uncalibrated val logits, labels); under torchrun every rank calls
    it (the val pass is sharded) and only the rank with `write` writes. Returns summary.json's
    `calibration`: one entry per checkpoint file name; `echo` gets one line per file.
    """
    from tltool.checkpoint import rewrite_checkpoints

    def fit(path: Path) -> tuple[Any, dict[str, Any]]:
        checkpoint, logits, labels = logits_of(path)
        result = calibrate_logits(logits, labels, None, data)
        echo("calibrated " + result.line(path.name))
        return dataclasses.replace(checkpoint, temperature=result.temperature), result.to_dict()

    return rewrite_checkpoints(paths, fit, write)
