"""`tltool baseline`: linear probe, kNN and nearest class mean on frozen features, chosen without val."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

import tltool.baseline as baseline
from conftest import make_dataset, tree_checksum
from tltool.cli import app


def write_config(path: Path, train: Path, *extra: str) -> Path:
    """A tiny, fast CPU config (random-init resnet18 at 24 px) with dotted overrides."""
    data: dict = {
        "run": {"device": "cpu"},
        "data": {"train": str(train), "image_size": 24, "resize_size": 24, "num_workers": 0, "batch_size": 16},
        "model": {"backbone": "resnet18", "weights": "none"},
        "log": {"progress": False},
    }
    for item in extra:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        data.setdefault(section, {})[name] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(data))
    return path


def clusters(count: int, dim: int, classes: int, seed: int, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random non-negative "features" around one centre per class (a fixed set of centres)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % classes
    return torch.relu(centres[labels] + spread * torch.randn(count, dim, generator=generator)), labels


def test_baseline_cli_on_colour_classes(tmp_path: Path, cli: CliRunner) -> None:
    data = make_dataset(tmp_path / "images", classes=3, per_class=12, size=24)
    before = tree_checksum(data)
    config = write_config(tmp_path / "c.yaml", data)
    result = cli.invoke(app, ["baseline", str(config), "run.seed=3", "--json", str(tmp_path / "out" / "b.json")])
    assert result.exit_code == 0, result.output
    for text in ("linear probe (l2=", "kNN (k=", "nearest class mean", "feature extraction", "val top-1"):
        assert text in result.stdout
    report = json.loads((tmp_path / "out" / "b.json").read_text())
    assert set(report) >= {"linear_probe", "knn", "nearest_class_mean", "features", "selection"}
    # The same val split as finetune (data.val_split 0.2 of 12 per class); 20% of the 10 train per class held out.
    assert report["features"]["dim"] == 512
    assert (report["features"]["train_images"], report["features"]["val_images"]) == (30, 6)
    assert report["selection"]["holdout_images"] == 6
    for method in ("linear_probe", "knn", "nearest_class_mean"):
        assert report[method]["val_acc1"] > 0.8, report[method]  # chance is 1/3
        assert report[method]["val_acc5"] == 1.0  # top-5 of 3 classes
        assert report[method]["method"]
    assert report["linear_probe"]["l2"] in baseline.L2_GRID and len(report["linear_probe"]["grid"]) == 6
    assert report["knn"]["k"] in baseline.K_GRID
    # Nothing but the JSON (and the features, in the feature store: conftest's TLTOOL_CACHE_DIR) was written: no
    # run directory, nothing into the dataset.
    store = tmp_path / "tltool_cache"
    written = {
        str(p.relative_to(tmp_path))
        for p in tmp_path.rglob("*")
        if p.is_file() and data not in p.parents and store not in p.parents
    }
    assert written == {"c.yaml", "out/b.json"}
    assert len(list((store / "features").glob("*.pt"))) == 2
    assert tree_checksum(data) == before


def test_help_has_an_example(cli: CliRunner) -> None:
    for command in ("baseline", "models"):
        result = cli.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Example: tltool" in result.output, command


def test_baseline_cli_user_error_is_one_line(tmp_path: Path, cli: CliRunner) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path / "missing")
    result = cli.invoke(app, ["baseline", str(config)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.train folder"), result.stderr


def test_holdout_split_is_stratified_seeded_and_disjoint() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    fit, held = baseline.holdout_split(labels, 0.2, seed=0)
    assert sorted(fit.tolist() + held.tolist()) == list(range(16))
    assert torch.bincount(labels[held], minlength=3).tolist() == [2, 1, 0]  # a single image is never held out
    again = baseline.holdout_split(labels, 0.2, seed=0)
    assert torch.equal(again[1], held)
    assert any(not torch.equal(baseline.holdout_split(labels, 0.2, seed=s)[1], held) for s in (1, 2, 3))


def test_selection_never_sees_val(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chosen l2 and k (and their held-out grids) do not move when val is replaced by anything else."""
    train, train_labels = clusters(120, 16, 4, seed=0, spread=2.0)
    val, val_labels = clusters(40, 16, 4, seed=1, spread=2.0)
    noise = torch.rand(40, 16) * 5
    shuffled = val_labels[torch.randperm(40, generator=torch.Generator().manual_seed(0))]

    fitted_rows: list[int] = []
    real_fit = baseline.fit_logistic

    def recording_fit(features: torch.Tensor, labels: torch.Tensor, *args, **kwargs):
        fitted_rows.append(features.shape[0])
        return real_fit(features, labels, *args, **kwargs)

    monkeypatch.setattr(baseline, "fit_logistic", recording_fit)
    probe = baseline.linear_probe(train, train_labels, val, val_labels, 4, seed=0)
    probe_noise = baseline.linear_probe(train, train_labels, noise, shuffled, 4, seed=0)
    assert probe["l2"] == probe_noise["l2"] and probe["grid"] == probe_noise["grid"]
    assert probe["val_acc1"] > 0.6 > probe_noise["val_acc1"]
    # Grid fits on the 96 fit-fold rows, the refit on the 120 train rows: no fit ever had a val row.
    assert fitted_rows == ([96] * 6 + [120]) * 2

    neighbour = baseline.knn(train, train_labels, val, val_labels, 4, seed=0)
    neighbour_noise = baseline.knn(train, train_labels, noise, shuffled, 4, seed=0)
    assert neighbour["k"] == neighbour_noise["k"] and neighbour["grid"] == neighbour_noise["grid"]
    assert neighbour["val_acc1"] > 0.6


def brute_force_knn(bank: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, classes: int, k: int):
    """The weighted kNN written out: per query, every cosine, sorted, the k best vote exp((cos-1)/T)."""
    out = torch.zeros(len(queries), classes, dtype=torch.float64)
    for q, query in enumerate(queries.double()):
        sims = []
        for b, row in enumerate(bank.double()):
            sims.append((float(query @ row / (query.norm() * row.norm())), b))
        for sim, b in sorted(sims, reverse=True)[:k]:
            out[q, labels[b]] += math.exp((sim - 1) / baseline.KNN_TEMPERATURE)
    return out


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_matches_brute_force(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(k)
    bank, queries = torch.randn(50, 6, generator=generator), torch.randn(13, 6, generator=generator)
    labels = torch.randint(0, 4, (50,), generator=generator)
    monkeypatch.setattr(baseline, "CHUNK_ELEMENTS", 200)  # several query chunks of 4
    similarities, indices = baseline.neighbours(F.normalize(bank, dim=1), F.normalize(queries, dim=1), k)
    scores = baseline.knn_vote(similarities, indices, labels, 4, k)
    expected = brute_force_knn(bank, labels, queries, 4, k)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(scores.argmax(1), expected.argmax(1))


def test_nearest_class_mean_and_topk() -> None:
    train = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    val = torch.tensor([[5.0, 0.2], [0.3, 4.0], [1.0, 1.1]])
    result = baseline.nearest_class_mean(train, labels, val, torch.tensor([0, 1, 0]), 2)
    assert result["val_acc1"] == pytest.approx(2 / 3) and result["val_acc5"] == 1.0
    assert baseline.topk_accuracy(torch.tensor([[0.1, 0.5, 0.4]]), torch.tensor([2]), 2) == 1.0


def test_probe_matches_scikit_learn() -> None:
    """fit_logistic(l2) is LogisticRegression(C=1/(l2*n)) on the same standardized features."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    train, labels = clusters(90, 12, 3, seed=0, spread=3.0)
    (standardized,) = baseline.standardize(train)
    l2 = 1e-2
    weight, bias = baseline.fit_logistic(standardized, labels, 3, l2)
    reference = linear_model.LogisticRegression(C=1 / (l2 * 90), tol=1e-10, max_iter=10_000)
    reference.fit(standardized.double().numpy(), labels.numpy())
    ours = (standardized @ weight + bias).softmax(1)
    theirs = torch.from_numpy(reference.predict_proba(standardized.double().numpy())).float()
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)


def test_baseline_json_to_an_unwritable_place_is_one_line_before_any_work(
    tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_dataset(tmp_path / "images", classes=2, per_class=6, size=24)
    config = write_config(tmp_path / "c.yaml", data)
    (tmp_path / "a_file").write_text("x")

    def one_line(args: list[str]) -> str:
        result = cli.invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
        return lines[0]

    def no_extraction(*args, **kwargs):
        raise AssertionError("the features were extracted before the --json path was checked")

    with monkeypatch.context() as patch:  # a path through a file: refused before the (slow) extraction
        patch.setattr(baseline, "extract_features", no_extraction)
        assert "a_file" in one_line(["baseline", str(config), "--json", str(tmp_path / "a_file" / "b.json")])
    # A full disk at the write itself (after the work): one line, no temp file, the old file untouched.
    target = tmp_path / "out" / "b.json"
    target.parent.mkdir()
    target.write_text("old")
    real_fsync = os.fsync

    def full(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".b.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    assert "no space left on device" in one_line(["baseline", str(config), "--json", str(target)])
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["b.json"]
