"""Knowledge distillation: the term's formula, the teacher's view of the images, and runs with a teacher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_dataset, run_overrides, write_config
from tltool.cli import app
from tltool.config import load_config
from tltool.data import Preprocess
from tltool.distill import Teacher, distillation_loss
from tltool.models import TransferModel, make_head
from tltool.objective import StepOutputs, build_objective
from tltool.train import finetune


def test_distillation_loss_is_t_squared_kl_of_the_softened_predictions() -> None:
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    teacher = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    t = 2.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        p_s = [math.exp(v / t) / sum(math.exp(w / t) for w in s_row) for v in s_row]
        p_t = [math.exp(v / t) / sum(math.exp(w / t) for w in t_row) for v in t_row]
        expected += sum(q * math.log(q / p) for q, p in zip(p_t, p_s, strict=True))
    expected = t * t * expected / 2
    assert distillation_loss(student, teacher, t).item() == pytest.approx(expected, rel=1e-5)
    assert distillation_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-6)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    distillation_loss(student, teacher, t).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None  # the teacher learns nothing


class Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images)
        return torch.zeros(images.shape[0], 2)


def test_the_teacher_sees_the_images_as_its_own_preprocessing_gives_them() -> None:
    student = Preprocess(image_size=16, resize_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    own = Preprocess(image_size=8, resize_size=8, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    pixels = torch.rand(2, 3, 16, 16)
    recorder = Recorder()
    Teacher(recorder, own, student)((pixels - 0.5) / 0.25)
    resized = torch.nn.functional.interpolate(pixels, size=(8, 8), mode="bilinear", antialias=True)
    expected = (resized - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / 0.5
    torch.testing.assert_close(recorder.seen[0], expected, rtol=1e-5, atol=1e-5)
    same = Recorder()
    images = torch.randn(2, 3, 16, 16)
    Teacher(same, student, student)(images)
    assert same.seen[0] is images  # the same preprocessing: passed as it is


def test_the_distill_term_covers_the_unlabelled_images_too() -> None:
    cfg = load_config(None, ["data.train=.", "distill.teacher=t.pt", "distill.temperature=3", "distill.weight=0.5"])
    model = TransferModel(nn.Identity(), make_head(4, 2, 0.0))
    recorder = Recorder()
    objective = build_objective(cfg, model, ["a", "b"], [0, 1], torch.device("cpu"), teacher=recorder)
    assert objective.names == ["ce", "distill"]
    logits, extra = torch.randn(3, 2), torch.randn(5, 2)
    out = StepOutputs(logits, torch.tensor([0, 1, 0]), unlabeled_logits=extra,
                      images=torch.randn(3, 4), unlabeled_images=torch.randn(5, 4))  # fmt: skip
    _, values = objective(out)
    assert recorder.seen[0].shape[0] == 8  # labelled and unlabelled images
    expected = 0.5 * distillation_loss(torch.cat([logits, extra]), torch.zeros(8, 2), 3.0)
    torch.testing.assert_close(values[1], expected)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    finetune(load_config(None, run_overrides(run_dir, dataset, "train.epochs=1")), quiet=True)
    return run_dir / "checkpoints" / "best.pt"


def test_a_student_learns_from_a_teacher(tmp_path: Path, dataset: Path, teacher: Path) -> None:
    extra = (f"distill.teacher={teacher}", "model.backbone=mobilenet_v3_small", "train.epochs=1")
    summary = finetune(load_config(None, run_overrides(tmp_path / "s", dataset, *extra)), quiet=True)
    assert summary["loss_terms"] == ["ce", "distill"] and "distillation from" in summary["method"]
    assert summary["feature_cache"] is None  # (the teacher needs the images)
    record = json.loads((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["loss_terms"]["distill"] > 0


def test_a_teacher_of_other_classes_is_a_one_line_error(tmp_path: Path, teacher: Path, cli) -> None:
    other = make_dataset(tmp_path / "other", classes=2, per_class=6)
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", run_overrides(run_dir, other, f"distill.teacher={teacher}"))
    result = cli.invoke(app, ["finetune", str(config)])
    assert result.exit_code == 2 and "predicts other classes" in result.output, result.output
    assert "Traceback" not in result.output and not run_dir.exists()
    missing = write_config(tmp_path / "m.yaml", run_overrides(run_dir, other, "distill.teacher=/no/such.pt"))
    result = cli.invoke(app, ["finetune", str(missing)])
    assert result.exit_code == 2 and "does not exist" in result.output and not run_dir.exists(), result.output
