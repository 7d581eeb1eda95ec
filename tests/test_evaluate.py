"""Evaluation: the one loop's per-sample outputs agree with its metrics, and a checkpoint opens for inference.

`evaluate()` is what training, `tltool eval`, `tltool report` and the export parity check run;
`open_trained()` is how the commands open a checkpoint, and `TrainedModel.samples()` the images they
evaluate it on (the run's val split, recomputed, or a `--data` folder).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_dataset, run_overrides
from tltool.checkpoint import load_checkpoint
from tltool.config import load_config
from tltool.data import Preprocess, eval_transform, make_loader, scan_data, scan_folder
from tltool.errors import CheckpointError, DataError
from tltool.evaluate import evaluate, run_eval
from tltool.train import finetune
from tltool.trained import TrainedModel, open_trained

CLASSES = 6  # more than 5, so top-5 is not trivially every image


def small_model(classes: int) -> nn.Module:
    """A seeded random classifier with dropout: a pass that forgets eval mode is not deterministic."""
    torch.manual_seed(0)
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(0.5), nn.Linear(48, classes))


def test_per_sample_outputs_agree_with_the_metrics(tmp_path: Path) -> None:
    _, samples = scan_folder(make_dataset(tmp_path / "images", classes=CLASSES, per_class=3, size=16))
    broken = tmp_path / "images" / "class_2" / "broken.png"
    broken.write_bytes(b"passes the scan, fails to decode")
    samples.insert(5, (str(broken), 2))
    labels = [label for _, label in samples]
    transform = eval_transform(Preprocess(image_size=16, resize_size=16))

    def loader(items: list[tuple[str, int]]) -> torch.utils.data.DataLoader:
        return make_loader(items, transform, batch_size=4, num_workers=0, seed=0, shuffle=False)

    model = small_model(CLASSES)
    cpu = torch.device("cpu")
    indexed = [(path, index) for index, (path, _) in enumerate(samples)]
    metrics = evaluate(model, loader(indexed), cpu, "fp32", CLASSES, per_sample=True, sample_labels=labels)
    outputs = metrics.pop("outputs")

    # The broken image is dropped from its batch; every other row names its own sample.
    kept = [i for i in range(len(samples)) if i != 5]
    assert outputs.indices.tolist() == kept
    assert outputs.labels.tolist() == [labels[i] for i in kept]
    assert outputs.logits.shape == (len(kept), CLASSES) and outputs.logits.dtype == torch.float32
    # The metrics are exactly what the per-sample outputs say.
    assert metrics["num_images"] == len(kept)
    assert torch.equal(outputs.predictions, outputs.logits.topk(1, dim=1).indices[:, 0])
    assert metrics["acc1"] == (outputs.predictions == outputs.labels).sum().item() / len(kept)
    top5 = outputs.logits.topk(5, dim=1).indices
    assert metrics["acc5"] == (top5 == outputs.labels[:, None]).any(dim=1).sum().item() / len(kept)
    assert 0 < metrics["acc5"] < 1  # six classes: top-5 misses some images, so the check means something
    confusion = torch.bincount(outputs.labels * CLASSES + outputs.predictions, minlength=CLASSES**2)
    assert metrics["confusion_matrix"] == confusion.view(CLASSES, CLASSES).tolist()
    expected_loss = F.cross_entropy(outputs.logits.double(), outputs.labels).item()
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert torch.allclose(outputs.probabilities().sum(dim=1), torch.ones(len(kept)))

    # Asking for the outputs changes no number, and a loader of labels gives what a loader of indices gives.
    assert evaluate(model, loader(indexed), cpu, "fp32", CLASSES, sample_labels=labels) == metrics
    labelled = evaluate(model, loader(samples), cpu, "fp32", CLASSES, per_sample=True)
    assert labelled.pop("outputs").indices is None
    assert labelled == metrics


def test_an_evaluation_set_with_no_readable_image_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"not a png")
    loader = make_loader([(str(tmp_path / "a.png"), 0)], eval_transform(Preprocess()), 4, 0, seed=0, shuffle=False)
    with pytest.raises(DataError, match="no image of the evaluation set could be read"):
        evaluate(small_model(2), loader, torch.device("cpu"), "fp32", 2, per_sample=True)


# --- opening a checkpoint --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    """A 1-epoch run on the shared 3-class dataset, with a seed other than the default."""
    root = tmp_path_factory.mktemp("evaluate_run")
    finetune(load_config(None, run_overrides(root / "run", dataset, "train.epochs=1", "run.seed=3")), quiet=True)
    return root / "run"


def test_open_trained_gives_the_model_and_what_it_was_trained_with(run_dir: Path, dataset: Path) -> None:
    path = run_dir / "checkpoints" / "best.pt"
    trained = open_trained(path, "cpu")
    checkpoint = load_checkpoint(path)
    assert not trained.model.training and trained.device == torch.device("cpu")
    assert {p.device.type for p in trained.model.parameters()} == {"cpu"}
    state = trained.model.state_dict()
    assert all(torch.equal(state[name], value) for name, value in checkpoint.model.items())
    assert trained.preprocess == Preprocess.from_dict(checkpoint.preprocess) and trained.preprocess.image_size == 32
    assert trained.class_names == ["class_0", "class_1", "class_2"] and trained.backbone == "resnet18"
    assert trained.data_config.train == str(dataset) and trained.seed == 3

    # The run's val split, recomputed, is the one the run validated on.
    samples, source = trained.samples()
    config = load_config(None, run_overrides(run_dir, dataset, "run.seed=3"))
    assert samples == scan_data(config.data, 3).val and source == f"val split of {dataset}"
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    metrics = run_eval(path, device_name="cpu")
    assert len(samples) == metrics["num_images"] == 6 and metrics["data"] == source
    assert metrics["acc1"] == pytest.approx(record["val_acc1"])
    assert metrics["loss"] == pytest.approx(record["val_loss"], rel=1e-5)


def test_data_folder_samples_carry_the_checkpoints_class_indices(run_dir: Path, dataset: Path, tmp_path: Path) -> None:
    trained = open_trained(run_dir / "checkpoints" / "best.pt")
    folder = tmp_path / "subset"
    for name in ("class_0", "class_2"):  # on its own this folder's classes would be 0 and 1
        shutil.copytree(dataset / name, folder / name)
    samples, source = trained.samples(str(folder))
    assert source == str(folder) and len(samples) == 24
    assert {Path(path).parent.name: label for path, label in samples} == {"class_0": 0, "class_2": 2}

    unknown = tmp_path / "unknown"
    shutil.copytree(dataset / "class_1", unknown / "class_9")
    with pytest.raises(DataError, match="has classes the model does not know: class_9"):
        trained.samples(str(unknown))
    unreadable = tmp_path / "unreadable" / "class_1"
    unreadable.mkdir(parents=True)
    (unreadable / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="no images to evaluate in"):
        trained.samples(str(unreadable.parent))
    assert trained.samples(str(unreadable.parent), allow_empty=True) == ([], str(unreadable.parent))


def test_a_changed_or_unrecorded_dataset_is_a_one_line_error(run_dir: Path, tmp_path: Path) -> None:
    trained = open_trained(run_dir / "checkpoints" / "best.pt")

    def recorded(config: dict) -> TrainedModel:
        return dataclasses.replace(trained, checkpoint=dataclasses.replace(trained.checkpoint, config=config))

    other = make_dataset(tmp_path / "other", classes=4, per_class=3)
    moved = {**trained.checkpoint.config, "data": {**trained.checkpoint.config["data"], "train": str(other)}}
    with pytest.raises(DataError, match="no longer has the checkpoint's classes"):
        recorded(moved).samples()
    with pytest.raises(CheckpointError, match="records no usable data config") as caught:
        recorded({}).samples()
    assert len(caught.value.message().splitlines()) == 1


def test_a_checkpoint_without_the_newer_keys_still_evaluates(run_dir: Path, tmp_path: Path) -> None:
    """A file written before `loss_terms` existed gives the same numbers as today's."""
    path = run_dir / "checkpoints" / "last.pt"
    raw = torch.load(path, map_location="cpu", weights_only=True)
    raw.pop("loss_terms", None)
    torch.save(raw, tmp_path / "old.pt")
    assert run_eval(tmp_path / "old.pt", device_name="cpu") | {"checkpoint": str(path)} == run_eval(
        path, device_name="cpu"
    )
