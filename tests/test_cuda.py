"""CUDA paths: mixed precision (bf16, fp16 with GradScaler), pinned memory, checkpoints portable to CPU.

Marked `cuda`: skipped without a GPU; `make test-cuda` runs them where there is one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import run_overrides
from tltool.checkpoint import load_checkpoint
from tltool.config import load_config
from tltool.evaluate import run_eval
from tltool.train import finetune

pytestmark = pytest.mark.cuda


def cuda_run(run_dir: Path, train: Path, *extra: str, resume: str | None = None) -> dict:
    overrides = [o for o in run_overrides(run_dir, train, *extra) if not o.startswith("run.device")]
    return finetune(load_config(None, [*overrides, "run.device=cuda"]), resume=resume, quiet=True)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "auto"])
def test_cuda_training_in_each_precision(tmp_path: Path, dataset: Path, precision: str) -> None:
    summary = cuda_run(tmp_path / "r", dataset, "train.freeze=none", "train.epochs=3", f"train.precision={precision}")
    assert summary["device"].startswith("cuda")
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in lines)
    assert lines[-1]["val_acc1"] > 0.5
    checkpoint = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert all(t.device.type == "cpu" for t in checkpoint.model.values())
    if summary["precision"] == "fp16":
        assert checkpoint.scaler["scale"] > 0  # the GradScaler's state travels for resume


def test_cuda_checkpoint_evaluates_on_cpu(tmp_path: Path, dataset: Path) -> None:
    cuda_run(tmp_path / "r", dataset, "train.precision=fp32")
    best = tmp_path / "r" / "checkpoints" / "best.pt"
    recorded = load_checkpoint(best).metrics
    metrics = run_eval(best, device_name="cpu")
    assert metrics["acc1"] == pytest.approx(recorded["val_acc1"])
    assert metrics["loss"] == pytest.approx(recorded["val_loss"], rel=1e-3)


def test_cuda_resume_matches_within_tolerance(tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tltool.session as session_module

    extra = ("train.epochs=3", "train.precision=fp16", "train.freeze=none")
    cuda_run(tmp_path / "straight", dataset, *extra)
    real = session_module.evaluate
    calls = {"n": 0}

    def crash_in_third_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(session_module, "evaluate", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        cuda_run(tmp_path / "resumed", dataset, *extra)
    monkeypatch.setattr(session_module, "evaluate", real)
    cuda_run(tmp_path / "resumed", dataset, *extra, resume="auto")
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt").model
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt").model
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over nccl needs 2 GPUs (one per process)")
def test_nccl_ddp_with_sync_batchnorm_on_two_gpus(tmp_path: Path, dataset: Path) -> None:
    import subprocess
    import sys

    from conftest import write_config

    overrides = [o for o in run_overrides(tmp_path / "r", dataset) if not o.startswith("run.device")]
    config = write_config(tmp_path / "c.yaml", [*overrides, "run.device=cuda", "train.freeze=none",
                                                 "train.sync_batchnorm=true", "data.batch_size=4"])  # fmt: skip
    command = [sys.executable, "-m", "tltool", "finetune", str(config), "--nproc", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes x batch 4 = global batch 8" in result.stdout
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(r["val_loss"]) for r in lines)
    checkpoint = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert checkpoint.world_size == 2 and all(t.device.type == "cpu" for t in checkpoint.model.values())
