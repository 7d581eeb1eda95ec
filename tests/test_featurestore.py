"""The feature store: frozen features kept across runs (reused bitwise, no backbone pass), keys that miss when
what the features depend on changes, concurrent extractions, LRU eviction, damaged entries, `tltool cache`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import tltool.features as features_module
import tltool.featurestore as featurestore
from conftest import make_dataset, run_overrides
from tltool.checkpoint import load_checkpoint
from tltool.cli import app
from tltool.config import load_config
from tltool.data import scan_data
from tltool.featurestore import FeatureStore
from tltool.models import build_model
from tltool.train import finetune
from tltool.transfer import freeze_modules


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Fixed train and val folders (so another seed draws the same split), 3 classes x 4 + 2 images of 16 px."""
    root = tmp_path_factory.mktemp("store_data")
    return make_dataset(root / "train", per_class=4, size=16, seed=1), make_dataset(root / "val", per_class=2, size=16)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 weights file: the same backbone in every run whatever its seed."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "tltool_cache" / "features"  # (conftest's TLTOOL_CACHE_DIR)


def overrides(run_dir: Path, data: tuple[Path, Path], weights: Path, *extra: str) -> list[str]:
    return run_overrides(run_dir, data[0], f"model.weights={weights}", "train.epochs=1", *extra, val=data[1])


def run(run_dir: Path, data: tuple[Path, Path], weights: Path, *extra: str) -> dict:
    return finetune(load_config(None, overrides(run_dir, data, weights, *extra)), quiet=True)


@contextlib.contextmanager
def conv_passes() -> Iterator[list[int]]:
    """Count the Conv2d forwards of more than one image in this process: the backbone's work on the data (the
    head is a Linear; `models.check_input_size` sends one zero image through every model it builds)."""
    count = [0]

    def hook(module: nn.Module, args: tuple) -> None:
        if isinstance(module, nn.Conv2d) and args[0].shape[0] > 1:
            count[0] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


def stored_features(tmp_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every entry of the store, by its kind (train, val), read back from disk."""
    out = {}
    for meta_path in store_dir(tmp_path).glob("*.json"):
        meta = json.loads(meta_path.read_text())
        out[meta["kind"]] = torch.load(meta_path.with_suffix(".pt"), weights_only=True)
    return out


def test_the_suite_never_touches_the_users_cache(tmp_path: Path) -> None:
    # conftest's autouse fixture: every test has its own store under its tmp_path.
    assert featurestore.store_root()[0] == store_dir(tmp_path)
    assert "TLTOOL_CACHE_MAX_MB" not in os.environ


def test_a_second_run_reuses_the_stored_features_bitwise_and_runs_no_backbone(
    tmp_path: Path, data: tuple[Path, Path], weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    caches = []
    real_build = features_module.build_cache
    monkeypatch.setattr("tltool.session.build_cache", lambda *a, **k: caches.append(real_build(*a, **k)) or caches[-1])
    with conv_passes() as first:
        summary = run(tmp_path / "first", data, weights)
    assert first[0] > 0 and summary["feature_cache"]["reused"] == []
    on_disk = stored_features(tmp_path)
    assert sorted(on_disk) == ["train", "val"]
    with conv_passes() as second:
        again = run(tmp_path / "second", data, weights)
    assert second[0] == 0  # not one backbone forward: the head trained on the stored features
    assert again["feature_cache"]["reused"] == ["train", "val"]
    for kind, part in (("train", caches[1].train), ("val", caches[1].val)):
        assert torch.equal(part.features, on_disk[kind]["features"])  # bitwise what was stored ...
        assert torch.equal(part.features, getattr(caches[0], kind).features)  # ... which is what run 1 extracted
        assert torch.equal(part.labels, on_disk[kind]["labels"])
    # The same config gives the same run, bit for bit, from the reused features.
    a = load_checkpoint(tmp_path / "first" / "checkpoints" / "last.pt").model
    b = load_checkpoint(tmp_path / "second" / "checkpoints" / "last.pt").model
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Another seed and head LR (with augment none) needs the same features: reused too.
    with conv_passes() as third:
        other = run(tmp_path / "third", data, weights, "run.seed=5", "train.lr=0.05")
    assert third[0] == 0 and other["feature_cache"]["reused"] == ["train", "val"]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # (conv_passes' hook, traced by the ONNX export)
@pytest.mark.parametrize("engine", ["eager", "onnxruntime"])
def test_tltool_baseline_and_finetune_share_entries(
    tmp_path: Path, data: tuple[Path, Path], weights: Path, cli, engine: str
) -> None:
    """Either order, with the engine train.feature_engine names (baseline extracts with it, as the run does)."""
    if engine == "onnxruntime":
        pytest.importorskip("onnxruntime")
    config = tmp_path / "c.yaml"
    from conftest import write_config

    write_config(config, overrides(tmp_path / "run", data, weights, f"train.feature_engine={engine}"))
    with conv_passes() as baseline_passes:
        result = cli.invoke(app, ["baseline", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    assert baseline_passes[0] > 0 and len(list(store_dir(tmp_path).glob("*.pt"))) == 2
    with conv_passes() as run_passes:
        summary = finetune(load_config(str(config), []), quiet=True)
    assert run_passes[0] == 0 and summary["feature_cache"]["reused"] == ["train", "val"]
    with conv_passes() as again:
        second = cli.invoke(app, ["baseline", str(config), "--quiet"])
    timeless = [re.sub(r"[\d.]+ s\b", "", r.output) for r in (result, second)]
    assert again[0] == 0 and timeless[0] == timeless[1]  # the same features: the same read-outs
    assert {json.loads(p.read_text())["engine"] for p in store_dir(tmp_path).glob("*.json")} == {engine}


def test_a_changed_image_weights_file_or_image_size_misses(
    tmp_path: Path, data: tuple[Path, Path], weights: Path
) -> None:
    train = make_dataset(tmp_path / "train", per_class=4, size=16, seed=1)
    mine = (train, data[1])
    own_weights = tmp_path / "w.pt"
    own_weights.write_bytes(weights.read_bytes())
    assert run(tmp_path / "r0", mine, own_weights)["feature_cache"]["reused"] == []

    def reused(name: str, *extra: str) -> list[str]:
        with conv_passes() as passes:
            found = run(tmp_path / name, mine, own_weights, *extra)["feature_cache"]["reused"]
        assert (passes[0] == 0) == (found == ["train", "val"])
        return found

    # The weights file rewritten with the same content (a new mtime): the same weights, reused.
    own_weights.write_bytes(weights.read_bytes())
    assert reused("same-weights") == ["train", "val"]
    # One train image rewritten (new pixels, the same size in bytes is not needed: size or mtime changes).
    image = sorted(train.rglob("*.png"))[0]
    make_dataset(tmp_path / "other", classes=1, per_class=1, size=16, seed=9)
    image.write_bytes((tmp_path / "other" / "class_0" / "000.png").read_bytes())
    assert reused("image") == ["val"]
    # Other weights under the same file name (and the same size): both parts miss.
    state = torch.load(weights, weights_only=True)
    state["conv1.weight"] = state["conv1.weight"] * 0.5
    torch.save(state, own_weights)
    assert reused("weights") == []
    assert reused("weights-again") == ["train", "val"]
    # Another preprocessing (image size): a miss.
    assert reused("size", "data.image_size=24", "data.resize_size=24") == []


def build_in_thread(cfg, weights_dir: Path, results: dict, name: str, gate: threading.Barrier) -> None:
    try:
        built = build_model(cfg.model, cfg.data, 3)
        freeze_modules(built.model, "backbone")
        split = scan_data(cfg.data, cfg.run.seed)
        gate.wait()
        results[name] = features_module.build_cache(
            cfg, built.model, built.weights_source, built.preprocess, split.train, split.val, torch.device("cpu"),
            "fp32", weights_dir / name,
        )  # fmt: skip
    except BaseException as exc:  # (shown by the test's assertion, not lost in a thread)
        results[name] = repr(exc)
        raise


def test_two_concurrent_extractions_of_one_key_end_with_one_entry(
    tmp_path: Path, data: tuple[Path, Path], weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(None, overrides(tmp_path / "r", data, weights))
    extractions = []
    real = features_module._extract_views

    def slow_extract(*args, **kwargs):  # (a window in which the other thread surely asks for the same key)
        extractions.append(threading.current_thread().name)
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(features_module, "_extract_views", slow_extract)
    results: dict = {}
    gate = threading.Barrier(2)
    threads = [
        threading.Thread(target=build_in_thread, args=(cfg, tmp_path, results, n, gate), name=n) for n in ("a", "b")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == ["a", "b"] and not any(isinstance(r, str) for r in results.values()), results
    # Each of train and val was extracted once: the second asker waited on the key's lock, then reused it.
    assert len(extractions) == 2
    assert sorted(results["a"].reused + results["b"].reused) == ["train", "val"]
    entries = sorted(p.name for p in store_dir(tmp_path).iterdir() if p.is_file())
    assert len(entries) == 4 and all(name.endswith((".pt", ".json")) and not name.startswith(".") for name in entries)
    stored = stored_features(tmp_path)
    for kind in ("train", "val"):
        assert torch.equal(getattr(results["a"], kind).features, getattr(results["b"], kind).features)
        assert torch.equal(getattr(results["a"], kind).features, stored[kind]["features"])


def entry(store: FeatureStore, key: str, rows: int = 1000) -> dict[str, torch.Tensor]:
    tensors = {"features": torch.randn(1, rows, 10), "labels": torch.zeros(rows, dtype=torch.long)}
    assert store.publish(key, {"kind": "train"}, tensors)
    return tensors


def test_eviction_keeps_the_budget_and_drops_the_least_recently_used(tmp_path: Path) -> None:
    size = 1000 * 10 * 4 + 1000 * 8  # about the bytes of one entry's tensors
    store = FeatureStore(tmp_path / "s", max_bytes=int(size * 3.5))
    for age, key in enumerate(("a", "b", "c")):
        entry(store, key)
        os.utime(store.path(key), (1000 + age, 1000 + age))  # a, b, c: oldest first
    # Reusing a records it as used now: b becomes the least recently used.
    got = store.fetch("a", {}, lambda: pytest.fail("a is stored"), memory_bytes=2**30)
    assert got.reused
    entry(store, "d")
    assert sorted(e.key for e in store.entries()) == ["a", "c", "d"]
    assert store.total_bytes() <= store.max_bytes
    assert not store.path("b").exists() and not store.meta_path("b").exists()
    # An entry larger than the whole budget is not kept (and evicts nothing).
    assert not store.publish("huge", {}, {"features": torch.zeros(1, 100_000, 10), "labels": torch.zeros(100_000)})
    assert sorted(e.key for e in store.entries()) == ["a", "c", "d"]


def test_the_budget_comes_from_the_key_the_environment_or_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert featurestore.budget_mb(None) == featurestore.DEFAULT_MAX_MB
    monkeypatch.setenv("TLTOOL_CACHE_MAX_MB", "12")
    assert featurestore.budget_mb(None) == 12 and featurestore.budget_mb(3) == 3
    monkeypatch.setenv("TLTOOL_CACHE_MAX_MB", "lots")
    with pytest.raises(featurestore.ConfigError, match="TLTOOL_CACHE_MAX_MB='lots' is not a size in MB"):
        featurestore.budget_mb(None)
    monkeypatch.delenv("TLTOOL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    assert featurestore.store_root() == (Path("/x/tltool/features"), False)
    assert featurestore.store_root("/y") == (Path("/y"), True)


def test_damaged_entries_are_rebuilt_with_a_warning(tmp_path: Path) -> None:
    warnings: list[str] = []
    store = FeatureStore(tmp_path / "s", max_bytes=2**30, warn=warnings.append)
    good = entry(store, "k")
    builds = []

    def build() -> dict[str, torch.Tensor]:
        builds.append(1)
        return {k: v.clone() for k, v in good.items()}

    # Truncated (a copy cut short outside tltool): the size no longer matches what was written.
    data = store.path("k").read_bytes()
    store.path("k").write_bytes(data[: len(data) // 2])
    got = store.fetch("k", {}, build, memory_bytes=2**30)
    assert not got.reused and builds == [1] and len(warnings) == 1
    assert warnings[0].startswith("warning: feature cache entry k is damaged") and "\n" not in warnings[0]
    assert torch.equal(store.read("k", mmap=False)["features"], good["features"])  # rebuilt, valid again
    # Wrong shapes behind a matching size: torch loads it, the shapes give it away.
    torch.save({"features": torch.zeros(1, 10, 1000), "labels": torch.zeros(10, dtype=torch.long)}, store.path("k"))
    meta = json.loads(store.meta_path("k").read_text())
    store.meta_path("k").write_text(json.dumps({**meta, "bytes": store.path("k").stat().st_size}))
    got = store.fetch("k", {}, build, memory_bytes=2**30)
    assert not got.reused and builds == [1, 1] and "features of shape [1, 10, 1000]" in warnings[1]
    assert torch.equal(got.tensors["features"], good["features"])


def test_a_run_finding_a_truncated_entry_warns_once_rebuilds_it_and_trains_the_same(
    tmp_path: Path, data: tuple[Path, Path], weights: Path, capfd: pytest.CaptureFixture
) -> None:
    run(tmp_path / "first", data, weights)
    capfd.readouterr()
    train_meta = next(p for p in store_dir(tmp_path).glob("*.json") if json.loads(p.read_text())["kind"] == "train")
    entry_file = train_meta.with_suffix(".pt")
    whole = entry_file.read_bytes()
    stored = torch.load(entry_file, weights_only=True)
    entry_file.write_bytes(whole[:-100])  # (a copy or a disk that lost the file's end)
    with conv_passes() as passes:
        summary = run(tmp_path / "second", data, weights)
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "damaged" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: feature cache entry {train_meta.stem} is damaged")
    assert passes[0] > 0 and summary["feature_cache"]["reused"] == ["val"]  # train extracted again, val reused
    rebuilt = torch.load(entry_file, weights_only=True)  # rebuilt: what the first run stored, bit for bit
    assert all(torch.equal(rebuilt[k], stored[k]) for k in ("features", "labels"))
    a = load_checkpoint(tmp_path / "first" / "checkpoints" / "last.pt").model
    b = load_checkpoint(tmp_path / "second" / "checkpoints" / "last.pt").model
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_write_cut_short_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FeatureStore(tmp_path / "s", max_bytes=2**30)
    real_save = torch.save

    def dies_midway(obj, handle):
        handle.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt  # (a Ctrl-C in the middle of the write)

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        entry(store, "k")
    monkeypatch.setattr(torch, "save", real_save)
    assert not store.path("k").exists() and store.read("k", mmap=False) is None
    assert not [p for p in store.root.iterdir() if p.is_file() and p.suffix == ".pt" or ".tmp-" in p.name]


def test_the_run_says_one_line_when_the_chosen_folder_is_unusable(
    tmp_path: Path, data: tuple[Path, Path], weights: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    config = tmp_path / "c.yaml"
    from conftest import write_config

    write_config(config, overrides(tmp_path / "run", data, weights))
    result = cli.invoke(app, ["finetune", str(config), f"train.feature_cache_dir={blocker / 'features'}"])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "feature cache: cannot create" in result.output
    # The default folder unusable (a read-only home): a warning, and the run keeps its features to itself.
    monkeypatch.delenv("TLTOOL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    result = cli.invoke(app, ["finetune", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "warning: feature cache" in result.output and "kept for this run only" in result.output


def test_cache_list_and_clear_through_the_cli(tmp_path: Path, data: tuple[Path, Path], weights: Path, cli) -> None:
    run(tmp_path / "r", data, weights)
    listed = cli.invoke(app, ["cache", "list"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.strip().splitlines()
    assert lines[0].split()[:4] == ["key", "backbone", "part", "transform"] and len(lines) == 4
    assert lines[-1].startswith("2 entries,") and str(store_dir(tmp_path)) in lines[-1]
    as_json = json.loads(cli.invoke(app, ["cache", "list", "--json"]).output)
    assert sorted((e["kind"], e["images"], e["backbone"]) for e in as_json) == [
        ("train", 12, "resnet18"),
        ("val", 6, "resnet18"),
    ]
    train_key = next(e["key"] for e in as_json if e["kind"] == "train")
    for args, message in (
        (["cache", "clear"], "say what to clear"),
        (["cache", "clear", "nope"], "no feature cache entry nope"),
        (["cache", "clear", "--all", train_key], "say what to clear"),
    ):
        result = cli.invoke(app, args)
        assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1
    cleared = cli.invoke(app, ["cache", "clear", train_key[:8]])
    assert cleared.exit_code == 0 and cleared.output.startswith("removed 1 entry")
    assert [e["kind"] for e in json.loads(cli.invoke(app, ["cache", "list", "--json"]).output)] == ["val"]
    cleared = cli.invoke(app, ["cache", "clear", "--all"])
    assert cleared.exit_code == 0 and cleared.output.startswith("removed 1 entry")
    assert not list(store_dir(tmp_path).glob("*.pt")) and not list(store_dir(tmp_path).glob("*.json"))
    moved = cli.invoke(app, ["cache", "list", "--dir", str(tmp_path / "elsewhere")])
    assert moved.exit_code == 0 and moved.output.startswith("0 entries")


@pytest.mark.slow  # (two processes that import torch: 7 s measured on the 2 cores when quiet, 43 s at load 9)
def test_two_processes_started_together_extract_each_part_once_and_both_runs_are_right(
    tmp_path: Path, data: tuple[Path, Path], weights: Path
) -> None:
    from conftest import write_config

    config = write_config(tmp_path / "c.yaml", overrides(tmp_path / "unused", data, weights))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}  # fmt: skip
    runs = [tmp_path / "a", tmp_path / "b"]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "tltool", "finetune", str(config), f"run.output_dir={run_dir}", "--quiet"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for run_dir in runs
    ]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    # Train and val were each extracted by one of the two (the other waited on the lock, or came later).
    reused = [json.loads((run_dir / "summary.json").read_text())["feature_cache"]["reused"] for run_dir in runs]
    assert sorted(reused[0] + reused[1]) == ["train", "val"]
    names = sorted(p.name for p in store_dir(tmp_path).iterdir() if p.is_file())
    assert len(names) == 4 and not any(name.startswith(".") for name in names)  # two entries, no temp files
    a, b = (load_checkpoint(run_dir / "checkpoints" / "last.pt").model for run_dir in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)  # two correct runs: the same weights, bit for bit
