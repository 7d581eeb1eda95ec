"""Domain adaptation from unlabelled target images: MCC, DANN's gradient reversal, AdaBN, and the second stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import tltool.session as session_module
from conftest import make_dataset, run_overrides, write_config
from tltool.adapt import (
    bn_stats,
    estimate_bn_stats,
    ganin_ramp,
    mcc_loss,
    reverse_gradient,
)
from tltool.checkpoint import load_checkpoint
from tltool.cli import app
from tltool.config import load_config
from tltool.errors import ConfigError
from tltool.models import build_model
from tltool.session import seed_everything
from tltool.train import finetune


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Unlabelled target images at two depths and no class folders: darker, noisier images of the same colours."""
    root = tmp_path_factory.mktemp("target") / "unlabeled"
    make_dataset(root / "a", classes=3, per_class=5, size=24, seed=7)
    for path in sorted((root / "a").rglob("*.png"))[::2]:
        path.rename(root / f"x{path.parent.name}{path.name}")
    return root


def run(tmp_path: Path, name: str, dataset: Path, *extra: str, resume: str | None = None) -> dict:
    return finetune(load_config(None, run_overrides(tmp_path / name, dataset, *extra)), resume=resume, quiet=True)


# --- the losses -----------------------------------------------------------------------------------------


def test_mcc_is_its_formula_on_fixed_logits() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 4.0]])
    temperature = 2.5
    batch, classes = logits.shape
    y = [[0.0] * classes for _ in range(batch)]
    for i in range(batch):  # softmax(z / T), element by element
        exps = [float(torch.tensor(logits[i, j].item() / temperature).exp()) for j in range(classes)]
        y[i] = [e / sum(exps) for e in exps]
    entropy = [-sum(p * float(torch.tensor(p + 1e-5).log()) for p in row) for row in y]
    raw = [1 + float(torch.tensor(-h).exp()) for h in entropy]
    weight = [batch * r / sum(raw) for r in raw]
    confusion = [[sum(y[i][j] * weight[i] * y[i][k] for i in range(batch)) for k in range(classes)]
                 for j in range(classes)]  # fmt: skip
    normalized = [[confusion[j][k] / sum(confusion[j]) for k in range(classes)] for j in range(classes)]
    expected = sum(normalized[j][k] for j in range(classes) for k in range(classes) if j != k) / classes
    assert mcc_loss(logits, temperature).item() == pytest.approx(expected, rel=1e-5)
    # Confident, distinct predictions confuse no class; a uniform batch confuses them all.
    assert mcc_loss(torch.eye(3) * 100, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert mcc_loss(torch.zeros(4, 3), 1.0).item() == pytest.approx(2 / 3, rel=1e-5)


def test_the_gradient_reversal_layer_flips_and_scales_the_gradient() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    (reverse_gradient(x, 0.3) * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(x.grad, -0.3 * torch.arange(3.0).expand(5, 3))
    assert torch.equal(reverse_gradient(x.detach(), 0.3), x.detach())  # the identity forward


def test_ganin_ramp() -> None:
    assert ganin_ramp(0.0) == 0.0 and ganin_ramp(1.0) == pytest.approx(1.0, abs=1e-4)
    assert ganin_ramp(0.1) == pytest.approx(2 / (1 + 2.718281828459045**-1) - 1)


# --- AdaBN ----------------------------------------------------------------------------------------------


def test_adabn_changes_only_batch_norm_buffers_and_equals_a_recomputation_by_hand() -> None:
    cfg = load_config(None, ["data.train=.", "model.backbone=resnet18", "model.weights=none"])
    torch.manual_seed(0)
    backbone = build_model(cfg.model, cfg.data, 3).model.backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 3, 32, 32, generator=generator) * 2 + 1, torch.zeros(4)) for _ in range(3)]
    batches.insert(1, None)  # an unreadable batch is skipped
    batches.append((torch.randn(1, 3, 32, 32, generator=generator), torch.zeros(1)))  # so is one of a single image

    # By hand: each BN layer's input per batch, its mean and unbiased variance, averaged over the batches.
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, inputs, name=name: seen.setdefault(name, []).append(inputs[0]))
             for name, m in backbone.named_modules() if isinstance(m, nn.BatchNorm2d)]  # fmt: skip
    estimated = estimate_bn_stats(backbone, batches, torch.device("cpu"), "fp32")
    for hook in hooks:
        hook.remove()
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, before[key]), key  # the backbone's own buffers and weights are untouched
    assert set(estimated) == set(bn_stats(backbone)) and len(estimated) == 3 * 20
    for name, inputs in seen.items():
        assert len(inputs) == 3
        means = torch.stack([x.transpose(0, 1).flatten(1).mean(1) for x in inputs]).mean(0)
        variances = torch.stack([x.transpose(0, 1).flatten(1).var(1, unbiased=True) for x in inputs]).mean(0)
        torch.testing.assert_close(estimated[f"{name}.running_mean"], means, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(estimated[f"{name}.running_var"], variances, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(estimated[f"{name}.running_mean"], before[f"{name}.running_mean"])


def test_an_adabn_run_saves_the_target_statistics_and_trains_only_the_head(
    tmp_path: Path, dataset: Path, target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached_streams = []  # AdaBN alone: the unlabelled images pass once (the statistics), never into the cache
    real_build_cache = session_module.build_cache
    monkeypatch.setattr(
        session_module,
        "build_cache",
        lambda *a, **k: cached_streams.append(sorted(a[-1] or {})) or real_build_cache(*a, **k),
    )
    summary = run(tmp_path, "r", dataset, f"adapt.unlabeled={target}", "adapt.bn_stats=target", "train.epochs=1")
    assert cached_streams == [[]]
    assert summary["feature_cache"] is not None and "AdaBN" in summary["method"]
    assert summary["adapt"]["unlabeled_images"] == 15
    saved = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    cfg = load_config(None, run_overrides(tmp_path / "x", dataset))
    seed_everything(cfg.run.seed)  # (as the session: the same random init)
    initial = build_model(cfg.model, cfg.data, 3).model.state_dict()
    stats = saved.bn_stats
    for key, value in saved.model.items():
        relative = key.removeprefix("backbone.")
        if key.startswith("head."):
            continue
        if relative in stats["target"]:  # the model carries the target's statistics; the source's are kept
            assert torch.equal(value, stats["target"][relative]), key
            assert torch.equal(stats["source"][relative], initial[key]), key
        else:
            assert torch.equal(value, initial[key]), key  # frozen weights
    assert not torch.equal(saved.model["head.1.weight"], initial["head.1.weight"])


# --- a run with a second stream -------------------------------------------------------------------------


def test_mcc_with_domain_batch_norm_logs_its_term_and_resumes_bitwise_mid_epoch(
    tmp_path: Path, dataset: Path, target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = (f"adapt.unlabeled={target}", "adapt.method=mcc", "adapt.weight=0.5", "train.freeze=none",
             "adapt.bn_stats=target", "data.augment=light", "train.epochs=2", "checkpoint.every_n_steps=3")  # fmt: skip
    straight = run(tmp_path, "straight", dataset, *extra)
    assert straight["loss_terms"] == ["ce", "mcc"] and "MCC" in straight["method"] and "AdaBN" in straight["method"]
    # The backbone trains: each domain's batch norm follows its own batches; the model carries the target's.
    saved = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    means = [k for k in saved.bn_stats["target"] if k.endswith("running_mean")]
    for key in means:
        assert torch.equal(saved.model[f"backbone.{key}"], saved.bn_stats["target"][key])
    assert any(not torch.allclose(saved.bn_stats["source"][k], saved.bn_stats["target"][k]) for k in means)
    records = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_terms"]["mcc"] > 0 for r in records)
    real_save, saves = session_module.save_atomic, []

    def crash_on_third_save(payload, path):
        saves.append(path)
        real_save(payload, path)
        if len(saves) == 3:  # step 3 (epoch 1), epoch 1's end, step 6 (epoch 2, batch 2)
            raise Crash()

    monkeypatch.setattr(session_module, "save_atomic", crash_on_third_save)
    with pytest.raises(Crash):
        run(tmp_path, "resumed", dataset, *extra)
    monkeypatch.setattr(session_module, "save_atomic", real_save)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt").epoch_progress["batches_done"] == 2
    torch.manual_seed(99)  # the process's RNG must not matter
    run(tmp_path, "resumed", dataset, *extra, resume="auto")
    a, b = (load_checkpoint(tmp_path / name / "checkpoints" / "last.pt") for name in ("straight", "resumed"))
    for key, value in a.model.items():
        assert torch.equal(b.model[key], value), key
    for key, value in a.bn_stats["source"].items():
        assert torch.equal(b.bn_stats["source"][key], value), key
    resumed = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_terms"] for r in resumed] == [r["loss_terms"] for r in records]


def test_dann_trains_its_discriminator_in_its_own_group_and_saves_it(
    tmp_path: Path, dataset: Path, target: Path
) -> None:
    extra = (f"adapt.unlabeled={target}", "adapt.method=dann", "adapt.dann_hidden=16", "train.freeze=none",
             "train.epochs=1", "adapt.warmup=none")  # fmt: skip
    summary = run(tmp_path, "r", dataset, *extra)
    saved = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert summary["loss_terms"] == ["ce", "dann"] and "DANN" in summary["method"]
    assert [g["name"] for g in saved.optimizer["param_groups"]] == ["backbone", "head", "dann"]
    discriminator = saved.loss_terms["dann"]["module"]
    assert discriminator["layers.0.weight"].shape == (16, 512)
    # (0.5 (BCE_s + BCE_t) starts near log 2 and the discriminator learns: it drops)
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < record["loss_terms"]["dann"] < 1.0


def test_adaptation_bad_inputs_are_one_line_errors(tmp_path: Path, dataset: Path, target: Path, cli) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "does not exist": ("adapt.unlabeled=/no/such/folder", "adapt.method=mcc"),
        "has no images": (f"adapt.unlabeled={empty}", "adapt.method=mcc"),
        "needs a backbone that trains": (f"adapt.unlabeled={target}", "adapt.method=dann"),
        "need adapt.unlabeled": ("adapt.method=mcc",),
        "nothing uses it": (f"adapt.unlabeled={target}",),
    }
    for message, extra in cases.items():
        run_dir = tmp_path / "runs" / message.replace(" ", "-")
        config = write_config(tmp_path / "c.yaml", run_overrides(run_dir, dataset, *extra))
        result = cli.invoke(app, ["finetune", str(config)])
        assert result.exit_code == 2, (message, result.output)
        assert message in result.output and "Traceback" not in result.output, result.output
        assert len(result.stderr.strip().splitlines()) <= 3, result.output
        assert not run_dir.exists(), message
    with pytest.raises(ConfigError):
        load_config(None, ["data.train=.", "adapt.method=mcc"])
