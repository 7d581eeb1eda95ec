"""The transfer benchmark's pieces, fast: the domain-pair writer, the statistics, the method table and the
harness's bookkeeping with a fake run (the benchmark itself: `make bench-transfer`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tltool.config import all_keys

REPO = Path(__file__).resolve().parent.parent


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def domains():
    pytest.importorskip("sklearn", reason="the target digits come from scikit-learn (extra `demo`)")
    pytest.importorskip("matplotlib", reason="the source fonts ship with matplotlib")
    return _load(REPO / "scripts" / "make_domains.py", "_bench_make_domains")


@pytest.fixture(scope="module")
def bench():
    return _load(REPO / "benchmarks" / "bench_transfer.py", "_bench_transfer")


def _files(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*.png")}


def test_domains_layout_determinism_and_idempotence(domains, tmp_path):
    out = tmp_path / "pair"
    summary = domains.write_domains(out, source_per_class=3, labels_per_class=2, test_fraction=0.5, seed=0)
    assert summary["written"] is True
    assert (summary["source_train"], summary["target_train"]) == (30, 20)
    assert summary["target_unlabeled"] + summary["target_train"] + summary["target_test"] == 1797

    digits = [str(d) for d in range(10)]
    for folder in ("source/train", "target/train", "target/test"):
        assert sorted(p.name for p in (out / folder).iterdir()) == digits, folder  # the same classes everywhere
    assert all(len(list((out / "target/train" / d).glob("*.png"))) == 2 for d in digits)
    unlabeled = list((out / "target/unlabeled").iterdir())
    assert unlabeled and all(p.is_file() and p.suffix == ".png" for p in unlabeled)  # no class folders
    # Every handwritten scan is in exactly one of the target's parts, named after its index.
    target = [p.name for p in (out / "target").rglob("*.png")]
    assert len(target) == len(set(target)) == 1797
    for path in (next((out / "source/train/7").glob("*.png")), unlabeled[0]):
        with Image.open(path) as image:
            assert (image.size, image.mode) == ((8, 8), "L")
            low, high = image.getextrema()
            assert 0 <= low < high <= 255

    before = _files(out)
    assert domains.write_domains(out, 3, 2, 0.5, seed=0)["written"] is False
    assert _files(out) == before  # nothing rewritten
    # Deterministic: the same arguments give the same bytes; another seed another split and renderings.
    again = domains.expected_files(3, 2, 0.5, seed=0)
    assert {name: (out / name).read_bytes() for name in again} == again
    assert domains.expected_files(3, 2, 0.5, seed=1) != again


def test_domains_rebuild_and_refuse(domains, tmp_path):
    out = tmp_path / "pair"
    domains.write_domains(out, 2, 1, 0.5, seed=0)
    assert domains.write_domains(out, 3, 1, 0.5, seed=0)["written"] is True  # another size: rebuilt
    assert len(list((out / "source/train/0").glob("*.png"))) == 3

    mine = tmp_path / "mine"
    (mine / "target").mkdir(parents=True)
    (mine / "target" / "notes.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        domains.write_domains(mine, 2, 1, 0.5, seed=0)
    assert (mine / "target" / "notes.txt").read_text() == "user data"


def test_rendered_digit_is_a_scan_of_ink_counts(domains):
    from PIL import ImageFont

    font = ImageFont.truetype(str(domains.font_paths()[0]), domains.FONT_PX)
    scan = domains.render_digit(font, 8, np.random.default_rng(0))
    assert scan.shape == (8, 8)
    assert scan.min() >= 0 and scan.max() <= 16 and np.all(scan == np.round(scan))
    assert scan.sum() > 16  # ink, as in the handwritten scans (counts of a 32x32 bitmap's 4x4 blocks)
    np.testing.assert_array_equal(scan, domains.render_digit(font, 8, np.random.default_rng(0)))


def test_statistics_on_fixed_numbers(bench):
    mean, std = bench.mean_std([0.5, 0.7, 0.6])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)  # sample std (n - 1)
    assert bench.mean_std([0.8]) == (0.8, 0.0)
    assert bench.format_mean_std([0.5, 0.7, 0.6]) == "60.0 ± 10.0"
    assert bench.format_mean_std([0.02, 0.04], signed=True) == "+3.0 ± 1.4"
    assert bench.format_mean_std([]) == "-"
    assert bench.format_mean_std([0.625]) == "62.5"  # one seed: no spread to show
    # Paired: per seed, only the seeds both have, in seed order.
    diffs = bench.paired_differences({0: 0.9, 1: 0.8, 2: 0.7}, {2: 0.6, 0: 0.5})
    assert diffs == pytest.approx([0.4, 0.1])


def test_method_table_skips_a_row_whose_key_does_not_exist(bench):
    keys = all_keys()
    real = bench.Method("l2sp", "source", ("train.regularization=l2sp",))
    future = bench.Method("future", "source", ("adapt.unlabeled={unlabeled}", "adapt.nonexistent_knob=1"))
    ready, skipped = bench.runnable([real, future], keys)
    assert ready == [real]
    assert skipped == {"future": "skipped: adapt.unlabeled not in this tltool"} or skipped == {
        "future": "skipped: adapt.nonexistent_knob not in this tltool"
    }
    assert bench.missing_key(future, [*keys, "adapt.unlabeled"]) == "adapt.nonexistent_knob"
    # Every row of the real table names its keys the way overrides do, and its run exists.
    for method in (*bench.BASELINES, *bench.METHODS):
        assert method.base in ("source", "target", "source-then-target")
        assert all("=" in item for item in method.overrides)
    assert [m.slug for m in bench.BASELINES] == ["source_only", "target_only", "source_then_target"]


def test_harness_with_a_fake_run(bench, monkeypatch, tmp_path):
    """run_seed on two seeds with fake training: the rows, the paired differences, skipped and failed rows."""
    accuracy = {"source-only": 0.60, "target-only": 0.70, "source then target": 0.80, "good": 0.65}

    def fake_config(config_path, overrides):
        return "unknown adapt.method 'later'" if "adapt.method=later" in overrides else list(overrides)

    def fake_train(cfg, command, run_dir, test):
        name = next(n for n, o in outcomes.items() if o.method.slug == run_dir.name.split("-", 1)[1])
        if name == "broken":
            raise RuntimeError("boom")
        seed = int(run_dir.name[4])
        if name == "source then target":  # it starts from the same seed's source-only checkpoint
            assert f"model.weights={tmp_path / f'seed{seed}-source_only' / 'checkpoints' / 'last.pt'}" in cfg
        return accuracy[name] + 0.01 * seed, 10.0 + seed

    monkeypatch.setattr(bench, "load_run_config", fake_config)
    monkeypatch.setattr(bench, "train_and_eval", fake_train)
    methods = [
        bench.Method("good", "source", ("train.l2sp_alpha=0.1",)),
        bench.Method("later", "source", ("adapt.method=later",)),
        bench.Method("broken", "target"),
    ]
    outcomes = {m.name: bench.Outcome(m) for m in (*bench.BASELINES, *methods)}
    budget = bench.Budget(seeds=(0, 1), source_per_class=1, source_epochs=1, target_epochs=1)
    for seed in budget.seeds:
        bench.run_seed(seed, budget, outcomes, tmp_path / "c.yaml", tmp_path, lambda s: bench.SeedData(tmp_path))

    rows = {row[0]: row[2:] for row in bench.table_rows(outcomes)}
    assert rows["source-only"] == ("60.5 ± 0.7", "-", "-10.0 ± 0.0", "10")
    assert rows["source then target"] == ("80.5 ± 0.7", "+20.0 ± 0.0", "+10.0 ± 0.0", "10")
    assert rows["good"][:3] == ("65.5 ± 0.7", "+5.0 ± 0.0", "-5.0 ± 0.0")
    assert rows["later"][0] == "skipped: unknown adapt.method 'later'"
    assert rows["broken"][0] == "failed: RuntimeError: boom"
    line = bench.summary_line(outcomes)
    assert line.startswith("bench-transfer: source_only=0.6050 target_only=0.7050 source_then_target=0.8050 ")
    assert line.endswith("good=0.6550 later=skipped broken=failed")
    assert "| good |  | 65.5 ± 0.7 |" in bench.format_table(outcomes, "title")
