"""Knowledge distillation (Hinton, Vinyals, Dean 2015): a trained model teaches the one being trained.

`distill.teacher` names any tltool checkpoint with the same classes (a big fine-tuned model, the source
run of a smaller one). Each step the teacher, frozen and in eval mode, predicts the batch's images; the
`distill` term of the objective is T^2 KL(softmax(teacher / T) || softmax(student / T)), on the labelled
images and, with `adapt.unlabeled`, on the unlabelled ones too. The teacher sees the images as its own
preprocessing would give them: the student's normalization is undone, the pixels resized to the teacher's
input size when it differs, and the teacher's normalization applied.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tltool.data import Preprocess
from tltool.errors import CheckpointError
from tltool.trained import open_trained


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch (float32).

    The T^2 keeps the gradient's scale independent of T (Hinton et al.); the teacher gets no gradient.
    """
    teacher_log = F.log_softmax(teacher.detach().float() / temperature, dim=1)
    student_log = F.log_softmax(student.float() / temperature, dim=1)
    return temperature**2 * F.kl_div(student_log, teacher_log, reduction="batchmean", log_target=True)


class Teacher(nn.Module):
    """A trained model, frozen, fed images prepared for the student (see the module docstring)."""

    def __init__(self, model: nn.Module, own: Preprocess, student: Preprocess) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.size = own.image_size if own.image_size != student.image_size else None
        self.same = own.mean == student.mean and own.std == student.std and self.size is None
        for name, values in (("student_mean", student.mean), ("student_std", student.std),
                             ("own_mean", own.mean), ("own_std", own.std)):  # fmt: skip
            self.register_buffer(name, torch.tensor(values).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # (always in eval mode: its batch norm and dropout never move)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.same:
            pixels = images.float() * self.student_std + self.student_mean
            if self.size is not None:
                pixels = F.interpolate(pixels, size=(self.size, self.size), mode="bilinear", antialias=True)
            images = (pixels - self.own_mean) / self.own_std
        return self.model(images)


def open_teacher(path: str, class_names: list[str], student: Preprocess, device: torch.device) -> Teacher:
    """The teacher of `distill.teacher`, on `device`; one line when it is not a tltool checkpoint or its
    classes differ from the data's."""
    trained = open_trained(Path(path), device, calibrated=False)  # the KD temperature is distill's own
    if trained.class_names != list(class_names):
        shown = ", ".join(trained.class_names[:10]) + (" ..." if len(trained.class_names) > 10 else "")
        raise CheckpointError(
            f"distill.teacher {path} predicts other classes ({shown}) than the data has "
            f"({', '.join(class_names[:10])}{' ...' if len(class_names) > 10 else ''})",
            "distil from a checkpoint trained on the same classes, in the same order",
        )
    return Teacher(trained.model, trained.preprocess, student).to(device)
