"""A bounded load test of `tltool serve`: N requests from C concurrent clients on 127.0.0.1, p50/p99 and throughput.

    python benchmarks/bench_serve.py                                  # 2,000 requests, 16 clients, batching on and off
    python benchmarks/bench_serve.py --requests 500 --max-batch 32    # smaller, batching only
    python benchmarks/bench_serve.py --model runs/x/checkpoints/best.pt --images photos/

Without --model it trains a small model first (mobilenet_v3_small, random init, 1 epoch on generated 64 px
images; nothing is downloaded) and sends those images. For each --max-batch value it starts the real server
(`python -m tltool serve MODEL --port 0 --max-batch B --max-wait-ms W`, torch threads = --threads), sends
--warmup requests that are not counted, then --requests raw-body POST /predict requests from --clients threads
(each its own httpx.Client with keep-alive), and stops it with SIGTERM. Latency is per request, from send to
the parsed JSON; throughput is requests over the wall time of the whole burst. A request fails when it raises
or its status is not 200; any failure makes the exit code 1. /health gives the batches the server ran.
The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tltool.config import load_config  # noqa: E402
from tltool.data import IMAGE_EXTENSIONS  # noqa: E402
from tltool.train import finetune  # noqa: E402

COLOURS = [(220, 40, 40), (40, 190, 40), (40, 40, 220)]


def make_model(root: Path, size: int) -> tuple[Path, Path]:
    """Generated 3-class images (a colour per class plus noise) and a 1-epoch mobilenet_v3_small on them."""
    rng = np.random.default_rng(0)
    data = root / "images"
    for index, colour in enumerate(COLOURS):
        folder = data / f"class_{index}"
        folder.mkdir(parents=True)
        for i in range(8):
            pixels = np.array(colour, dtype=np.float64) + rng.normal(0, 25, (size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    overrides = [
        f"run.output_dir={root / 'run'}",
        "run.device=cpu",
        f"data.train={data}",
        f"data.image_size={size}",
        f"data.resize_size={size}",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.augment=none",
        "model.backbone=mobilenet_v3_small",
        "model.weights=none",
        "train.epochs=1",
        "train.precision=fp32",
        "log.progress=false",
    ]
    summary = finetune(load_config(None, overrides), quiet=True)
    return Path(summary["checkpoints"]["last"]), data


def start_server(model: Path, max_batch: int, max_wait_ms: float, threads: int) -> tuple[subprocess.Popen, str]:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    command = [sys.executable, "-m", "tltool", "serve", str(model), "--port", "0", "--max-batch", str(max_batch)]
    command += ["--max-wait-ms", str(max_wait_ms), "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stderr is not None
    deadline = time.monotonic() + 120
    for line in process.stderr:
        if line.startswith("serving ") and "http://" in line:
            threading.Thread(target=process.stderr.read, daemon=True).start()  # keep draining it
            return process, "http://" + line.split("http://", 1)[1].split()[0]
        if time.monotonic() > deadline:
            break
    process.kill()
    raise SystemExit(f"the server did not start (exit {process.wait()})")


def burst(url: str, bodies: list[bytes], requests: int, clients: int) -> tuple[list[float], int, float]:
    """`requests` POST /predict spread over `clients` threads: latencies (s), failures, wall time (s)."""
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        nonlocal failures
        with httpx.Client(base_url=url, timeout=60) as http:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                begun = time.perf_counter()
                try:
                    response = http.post("/predict", content=bodies[index % len(bodies)])
                    ok = response.status_code == 200 and "predictions" in response.json()[0]
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - begun
                with lock:
                    latencies.append(elapsed)
                    failures += not ok

    begun = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    return latencies, failures, time.perf_counter() - begun


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a checkpoint or export; default: train a small one")
    parser.add_argument("--images", type=Path, help="a folder of images to send (default: the generated ones)")
    parser.add_argument("--image-size", type=int, default=64, help="of the generated model and images")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=32)
    parser.add_argument("--max-batch", type=int, nargs="+", default=[32, 1], help="one server run per value")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    args = parser.parse_args()
    if (args.model is None) != (args.images is None):
        parser.error("give --model and --images together (a model and what to send it), or neither")

    with tempfile.TemporaryDirectory() as tmp:
        model, images = (args.model, args.images) if args.model else make_model(Path(tmp), args.image_size)
        files = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        bodies = [p.read_bytes() for p in files]
        print(
            f"bench-serve on {platform.machine()} ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}), torch "
            f"{torch.__version__}: {model.name}, {len(files)} images of {np.mean([len(b) for b in bodies]) / 1024:.1f} KiB, "
            f"{args.requests} requests from {args.clients} clients, server threads {args.threads}, "
            f"--max-wait-ms {args.max_wait_ms:g}"
        )
        print(
            f"{'max batch':>9} {'ok':>6} {'failed':>6} {'req/s':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'batches':>7} {'mean batch':>10} {'largest':>7}"
        )
        summary, failed_total = [], 0
        for max_batch in args.max_batch:
            process, url = start_server(model, max_batch, args.max_wait_ms, args.threads)
            try:
                _, warm_failures, _ = burst(url, bodies, args.warmup, args.clients)
                before = httpx.get(f"{url}/health").json()
                latencies, failures, wall = burst(url, bodies, args.requests, args.clients)
                after = httpx.get(f"{url}/health").json()
            finally:
                process.send_signal(signal.SIGTERM)
                code = process.wait(timeout=30)
            batches = after["batches"] - before["batches"]
            images_run = after["images"] - before["images"]
            failures += warm_failures
            failed_total += failures + (code != 0)
            p50, p90, p99 = (percentile(latencies, q) * 1000 for q in (50, 90, 99))
            rate = args.requests / wall
            print(
                f"{max_batch:>9} {len(latencies) - failures:>6} {failures:>6} {rate:>7.1f} {p50:>7.1f} {p90:>7.1f} "
                f"{p99:>7.1f} {batches:>7} {images_run / max(batches, 1):>10.2f} {after['max_batch_seen']:>7}"
                + (f"  (server exit {code})" if code else "")
            )
            summary.append(
                f"b{max_batch}_rps={rate:.1f} b{max_batch}_p50_ms={p50:.1f} b{max_batch}_p99_ms={p99:.1f} b{max_batch}_failed={failures}"
            )
        print(f"bench-serve: requests={args.requests} clients={args.clients} " + " ".join(summary))
    return 1 if failed_total else 0


if __name__ == "__main__":
    sys.exit(main())
