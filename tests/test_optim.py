"""Optimizers: the kernel `train.optimizer_impl` picks, and fused == loop up to float rounding."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torchvision

import tltool.optim as optim_module
from conftest import run_overrides
from tltool.config import load_config
from tltool.errors import ConfigError
from tltool.optim import make_optimizer, optimizer_impl
from tltool.train import finetune


def train_config(*overrides: str):
    return load_config(None, ["data.train=.", *overrides]).train


def groups(model: torch.nn.Module) -> list[dict]:
    """Two named groups at different LRs, as an unfreeze plan gives them."""
    return [
        {"params": list(model.fc.parameters()), "name": "head", "lr": 0.01},
        {"params": [p for n, p in model.named_parameters() if not n.startswith("fc.")], "name": "backbone", "lr": 1e-3},
    ]


@pytest.mark.parametrize(
    "impl,expected", [("auto", "fused"), ("fused", "fused"), ("foreach", "foreach"), ("loop", "loop")]
)
def test_the_kernel_each_setting_gives_on_cpu(impl: str, expected: str) -> None:
    model = torch.nn.Linear(3, 2)
    for name in ("sgd", "adam", "adamw"):
        optimizer = make_optimizer(
            train_config(f"train.optimizer={name}", f"train.optimizer_impl={impl}"), {"head": list(model.parameters())}
        )
        assert optimizer_impl(optimizer) == expected, name


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_fused_takes_the_same_steps_as_the_loop(name: str) -> None:
    """The same gradients give the same parameters (the kernel is the only difference), across a state swap."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    models = {impl: copy.deepcopy(model) for impl in ("fused", "loop")}
    extra = (f"train.optimizer={name}", "train.weight_decay=0.05")
    optimizers = {
        impl: make_optimizer(train_config(*extra, f"train.optimizer_impl={impl}"), groups(m))
        for impl, m in models.items()
    }
    for step in range(5):
        if step == 3:  # what a resume across settings does: the state moves from one kernel to the other
            state = optimizers["fused"].state_dict()
            optimizers["fused"].load_state_dict(optimizers["loop"].state_dict())
            optimizers["loop"].load_state_dict(state)
        generator = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=generator) for p in model.parameters()]
        for impl, m in models.items():
            for p, grad in zip(m.parameters(), grads, strict=True):
                p.grad = grad.clone()
            optimizers[impl].step()
    for (key, a), b in zip(models["fused"].named_parameters(), models["loop"].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
        assert not torch.equal(a, dict(model.named_parameters())[key]), key


def test_auto_falls_back_where_torch_has_no_fused_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoFused(torch.optim.AdamW):
        def __init__(self, params, fused=None, **kwargs):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be on supported devices")
            super().__init__(params, **kwargs)

    monkeypatch.setitem(optim_module._OPTIMIZERS, "adamw", NoFused)
    params = {"head": list(torch.nn.Linear(3, 2).parameters())}
    assert optimizer_impl(make_optimizer(train_config(), params)) == "loop"
    with pytest.raises(ConfigError, match="optimizer_impl=fused is not available here.*use train.optimizer_impl=auto"):
        make_optimizer(train_config("train.optimizer_impl=fused"), params)


def test_a_run_reports_its_kernel_and_resumes_under_another(tmp_path: Path, dataset: Path) -> None:
    run_dir = tmp_path / "run"
    finetune(load_config(None, run_overrides(run_dir, dataset, "train.epochs=1")), quiet=True)
    assert json.loads((run_dir / "summary.json").read_text())["optimizer_impl"] == "fused"
    extra = ("train.epochs=2", "train.optimizer_impl=loop")
    summary = finetune(load_config(None, run_overrides(run_dir, dataset, *extra)), resume="auto", quiet=True)
    assert summary["optimizer_impl"] == "loop" and summary["final"]["epoch"] == 2
