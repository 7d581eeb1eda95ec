"""The parity check: every exported file against the PyTorch model, on real images, before it gets its name.

The images are the run's val split (or `--data`), found as `tltool eval` finds them
(`TrainedModel.samples`), interleaved over classes, decoded and resized/cropped exactly as eval does;
each file gets batch 1 and a larger batch (and, with `--dynamic-size`, that batch again at another,
non-square size). The PyTorch reference is the evaluation loop's own per-sample logits (`evaluate`). A
file fails beyond its batch's limit, PARITY_TOLERANCE * max(1, max |reference|) max abs diff of its
output, or below PARITY_MIN_AGREEMENT top-1 agreement, and the export then writes nothing.

Why the limit scales with the outputs: float32 rounding grows with the size of what is summed, so a model
whose logits are in the thousands (e.g. one trained at a high learning rate) differs by more than 1e-4 in
absolute terms between two correct implementations (an fp32 ulp at 2,000 is 1.2e-4). Up to magnitude 1
the limit is the absolute 1e-4 it always was; above, it is a relative 1e-4 of the largest output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from tltool.data import Preprocess, Sample, load_image
from tltool.errors import ExportError, TltoolError
from tltool.evaluate import evaluate
from tltool.export.spec import Echo, ExportSpec, Runner, first_line, normalize, uint8_transform
from tltool.trained import TrainedModel

# A parity check fails beyond this max abs diff of the outputs (times the largest |output| when above 1),
# or below this top-1 agreement.
PARITY_TOLERANCE = 1e-4
PARITY_MIN_AGREEMENT = 1.0
PARITY_MAX_BATCH = 8


@dataclass(frozen=True)
class ParityResult:
    """Exported vs PyTorch outputs on one batch."""

    batch_size: int
    max_abs_diff: float
    agreement: float
    limit: float = PARITY_TOLERANCE

    def passed(self) -> bool:
        """Within the limit and agreeing; `<=` rather than `>` so that a NaN diff fails."""
        return self.max_abs_diff <= self.limit and self.agreement >= PARITY_MIN_AGREEMENT


def parity_limit(reference: torch.Tensor) -> float:
    """The max abs diff allowed against `reference`: PARITY_TOLERANCE, relative to its largest |value| above 1."""
    scale = reference.abs().max().item() if reference.numel() else 0.0
    return PARITY_TOLERANCE * max(1.0, scale) if math.isfinite(scale) else PARITY_TOLERANCE


@dataclass(frozen=True)
class ParityImages:
    """The uint8 N x 3 x H x W batches every format is checked on, and what they are (for the report).

    `labels` are the classes of the largest batch's images (0 for random pixels): only the evaluation
    loop that computes the reference needs them; the check compares outputs, not accuracy.
    """

    batches: list[torch.Tensor]
    labels: torch.Tensor
    kind: str
    preprocess: Preprocess


# --- images --------------------------------------------------------------------------------------------


def interleave_classes(samples: Sequence[Sample]) -> list[Sample]:
    """Samples reordered round-robin over classes, so the first few cover as many classes as possible."""
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    queues = [by_class[label] for label in sorted(by_class)]
    longest = max((len(q) for q in queues), default=0)
    return [q[i] for i in range(longest) for q in queues if i < len(q)]


def _parity_samples(trained: TrainedModel, data: str | None, echo: Echo) -> tuple[list[Sample], str]:
    """The candidate images: `data` if given (errors are the user's to fix), else the run's val split.

    The recorded dataset may be gone (exporting on another machine); then there are simply no images.
    """
    try:
        return trained.samples(data, allow_empty=True)
    except TltoolError as exc:
        if data:
            raise
        echo(f"note: the run's val split is not readable here ({exc.what})")
        return [], "the run's val split"


def _load_images(samples: Sequence[Sample], preprocess: Preprocess, count: int) -> tuple[list[torch.Tensor], list[int]]:
    """Up to `count` images as uint8 3 x H x W crops, and their classes, skipping any that fail to decode."""
    transform = uint8_transform(preprocess)
    images, labels = [], []
    for path, label in interleave_classes(samples):
        if len(images) == count:
            break
        try:
            images.append(transform(load_image(path)))
        except (OSError, SyntaxError, ValueError):
            continue
        labels.append(label)
    return images, labels


def other_size(preprocess: Preprocess) -> tuple[int, int]:
    """A non-square (height, width) unlike the image size: where a dynamic-size file is checked too."""
    size = preprocess.image_size
    return size + size // 2, size + size // 4


def parity_images(trained: TrainedModel, data: str | None, dynamic_size: bool, echo: Echo) -> ParityImages:
    """Batch 1 and batch up-to-PARITY_MAX_BATCH of real images (random pixels if none are readable)."""
    preprocess = trained.preprocess
    samples, source = _parity_samples(trained, data, echo)
    images, labels = _load_images(samples, preprocess, PARITY_MAX_BATCH)
    kind = "image"
    if not images:
        echo(f"note: no readable images in {source} for the parity check; using random pixels")
        generator = torch.Generator().manual_seed(0)
        size = preprocess.image_size
        images = list(torch.randint(0, 256, (PARITY_MAX_BATCH, 3, size, size), generator=generator, dtype=torch.uint8))
        labels = [0] * len(images)
        kind = "random image"
    large = max(2, len(images))  # a single image is repeated: the second batch must still be > 1
    batch = torch.stack([images[i % len(images)] for i in range(large)])
    batch_labels = torch.tensor([labels[i % len(labels)] for i in range(large)], dtype=torch.long)
    batches = [batch[:1], batch]
    if dynamic_size:
        batches.append(TF.resize(batch, list(other_size(preprocess)), antialias=True))
    return ParityImages(batches, batch_labels, kind, preprocess)


# --- comparing -----------------------------------------------------------------------------------------


def compare(reference: torch.Tensor, exported: torch.Tensor) -> ParityResult:
    """Max abs diff and top-1 agreement of exported vs reference outputs.

    A different arg-max counts as agreement only when the reference scores both classes within the
    limit of each other (a tie that float rounding may break either way).
    """
    exported = exported.float()
    limit = parity_limit(reference)
    if exported.shape != reference.shape:
        return ParityResult(reference.shape[0], float("inf"), 0.0, limit)
    diff = (exported - reference).abs().max().item()
    chosen = exported.argmax(dim=1)
    best = reference.max(dim=1).values
    tie = reference.gather(1, chosen[:, None]).squeeze(1) >= best - limit
    agreement = ((chosen == reference.argmax(dim=1)) | tie).float().mean().item()
    return ParityResult(reference.shape[0], diff, agreement, limit)


def reference_logits(model: nn.Module, images: ParityImages, num_classes: int) -> list[torch.Tensor]:
    """What the PyTorch model says for each parity batch: computed once, shared by every format checked.

    One pass of the evaluation loop (fp32, on the CPU) over the batches, split back into batches.
    """
    batches = [(normalize(batch, images.preprocess), images.labels[: len(batch)]) for batch in images.batches]
    outputs = evaluate(model, batches, torch.device("cpu"), "fp32", num_classes, per_sample=True)["outputs"]
    return list(outputs.logits.split([len(batch) for batch in images.batches]))


def check_parity(
    references: Sequence[torch.Tensor], run_exported: Runner, images: ParityImages, spec: ExportSpec, echo: Echo
) -> list[ParityResult]:
    """Run every batch through the exported file, print one line per batch, raise ExportError on any failure.

    `references` are the PyTorch logits of each batch (`reference_logits`); a file that outputs
    probabilities is compared with their softmax.
    """
    results = []
    for batch, logits in zip(images.batches, references, strict=True):
        reference = logits.softmax(dim=1) if spec.softmax else logits
        height, width = batch.shape[-2:]
        at = "" if (height, width) == (spec.preprocess.image_size,) * 2 else f" at {height}x{width}"
        try:
            exported = run_exported(spec.model_input(batch))
        except Exception as exc:  # a runtime error here (e.g. an axis that is not dynamic) is a failure
            raise ExportError(
                f"the exported {spec.format} model fails at batch {batch.shape[0]}{at}: {first_line(exc)}",
                "nothing was written; report this with the backbone name",
            ) from None
        result = compare(reference, exported)
        plural = "s" if result.batch_size != 1 else ""
        echo(
            f"parity {spec.format} batch {result.batch_size}{at}: max abs diff {result.max_abs_diff:.1e} "
            f"({spec.output_name}), top-1 agreement {result.agreement:.1%} ({result.batch_size} {images.kind}{plural})"
        )
        results.append(result)
    failed = [r for r in results if not r.passed()]
    if failed:
        first = failed[0]
        raise ExportError(
            f"{spec.format} parity check failed at batch {first.batch_size}: max abs diff {first.max_abs_diff:.1e} "
            f"(limit {first.limit:.1e}), top-1 agreement {first.agreement:.1%} "
            f"(needed {PARITY_MIN_AGREEMENT:.0%})",
            "nothing was written; --no-verify writes the files unchecked",
        )
    return results
