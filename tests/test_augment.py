"""Augmentation policies, random erasing and MixUp / CutMix: seeded per draw or per batch, resumable, and the
soft-target loss against its formula."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

import tltool.session as session_module
from conftest import make_dataset, run_overrides, write_config
from tltool.checkpoint import load_checkpoint
from tltool.cli import app
from tltool.config import DataConfig, load_config
from tltool.data import ImageDataset, Preprocess, Stream, make_loader, scan_folder, set_loader_epoch, train_transform
from tltool.data.mixing import BatchMixer, make_mixer
from tltool.data.transforms import POLICIES
from tltool.features import _extract_views, cache_applies, cache_key, views_for
from tltool.objective import soft_cross_entropy
from tltool.runstate import EpochProgress
from tltool.session import build_session
from tltool.train import finetune, train_one_epoch

PRE = Preprocess(image_size=16, resize_size=16)


class Crash(Exception):
    pass


def picture(folder: Path, seed: int = 0, size: int = 24) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path = folder / f"picture_{seed}_{size}.png"
    Image.fromarray(pixels).save(path)
    return path


def draw(transform, path: Path, seed: int) -> torch.Tensor:
    """The draw of the image at a position whose seed is `seed`: ImageDataset's (index, seed) key."""
    return ImageDataset([(str(path), 0)], transform)[(0, seed)][0]


# --- policies ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_a_policy_is_seeded_per_draw_and_draws_only_from_torch(policy: str, tmp_path: Path) -> None:
    transform = train_transform(PRE, policy)
    assert any(isinstance(step, (T.RandAugment, T.TrivialAugmentWide, T.AugMix)) for step in transform.transforms)
    image = picture(tmp_path)
    random.seed(1)
    np.random.seed(1)
    first = draw(transform, image, seed=7)
    random.seed(2)  # Python's and numpy's generators do not matter: every draw is torch's, seeded by the key
    np.random.seed(2)
    assert torch.equal(first, draw(transform, image, seed=7))
    assert first.shape == (3, 16, 16)
    # Another position, another draw; and the policy acts on top of standard's crop and flip (same seeds, no
    # policy: the same crop, so what differs is the policy's operation; a draw may pick the identity).
    assert not torch.equal(first, draw(transform, image, seed=8))
    plain = T.Compose([step for step in transform.transforms if not isinstance(step, type(transform.transforms[2]))])
    changed = [not torch.equal(draw(transform, image, s), draw(plain, image, s)) for s in range(8)]
    assert sum(changed) >= 4, changed


def test_policies_follow_the_preprocess_interpolation_where_they_can(tmp_path: Path) -> None:
    assert train_transform(Preprocess(16, 16, interpolation="nearest"), "randaugment").transforms[2].interpolation == (
        InterpolationMode.NEAREST
    )
    # AugMix runs its geometric operations on tensors, where bicubic is refused: bilinear instead (and it runs).
    bicubic = train_transform(Preprocess(16, 16, interpolation="bicubic"), "augmix")
    assert bicubic.transforms[2].interpolation == InterpolationMode.BILINEAR
    assert draw(bicubic, picture(tmp_path), 3).shape == (3, 16, 16)


def _batches(root: Path, augment: str, workers: int, epoch: int, skip_batches: int = 0) -> list[torch.Tensor]:
    _, samples = scan_folder(root)
    loader = make_loader(samples, train_transform(PRE, augment, 0.5), 4, workers, seed=5, shuffle=True, seeded=True)
    set_loader_epoch(loader, 5, epoch, skip_batches=skip_batches)
    return [images for images, _ in loader]


@pytest.mark.slow
def test_policy_batches_are_the_same_with_0_or_2_workers_and_after_a_mid_epoch_resume(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", classes=2, per_class=4, size=20)
    for policy in POLICIES:
        in_process = _batches(root, policy, 0, epoch=1)
        assert len(in_process) == 2
        with_workers = _batches(root, policy, 2, epoch=1)
        assert all(torch.equal(a, b) for a, b in zip(in_process, with_workers, strict=True)), policy
        resumed = _batches(root, policy, 2, epoch=1, skip_batches=1)
        assert torch.equal(resumed[0], in_process[1]), policy
        assert not torch.equal(in_process[0], _batches(root, policy, 0, epoch=2)[0]), policy


def test_random_erasing_erases_one_box_to_zero_with_p_1_and_nothing_with_p_0(tmp_path: Path) -> None:
    image = picture(tmp_path, size=16)
    for augment in ("none", "trivialaugment"):
        plain = train_transform(PRE, augment)
        assert torch.equal(draw(train_transform(PRE, augment, 0.0), image, 4), draw(plain, image, 4))
        erased_any = 0
        for seed in range(6):
            before, after = draw(plain, image, seed), draw(train_transform(PRE, augment, 1.0), image, seed)
            changed = (before != after).any(dim=0)
            if not changed.any():
                continue
            erased_any += 1
            rows, cols = changed.any(dim=1).nonzero(), changed.any(dim=0).nonzero()
            box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
            # (after normalization: the box is 0, the dataset mean; the rest untouched)
            assert torch.all(after[:, box[0], box[1]] == 0)
            outside = torch.ones_like(changed)
            outside[box] = False
            assert torch.equal(after[:, outside], before[:, outside])
        assert erased_any >= 5, augment


def test_the_feature_cache_uses_the_policy_and_erasing_for_its_views(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", classes=2, per_class=2, size=16)
    _, samples = scan_folder(root)
    cfg = load_config(None, ["data.augment=none", "data.random_erasing=1.0", "train.feature_cache_views=2",
                             "data.num_workers=0", "data.batch_size=4"])  # fmt: skip
    # Erasing makes augment=none random: K views, a cache key of its own, and auto caches only with K > 1.
    assert views_for(cfg) == 2 and cache_applies(cfg)
    assert not cache_applies(load_config(None, ["data.augment=none", "data.random_erasing=0.5"]))
    assert cache_applies(load_config(None, ["data.augment=none"]))
    plain = load_config(None, ["data.augment=none", "train.feature_cache_views=2"])
    assert cache_key(cfg, "w", PRE, samples, "train") != cache_key(plain, "w", PRE, samples, "train")
    assert cache_key(cfg, "w", PRE, samples, "val") == cache_key(plain, "w", PRE, samples, "val")
    features, labels = _extract_views(nn.Flatten(), samples, train_transform(PRE, "none", 1.0), 2, cfg,
                                      torch.device("cpu"), "fp32")  # fmt: skip
    unerased = _extract_views(nn.Flatten(), samples, train_transform(PRE, "none"), 1, cfg, torch.device("cpu"), "fp32")
    assert features.shape[:2] == (2, 4) and labels.tolist() == [0, 0, 1, 1]
    assert not torch.equal(features[0], features[1])  # each view its own boxes
    assert ((features[0] == 0) & (unerased[0][0] != 0)).any()  # erased to zero


def test_a_policy_typo_is_one_line_listing_the_values(tmp_path: Path, dataset: Path, cli) -> None:
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "r", dataset, "data.augment=randaugmnet"))
    result = cli.invoke(app, ["finetune", str(config)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    line = next(line for line in result.output.splitlines() if "data.augment" in line)
    for value in ("none", "light", "standard", "randaugment", "trivialaugment", "augmix"):
        assert f"'{value}'" in line


# --- MixUp / CutMix ----------------------------------------------------------------------------------------


def batch(size: int = 8, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.rand(size, 3, 8, 8, generator=generator), torch.arange(size) % classes


def test_mixup_blends_images_and_targets_with_one_lambda() -> None:
    mixer = BatchMixer(DataConfig(mixup_alpha=0.4), 4, seed=0)
    images, labels = batch()
    mixed, targets, dominant = mixer(images, labels, epoch=0, index=0)
    assert targets.shape == (8, 4) and torch.allclose(targets.sum(dim=1), torch.ones(8))
    lam = float(targets[0, labels[0]])  # (neighbours have different labels: own share lambda, partner's 1 - lambda)
    assert 0 < lam < 1
    partner = labels.roll(1, 0)
    torch.testing.assert_close(targets, lam * F.one_hot(labels, 4) + (1 - lam) * F.one_hot(partner, 4))
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, 0))
    assert torch.equal(dominant, labels if lam >= 0.5 else partner)


def test_cutmix_pastes_a_box_and_labels_by_area() -> None:
    mixer = BatchMixer(DataConfig(cutmix_alpha=1.0), 4, seed=0)
    images, labels = batch()
    for index in range(6):
        mixed, targets, dominant = mixer(images, labels, epoch=0, index=index)
        pasted = (mixed != images).any(dim=1)[0]  # (random pixels: every pasted one differs)
        assert torch.equal(mixed[:, :, pasted], images.roll(1, 0)[:, :, pasted])
        assert torch.equal(mixed[:, :, ~pasted], images[:, :, ~pasted])
        area = pasted.float().mean()
        torch.testing.assert_close(targets[:, labels[0]][0], 1 - area)
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
        own = targets.gather(1, labels[:, None]).squeeze(1)
        assert torch.equal(dominant, torch.where(own >= 0.5, labels, labels.roll(1, 0)))


def test_mixing_is_seeded_per_batch_and_rank_and_leaves_the_main_rng_alone() -> None:
    cfg = DataConfig(mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.5)
    mixer = BatchMixer(cfg, 4, seed=2)
    images, labels = batch()
    torch.manual_seed(99)
    state = torch.get_rng_state()
    a = mixer(images, labels, epoch=1, index=3)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(5)  # the process's RNG does not matter
    b = BatchMixer(cfg, 4, seed=2)(images, labels, epoch=1, index=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    others = [mixer(images, labels, epoch=e, index=i, rank=r)[1] for e, i, r in ((2, 3, 0), (1, 4, 0), (1, 3, 1))]
    assert all(not torch.equal(a[1], t) for t in others)
    # mix_prob 0.5: some batches pass unmixed (one-hot targets, the images untouched), some are mixed; and both
    # kinds of mixing occur (v2.RandomChoice).
    kinds = set()
    for index in range(40):
        mixed, targets, _ = mixer(images, labels, epoch=0, index=index)
        if torch.equal(targets, F.one_hot(labels, 4).float()):
            assert torch.equal(mixed, images)
            kinds.add("none")
        elif ((mixed == images).all(dim=1) | (mixed == images.roll(1, 0)).all(dim=1)).all():
            kinds.add("cutmix")
        else:
            kinds.add("mixup")
    assert kinds == {"none", "cutmix", "mixup"}
    assert make_mixer(DataConfig(), 4, 0) is None and make_mixer(DataConfig(mixup_alpha=1, mix_prob=0), 4, 0) is None


def test_the_soft_target_loss_is_its_formula_and_composes_with_smoothing_and_class_weights() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, generator=generator)
    targets = torch.rand(5, 3, generator=generator)
    targets = targets / targets.sum(dim=1, keepdim=True)
    log_p = logits.log_softmax(dim=1)
    torch.testing.assert_close(soft_cross_entropy(logits, targets), -(targets * log_p).sum(dim=1).mean())
    smoothed = targets * 0.8 + 0.2 / 3
    torch.testing.assert_close(soft_cross_entropy(logits, targets, None, 0.2), -(smoothed * log_p).sum(dim=1).mean())
    # (torch's own probability-target form agrees where it applies: no class weights)
    torch.testing.assert_close(
        soft_cross_entropy(logits, targets, None, 0.2), F.cross_entropy(logits, targets, label_smoothing=0.2)
    )
    weight = torch.tensor([0.5, 2.0, 1.0])
    expected = -(smoothed * weight * log_p).sum() / (targets * weight).sum()
    torch.testing.assert_close(soft_cross_entropy(logits, targets, weight, 0.2), expected)
    # One-hot targets: exactly torch's hard-label loss, weights and smoothing included.
    labels = torch.tensor([0, 2, 1, 1, 0])
    one_hot = F.one_hot(labels, 3).float()
    for w in (None, weight):
        for eps in (0.0, 0.2):
            torch.testing.assert_close(soft_cross_entropy(logits, one_hot, w, eps),
                                       F.cross_entropy(logits, labels, weight=w, label_smoothing=eps))  # fmt: skip


def test_the_loop_mixes_the_batch_trains_on_soft_targets_and_counts_hits_on_the_dominant_label(
    tmp_path: Path, dataset: Path
) -> None:
    overrides = run_overrides(tmp_path / "r", dataset, "data.mixup_alpha=1.0", "data.cutmix_alpha=1.0",
                              "train.label_smoothing=0.1", "train.class_weights=balanced")  # fmt: skip
    session = build_session(load_config(None, overrides), quiet=True)
    session.start()
    assert not session.inputs.cached  # (augment none and a frozen backbone: the cache would apply but for mixing)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 3, (8,), generator=generator))
               for _ in range(3)]  # fmt: skip
    session.set_streams({"train": Stream("train", batches)})
    session.state.in_epoch = EpochProgress()
    seen, mixer = [], session.mixer

    def recording(images, labels, epoch, index, rank):
        out = mixer(images, labels, epoch, index, rank)
        seen.append(out)
        return out

    logits = []
    session.mixer = recording
    session.model.head.register_forward_hook(lambda module, args, out: logits.append(out.detach()))
    result = train_one_epoch(session)
    assert len(seen) == 3 and len(logits) == 3
    weight = session.objective.class_weight
    expected_loss = (
        sum(float(soft_cross_entropy(z, t, weight, 0.1)) for z, (_, t, _) in zip(logits, seen, strict=True)) / 3
    )
    assert result["train_loss"] == pytest.approx(expected_loss, rel=1e-5)
    hits = sum(int((z.argmax(dim=1) == d).sum()) for z, (_, _, d) in zip(logits, seen, strict=True))
    assert result["train_acc"] == pytest.approx(hits / 24)
    assert any(not torch.equal(d, b[1]) for (_, _, d), b in zip(seen, batches, strict=True))  # a partner dominated


def test_mixing_and_the_feature_cache(tmp_path: Path, dataset: Path, cli, capsys) -> None:
    # auto: off, with a note; on: a one-line error before anything is written.
    cfg = load_config(None, run_overrides(tmp_path / "r", dataset, "data.cutmix_alpha=1.0"))
    assert not cache_applies(cfg)
    finetune(cfg, dry_run=True)
    assert "cache      off (MixUp/CutMix mix the images)" in capsys.readouterr().out
    run_dir = tmp_path / "on"
    config = write_config(tmp_path / "c.yaml", run_overrides(run_dir, dataset, "data.mixup_alpha=0.2",
                                                             "train.feature_cache=on"))  # fmt: skip
    result = cli.invoke(app, ["finetune", str(config)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "train.feature_cache: on cannot serve data.mixup_alpha" in result.output
    assert not run_dir.exists()


@pytest.mark.slow
def test_a_mixed_run_resumes_bitwise_mid_epoch(tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = ("data.mixup_alpha=0.4", "data.cutmix_alpha=1.0", "data.mix_prob=0.7", "data.augment=trivialaugment",
             "model.head_dropout=0.3", "train.epochs=2", "checkpoint.every_n_steps=2",
             "model.backbone=mobilenet_v3_small")  # fmt: skip

    def run(name: str, resume: str | None = None) -> dict:
        return finetune(load_config(None, run_overrides(tmp_path / name, dataset, *extra)), resume=resume, quiet=True)

    run("straight")
    real_save = session_module.save_atomic

    def crash(payload, path):
        real_save(payload, path)
        if payload["epoch"] == 1 and (payload["epoch_progress"] or {}).get("batches_done") == 2:
            raise Crash()

    monkeypatch.setattr(session_module, "save_atomic", crash)
    with pytest.raises(Crash):
        run("resumed")
    monkeypatch.setattr(session_module, "save_atomic", real_save)
    torch.manual_seed(1234)
    run("resumed", resume="auto")
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for key, value in a.model.items():
        assert torch.equal(b.model[key], value), key
    lines = [[json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
             for n in ("straight", "resumed")]  # fmt: skip
    assert [r["train_loss"] for r in lines[0]] == [r["train_loss"] for r in lines[1]]
