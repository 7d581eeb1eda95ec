"""LP-FT (`train.head_init: probe`) and WiSE-FT (`train.wise_alpha`, `eval|export --wise-alpha`): the mechanisms."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import tltool.lpft as lpft
from conftest import make_dataset, run_overrides, write_config
from tltool import baseline
from tltool.checkpoint import Checkpoint, load_checkpoint
from tltool.cli import app
from tltool.config import all_keys, load_config
from tltool.data import DataSplit, eval_transform, load_image
from tltool.errors import CheckpointError, ConfigError, DataError
from tltool.runlog import format_summary
from tltool.session import build_session
from tltool.train import finetune
from tltool.wise import interpolate, wise_weights
from tltool.wise_run import WISE_GRID, choose_alpha, start_wise, wise_holdout

LPFT_METHOD = "LP-FT (head from the linear probe)"


@dataclass(frozen=True)
class WiseRun:
    """One finished 1-epoch run with LP-FT and WiSE-FT (auto), shared by the tests of this module."""

    overrides: list[str]
    summary: dict[str, Any]

    @property
    def best(self) -> Path:
        return Path(self.summary["checkpoints"]["best"])

    @property
    def wise(self) -> Path:
        return Path(self.summary["wise"]["checkpoint"])


@pytest.fixture(scope="module")
def wise_run(tmp_path_factory: pytest.TempPathFactory) -> WiseRun:
    root = tmp_path_factory.mktemp("wise")
    data = make_dataset(root / "images", per_class=12, size=24)
    extra = ("train.head_init=probe", "train.freeze=none", "train.wise_alpha=auto", "train.epochs=1", "train.lr=0.001")
    overrides = run_overrides(root / "run", data, *extra)
    return WiseRun(overrides, finetune(load_config(None, overrides), quiet=True))


def train_images(session: Any) -> torch.Tensor:
    """The session's train images through its eval transform, in split order."""
    transform = eval_transform(session.built.preprocess)
    return torch.stack([transform(load_image(path)) for path, _ in session.split.train])


def eval_json(cli: CliRunner, checkpoint: Path, out: Path, *extra: str) -> dict[str, Any]:
    result = cli.invoke(app, ["eval", str(checkpoint), "--device", "cpu", "--json", str(out), *extra])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def one_line_error(result: Any) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# --- LP-FT ---------------------------------------------------------------------------------------------


def test_probe_head_gives_the_probes_scores_before_the_first_step(tmp_path: Path, dataset: Path) -> None:
    cfg = load_config(None, run_overrides(tmp_path / "run", dataset, "train.head_init=probe", "train.freeze=none"))
    session = build_session(cfg, quiet=True)
    model = session.model.eval()
    with torch.no_grad():
        logits = model(train_images(session))
    # `tltool baseline`'s own probe, fitted independently on its own extraction (same seed: same backbone).
    features = baseline.extract_features(cfg, quiet=True)
    probe = baseline.fit_probe(features.train, features.train_labels, features.num_classes, cfg.run.seed)
    scores = probe.scores(features.train)
    assert torch.equal(features.train_labels, torch.tensor([label for _, label in session.split.train]))
    torch.testing.assert_close(logits, scores, atol=1e-4, rtol=1e-5)
    assert torch.equal(logits.argmax(dim=1), scores.argmax(dim=1))
    # A random head says something else: the equality above is the probe's doing.
    random_cfg = load_config(None, run_overrides(tmp_path / "random", dataset, "train.freeze=none"))
    with torch.no_grad():
        random_logits = build_session(random_cfg, quiet=True).model.eval()(train_images(session))
    assert not torch.allclose(random_logits, scores, atol=1e-2)


def test_probe_folding_is_the_same_map() -> None:
    """W' = W / std, b' = b - W' . mean: one Linear gives the probe's scores of raw features."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 6, generator=generator) * 5 + 3
    labels = torch.arange(40) % 3
    probe = baseline.fit_probe(features, labels, 3, seed=0, grid=(1.0,))
    weight, bias = probe.folded()
    torch.testing.assert_close(features @ weight.T + bias, probe.scores(features), atol=1e-4, rtol=1e-5)


def test_a_resume_takes_the_head_and_theta0_from_the_checkpoint(
    wise_run: WiseRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refit(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a resume fitted the probe again")

    monkeypatch.setattr(lpft, "fit_probe", refit)
    session = build_session(load_config(None, [*wise_run.overrides, "train.epochs=2"]), resume="auto", quiet=True)
    last = load_checkpoint(Path(wise_run.summary["checkpoints"]["last"]))
    for name, value in session.model.state_dict().items():
        assert torch.equal(value, last.model[name]), name
    assert last.initial_model is not None
    for name, value in session.wise.initial.items():
        assert torch.equal(value, last.initial_model[name]), name


def test_dry_run_names_the_methods_and_fits_nothing(
    tmp_path: Path, dataset: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lpft, "fit_probe", lambda *args, **kwargs: pytest.fail("a dry run fitted the probe"))
    overrides = run_overrides(tmp_path / "run", dataset, "train.head_init=probe", "train.wise_alpha=0.5")
    result = cli.invoke(app, ["finetune", str(write_config(tmp_path / "c.yaml", overrides)), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"+ {LPFT_METHOD} + WiSE-FT (alpha 0.5)" in result.stdout
    assert not (tmp_path / "run").exists()


# --- WiSE-FT: the weights ------------------------------------------------------------------------------


def test_interpolation_ends_and_midpoint_are_exact() -> None:
    generator = torch.Generator().manual_seed(0)
    initial = {"w": torch.randn(5, 7, generator=generator), "n": torch.tensor(3)}
    finetuned = {"w": torch.randn(5, 7, generator=generator), "n": torch.tensor(9)}
    assert torch.equal(interpolate(initial, finetuned, 0.0)["w"], initial["w"])
    assert torch.equal(interpolate(initial, finetuned, 1.0)["w"], finetuned["w"])
    assert torch.equal(interpolate(initial, finetuned, 0.5)["w"], (initial["w"] + finetuned["w"]) / 2)
    assert torch.allclose(interpolate(initial, finetuned, 0.3)["w"], 0.7 * initial["w"] + 0.3 * finetuned["w"])
    assert all(interpolate(initial, finetuned, a)["n"].item() == 9 for a in (0.0, 0.5, 1.0))  # integer: theta_ft's


def test_auto_picks_the_alpha_with_the_best_held_out_accuracy() -> None:
    """Class 1 iff x > 10 alpha: only alpha 0.3 puts the boundary between the two classes' points."""
    model = nn.Linear(1, 2)
    initial = {"weight": torch.tensor([[0.0], [1.0]]), "bias": torch.tensor([0.0, 0.0])}
    finetuned = {"weight": torch.tensor([[0.0], [1.0]]), "bias": torch.tensor([0.0, -10.0])}
    held_out = [(torch.tensor([[2.0], [2.5], [3.5], [4.0]]), torch.tensor([0, 0, 1, 1]))]
    alpha, rows = choose_alpha(model, initial, finetuned, held_out, torch.device("cpu"), "fp32", 2)
    assert alpha == pytest.approx(0.3)
    assert [row["alpha"] for row in rows] == list(WISE_GRID)
    assert [row["holdout_acc1"] for row in rows].count(1.0) == 1


def test_auto_holds_out_train_images_that_never_train() -> None:
    train = [(f"{c}/{i}.png", c) for c in range(3) for i in range(10)] + [("3/0.png", 3)]
    split = DataSplit(["a", "b", "c", "d"], train, [("v.png", 0)])
    cfg = load_config(None, ["train.wise_alpha=auto"])
    kept, held = wise_holdout(cfg, split)
    assert sorted(kept.train + held) == sorted(train) and not set(kept.train) & set(held)
    assert sorted(label for _, label in held) == [0, 1, 2]  # 10% of each class; a class of one image only trains
    assert kept.val == split.val
    assert wise_holdout(load_config(None, ["train.wise_alpha=0.5"]), split) == (split, [])
    with pytest.raises(DataError, match="no class has two"):
        wise_holdout(cfg, DataSplit(["a"], [("a/0.png", 0)], []))


def test_missing_theta0_is_one_line() -> None:
    checkpoint = Checkpoint.from_dict({"config": {}, "class_names": ["a"], "preprocess": {}, "arch": {}, "model": {}})
    assert checkpoint.initial_model is None  # an older checkpoint loads without the key
    with pytest.raises(CheckpointError, match="holds no starting weights"):
        wise_weights(checkpoint, 0.5, "old.pt")
    with pytest.raises(CheckpointError, match="holds no starting weights"):
        start_wise(load_config(None, ["train.wise_alpha=0.5"]), nn.Linear(1, 1), checkpoint, [])
    with pytest.raises(ConfigError, match="outside"):
        wise_weights(checkpoint, 1.5, "old.pt")


def test_config_keys_and_bad_values() -> None:
    assert {"train.head_init", "train.wise_alpha"} <= set(all_keys())
    for bad in ("train.wise_alpha=1.5", "train.wise_alpha=best", "train.head_init=zero"):
        with pytest.raises(ConfigError) as error:
            load_config(None, [bad])
        assert len(error.value.details) == 1, error.value.details


# --- WiSE-FT in a run, eval and export ------------------------------------------------------------------


def test_run_writes_wise_checkpoint_from_best_and_held_out_choice(wise_run: WiseRun) -> None:
    summary, wise = wise_run.summary, wise_run.summary["wise"]
    assert LPFT_METHOD in summary["method"] and "WiSE-FT" in summary["method"]
    saved = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert saved["method"] == summary["method"] and saved["wise"]["alpha"] == wise["alpha"]
    # 3 classes x 12: 2 per class to val, then 10% of the 10 train images per class hold out alpha's choice.
    assert wise["holdout_images"] == 3 and summary["train_images"] == 27
    best_row = max(wise["grid"], key=lambda row: (row["holdout_acc1"], -row["holdout_loss"]))
    assert wise["alpha"] == best_row["alpha"]
    best, written = load_checkpoint(wise_run.best), load_checkpoint(wise_run.wise)
    expected = interpolate(best.initial_model, best.model, wise["alpha"])
    assert all(torch.equal(written.model[name], value) for name, value in expected.items())
    assert written.initial_model is None
    table = format_summary(summary)
    assert "wise-ft      alpha" in table and f"tltool eval {wise_run.wise}" in table


def test_eval_wise_alpha(wise_run: WiseRun, tmp_path: Path, cli: CliRunner) -> None:
    plain = eval_json(cli, wise_run.best, tmp_path / "plain.json")
    one = eval_json(cli, wise_run.best, tmp_path / "one.json", "--wise-alpha", "1")
    assert one["wise_alpha"] == 1.0 and plain["wise_alpha"] is None
    for key in ("loss", "acc1", "acc5", "confusion_matrix", "per_class"):
        assert one[key] == plain[key], key
    # The run's wise.pt is best.pt at the alpha it chose.
    alpha = str(wise_run.summary["wise"]["alpha"])
    mixed = eval_json(cli, wise_run.best, tmp_path / "mixed.json", "--wise-alpha", alpha)
    assert mixed["loss"] == eval_json(cli, wise_run.wise, tmp_path / "wise.json")["loss"]


def test_eval_and_export_refuse_bad_alpha_and_missing_theta0(wise_run: WiseRun, tmp_path: Path, cli: CliRunner) -> None:
    out = tmp_path / "out"
    cases = [
        (wise_run.best, "1.5", "outside [0, 1]"),
        (wise_run.best, "-0.5", "outside [0, 1]"),
        (wise_run.wise, "0.5", "holds no starting weights"),
    ]
    for checkpoint, alpha, message in cases:
        result = cli.invoke(app, ["eval", str(checkpoint), "--wise-alpha", alpha, "--json", str(out / "m.json")])
        assert message in one_line_error(result)
        args = ["export", str(checkpoint), "-f", "safetensors", "-o", str(out / "m.safetensors")]
        assert message in one_line_error(cli.invoke(app, [*args, "--wise-alpha", alpha]))
        assert not out.exists()


def test_export_writes_the_interpolated_weights(wise_run: WiseRun, tmp_path: Path, cli: CliRunner) -> None:
    from safetensors.torch import load_file

    path = tmp_path / "mid.safetensors"
    args = ["export", str(wise_run.best), "-f", "safetensors", "-o", str(path), "--wise-alpha", "0.5"]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "WiSE-FT alpha 0.5" in result.stdout
    best = load_checkpoint(wise_run.best)
    expected = interpolate(best.initial_model, best.model, 0.5)
    tensors = load_file(str(path))
    assert all(torch.equal(tensors[name], value) for name, value in expected.items())
