"""tltool's training loop against a plain, textbook PyTorch loop, measured in the same process.

    python benchmarks/bench_train.py            # the full table (make bench)
    python benchmarks/bench_train.py --quick    # a reduced version, under a minute
    python benchmarks/bench_train.py --costs    # only (c), the methods' costs (its figures of the bench line)
    python benchmarks/bench_train.py --gradckpt # only (d), train.grad_checkpointing's memory and time
    python benchmarks/bench_train.py --second-run  # only (e), a frozen run repeated on the same data
    python benchmarks/bench_train.py --extraction  # only (f), extraction speed and train.feature_engine

(a) throughput: images/s of a plain loop (forward, loss, zero_grad, backward, step; frozen case with the
    backbone in eval mode and requires_grad off) and of tltool's `train_one_epoch`, on the same batches
    held in memory, for mobilenet_v3_small and resnet18 at 64 and 128 px, batch 32, frozen and full
    fine-tune. "same" runs tltool at the plain loop's precision and layout (fp32, NCHW); "auto" runs
    tltool's defaults (train.precision auto, train.channels_last auto). Both use tltool's optimizer (AdamW,
    train.optimizer_impl auto: the fused kernel); the plain loop uses torch's default AdamW, as a
    hand-written loop does. The loops take turns on the same batches; a ratio is the median over rounds.
(b) a whole 10-epoch frozen run on generated images (plain loop with a DataLoader vs `tltool finetune`
    with its feature cache), each in its own process: 2,000 train + 500 val images at 128 px (--quick: 200 +
    50 at 64 px). Peak memory is each worker's own high-water RSS (VmHWM, see `peak_rss_mb`).

(c) the cost of the transfer methods that add images (issue #14), on mobilenet_v3_small at 64 px, batch 32:
    - the time of an MCC step and of a DANN step (labelled batch + unlabelled batch through one concatenated
      forward, backbone training) over a plain step on the same labelled batches, same model and settings; paired
      and interleaved as in (a), median over rounds;
    - the start-up (build_session + start: AdaBN's estimate, the feature cache) of a frozen, cached run with
      `adapt.bn_stats: target` and of one with `source.train` (co-training), minus that of the same run without
      them, in units of one extraction pass over the extra images (extraction.extract, eval transform), measured
      in the same rounds.

(d) train.grad_checkpointing: a full fine-tune of mobilenet_v2 (no pretrained weights needed: the cost is the
    same), batch 32 at 128 px (--quick: 16 at 96), AdamW, channels_last (tltool's default layout), fp32: the
    peak RSS (VmHWM) of a process per setting, with and without checkpointing, and how far it rose above the RSS of the built
    model; the time per step of both, taken in turn in one process (median of paired ratios). A net with few weights and wide activations (its inverted residuals expand 6x),
    so the activations are most of the memory; weights, gradients and AdamW state (~56 MB) are the same in both.

(e) the feature store (issue #18): a frozen MobileNetV2 run (ImageNet weights when torch's hub cache has them,
    else none: the cost is the same), 10 epochs, 1,000 train + 500 val images at 96 px (--quick: 200 + 100 at
    64 px), batch 32, each a whole process timed from outside (imports included): the plain loop of (b), tltool's
    first run (an empty feature store) and the same run again (the store holds its features) SECOND_RUNS times,
    its median and range shown (a run of seconds on a shared machine: one pause moves it by a third). Speed-ups
    are the plain loop's time over the first run and over the second's median; the time of `import torch,
    torchvision` alone is shown beside them.

(f) feature extraction (issue #18 parts 2-3): MobileNetV2 (weights as (e)), 1,000 JPEG images of 120 px to 96 px
    (--quick: 200 of 80 px to 64 px), batch 32, fp32, channels_last (tltool's defaults for it on CPU): the
    backbone's own forward on the same images already decoded and held in memory as batches, at its best of one
    process (1 thread or torch's default) and the loader's worker count of processes at 1 thread each, against
    `extraction.extract` over tltool's loader (data.num_workers auto) reading the files; their throughputs' ratio
    (median over paired rounds) is extraction_fraction (extraction_fraction_one_process: against the one-process
    forward alone, a plain in-memory loop). Then each train.feature_engine (eager, onnxruntime,
    compile; compile left out by --quick: its first batch compiles for 40+ s) through the same loader: images/s
    after its build, build seconds, and the max abs difference of all its features from eager's. Run in a fresh
    process, as a user's run extracts right after its start (see `extraction_in_a_fresh_process`).

It ends with one machine-readable line:
    bench: full_ratio=... full_auto_ratio=... frozen10_speedup=... peak_rss_mb=... mcc_step_ratio=...
    dann_step_ratio=... adabn_startup_passes=... source_startup_passes=... gradckpt_rss_ratio=...
    gradckpt_step_ratio=... first_run_speedup=... second_run_speedup=... extraction_fraction=...
    extraction_fraction_one_process=... engine_<name>_img_s=... engine_<name>_max_diff=...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECOND_RUNS = 3  # (e): the second run is timed this many times (each a whole process), the median reported

from tltool.config import load_config  # noqa: E402
from tltool.data import Preprocess, Stream, eval_transform, make_loader, scan_folder  # noqa: E402
from tltool.extraction import extract  # noqa: E402
from tltool.models import build_model  # noqa: E402
from tltool.runstate import EpochProgress  # noqa: E402
from tltool.session import build_session  # noqa: E402
from tltool.train import finetune, train_one_epoch  # noqa: E402


def make_images(root: Path, classes: int, per_class: int, size: int, seed: int = 0) -> Path:
    """An ImageFolder of noisy images with a colour per class (learnable, as the tests' data)."""
    colours = np.random.default_rng(1234).integers(30, 225, (classes, 3))  # the same classes in every split
    rng = np.random.default_rng(seed)
    for index in range(classes):
        folder = root / f"class_{index}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = colours[index] + rng.normal(0, 30, (size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


def build(backbone: str, size: int, frozen: bool, channels_last: bool, weights: str = "none"):
    cfg = load_config(
        None,
        [
            f"model.backbone={backbone}",
            f"model.weights={weights}",
            f"data.image_size={size}",
            f"data.resize_size={size}",
            "train.freeze=" + ("backbone" if frozen else "none"),
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data, 10).model
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return cfg, model


def batches(size: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(32, 3, size, size, generator=generator), torch.randint(0, 10, (32,), generator=generator))
        for _ in range(count)
    ]


def plain_loop(backbone: str, size: int, frozen: bool):
    """The textbook loop; returns a function that trains on a list of batches and returns its seconds."""
    _, model = build(backbone, size, frozen, channels_last=False)
    model.train()
    if frozen:
        model.backbone.requires_grad_(False)
        model.backbone.eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def run(items: list) -> float:
        start = time.perf_counter()
        for images, labels in items:
            step(images, labels)
        return time.perf_counter() - start

    return run


def tltool_loop(backbone: str, size: int, frozen: bool, defaults: bool, workdir: Path):
    """tltool's session and its train_one_epoch (its defaults, or the plain loop's fp32 NCHW), built from a config
    as `tltool finetune` builds it, then fed the same in-memory batches as the plain loop: a function as plain_loop's.
    """
    data = workdir / "images"
    if not data.exists():
        make_images(data, classes=10, per_class=2, size=16)
    run_dir = workdir / f"{backbone}-{size}-{frozen}-{defaults}"
    overrides = [
        f"model.backbone={backbone}",
        "model.weights=none",
        f"data.train={data}",
        f"data.image_size={size}",
        f"data.resize_size={size}",
        "data.batch_size=32",
        "data.num_workers=0",
        f"run.output_dir={run_dir}",
        "run.device=cpu",
        "train.freeze=" + ("backbone" if frozen else "none"),
        "train.feature_cache=off",  # (the loop through the whole model; the cache is measured in (b))
        "log.progress=false",
    ]
    if not defaults:  # the plain loop's precision and layout
        overrides += ["train.precision=fp32", "train.channels_last=off"]
    torch.manual_seed(0)
    session = build_session(load_config(None, overrides), quiet=True)
    session.start()

    def run(items: list) -> float:
        start = time.perf_counter()
        session.set_streams({"train": Stream("train", items)})
        session.state.in_epoch = EpochProgress()
        train_one_epoch(session)
        return time.perf_counter() - start

    return run


def throughput_table(quick: bool, workdir: Path) -> list[dict]:
    """Images/s of the three loops, and tltool/plain ratios that this machine's noise hardly moves.

    The three loops are built once and then take turns, round after round, on the same batches (the
    order rotates each round). The noise of a shared machine comes in slow phases of seconds that slow
    whatever runs then: a round's three timings share its phase, so each round gives one ratio, and the
    row's ratio is the median over rounds. The images/s shown are each loop's best round.
    """
    rows = []
    models = ["mobilenet_v3_small", "resnet18"]
    sizes = [64] if quick else [64, 128]
    rounds = 3 if quick else 9
    for backbone in models:
        for size in sizes:
            for frozen in (True, False):
                count = (4 if quick else 6) if not frozen else (6 if quick else 10)
                data = batches(size, count)
                loops = {
                    "plain": plain_loop(backbone, size, frozen),
                    "same": tltool_loop(backbone, size, frozen, defaults=False, workdir=workdir),
                    "auto": tltool_loop(backbone, size, frozen, defaults=True, workdir=workdir),
                }
                for run in loops.values():  # warm-up: first-call allocations, oneDNN primitive caches
                    run(data[:2])
                seconds: dict[str, list[float]] = {name: [] for name in loops}
                names = list(loops)
                for index in range(rounds):
                    for name in names[index % 3 :] + names[: index % 3]:
                        seconds[name].append(loops[name](data))
                best = {name: len(data) * 32 / min(times) for name, times in seconds.items()}
                ratio = {
                    name: statistics.median(p / t for p, t in zip(seconds["plain"], seconds[name], strict=True))
                    for name in ("same", "auto")
                }
                row = {
                    "model": backbone,
                    "px": size,
                    "mode": "frozen" if frozen else "full",
                    **best,
                    "ratio_same": ratio["same"],
                    "ratio_auto": ratio["auto"],
                }
                print(
                    f"{backbone:<20} {size:>4} {row['mode']:<7} plain {best['plain']:8.1f}  tltool {best['same']:8.1f}"
                    f" ({row['ratio_same']:.2f}x)  tltool defaults {best['auto']:8.1f} ({row['ratio_auto']:.2f}x)",
                    flush=True,
                )
                rows.append(row)
    return rows


# --- what the methods that add images cost (issue #14) -------------------------------------------------

COST_MODEL, COST_SIZE = "mobilenet_v3_small", 64


def cost_overrides(workdir: Path, name: str, *extra: str) -> list[str]:
    return [
        f"model.backbone={COST_MODEL}",
        "model.weights=none",
        f"data.train={workdir / 'cost' / 'train'}",
        f"data.image_size={COST_SIZE}",
        f"data.resize_size={COST_SIZE}",
        "data.batch_size=32",
        "data.num_workers=0",
        "data.augment=none",
        f"run.output_dir={workdir / 'cost' / 'runs' / name}",
        "run.device=cpu",
        "train.precision=fp32",
        "log.progress=false",
        *extra,
    ]


def adapt_step_ratios(quick: bool, workdir: Path) -> dict[str, float]:
    """Seconds per step of MCC and DANN (labelled + unlabelled batch) over a plain step, full fine-tune."""
    count, rounds = (3, 3) if quick else (4, 7)
    generator = torch.Generator().manual_seed(1)
    labelled = batches(COST_SIZE, count)
    unlabelled = [
        (torch.randn(32, 3, COST_SIZE, COST_SIZE, generator=generator), torch.full((32,), -1)) for _ in range(count)
    ]
    unlabeled_dir = str(workdir / "cost" / "unlabeled")
    methods = {"plain": (), "mcc": ("adapt.method=mcc",), "dann": ("adapt.method=dann",)}
    loops = {}
    for name, extra in methods.items():
        adapt = (f"adapt.unlabeled={unlabeled_dir}", *extra) if extra else ()
        torch.manual_seed(0)
        session = build_session(load_config(None, cost_overrides(workdir, f"step-{name}", "train.freeze=none",
                                                                 *adapt)), quiet=True)  # fmt: skip
        session.start()

        def run(items: list, session=session, adapting=bool(extra)) -> float:
            start = time.perf_counter()
            streams = {"train": Stream("train", items)}
            if adapting:
                streams["unlabeled"] = Stream("unlabeled", unlabelled[: len(items)])
            session.set_streams(streams)
            session.state.in_epoch = EpochProgress()
            train_one_epoch(session)
            return time.perf_counter() - start

        loops[name] = run
    for run in loops.values():  # warm-up
        run(labelled[:2])
    seconds: dict[str, list[float]] = {name: [] for name in loops}
    names = list(loops)
    for index in range(rounds):
        for name in names[index % 3 :] + names[: index % 3]:
            seconds[name].append(loops[name](labelled))
    ratios = {
        name: statistics.median(t / p for p, t in zip(seconds["plain"], seconds[name], strict=True))
        for name in ("mcc", "dann")
    }
    per_step = {name: 1000 * min(times) / count for name, times in seconds.items()}
    print(
        f"{COST_MODEL} {COST_SIZE}px full fine-tune, batch 32 (+32 unlabelled): ms/step plain {per_step['plain']:.0f}, "
        f"MCC {per_step['mcc']:.0f} ({ratios['mcc']:.2f}x), DANN {per_step['dann']:.0f} ({ratios['dann']:.2f}x)",
        flush=True,
    )
    return {"plain_ms": per_step["plain"], "mcc_ms": per_step["mcc"], "dann_ms": per_step["dann"],
            "mcc_step_ratio": ratios["mcc"], "dann_step_ratio": ratios["dann"]}  # fmt: skip


def startup_costs(quick: bool, workdir: Path) -> dict[str, float]:
    """Start-up of a frozen, cached run with AdaBN or source co-training, minus the plain one's, in passes over
    the extra images (one pass: extraction.extract of the pretrained backbone over them)."""
    rounds = 2 if quick else 3
    root = workdir / "cost"
    unlabeled_dir, source_dir = root / "unlabeled", root / "source"
    runs = {
        "plain": (),
        "adabn": (f"adapt.unlabeled={unlabeled_dir}", "adapt.bn_stats=target"),
        "source": (f"source.train={source_dir}",),
    }
    extra_images = {
        "adabn": [(str(path), -1) for path in sorted(unlabeled_dir.rglob("*.jpg"))],
        "source": scan_folder(str(source_dir), key="source.train")[1],
    }
    seconds: dict[str, list[float]] = {name: [] for name in [*runs, "pass_adabn", "pass_source"]}

    def start_run(name: str, index: int) -> float:
        start = time.perf_counter()
        torch.manual_seed(0)
        cfg = load_config(None, cost_overrides(workdir, f"start-{name}-{index}", "train.freeze=backbone", *runs[name]))
        session = build_session(cfg, quiet=True)
        session.start()
        assert session.inputs.cached
        return time.perf_counter() - start

    def one_pass(name: str) -> float:
        cfg = load_config(None, cost_overrides(workdir, "pass"))
        model = build_model(cfg.model, cfg.data, 10).model
        preprocess = Preprocess(COST_SIZE, COST_SIZE)
        start = time.perf_counter()
        loader = make_loader(extra_images[name], eval_transform(preprocess), 32, 0, 0, shuffle=False)
        extract(model.backbone, loader, torch.device("cpu"), "fp32")
        return time.perf_counter() - start

    start_run("plain", -1)  # warm-up
    names = [*runs, "pass_adabn", "pass_source"]
    for index in range(rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            seconds[name].append(one_pass(name[5:]) if name.startswith("pass_") else start_run(name, index))
    out = {}
    for name in ("adabn", "source"):
        extra = [t - p for p, t in zip(seconds["plain"], seconds[name], strict=True)]
        out[f"{name}_startup_passes"] = statistics.median(
            e / q for e, q in zip(extra, seconds[f"pass_{name}"], strict=True)
        )
        out[f"{name}_pass_s"] = statistics.median(seconds[f"pass_{name}"])
        out[f"{name}_extra_s"] = statistics.median(extra)
    print(
        f"{COST_MODEL} {COST_SIZE}px frozen + cache, start-up over a plain run's ({statistics.median(seconds['plain']):.1f} s):"
        f" AdaBN +{out['adabn_extra_s']:.1f} s = {out['adabn_startup_passes']:.2f} passes over its "
        f"{len(extra_images['adabn'])} unlabelled images ({out['adabn_pass_s']:.1f} s a pass); source co-training "
        f"+{out['source_extra_s']:.1f} s = {out['source_startup_passes']:.2f} passes over its "
        f"{len(extra_images['source'])} source images ({out['source_pass_s']:.1f} s a pass)",
        flush=True,
    )
    return out


def cost_figures(costs: dict[str, float]) -> str:
    """(c)'s part of the machine-readable line."""
    names = ("mcc_step_ratio", "dann_step_ratio", "adabn_startup_passes", "source_startup_passes")
    return " ".join(f"{name}={costs[name]:.2f}" for name in names)


def method_costs(quick: bool, workdir: Path) -> dict[str, float]:
    root = workdir / "cost"
    per_class = 10 if quick else 20
    make_images(root / "train", classes=10, per_class=per_class, size=COST_SIZE, seed=2)
    make_images(root / "unlabeled", classes=10, per_class=2 * per_class, size=COST_SIZE, seed=3)
    make_images(root / "source", classes=10, per_class=2 * per_class, size=COST_SIZE, seed=4)
    return {**adapt_step_ratios(quick, workdir), **startup_costs(quick, workdir)}


# --- 10-epoch frozen runs, one process each ---------------------------------------------------------


def frozen_plain_run(data: Path, backbone: str, size: int, epochs: int, weights: str = "none") -> dict:
    """The textbook frozen run: ImageFolder + DataLoader, backbone recomputed every epoch, val each epoch."""
    from torchvision import datasets

    from tltool.data import eval_transform

    start = time.perf_counter()
    transform = eval_transform(Preprocess(size, size))
    train = datasets.ImageFolder(str(data / "train"), transform=transform)
    val = datasets.ImageFolder(str(data / "val"), transform=transform)
    torch.manual_seed(0)
    _, model = build(backbone, size, frozen=True, channels_last=False, weights=weights)
    model.backbone.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    train_loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True, num_workers=2)
    val_loader = torch.utils.data.DataLoader(val, batch_size=32, num_workers=2)
    accuracy = 0.0
    for _ in range(epochs):
        model.train()
        model.backbone.eval()
        for images, labels in train_loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in val_loader:
                correct += (model(images).argmax(1) == labels).sum().item()
        accuracy = correct / len(val)
    return {"seconds": time.perf_counter() - start, "val_acc1": accuracy}


def frozen_overrides(data: Path, backbone: str, size: int, epochs: int, run_dir: Path, weights: str) -> list[str]:
    """The frozen tltool run's settings (the plain loop's: no augmentation, no schedule, batch 32, CPU)."""
    return [
        f"data.train={data / 'train'}",
        f"data.val={data / 'val'}",
        f"model.backbone={backbone}",
        f"model.weights={weights}",
        f"data.image_size={size}",
        f"data.resize_size={size}",
        "data.augment=none",
        f"train.epochs={epochs}",
        "run.device=cpu",
        "data.batch_size=32",
        f"run.output_dir={run_dir}",
        "train.scheduler=none",
        "log.progress=false",
    ]


def frozen_tltool_run(data: Path, backbone: str, size: int, epochs: int, run_dir: Path, weights: str = "none") -> dict:
    start = time.perf_counter()
    cfg = load_config(None, frozen_overrides(data, backbone, size, epochs, run_dir, weights))
    summary = finetune(cfg, quiet=True)
    cache = summary["feature_cache"] or {}
    return {
        "seconds": time.perf_counter() - start,
        "val_acc1": summary["final"]["val_acc1"],
        "extract_seconds": cache.get("extract_seconds"),
        "reused": cache.get("reused"),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MB: VmHWM, the high-water mark of its own address space.

    Not `ru_maxrss`: on Linux it survives fork + exec, so a worker started by a big parent reports at least the
    parent's RSS (every worker read 1662 MB). VmHWM starts afresh at exec. DataLoader worker processes are
    not included (they have their own address space). Without /proc, ru_maxrss is the fallback.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB elsewhere


def gradckpt_setup(checkpointed: bool, quick: bool):
    """(d): a full mobilenet_v2 fine-tune (model, AdamW, a batch), with or without checkpointing."""
    from tltool.gradckpt import enable_grad_checkpointing

    batch, size = (16, 96) if quick else (32, 128)
    model = build("mobilenet_v2", size, frozen=False, channels_last=True)[1]
    if checkpointed:
        enable_grad_checkpointing(model.backbone)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(batch, 3, size, size, generator=generator), torch.randint(0, 10, (batch,))

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        return time.perf_counter() - start

    return batch, size, step


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def gradckpt_table(quick: bool) -> dict:
    """Peak memory: one process per setting (VmHWM over 2 steps, and how far it rose above the RSS before the
    first step). Time: both settings in this process, steps taken in turn, the median of the paired ratios
    (the machine's load changes between processes)."""
    memory = {}
    for setting in ("plain", "checkpointed"):
        command = [sys.executable, __file__, "--worker", f"gradckpt-{setting}"] + (["--quick"] if quick else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        memory[setting] = json.loads(done.stdout.strip().splitlines()[-1])
    batch, size, plain_step = gradckpt_setup(False, quick)
    ckpt_step = gradckpt_setup(True, quick)[2]
    plain_step(), ckpt_step()  # warm-up: allocations, AdamW state
    pairs = [(plain_step(), ckpt_step()) for _ in range(3 if quick else 5)]
    plain, ckpt = memory["plain"], memory["checkpointed"]
    row = {
        "model": "mobilenet_v2",
        "batch": batch,
        "px": size,
        **{f"{k}_{m}": v for k, r in memory.items() for m, v in r.items()},
        "plain_step_seconds": statistics.median(p for p, _ in pairs),
        "checkpointed_step_seconds": statistics.median(c for _, c in pairs),
        "rss_ratio": ckpt["peak_rss_mb"] / plain["peak_rss_mb"],
        "training_memory_ratio": ckpt["rise_mb"] / plain["rise_mb"],
        "step_ratio": statistics.median(c / p for p, c in pairs),
    }
    print(
        f"mobilenet_v2 full fine-tune, batch {batch} at {size} px: peak RSS {plain['peak_rss_mb']:.0f} MB -> "
        f"{ckpt['peak_rss_mb']:.0f} MB (x{row['rss_ratio']:.2f}); its rise above the built model "
        f"{plain['rise_mb']:.0f} MB -> {ckpt['rise_mb']:.0f} MB (x{row['training_memory_ratio']:.2f}); "
        f"time per step {row['plain_step_seconds']:.2f} s -> {row['checkpointed_step_seconds']:.2f} s "
        f"(x{row['step_ratio']:.2f})",
        flush=True,
    )
    return row


def run_worker(args: argparse.Namespace) -> None:
    if args.worker.startswith("gradckpt-"):
        step = gradckpt_setup(args.worker == "gradckpt-checkpointed", args.quick)[2]
        before = rss_mb()
        step(), step()
        result = {"peak_rss_mb": peak_rss_mb(), "rise_mb": peak_rss_mb() - before}
        print(json.dumps(result))
        return
    data = Path(args.data)
    if args.worker == "plain":
        result = frozen_plain_run(data, args.model, args.size, args.epochs, args.weights)
    else:
        result = frozen_tltool_run(data, args.model, args.size, args.epochs, Path(args.run_dir), args.weights)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def frozen10(quick: bool) -> list[dict]:
    rows = []
    # Issue #3's setting (2,000 train images at 128 px, val a quarter of that); --quick: 200 at 64 px.
    per_class, size = (20, 64) if quick else (200, 128)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = size * 5 // 4  # generated a little larger than the input: the transform resizes them
        make_images(root / "data" / "train", 10, per_class, source, seed=0)
        make_images(root / "data" / "val", 10, per_class // 4, source, seed=1)
        for backbone in ("mobilenet_v3_small", "resnet18"):
            results = {}
            for worker in ("plain", "tltool"):
                command = [
                    sys.executable,
                    __file__,
                    "--worker",
                    worker,
                    "--data",
                    str(root / "data"),
                    "--model",
                    backbone,
                    "--size",
                    str(size),
                    "--epochs",
                    "10",
                    "--run-dir",
                    str(root / f"run-{backbone}"),
                ]
                # (an empty feature store: a first run, and nothing left in the user's ~/.cache)
                env = {**os.environ, "TLTOOL_CACHE_DIR": str(root / f"store-{backbone}")}
                done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
                results[worker] = json.loads(done.stdout.strip().splitlines()[-1])
            speedup = results["plain"]["seconds"] / results["tltool"]["seconds"]
            row = {
                "model": backbone,
                "images": per_class * 10,
                "val_images": per_class // 4 * 10,
                "px": size,
                **{f"{k}_{m}": v for k, r in results.items() for m, v in r.items()},
                "speedup": speedup,
            }
            print(
                f"{backbone:<20} 10 epochs frozen, {per_class * 10} images {size}px: plain {results['plain']['seconds']:6.1f} s"
                f" (val {results['plain']['val_acc1']:.3f}, {results['plain']['peak_rss_mb']:.0f} MB)  tltool "
                f"{results['tltool']['seconds']:6.1f} s (val {results['tltool']['val_acc1']:.3f}, "
                f"{results['tltool']['peak_rss_mb']:.0f} MB)  speed-up {speedup:.1f}x",
                flush=True,
            )
            rows.append(row)
    return rows


def hub_has(filename_start: str) -> bool:
    """Whether torch's hub cache holds a weights file (no download during a benchmark)."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return folder.is_dir() and any(p.name.startswith(filename_start) for p in folder.iterdir())


def timed_process(command: list[str], env: dict[str, str]) -> tuple[float, dict]:
    """A whole process's wall time, imports included, and the JSON of its last line."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    seconds = time.perf_counter() - start
    lines = done.stdout.strip().splitlines()
    return seconds, json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}


def second_run_table(quick: bool) -> dict:
    """(e): plain loop, tltool's first and second frozen runs on the same data, each a whole process."""
    per_class, val_per_class, size = (20, 10, 64) if quick else (100, 50, 96)
    # ImageNet weights from torch's hub cache (V2, else V1), else none: the cost is the same.
    weights = next((name for name, file in (("IMAGENET1K_V2", "mobilenet_v2-7ebf99e0"),
                                            ("IMAGENET1K_V1", "mobilenet_v2-b0353104")) if hub_has(file)), "none")  # fmt: skip
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = size * 5 // 4
        make_images(root / "data" / "train", 10, per_class, source, seed=0)
        make_images(root / "data" / "val", 10, val_per_class, source, seed=1)
        env = {**os.environ, "TLTOOL_CACHE_DIR": str(root / "store")}  # (empty: the first run extracts)

        plain_worker = [sys.executable, __file__, "--worker", "plain", "--data", str(root / "data"), "--model",
                        "mobilenet_v2", "--size", str(size), "--epochs", "10", "--weights", weights]  # fmt: skip

        def cli_run(run: str) -> tuple[float, dict]:
            """`tltool finetune` as a user runs it (the console script's process, exit included)."""
            cfg = load_config(None, frozen_overrides(root / "data", "mobilenet_v2", size, 10, root / run, weights))
            (root / f"{run}.yaml").write_text(cfg.to_yaml())
            seconds, _ = timed_process([sys.executable, "-m", "tltool", "finetune", str(root / f"{run}.yaml")], env)
            summary = json.loads((root / run / "summary.json").read_text())
            cache = summary["feature_cache"] or {}
            return seconds, {"val_acc1": summary["final"]["val_acc1"], "extract_seconds": cache.get("extract_seconds"),
                             "reused": cache.get("reused")}  # fmt: skip

        imports, _ = timed_process([sys.executable, "-c", "import torch, torchvision"], env)
        plain, plain_result = timed_process(plain_worker, env)
        first, first_result = cli_run("first")
        # The second run is a few seconds, so one pause of the shared machine moves it by a third: the median
        # of SECOND_RUNS of them (each its own run directory, all reusing the first run's features).
        seconds_results = [cli_run(f"second{index}") for index in range(SECOND_RUNS)]
    seconds = sorted(t for t, _ in seconds_results)
    second, second_result = statistics.median(seconds), seconds_results[0][1]
    if any(result.get("reused") != ["train", "val"] for _, result in seconds_results):
        raise SystemExit(f"a second run did not reuse the stored features: {seconds_results}")
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    row = {
        "model": "mobilenet_v2",
        "weights": weights,
        "images": per_class * 10,
        "val_images": val_per_class * 10,
        "px": size,
        "import_seconds": imports,
        "plain_seconds": plain,
        "first_seconds": first,
        "second_seconds": second,
        "second_seconds_all": seconds,
        "first_extract_seconds": first_result.get("extract_seconds"),
        "second_extract_seconds": second_result.get("extract_seconds"),
        "val_acc1": {
            "plain": plain_result.get("val_acc1"),
            "first": first_result.get("val_acc1"),
            "second": second_result.get("val_acc1"),
        },  # fmt: skip
        "first_speedup": plain / first,
        "second_speedup": plain / second,
        "load_before": load,
        "load_after": load_after,
    }
    print(
        f"mobilenet_v2 ({weights}) 10 epochs frozen, {row['images']} + {row['val_images']} images {size}px, whole "
        f"processes: plain {plain:.1f} s, tltool first run {first:.1f} s (extraction {row['first_extract_seconds']:.1f}"
        f" s) {row['first_speedup']:.1f}x, second run {second:.1f} s (median of {SECOND_RUNS}: {seconds[0]:.1f}-"
        f"{seconds[-1]:.1f} s; features reused in "
        f"{row['second_extract_seconds']:.2f} s) {row['second_speedup']:.1f}x; `import torch, torchvision` alone "
        f"{imports:.1f} s; load average {load:.2f} before, {load_after:.2f} after",
        flush=True,
    )
    return row


def extraction_table(quick: bool) -> dict:
    """(f): extraction through tltool's loader vs the backbone on in-memory batches; each engine's speed and diff."""
    from torch.utils.data import DataLoader

    from tltool.data import resolve_num_workers
    from tltool.engines import Engine, eager_engine
    from tltool.extraction import extraction_schedule, forward_in_workers

    count, size = (200, 64) if quick else (1000, 96)
    weights = next((name for name, file in (("IMAGENET1K_V2", "mobilenet_v2-7ebf99e0"),
                                            ("IMAGENET1K_V1", "mobilenet_v2-b0353104")) if hub_has(file)), "none")  # fmt: skip
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    device = torch.device("cpu")
    _, model = build("mobilenet_v2", size, frozen=True, channels_last=True, weights=weights)
    backbone = model.backbone.eval()
    rounds = 3 if quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        _, samples = scan_folder(make_images(Path(tmp) / "data", 10, count // 10, size * 5 // 4))
        transform = eval_transform(Preprocess(size, size))
        loader = make_loader(samples, transform, 32, "auto", seed=0, shuffle=False)
        in_memory = list(make_loader(samples, transform, 32, 0, seed=0, shuffle=False))

        def forward() -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                for images, _ in in_memory:
                    backbone(images)
            return count / (time.perf_counter() - start)

        def extraction(engine: Engine | None = None) -> tuple[float, torch.Tensor]:
            start = time.perf_counter()
            features, _ = extract(backbone, loader, device, "fp32", engine)  # (on its extraction_schedule)
            return count / (time.perf_counter() - start), features

        def forward_at(threads: int) -> float:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return forward()
            finally:
                torch.set_num_threads(before)

        # The same in-memory batches, each forward in one of the loader's worker processes at 1 thread (the
        # layout an extraction in workers uses): the backbone's own speed over processes instead of threads.
        spread = DataLoader(in_memory, batch_size=None, num_workers=loader.num_workers)

        def forward_in_processes() -> float:
            start = time.perf_counter()
            for _ in forward_in_workers(spread, eager_engine(backbone, device, "fp32")):
                pass
            return count / (time.perf_counter() - start)

        schedule = extraction_schedule(device, loader.num_workers)
        thread_counts = sorted({1, torch.get_num_threads()})
        forward(), extraction()  # (warm-up: workers started, allocator and kernels warm)
        # The backbone's own speed is its best over one process at the default and extraction's thread counts
        # and over the loader's worker processes at 1 thread each: the strict test. The fraction against one
        # process alone (a plain in-memory loop) is printed beside it.
        fractions, single, forward_rates, process_rates, extract_rates = [], [], [], [], []
        for _ in range(rounds):
            a = max(forward_at(threads) for threads in thread_counts)
            p = forward_in_processes() if loader.num_workers else 0.0
            b = extraction()[0]
            forward_rates.append(a), process_rates.append(p), extract_rates.append(b)
            fractions.append(b / max(a, p)), single.append(b / a)
        reference = extraction()[1]
        engines = {}
        for name in ("eager", "onnxruntime") + (() if quick else ("compile",)):
            engine = Engine(backbone, device, "fp32", name, name, print)
            start = time.perf_counter()
            extract(backbone, [in_memory[0]], device, "fp32", engine)  # build (export / compile) + parity
            engine(in_memory[1][0])
            build_seconds = time.perf_counter() - start
            rate, features = max((extraction(engine) for _ in range(2)), key=lambda r: r[0])
            engines[name] = {"img_s": rate, "build_seconds": build_seconds,
                             "max_diff": (features - reference).abs().max().item(), "used": engine.used}  # fmt: skip
    row = {
        "model": "mobilenet_v2",
        "weights": weights,
        "images": count,
        "px": size,
        "workers": resolve_num_workers("auto"),
        "threads": schedule.threads,
        "phase_batches": schedule.chunk,
        "forward_threads": thread_counts,
        "forward_img_s": max(forward_rates),
        "forward_processes_img_s": max(process_rates),
        "extraction_img_s": max(extract_rates),
        "fraction": statistics.median(fractions),
        "fraction_one_process": statistics.median(single),
        "engines": engines,
        "load_before": load,
        "load_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
    }
    mode = ("forward in the workers" if schedule.in_workers
            else f"phased by {schedule.chunk} batches" if schedule.chunk else "overlapped")  # fmt: skip
    print(
        f"mobilenet_v2 ({weights}) {count} images {size}px, batch 32, fp32 channels_last: in-memory forward "
        f"{row['forward_img_s']:.0f} img/s in one process (best of {thread_counts} threads), "
        f"{row['forward_processes_img_s']:.0f} img/s over {row['workers']} processes at 1 thread; extraction from "
        f"files {row['extraction_img_s']:.0f} img/s ({row['workers']} workers, {mode}): fraction "
        f"{row['fraction']:.2f} of the best, {row['fraction_one_process']:.2f} of one process (medians of {rounds})",
        flush=True,
    )
    for name, e in engines.items():
        print(f"  engine {name:<11} {e['img_s']:6.0f} img/s from files, build+parity {e['build_seconds']:.1f} s, "
              f"max diff from eager {e['max_diff']:.2g}" + ("" if e["used"] == name else " (FELL BACK to eager)"))  # fmt: skip
    print(f"  load average {row['load_before']:.2f} before, {row['load_after']:.2f} after", flush=True)
    return row


def extraction_in_a_fresh_process(quick: bool) -> dict:
    """(f) run by this script in a new process, as a user's run extracts: right after its start. In this process,
    after the sections before it, the loader's workers fork from a heap that training filled and freed: they take
    about twice the page faults and run at 0.68-0.75 of a plain loop measured beside them, while in a fresh
    process, the state a `tltool finetune` extracts in, the same code runs at 1.07-1.25 of it (BENCHMARKS.md)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "extraction.json"
        command = [sys.executable, __file__, "--extraction", "--json", str(out)] + (["--quick"] if quick else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        for line in done.stdout.splitlines():
            if not line.startswith(("machine:", "bench:")):
                print(line, flush=True)
        return json.loads(out.read_text())["extraction"]


def extraction_figures(row: dict) -> str:
    figures = [f"extraction_fraction={row['fraction']:.2f}",
               f"extraction_fraction_one_process={row['fraction_one_process']:.2f}"]  # fmt: skip
    for name, e in row["engines"].items():
        figures.append(f"engine_{name}_img_s={e['img_s']:.0f} engine_{name}_max_diff={e['max_diff']:.2g}")
    return " ".join(figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a reduced version (under a minute)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--costs", action="store_true", help="only (c): what the methods that add images cost")
    parser.add_argument("--gradckpt", action="store_true", help="only (d): train.grad_checkpointing's memory and time")
    parser.add_argument("--second-run", action="store_true", help="only (e): a frozen run repeated on the same data")
    parser.add_argument("--extraction", action="store_true", help="only (f): extraction speed and feature engines")
    parser.add_argument(
        "--worker", choices=["plain", "tltool", "gradckpt-plain", "gradckpt-checkpointed"], help=argparse.SUPPRESS
    )
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--weights", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    if args.costs:
        with tempfile.TemporaryDirectory() as workdir:
            costs = method_costs(args.quick, Path(workdir))
        print("bench: " + cost_figures(costs))
        return
    if args.gradckpt:
        row = gradckpt_table(args.quick)
        print(f"bench: gradckpt_rss_ratio={row['rss_ratio']:.2f} gradckpt_step_ratio={row['step_ratio']:.2f}")
        return
    if args.second_run:
        row = second_run_table(args.quick)
        line = f"bench: first_run_speedup={row['first_speedup']:.1f} second_run_speedup={row['second_speedup']:.1f}"
        if args.json:
            Path(args.json).write_text(json.dumps({"second_run": row, "line": line}, indent=2))
        print(line)
        return
    if args.extraction:
        row = extraction_table(args.quick)
        line = "bench: " + extraction_figures(row)
        if args.json:
            Path(args.json).write_text(json.dumps({"extraction": row, "line": line}, indent=2))
        print(line)
        return
    print("training images/s, batch 32 (best round; ratios: median over rounds of paired timings):")
    with tempfile.TemporaryDirectory() as workdir:
        rows = throughput_table(args.quick, Path(workdir))
        print("transfer methods that add images:")
        costs = method_costs(args.quick, Path(workdir))
    print("whole frozen runs:")
    runs = frozen10(args.quick)
    print("gradient checkpointing (train.grad_checkpointing):")
    gradckpt = gradckpt_table(args.quick)
    print("a frozen run repeated on the same data (the feature store):")
    second = second_run_table(args.quick)
    print("feature extraction (issue #18 parts 2-3), in a fresh process:")
    extraction = extraction_in_a_fresh_process(args.quick)
    full = [r for r in rows if r["mode"] == "full"]
    resnet_full = [r for r in full if r["model"] == "resnet18"]
    peak = max(max(r["plain_peak_rss_mb"], r["tltool_peak_rss_mb"]) for r in runs)
    line = (
        f"bench: full_ratio={min(r['ratio_same'] for r in full):.2f} "
        f"full_auto_ratio={min(r['ratio_auto'] for r in resnet_full):.2f} "
        f"frozen10_speedup={min(r['speedup'] for r in runs):.1f} peak_rss_mb={peak:.0f} "
        + cost_figures(costs)
        + f" gradckpt_rss_ratio={gradckpt['rss_ratio']:.2f} gradckpt_step_ratio={gradckpt['step_ratio']:.2f}"
        + f" first_run_speedup={second['first_speedup']:.1f} second_run_speedup={second['second_speedup']:.1f} "
        + extraction_figures(extraction)
    )
    if args.json:
        results = {"throughput": rows, "frozen10": runs, "method_costs": costs, "gradckpt": gradckpt,
                   "second_run": second, "extraction": extraction, "line": line}  # fmt: skip
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(line)


if __name__ == "__main__":
    main()
