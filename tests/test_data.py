"""Data: folder scanning, splits, image modes, bad images, transforms, sampler order."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_dataset
from tltool.config import DataConfig
from tltool.data import (
    EpochSampler,
    ImageDataset,
    Preprocess,
    collate_skip_bad,
    eval_transform,
    image_problem,
    load_image,
    scan_data,
    scan_eval_folder,
    scan_folder,
    stratified_split,
    train_transform,
)
from tltool.data.folders import walk_images
from tltool.errors import DataError


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb unless decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_scan_ignores_hidden_and_non_image_entries(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", classes=2, per_class=3)
    (root / ".DS_Store").write_bytes(b"junk")
    (root / "README.txt").write_text("not a class")
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".ipynb_checkpoints" / "x.png")
    (root / "class_0" / ".hidden.png").write_bytes(b"")
    (root / "class_0" / "notes.txt").write_text("x")
    (root / "class_0" / "nested").mkdir()
    Image.new("RGB", (8, 8)).save(root / "class_0" / "nested" / "deep.PNG")
    classes, samples = scan_folder(root)
    assert classes == ["class_0", "class_1"]
    assert len(samples) == 7
    assert not any("/." in path or path.endswith(".txt") for path, _ in samples)


def test_empty_class_and_missing_folders_are_errors(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", classes=2, per_class=2)
    (root / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class"):
        scan_folder(root)
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        scan_folder(tmp_path / "flat")


def test_stratified_split_is_seeded_and_per_class() -> None:
    samples = [(f"c{c}/{i}.png", c) for c in range(3) for i in range(10)]
    train, val = stratified_split(samples, 0.2, seed=5)
    assert len(val) == 6 and len(train) == 24
    assert sorted(label for _, label in val) == [0, 0, 1, 1, 2, 2]
    assert set(train).isdisjoint(val)
    assert stratified_split(samples, 0.2, seed=5) == (train, val)
    assert stratified_split(samples, 0.2, seed=6)[1] != val


def test_train_and_val_must_have_the_same_classes(tmp_path: Path) -> None:
    train = make_dataset(tmp_path / "train", classes=3, per_class=2)
    val = make_dataset(tmp_path / "val", classes=2, per_class=2)
    with pytest.raises(DataError, match="only in train: \\['class_2'\\]"):
        scan_data(DataConfig(train=str(train), val=str(val)), seed=0)


def test_scan_eval_folder_maps_class_names(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", classes=2, per_class=2)
    samples = scan_eval_folder(root, ["class_1", "class_0", "other"])
    assert {label for path, label in samples if "class_0" in path} == {1}
    with pytest.raises(DataError, match="does not know"):
        scan_eval_folder(root, ["class_0"])


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    array = np.full((4, 4), 1000, dtype=np.uint16)
    array[0, 0] = 65535
    Image.fromarray(array).save(tmp_path / "g16.png")
    image = load_image(tmp_path / "g16.png")
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels[1, 1, 0] == round(1000 / 257)  # 4, not 255
    assert pixels[0, 0, 0] == 255


def test_modes_become_rgb(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "a.png")
    image = np.asarray(load_image(tmp_path / "a.png"))
    assert tuple(image[1, 1]) == (255, 255, 255)  # composited on white
    assert tuple(image[0, 0]) == (0, 0, 255)
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert load_image(tmp_path / "c.jpg").mode == "RGB"
    Image.new("P", (4, 4), 3).save(tmp_path / "p.png")
    Image.new("L", (4, 4), 128).save(tmp_path / "l.png")
    Image.new("1", (4, 4), 1).save(tmp_path / "b.png")
    for name in ("p.png", "l.png", "b.png"):
        assert load_image(tmp_path / name).mode == "RGB"
    assert tuple(np.asarray(load_image(tmp_path / "l.png"))[0, 0]) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (20, 10), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    image.save(tmp_path / "o.jpg", exif=exif)
    assert load_image(tmp_path / "o.jpg").size == (10, 20)


def test_bad_images_are_found_by_header(tmp_path: Path) -> None:
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, I am not a JPEG")
    (tmp_path / "bomb.png").write_bytes(png_header(30000, 30000))
    assert image_problem(tmp_path / "zero.jpg") == "empty file"
    assert image_problem(tmp_path / "text.jpg") == "not an image"
    assert "decompression bomb" in image_problem(tmp_path / "bomb.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    assert image_problem(tmp_path / "ok.png") is None


def test_truncated_jpeg_is_dropped_from_its_batch(tmp_path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    assert image_problem(tmp_path / "t.jpg") is None  # the header is fine: only decoding fails
    dataset = ImageDataset(
        [(str(tmp_path / "t.jpg"), 0), (str(tmp_path / "ok.png"), 1)], eval_transform(Preprocess(32, 32))
    )
    batch = collate_skip_bad([dataset[0], dataset[1]])
    assert batch[0].shape == (1, 3, 32, 32) and batch[1].tolist() == [1]
    assert collate_skip_bad([dataset[0]]) is None


def test_bad_images_are_skipped_with_a_count_or_stop_the_run(tmp_path: Path, capsys) -> None:
    root = make_dataset(tmp_path / "d", classes=2, per_class=10)
    (root / "class_0" / "zero.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="1 of 21 images are unreadable"):
        scan_data(DataConfig(train=str(root)), seed=0)
    split = scan_data(DataConfig(train=str(root), max_bad_fraction=0.1), seed=0)
    assert split.bad == [(str(root / "class_0" / "zero.jpg"), "empty file")]
    assert len(split.train) + len(split.val) == 20
    assert "skipping" in capsys.readouterr().err
    with pytest.raises(DataError, match="on_bad_image"):
        scan_data(DataConfig(train=str(root), max_bad_fraction=0.5, on_bad_image="error"), seed=0)


def test_preprocess_overrides_keep_the_preset_ratio() -> None:
    preset = Preprocess(224, 256)
    assert preset.with_config(DataConfig(image_size=112)).resize_size == 128
    assert preset.with_config(DataConfig(image_size=64, resize_size=64)).resize_size == 64
    with pytest.raises(DataError, match="resize_size"):
        preset.with_config(DataConfig(image_size=64, resize_size=32))
    assert Preprocess.from_dict(preset.to_dict()) == preset


@pytest.mark.parametrize("augment", ["none", "light", "standard"])
def test_transforms_give_normalized_tensors(augment: str) -> None:
    image = Image.new("RGB", (40, 30), (255, 255, 255))
    pre = Preprocess(32, 36)
    out = train_transform(pre, augment)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (1 - torch.tensor(pre.mean)) / torch.tensor(pre.std)
    torch.testing.assert_close(eval_transform(pre)(image)[:, 5, 5], expected)


def test_sampler_order_depends_on_seed_and_epoch_only() -> None:
    a, b = EpochSampler(20, seed=1), EpochSampler(20, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) and sorted(a) == list(range(20))
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(EpochSampler(5, 0, shuffle=False)) == [0, 1, 2, 3, 4]


# --- seeded augmentation, workers ---------------------------------------------------------------------


def _augmented_batches(root: Path, workers: int, epoch: int, skip_batches: int = 0) -> list[torch.Tensor]:
    from tltool.data import Preprocess, make_loader, scan_folder, set_loader_epoch, train_transform

    _, samples = scan_folder(root)
    loader = make_loader(samples, train_transform(Preprocess(16, 16), "standard"), 4, workers, seed=5,
                         shuffle=True, seeded=True)  # fmt: skip
    set_loader_epoch(loader, 5, epoch, skip_batches=skip_batches)
    return [images for images, _ in loader]


def test_augmentation_depends_on_seed_epoch_and_position_not_on_workers(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", classes=2, per_class=6, size=24)
    state = torch.get_rng_state()
    in_process = _augmented_batches(root, 0, epoch=1)
    assert torch.equal(torch.get_rng_state(), state)  # the main RNG (dropout) is not consumed by loading
    with_workers = _augmented_batches(root, 2, epoch=1)
    assert len(in_process) == 3 and all(torch.equal(a, b) for a, b in zip(in_process, with_workers, strict=True))
    assert not torch.equal(in_process[0], _augmented_batches(root, 0, epoch=2)[0])  # a new epoch, new crops
    resumed = _augmented_batches(root, 2, epoch=1, skip_batches=1)  # a mid-epoch resume, other worker count
    assert all(torch.equal(a, b) for a, b in zip(in_process[1:], resumed, strict=True))


def test_num_workers_auto_follows_the_cpus_of_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import tltool.data.loading as data_module

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cpus, expected in ((1, 0), (2, 2), (6, 6), (64, 8)):
        monkeypatch.setattr(data_module, "usable_cpus", lambda cpus=cpus: cpus)
        assert data_module.resolve_num_workers("auto") == expected
    monkeypatch.setattr(data_module, "usable_cpus", lambda: 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: 2 processes share this node's 4 CPUs
    assert data_module.resolve_num_workers("auto") == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert data_module.resolve_num_workers("auto") == 0
    assert data_module.resolve_num_workers(3) == 3
    assert DataConfig(num_workers="auto").num_workers == "auto" and DataConfig().num_workers == "auto"
    with pytest.raises(ValueError):
        DataConfig(num_workers="many")


def test_loader_workers_persist_across_epochs(tmp_path: Path) -> None:
    from tltool.data import Preprocess, eval_transform, make_loader, scan_folder

    _, samples = scan_folder(make_dataset(tmp_path / "d", classes=2, per_class=2))
    assert make_loader(samples, eval_transform(Preprocess(16, 16)), 2, 1, seed=0, shuffle=False).persistent_workers
    assert not make_loader(samples, eval_transform(Preprocess(16, 16)), 2, 0, seed=0, shuffle=False).persistent_workers


def test_symlink_loops_and_repeated_links_add_no_images(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", classes=2, per_class=3, size=8)
    (root / "class_0" / "up").symlink_to("..")  # back to the root: a loop through every class
    (root / "class_0" / "self").symlink_to(".")
    classes, samples = scan_folder(root)
    assert classes == ["class_0", "class_1"]
    counts = [sum(1 for _, label in samples if label == i) for i in range(2)]
    # class_0 reaches class_1's 3 images through `up` once (a link outside it, followed), never 12 -> 1,452
    assert counts == [6, 3] and len({path for path, _ in samples}) == len(samples)
    walk = walk_images(root / "class_0")
    assert sorted(p.name for p in walk.repeated) == ["class_0", "self"]  # up/class_0 is class_0 again
    assert [p.name for p in walk.outside] == ["up"]


def test_a_fifo_named_like_an_image_is_reported_as_one_and_never_opened(tmp_path: Path, capsys) -> None:
    root = make_dataset(tmp_path / "d", classes=2, per_class=10, size=8)
    os.mkfifo(root / "class_0" / "pipe.jpg")
    split = scan_data(DataConfig(train=str(root), max_bad_fraction=0.1), seed=0)  # would block if opened
    assert split.bad == [(str(root / "class_0" / "pipe.jpg"), "is a FIFO (named pipe), not a file")]
    assert "pipe.jpg: is a FIFO" in capsys.readouterr().err
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(DataError, match=r"data.train folder .*pipe is a FIFO \(named pipe\), not a folder"):
        scan_folder(tmp_path / "pipe")


EXIT_WITH_LIVE_WORKERS = """
import sys
from tltool.data import eval_transform, make_loader, scan_folder
from tltool.data.transforms import Preprocess
_, samples = scan_folder(sys.argv[1])
loader = make_loader(samples, eval_transform(Preprocess(16, 16)), 4, 2, seed=0, shuffle=True)
next(iter(loader))
cycle = {"loader": loader}
cycle["self"] = cycle  # (kept alive until a collection: its persistent workers still run at exit)
del loader
print(" ".join(str(p.pid) for p in cycle["loader"]._iterator._workers), flush=True)
"""


def test_a_process_exits_with_its_loader_workers_still_running(tmp_path: Path) -> None:
    # multiprocessing's exit handler sends the workers SIGTERM, which they ignore, and waits for them:
    # without tltool's exit hook the process never ends.
    import subprocess
    import sys

    data = make_dataset(tmp_path / "images", classes=2, per_class=4, size=16)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", EXIT_WITH_LIVE_WORKERS, str(data)], capture_output=True,
                          text=True, timeout=60, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    workers = [int(pid) for pid in done.stdout.split()]
    assert len(workers) == 2
    for pid in workers:  # killed and reaped, not left running
        assert not Path(f"/proc/{pid}").exists()


def test_the_transforms_normalization_runs_once_per_batch_with_the_per_image_values(tmp_path: Path) -> None:
    """make_loader runs the transform's trailing ToDtype / Normalize on each collated batch: the dataset yields
    uint8 images, and the batches are bitwise those of the whole transform applied to each image (the eval
    transform, and a seeded augmenting one); random erasing, after Normalize and random per image, keeps the
    whole transform per image."""
    from torch.utils.data import DataLoader

    from tltool.data import make_loader
    from tltool.data.transforms import split_batch_tail

    _, samples = scan_folder(make_dataset(tmp_path / "d", classes=2, per_class=5, size=30, suffix=".jpg"))
    pre = Preprocess(24, 28)
    each, tail = split_batch_tail(eval_transform(pre))
    assert [type(step).__name__ for step in tail.transforms] == ["ToDtype", "Normalize"]
    assert [type(step).__name__ for step in each.transforms] == ["Resize", "CenterCrop", "ToImage"]
    assert split_batch_tail(train_transform(pre, "light", random_erasing=0.5))[1] is None
    assert split_batch_tail(each) == (each, None)
    for transform, seeded in ((eval_transform(pre), False), (train_transform(pre, "trivialaugment"), True)):
        loader = make_loader(samples, transform, 4, 0, seed=3, shuffle=True, seeded=seeded)
        assert loader.dataset[0][0].dtype == torch.uint8  # (the per-image part stops before ToDtype)
        whole = ImageDataset(samples, transform)
        reference = DataLoader(whole, batch_size=4, sampler=loader.sampler, collate_fn=collate_skip_bad)
        pairs = list(zip(loader, reference, strict=True))
        assert len(pairs) == 3
        for (images, labels), (expected, expected_labels) in pairs:
            assert images.dtype == torch.float32 and torch.equal(images, expected)
            assert torch.equal(labels, expected_labels)
