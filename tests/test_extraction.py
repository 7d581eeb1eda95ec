"""Extraction: where the frozen backbone's forward runs (the workers, phases, overlapped) and what comes out."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import tltool.extraction as extraction_module
from tltool.data import Preprocess


def test_the_extraction_schedule_puts_the_forward_in_the_workers_or_phases_where_they_share_its_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    schedule = extraction_module.extraction_schedule
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(extraction_module, "usable_cpus", lambda: 2)
    assert schedule(cpu, 2) == extraction_module.ExtractionSchedule(1, 0, in_workers=True)  # (a worker per CPU)
    assert schedule(cpu, 3).in_workers
    assert schedule(cpu, 2, "onnxruntime").chunk == extraction_module.PHASE_BATCHES  # (the engine runs in the main)
    assert schedule(cpu, 1).chunk == extraction_module.PHASE_BATCHES  # (a CPU without a worker: phased)
    assert schedule(cpu, 0) == extraction_module.ExtractionSchedule(2, 0)  # (the main process decodes: no sharing)
    assert schedule(cuda, 2) == extraction_module.ExtractionSchedule(2, 0)  # (the forward is the GPU's)
    monkeypatch.setattr(extraction_module.multiprocessing, "get_start_method", lambda *args, **kwargs: "spawn")
    assert schedule(cpu, 2).chunk == extraction_module.PHASE_BATCHES  # (spawn would copy the backbone per worker)
    monkeypatch.undo()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(extraction_module, "usable_cpus", lambda: 4)
    assert schedule(cpu, 2, "onnxruntime").chunk == 0  # (2 cores left for 2 threads: overlap)
    assert schedule(cpu, 2).chunk == 0 and not schedule(cpu, 2).in_workers
    assert schedule(cpu, 3).chunk == extraction_module.PHASE_BATCHES
    assert schedule(cpu, 3).threads == 2  # (torch's threads are never cut)


class PidNet(torch.nn.Module):
    """A backbone whose last feature is the id of the process that ran it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pid = torch.full((len(x), 1), float(os.getpid()))
        return torch.cat([self.conv(x).mean((2, 3)), pid], 1)


def test_workers_run_the_forward_on_the_backbone_as_it_is_at_each_extraction(
    dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a worker per CPU, each worker runs the backbone on the batches it decoded (features and labels as
    the main process computes them, in order), on the weights of the moment: its workers are forked per pass."""
    import io

    from tqdm import tqdm

    from tltool.data import eval_transform, make_loader, scan_folder

    monkeypatch.setattr(extraction_module, "usable_cpus", lambda: 2)
    _, samples = scan_folder(dataset)
    transform = eval_transform(Preprocess(32, 32))
    net, cpu = PidNet().eval(), torch.device("cpu")
    for scale in (1.0, 3.0):
        net.conv.weight.data.mul_(scale)
        main_loader = make_loader(samples, transform, 4, 0, seed=0, shuffle=False)
        in_main = extraction_module.extract(net, main_loader, cpu, "fp32")
        loader = make_loader(samples, transform, 4, 2, seed=0, shuffle=False)
        bar = tqdm(loader, file=io.StringIO(), mininterval=0)
        in_workers = extraction_module.extract(net, bar, cpu, "fp32")
        assert bar.n == len(loader) == 9  # (the progress bar counted the batches the workers' loader gave)
        assert set(in_main[0][:, -1].tolist()) == {os.getpid()}
        workers = set(in_workers[0][:, -1].tolist())
        assert len(workers) == 2 and os.getpid() not in workers
        torch.testing.assert_close(in_workers[0][:, :-1], in_main[0][:, :-1], rtol=1e-5, atol=1e-6)
        assert torch.equal(in_workers[1], in_main[1]) and len(in_main[1]) == len(samples)


def test_a_workers_forward_runs_micro_batches_by_the_input_size_only(
    dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers run each batch in micro-batches of about MICRO_BATCH_PIXELS input pixels (a power of two, at
    most the batch), in order; a rule of the input's size alone, so the features never depend on timing."""
    from tltool.data import eval_transform, make_loader, scan_folder

    def images(n: int, px: int) -> torch.Tensor:
        return torch.zeros(n, 3, px, px)

    rule = extraction_module.micro_batch
    assert [rule(images(32, px)) for px in (32, 64, 96, 128, 160, 224, 299, 384)] == [32, 32, 16, 8, 8, 4, 2, 1]
    assert rule(images(5, 96)) == 5 and rule(images(1, 1024)) == 1

    class SizeNet(torch.nn.Module):
        """Features: the size of the batch each image was run in, and the image's first value."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.full((len(x), 1), float(len(x))), x[:, :1, 0, 0]], 1)

    monkeypatch.setattr(extraction_module, "usable_cpus", lambda: 2)
    monkeypatch.setattr(extraction_module, "MICRO_BATCH_PIXELS", 3 * 32 * 32)  # (32 px images: 2 at a time)
    _, samples = scan_folder(dataset)
    transform, cpu = eval_transform(Preprocess(32, 32)), torch.device("cpu")
    whole = extraction_module.extract(
        SizeNet(), make_loader(samples, transform, 4, 0, seed=0, shuffle=False), cpu, "fp32"
    )
    micro = extraction_module.extract(
        SizeNet(), make_loader(samples, transform, 4, 2, seed=0, shuffle=False), cpu, "fp32"
    )
    assert set(whole[0][:, 0].tolist()) == {4.0} and set(micro[0][:, 0].tolist()) == {2.0}
    assert torch.equal(micro[0][:, 1], whole[0][:, 1]) and torch.equal(micro[1], whole[1])


# A fresh process whose loader workers run an engine that reports what malloc did with a 30 MiB block (an
# activation's size) in each call: how much of it was mapped for itself (mallinfo2's hblkhd) and how much of the
# heap it grew was kept once freed. The workers inherit their parent's malloc state, so the parent is a fresh
# process whose earlier frees are known, not the test's.
MALLOC_SCRIPT = """
import ctypes, json, os
import torch
from torch.utils.data import DataLoader
import tltool.extraction as extraction

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2

def a_forward(images):
    before = mallinfo2()
    block = torch.ones(30 * 2**18)
    mapped = mallinfo2().hblkhd - before.hblkhd
    del block
    kept = mallinfo2().arena - before.arena
    return torch.tensor([[float(mapped), float(kept), float(os.getpid())]]).expand(len(images), 3)

def calls():
    batches = [(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)) for _ in range(4)]
    loader = DataLoader(batches, batch_size=None, num_workers=2)
    rows = [features[0].tolist() for features, _ in extraction.forward_in_workers(loader, a_forward)]
    assert len({row[2] for row in rows}) == 2, rows
    return [row[:2] for row in rows]

kept = calls()
extraction.keep_freed_memory = lambda: False  # (the control: glibc's default)
control = calls()
applied = []
extraction.keep_freed_memory = lambda: applied.append(os.getpid()) or True
step = extraction._MicroBatched(a_forward)
step(torch.zeros(2, 3, 8, 8)), step(torch.zeros(2, 3, 8, 8))
print(json.dumps({"kept": kept, "control": control, "in_main": applied}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="mallopt is glibc's")
def test_extraction_workers_keep_the_memory_a_forward_frees() -> None:
    """Each worker, as it starts, sets its malloc to keep freed memory (keep_freed_memory): a block of an
    activation's size comes from the heap, not a mapping of its own, and the heap keeps it once freed, so the next
    forward reuses those pages instead of faulting them in again. Without it (the control: glibc's default) the
    block is mapped and unmapped at every call. Never in the main process: a user's own process keeps glibc's
    default."""
    import json
    import subprocess

    if not _keeps_memory_in_a_child():
        pytest.skip("malloc is not glibc's: mallopt is not there")
    # (glibc's defaults: without the environment's own malloc settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-c", MALLOC_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    block = 30 * 2**20
    # (the rows in the loader's order: the first two are each worker's first call)
    assert all(mapped == 0 for mapped, _ in result["kept"]), result
    assert all(kept > block // 2 for _, kept in result["kept"][:2]), result  # (the heap grew by it, less its free top)
    assert all(mapped >= block and kept < block // 2 for mapped, kept in result["control"][:2]), result
    assert result["in_main"] == []


def _keeps_memory_in_a_child() -> bool:
    """Whether keep_freed_memory applies here (run in a child: the test process keeps its malloc as it is)."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(extraction_module.keep_freed_memory)


def test_phases_decode_a_chunk_before_the_forward_runs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """in_phases takes `chunk` batches (or PHASE_BYTES of images) from the loader before handing out the first,
    keeps their order and passes undecodable (None) batches on; extract's features equal a straight pass."""
    events: list[str] = []
    batches = [(torch.full((2, 3, 4, 4), float(k)), torch.tensor([k, k])) for k in range(7)]
    batches[3] = None

    def loader():
        for k, batch in enumerate(batches):
            events.append(f"read {k}")
            yield batch

    for k, batch in enumerate(extraction_module.in_phases(loader(), 3)):
        assert batch is batches[k]
        events.append(f"use {k}")
    assert events == ["read 0", "read 1", "read 2", "use 0", "use 1", "use 2", "read 3", "read 4", "read 5",
                      "use 3", "use 4", "use 5", "read 6", "use 6"]  # fmt: skip
    monkeypatch.setattr(extraction_module, "PHASE_BYTES", 2 * batches[0][0].numel() * 4)
    events.clear()
    for k, _ in enumerate(extraction_module.in_phases(loader(), 100)):
        events.append(f"use {k}")
    assert events[:4] == ["read 0", "read 1", "use 0", "use 1"]  # (the bytes of 2 batches end a phase)
    assert list(extraction_module.in_phases(loader(), 0)) == batches  # (0: straight through)

    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.Flatten())
    cpu = torch.device("cpu")
    straight = extraction_module.extract(backbone, [b for b in batches], cpu, "fp32")
    monkeypatch.setattr(extraction_module, "loader_workers", lambda loader: 2)
    monkeypatch.setattr(extraction_module, "usable_cpus", lambda: 3)  # (a CPU without a worker: phased)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    calls = []
    real = extraction_module.in_phases
    monkeypatch.setattr(extraction_module, "in_phases", lambda b, chunk: calls.append(chunk) or real(b, chunk))
    phased = extraction_module.extract(backbone, [b for b in batches], cpu, "fp32")
    assert calls == [extraction_module.PHASE_BATCHES]
    assert torch.equal(phased[0], straight[0]) and torch.equal(phased[1], straight[1])
    assert phased[1].tolist() == [0, 0, 1, 1, 2, 2, 4, 4, 5, 5, 6, 6]
