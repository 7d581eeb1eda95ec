"""Transfer across a real domain shift: printed digits (source) -> handwritten digits (target), per method.

    python benchmarks/bench_transfer.py            # make bench-transfer: 3 seeds
    python benchmarks/bench_transfer.py --quick    # 1 seed, a smaller source, fewer epochs (~15 min on 2 cores)

The domain pair is scripts/make_domains.py's, one folder per seed under data/domains-bench/ (the seed picks the
renderings and the target's split): `source/train` (printed digits rendered from matplotlib's fonts), and
scikit-learn's handwritten scans split into `target/train` (5 labels per digit), `target/unlabeled` (the rest
of the training half, without labels) and `target/test` (the other half, used only for the number reported).

Each method is a tltool run, in this process through the same calls as `tltool finetune` and
`tltool eval CKPT --data target/test` (`tltool.train.finetune`, `tltool.evaluate.run_eval`), into a temporary
run directory. Every run starts from torchvision's ImageNet MobileNetV2 (the file `make install` puts in the
project's torch hub cache), trains all of it (target-only: its head), and is evaluated at its last epoch (no
checkpoint is picked):

  source-only         the labelled source; val: a held-out fifth of the source
  target-only         the 50 labelled target images (a new head on the frozen backbone: better on held-out labels)
  source then target  the source-only checkpoint fine-tuned on the 50 labels (`model.weights=<checkpoint>`)
  and METHODS below: each one the run it extends plus its config keys, run only when this tltool has the keys
  (`tltool config keys`) and accepts the values; otherwise the row says "skipped", with the reason.

For each method it prints target test top-1 as mean ± std over the seeds, the paired difference (per seed,
same data) against source-only and against target-only as mean ± std, and the mean wall time of a seed's
run (training + evaluation). It ends with one machine-readable line `bench-transfer: <method>=<mean> ...`.

The settings (BASE, FULL / QUICK, TARGET_BATCH, target-only's recipe) were chosen without the target's test
labels, on a 2-core machine shared with other jobs (so with few trials): the learning rate and source epochs on
the source's held-out fifth (AdamW at 1e-3 reached 0.93 val top-1 after one epoch of 1,600 printed digits and
0.99 after two), the target runs' length and target-only's recipe on one held-out label per digit (4 train,
1 val); BENCHMARKS.md has the numbers. Method knobs are each method's defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

DATA_ROOT = REPO / "data" / "domains-bench"
LABELS_PER_CLASS = 5
TEST_FRACTION = 0.5

# Every run's config (written as the YAML that the printed commands name); the methods add overrides.
# MobileNetV2 from ImageNet at 32 px: the 8x8 scans upscaled 4x, bilinear, so the net's 32x downsampling
# leaves one cell. Digits are not flipped or cropped (augment none). Batch norm trains (bn_policy train):
# its statistics are what AdaBN replaces.
BASE = {
    "model": {"backbone": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
    "data": {
        "image_size": 32,
        "resize_size": 32,
        "interpolation": "bilinear",
        "augment": "none",
        "batch_size": 32,
        "num_workers": 0,
    },
    "train": {"freeze": "none", "optimizer": "adamw", "lr": 0.001, "scheduler": "cosine"},
    "checkpoint": {"save_best": False},
    "log": {"progress": False},
}


@dataclass(frozen=True)
class Budget:
    """What a full or a quick run trains: seeds, printed images per digit, epochs on source and on target."""

    seeds: tuple[int, ...]
    source_per_class: int
    source_epochs: int
    target_epochs: int


FULL = Budget(seeds=(0, 1, 2), source_per_class=200, source_epochs=3, target_epochs=10)
QUICK = Budget(seeds=(0,), source_per_class=100, source_epochs=2, target_epochs=10)
# The 50 target labels train in batches of 16 (4 steps an epoch, 40 in all) rather than the source's 32.
TARGET_BATCH = 16


@dataclass(frozen=True)
class Method:
    """A row: the run it extends (`source`, `target` or `source-then-target`) and the overrides it adds.

    Overrides may name the seed's folders: {source} (source/train), {unlabeled} (target/unlabeled),
    {labels} (target/train).
    """

    name: str
    base: str
    overrides: tuple[str, ...] = ()
    what: str = ""

    @property
    def slug(self) -> str:
        """The method's name in the machine-readable line (`source then target` -> `source_then_target`)."""
        return "".join(c if c.isalnum() else "_" for c in self.name.lower()).strip("_")


BASELINES = (
    Method("source-only", "source", (), "labelled source, ImageNet start"),
    # On the held-out labels (4 train / 1 val per digit) the frozen ImageNet backbone with a new head did better
    # than training all of it (val loss 1.17 vs 1.52, top-1 6/10 vs 4/10): target-only gets that recipe.
    Method("target-only", "target", ("train.freeze=backbone", "train.lr=0.01"), "5 labels per digit, frozen ImageNet"),
    Method("source then target", "source-then-target", (), "source-only checkpoint, then the 5 labels"),
)
# One line a method. Unsupervised adaptation extends source-only (labelled source + unlabelled target);
# LP-FT extends source then target; co-training trains on the labels with the source beside them; Co-Tuning
# extends "target, all layers" (compare the two per seed, --json).
METHODS = (
    Method("AdaBN", "source", ("adapt.unlabeled={unlabeled}", "adapt.bn_stats=target"), "BN stats of the target"),
    Method("MCC", "source", ("adapt.unlabeled={unlabeled}", "adapt.method=mcc"), "min. class confusion on target"),
    Method("DANN", "source", ("adapt.unlabeled={unlabeled}", "adapt.method=dann"), "domain-adversarial"),
    Method("LP-FT", "source-then-target", ("train.head_init=probe",), "probe head, then fine-tune"),
    Method("co-training", "target", ("source.train={source}",), "labels + labelled source"),
    # Co-Tuning trains all layers on the 50 labels (its loss reaches the backbone through the ImageNet head), so
    # its paired baseline is the same run without it: all layers on the labels (target-only trains a head only).
    Method("target, all layers", "target", (), "5 labels per digit, all layers (Co-Tuning's base)"),
    # (weight 2.3: TLlib's default trade-off; the relation is to ImageNet's classes, little help for digits)
    Method("Co-Tuning", "target", ("train.cotuning_weight=2.3",), "labels + ImageNet classifier relation"),
)


@dataclass
class Outcome:
    """One method's results: top-1 and seconds per seed, or why it did not run (`skipped: ...`, `failed: ...`)."""

    method: Method
    acc1: dict[int, float] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    skipped: str | None = None


# ---- statistics -------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0.0 for a single value): the spread over seeds."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_differences(values: dict[int, float], baseline: dict[int, float]) -> list[float]:
    """Per-seed differences `values - baseline` over the seeds both have, in seed order.

    Paired: each seed is one data split and one training seed for every method, so the split's luck cancels.
    """
    return [values[seed] - baseline[seed] for seed in sorted(values.keys() & baseline.keys())]


def format_mean_std(values: Sequence[float], scale: float = 100.0, signed: bool = False) -> str:
    """`71.3 ± 2.1` (points of top-1 by default); one value alone, without a spread that one seed cannot
    give; `-` when there is nothing to report."""
    if not values:
        return "-"
    mean, std = mean_std(values)
    sign = "+" if signed else ""
    return f"{mean * scale:{sign}.1f}" + (f" ± {std * scale:.1f}" if len(values) > 1 else "")


# ---- which rows this tltool can run -------------------------------------------------------------------------


def override_keys(overrides: Iterable[str]) -> list[str]:
    """The dotted keys of `key=value` overrides."""
    return [item.split("=", 1)[0].strip() for item in overrides]


def missing_key(method: Method, keys: Iterable[str]) -> str | None:
    """The first of the method's config keys that `keys` (this tltool's `tltool config keys`) lacks, or None."""
    known = set(keys)
    return next((key for key in override_keys(method.overrides) if key not in known), None)


def runnable(methods: Sequence[Method], keys: Iterable[str]) -> tuple[list[Method], dict[str, str]]:
    """The methods whose keys all exist, and for the others method name -> `skipped: <key> not in this tltool`."""
    keys = list(keys)
    ready, skipped = [], {}
    for method in methods:
        key = missing_key(method, keys)
        if key is None:
            ready.append(method)
        else:
            skipped[method.name] = f"skipped: {key} not in this tltool"
    return ready, skipped


# ---- the runs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedData:
    """A seed's domain pair (make_domains.py's layout)."""

    root: Path

    @property
    def folders(self) -> dict[str, str]:
        return {
            "source": str(self.root / "source" / "train"),
            "labels": str(self.root / "target" / "train"),
            "unlabeled": str(self.root / "target" / "unlabeled"),
            "test": str(self.root / "target" / "test"),
        }


def base_overrides(base: str, data: SeedData, budget: Budget, seed: int, source_checkpoint: Path | None) -> list[str]:
    """The overrides of the run a method extends: which data, how long, from which weights.

    Target runs validate on their own training labels (all 5 per digit train; the number is only a monitor)
    and every run is evaluated at its last epoch, so nothing is selected on target data beyond the labels.
    """
    folders = data.folders
    common = [f"run.seed={seed}"]
    if base == "source":
        return [*common, f"data.train={folders['source']}", f"train.epochs={budget.source_epochs}"]
    target = [*common, f"data.train={folders['labels']}", f"data.val={folders['labels']}"]
    target += [f"data.batch_size={TARGET_BATCH}", f"train.epochs={budget.target_epochs}"]
    if base == "target":
        return target
    if base == "source-then-target":
        if source_checkpoint is None:
            raise RuntimeError("source then target needs the source-only run of the same seed first")
        return [*target, f"model.weights={source_checkpoint}"]
    raise ValueError(f"unknown base run {base!r}")


def method_overrides(method: Method, data: SeedData) -> list[str]:
    """The method's own overrides with the seed's folders filled in."""
    return [item.format(**data.folders) for item in method.overrides]


def load_run_config(config_path: Path, overrides: list[str]):
    """The run's Config as `tltool finetune` builds it, or the first problem (str) when this tltool rejects it
    (a key it has whose value it does not know yet)."""
    from tltool.catalog import TORCHVISION_NAMES
    from tltool.config import load_config
    from tltool.errors import TltoolError

    try:
        return load_config(config_path, overrides, names=TORCHVISION_NAMES)
    except TltoolError as exc:
        return str(exc).splitlines()[0]


def train_and_eval(cfg, command: str, run_dir: Path, test: str) -> tuple[float, float]:
    """`tltool finetune ... -q` of `cfg`, then `tltool eval RUN/checkpoints/last.pt --data TEST`.

    Returns (target test top-1, seconds for both).
    """
    from tltool.evaluate import run_eval
    from tltool.train import finetune

    print(f"$ {command}", flush=True)
    start = time.perf_counter()
    finetune(cfg, quiet=True)
    metrics = run_eval(run_dir / "checkpoints" / "last.pt", data=test)
    return float(metrics["acc1"]), time.perf_counter() - start


def run_seed(
    seed: int,
    budget: Budget,
    outcomes: dict[str, Outcome],
    config_path: Path,
    work: Path,
    make_data: Callable[[int], SeedData],
) -> None:
    """Every runnable method on one seed's domain pair, in `outcomes`' order (baselines first).

    A config this tltool rejects marks the row skipped; a method that fails (not a baseline: those are the
    reference, their failure stops the benchmark) marks it failed, with the error, and the others go on.
    """
    data = make_data(seed)
    source_checkpoint: Path | None = None
    for name, outcome in outcomes.items():
        if outcome.skipped:
            continue
        method = outcome.method
        if method.base == "source-then-target" and source_checkpoint is None:
            outcome.skipped = "skipped: needs the source-only run"
            continue
        run_dir = work / f"seed{seed}-{method.slug}"
        overrides = [
            *base_overrides(method.base, data, budget, seed, source_checkpoint),
            *method_overrides(method, data),
            f"run.output_dir={run_dir}",
        ]
        cfg = load_run_config(config_path, overrides)
        if isinstance(cfg, str):
            outcome.skipped = f"skipped: {cfg}"
            print(f"{name}: {outcome.skipped}", flush=True)
            continue
        command = f"tltool finetune {shlex.join([str(config_path), *overrides])} -q"
        try:
            acc1, seconds = train_and_eval(cfg, command, run_dir, data.folders["test"])
        except Exception as exc:
            if method in BASELINES:
                raise
            traceback.print_exc()
            outcome.skipped = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            continue
        outcome.acc1[seed], outcome.seconds[seed] = acc1, seconds
        print(f"seed {seed} {name}: target test top-1 {acc1:.4f} ({seconds:.0f} s)", flush=True)
        if name == "source-only":
            source_checkpoint = run_dir / "checkpoints" / "last.pt"


# ---- the table ----------------------------------------------------------------------------------------------


def table_rows(outcomes: dict[str, Outcome]) -> list[tuple[str, ...]]:
    """One row a method: name, what it is, target top-1, differences against source-only and target-only, wall s
    (a seed's training + evaluation, mean over the seeds)."""
    source = outcomes["source-only"].acc1 if "source-only" in outcomes else {}
    target = outcomes["target-only"].acc1 if "target-only" in outcomes else {}
    rows = []
    for name, outcome in outcomes.items():
        if outcome.skipped or not outcome.acc1:
            rows.append((name, outcome.method.what, outcome.skipped or "skipped: not run", "", "", ""))
            continue
        acc = [outcome.acc1[seed] for seed in sorted(outcome.acc1)]
        vs_source = (
            "-" if name == "source-only" else format_mean_std(paired_differences(outcome.acc1, source), signed=True)
        )
        vs_target = (
            "-" if name == "target-only" else format_mean_std(paired_differences(outcome.acc1, target), signed=True)
        )
        seconds = statistics.fmean(outcome.seconds.values())
        rows.append((name, outcome.method.what, format_mean_std(acc), vs_source, vs_target, f"{seconds:.0f}"))
    return rows


def format_table(outcomes: dict[str, Outcome], title: str) -> str:
    """The results as a Markdown table (readable as text too)."""
    header = ("method", "what", "target test top-1 (%)", "vs source-only (points)", "vs target-only (points)", "wall s")
    rows = table_rows(outcomes)
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary_line(outcomes: dict[str, Outcome]) -> str:
    """`bench-transfer: source_only=0.6630 ... adabn=skipped`: each method's mean top-1 over the seeds, or
    `skipped` / `failed` (never a number for a row that did not run on every seed)."""
    parts = []
    for outcome in outcomes.values():
        if outcome.skipped or not outcome.acc1:
            value = (outcome.skipped or "skipped").split(":", 1)[0]
        else:
            value = f"{statistics.fmean(outcome.acc1.values()):.4f}"
        parts.append(f"{outcome.method.slug}={value}")
    return "bench-transfer: " + " ".join(parts)


# ---- main -------------------------------------------------------------------------------------------------


def prepare_weights() -> None:
    """The ImageNet MobileNetV2 file in the project's torch hub cache, as `make demo` links it."""
    os.environ.setdefault("TORCH_HOME", str(REPO / ".cache" / "torch"))
    import demo

    try:
        demo.link_weights()
    except demo.StepFailed as exc:
        raise SystemExit(f"error: {exc}") from None


def data_maker(budget: Budget, root: Path) -> Callable[[int], SeedData]:
    """A function seed -> that seed's domain pair, written (or found up to date) by make_domains.py."""
    from make_domains import write_domains

    def make(seed: int) -> SeedData:
        out = root / f"seed{seed}-src{budget.source_per_class}"
        summary = write_domains(out, budget.source_per_class, LABELS_PER_CLASS, TEST_FRACTION, seed)
        state = "written" if summary["written"] else "up to date"
        print(
            f"data {out}: source {summary['source_train']}, target labels {summary['target_train']}, "
            f"unlabelled {summary['target_unlabeled']}, test {summary['target_test']} ({state})",
            flush=True,
        )
        return SeedData(out)

    return make


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, 100 printed digits per class, 2 source epochs")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds (default: 0 1 2; --quick: 0)")
    parser.add_argument("--only", nargs="+", metavar="METHOD", help="run only these methods (and the baselines)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories (printed at the end)")
    parser.add_argument("--json", help="also write the per-seed results to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = QUICK if args.quick else FULL
    if args.seeds:
        budget = Budget(tuple(args.seeds), budget.source_per_class, budget.source_epochs, budget.target_epochs)
    prepare_weights()

    import torch

    from tltool.config import all_keys

    methods = [m for m in METHODS if not args.only or m.name in args.only]
    ready, skipped = runnable(methods, all_keys())
    outcomes = {m.name: Outcome(m) for m in BASELINES}
    outcomes.update({m.name: Outcome(m, skipped=skipped.get(m.name)) for m in methods})
    for name, reason in skipped.items():
        print(f"{name}: {reason}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    config_path = work / "bench_transfer.yaml"
    config_path.write_text(json.dumps(BASE, indent=2) + "\n", encoding="utf-8")  # JSON is YAML
    print(f"config {config_path}: {json.dumps(BASE)}", flush=True)
    started = time.perf_counter()
    try:
        make_data = data_maker(budget, DATA_ROOT)
        for seed in budget.seeds:
            run_seed(seed, budget, outcomes, config_path, work, make_data)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - started

    title = (
        f"printed -> handwritten digits, MobileNetV2 (ImageNet) at 32 px, {LABELS_PER_CLASS} target labels per "
        f"digit, seeds {' '.join(map(str, budget.seeds))}, source {budget.source_per_class}/digit x "
        f"{budget.source_epochs} epochs, target {budget.target_epochs} epochs; {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; {total:.0f} s in all"
    )
    print("\n" + format_table(outcomes, title) + "\n")
    if args.keep:
        print(f"run directories: {work}")
    if args.json:
        result = {name: {"acc1": o.acc1, "seconds": o.seconds, "skipped": o.skipped} for name, o in outcomes.items()}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(summary_line(outcomes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
