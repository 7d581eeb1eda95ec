"""The per-step cost of train.ema_decay: tltool's train_one_epoch with and without the EMA, in the same process.

    python benchmarks/bench_ema.py            # make bench-ema
    python benchmarks/bench_ema.py --quick    # fewer rounds, under a minute or two

Cases, batch 32 of in-memory tensors, fp32 NCHW, AdamW (fused), CPU:
- full fine-tuning of mobilenet_v3_small and resnet18 at 64 px: the EMA of the whole model (every parameter
  and batch-norm buffer lerped after each step);
- the frozen backbone with the feature cache (steps on 512/576-d features through the head): the EMA of the
  head (what tltool does), and for comparison the EMA of the whole model (what it would cost to average the
  constant backbone too).
The sessions with and without the EMA are built once and take turns on the same batches, round after round;
each round gives one ratio (with / without) and a row's ratio is the median over rounds (the noise of a shared
machine comes in phases of seconds that slow both alike). Ends with one machine-readable line:
    bench-ema: <case>=<ratio> ...
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tltool.config import load_config  # noqa: E402
from tltool.data import Stream  # noqa: E402
from tltool.ema import WeightEMA  # noqa: E402
from tltool.runstate import EpochProgress  # noqa: E402
from tltool.session import build_session  # noqa: E402
from tltool.train import train_one_epoch  # noqa: E402

BATCH = 32


def make_images(root: Path, classes: int = 10, per_class: int = 2, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for index in range(classes):
        folder = root / f"class_{index}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def loop(backbone: str, frozen: bool, ema: str, workdir: Path):
    """A session (ema: none, head, model) and a function that trains it on a list of batches, returning seconds."""
    data = workdir / "images"
    if not data.exists():
        make_images(data)
    overrides = [
        f"model.backbone={backbone}",
        "model.weights=none",
        f"data.train={data}",
        "data.image_size=64",
        "data.resize_size=64",
        f"data.batch_size={BATCH}",
        "data.num_workers=0",
        f"run.output_dir={workdir / f'{backbone}-{frozen}-{ema}'}",
        "run.device=cpu",
        "train.freeze=" + ("backbone" if frozen else "none"),
        "train.feature_cache=" + ("on" if frozen else "off"),
        "train.precision=fp32",
        "train.channels_last=off",
        "log.progress=false",
    ]
    if ema != "none":
        overrides.append("train.ema_decay=0.999")
    torch.manual_seed(0)
    session = build_session(load_config(None, overrides), quiet=True)
    session.start()
    if ema == "model":  # the whole model averaged although its backbone never trains: the cost tltool avoids
        session.ema = WeightEMA(session.model, 0.999, head_only=False)

    def run(items: list) -> float:
        start = time.perf_counter()
        session.set_streams({"train": Stream("train", items)})
        session.state.in_epoch = EpochProgress()
        train_one_epoch(session)
        return time.perf_counter() - start

    features = session.cache.train.features.shape[-1] if session.cache is not None else None
    return run, features, session


def update_ms(session, repeats: int = 20) -> float:
    """One `WeightEMA.update()` alone, in ms (the best of `repeats`): the EMA's own cost, whatever the step's."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.ema.update()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def batches(count: int, features: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    shape = (BATCH, features) if features else (BATCH, 3, 64, 64)
    return [
        (torch.randn(*shape, generator=generator), torch.randint(0, 10, (BATCH,), generator=generator))
        for _ in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rounds = 3 if args.quick else 9
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, 64 px, fp32, CPU")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cases = [
            ("mobilenet_v3_small", False, ["model"]),
            ("resnet18", False, ["model"]),
            ("resnet18", True, ["head", "model"]),
        ]
        for backbone, frozen, kinds in cases:
            base, features, _ = loop(backbone, frozen, "none", workdir)
            built = {kind: loop(backbone, frozen, kind, workdir) for kind in kinds}
            loops = {"none": base, **{kind: built[kind][0] for kind in kinds}}
            count = 200 if frozen else (4 if args.quick else 6)
            data = batches(count, features)
            for run in loops.values():  # warm-up
                run(data[:2])
            seconds: dict[str, list[float]] = {name: [] for name in loops}
            names = list(loops)
            for index in range(rounds):
                for name in names[index % len(names) :] + names[: index % len(names)]:
                    seconds[name].append(loops[name](data))
            mode = "frozen, cached" if frozen else "full"
            step_ms = 1000 * min(seconds["none"]) / count
            for kind in kinds:
                ratio = statistics.median(e / n for e, n in zip(seconds[kind], seconds["none"], strict=True))
                key = f"{backbone}_{'frozen' if frozen else 'full'}_ema_{kind}"
                results[key] = ratio
                print(
                    f"{backbone:<20} {mode:<15} EMA of the {kind:<5}  step {step_ms:7.2f} ms without, "
                    f"{1000 * min(seconds[kind]) / count:7.2f} ms with: x{ratio:.3f} per step (median of {rounds}); "
                    f"the update alone {update_ms(built[kind][2]):.2f} ms",
                    flush=True,
                )
    print("bench-ema: " + " ".join(f"{key}={value:.3f}" for key, value in results.items()))


if __name__ == "__main__":
    main()
