"""Calibration (issue #17 part 4): ECE, reliability bins, temperature scaling and where T is applied.

The mechanisms proven: the fitted T minimizes the NLL; the ECE is the by-hand formula; T travels in the
checkpoint and every consumer (eval, predict, ONNX, TorchScript, safetensors) divides the logits by it,
argmax unchanged; a checkpoint without T is untouched; `tltool calibrate` and `train.calibrate` lower val
NLL; bad input is one line, exit 2, the checkpoint untouched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import make_dataset, run_overrides, trained_checkpoint
from tltool.calibration import (
    ECE_BINS,
    MIN_TEMPERATURE,
    calibrate_logits,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
    save_temperature,
)
from tltool.checkpoint import load_checkpoint
from tltool.cli import app
from tltool.config import load_config
from tltool.data import eval_transform, load_image
from tltool.evaluate import format_report, run_eval
from tltool.export.spec import ExportSpec
from tltool.plots import figure_png, reliability_figure
from tltool.predict import run_predict
from tltool.train import finetune
from tltool.trained import open_trained


def overconfident_logits(n: int = 400, classes: int = 5, scale: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z), logits scale x z: a model `scale` times too sure of itself (T* near scale)."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(n, classes, generator=generator) * 1.5
    labels = torch.multinomial(z.softmax(dim=1), 1, generator=generator)[:, 0]
    return z * scale, labels


# --- the formulas ------------------------------------------------------------------------------------------


def test_fitted_temperature_minimizes_nll_of_overconfident_logits() -> None:
    logits, labels = overconfident_logits()
    t = fit_temperature(logits, labels)
    assert 2.0 < t < 8.0  # the logits are 4x too sharp
    at_t = nll(logits, labels, t)
    assert at_t < nll(logits, labels, 1.0)
    assert at_t < nll(logits, labels, t * 1.1)
    assert at_t < nll(logits, labels, t / 1.1)
    # and it is the minimum: the NLL's derivative in log T is zero there
    log_t = torch.tensor(t, dtype=torch.float64).log().requires_grad_()
    F.cross_entropy(logits.double() / log_t.exp(), labels).backward()
    assert abs(log_t.grad.item()) < 1e-4


def test_underconfident_logits_get_a_temperature_below_one_and_argmax_is_kept() -> None:
    logits, labels = overconfident_logits(scale=0.3)
    result = calibrate_logits(logits, labels)
    assert result.temperature < 1.0
    assert result.nll_after < result.nll_before
    assert torch.equal((logits / result.temperature).argmax(dim=1), logits.argmax(dim=1))
    assert result.warning is None


def test_a_perfectly_separated_set_is_flagged() -> None:
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [4.0, 1.0]])
    labels = torch.tensor([0, 1, 0])
    result = calibrate_logits(logits, labels)
    assert result.temperature < 0.2 and result.nll_after < result.nll_before
    assert result.warning is not None and "every calibration image right" in result.warning
    assert fit_temperature(logits * 1000, labels) >= MIN_TEMPERATURE


def test_ece_equals_the_by_hand_formula_with_few_bins() -> None:
    # Top-1 confidences 0.9 (right), 0.7 (wrong), 0.6 (right), 0.45 (right), 0.4 (wrong); 4 bins of width 0.25:
    # (0.25, 0.5]: {0.45 right, 0.4 wrong}, (0.5, 0.75]: {0.7 wrong, 0.6 right}, (0.75, 1]: {0.9 right}.
    probabilities = torch.tensor(
        [
            [0.9, 0.05, 0.05],
            [0.2, 0.7, 0.1],
            [0.6, 0.3, 0.1],
            [0.45, 0.3, 0.25],
            [0.3, 0.3, 0.4],
        ]
    )
    labels = torch.tensor([0, 0, 0, 0, 1])
    by_hand = (
        2 / 5 * abs((1 + 0) / 2 - (0.45 + 0.4) / 2) + 2 / 5 * abs((0 + 1) / 2 - (0.7 + 0.6) / 2) + 1 / 5 * abs(1 - 0.9)
    )
    assert expected_calibration_error(probabilities, labels, bins=4) == pytest.approx(by_hand, abs=1e-6)
    bins = reliability_bins(probabilities, labels, bins=4)
    assert [b.count for b in bins] == [0, 2, 2, 1]
    assert bins[1].accuracy == 0.5 and bins[1].confidence == pytest.approx(0.425)


def test_reliability_bins_sum_to_torchmetrics_ece() -> None:
    logits, labels = overconfident_logits()
    probabilities = logits.softmax(dim=1)
    bins = reliability_bins(probabilities, labels)
    assert len(bins) == ECE_BINS and sum(b.count for b in bins) == len(labels)
    from_bins = sum(b.count / len(labels) * abs(b.accuracy - b.confidence) for b in bins)
    assert from_bins == pytest.approx(expected_calibration_error(probabilities, labels), abs=1e-5)


def test_reliability_figure_draws_the_bins() -> None:
    pytest.importorskip("matplotlib")
    logits, labels = overconfident_logits()
    probabilities = logits.softmax(dim=1)
    bins = reliability_bins(probabilities, labels)
    figure = reliability_figure(bins, expected_calibration_error(probabilities, labels), 1.5)
    top, bottom = figure.axes[:2]
    assert [round(p.get_height(), 6) for p in bottom.patches] == [float(b.count) for b in bins]
    assert "ECE" in top.get_title() and "T = 1.5" in top.get_title()
    assert figure_png(figure).startswith(b"\x89PNG")


# --- T in the checkpoint, applied everywhere -----------------------------------------------------------


@pytest.fixture()
def calibrated(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """(a copy of the shared 1-epoch resnet18 best.pt, the same with T = 0.37 written in, T)."""
    source = trained_checkpoint("resnet18", tmp_path_factory)
    plain = tmp_path / "plain.pt"
    shutil.copyfile(source, plain)
    scaled = tmp_path / "scaled.pt"
    save_temperature(load_checkpoint(plain), 0.37, scaled)
    return plain, scaled, 0.37


def _images(checkpoint: Path) -> tuple[list[str], torch.Tensor]:
    """The run's images and their normalized pixels (the float input of the model and of a plain export)."""
    trained = open_trained(checkpoint)
    data = Path(trained.checkpoint.config["data"]["train"])
    files = sorted(str(p) for p in data.rglob("*.png"))[:6]
    transform = eval_transform(trained.preprocess)
    return files, torch.stack([transform(load_image(f)) for f in files])


def test_checkpoint_without_temperature_behaves_as_before(calibrated: tuple[Path, Path, float]) -> None:
    plain, _scaled, _t = calibrated
    assert load_checkpoint(plain).temperature is None
    trained = open_trained(plain)
    assert trained.model.temperature == 1.0
    _files, pixels = _images(plain)
    with torch.inference_mode():
        logits = trained.model(pixels)
        assert torch.equal(logits, trained.model.head(trained.model.backbone(pixels)))
    metrics = run_eval(plain, device_name="cpu")
    assert metrics["temperature"] is None and 0.0 <= metrics["ece"] <= 1.0
    assert f"expected calibration error {metrics['ece']:.4f} (15 bins; not calibrated)" in format_report(
        metrics, metrics["class_names"]
    )


def test_without_torchmetrics_eval_and_calibrate_work_and_name_the_extra(
    calibrated: tuple[Path, Path, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchmetrics is the optional `metrics` extra: without it eval, the report figure and calibrate still
    work, and the ECE is replaced by one line naming the pip command (never a traceback)."""
    import sys

    from tltool.calibration import ECE_NEEDS

    for name in [m for m in sys.modules if m == "torchmetrics" or m.startswith("torchmetrics.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # (import torchmetrics... raises ImportError)
    plain, _scaled, _t = calibrated
    assert expected_calibration_error(torch.tensor([[0.9, 0.1]]), torch.tensor([0])) is None
    metrics = run_eval(plain, device_name="cpu")
    assert metrics["ece"] is None and metrics["acc1"] >= 0.0
    assert f"{ECE_NEEDS} (not calibrated)" in format_report(metrics, metrics["class_names"])
    assert "pip install 'tltool[metrics]'" in ECE_NEEDS
    figure_png(reliability_figure(reliability_bins(torch.tensor([[0.9, 0.1]]), torch.tensor([0])), None))
    logits, labels = torch.tensor([[4.0, 0.0], [0.0, 3.0], [2.0, 0.0]]), torch.tensor([0, 1, 1])
    fitted = calibrate_logits(logits, labels)
    assert fitted.ece_before is None and ECE_NEEDS in fitted.line("best.pt")
    assert fitted.nll_after < fitted.nll_before


def test_eval_and_predict_apply_the_temperature(calibrated: tuple[Path, Path, float]) -> None:
    plain, scaled, t = calibrated
    files, pixels = _images(plain)
    raw_model = open_trained(scaled, calibrated=False).model
    assert raw_model.temperature == 1.0
    with torch.inference_mode():
        raw = raw_model(pixels)
    expected = (raw / t).softmax(dim=1)

    results = run_predict(scaled, files, topk=3, device="cpu", echo=lambda _line: None)
    for row, result in zip(expected, results, strict=True):
        assert [p.index for p in result.predictions] == row.argsort(descending=True).tolist()
        assert [p.probability for p in result.predictions] == pytest.approx(row.sort(descending=True).values.tolist())
    plain_results = run_predict(plain, files, topk=1, device="cpu", echo=lambda _line: None)
    assert [r.predictions[0].index for r in plain_results] == [r.predictions[0].index for r in results]
    assert [r.predictions[0].index for r in results] == raw.argmax(dim=1).tolist()

    before, after = run_eval(plain, device_name="cpu"), run_eval(scaled, device_name="cpu")
    assert after["temperature"] == t and after["acc1"] == before["acc1"]
    assert "logits / temperature 0.37)" in format_report(after, after["class_names"])
    assert after["confusion_matrix"] == before["confusion_matrix"]
    assert after["loss"] != pytest.approx(before["loss"])


def test_exports_apply_the_temperature(calibrated: tuple[Path, Path, float], tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")

    _plain, scaled, t = calibrated
    files, pixels = _images(scaled)
    with torch.inference_mode():
        raw = open_trained(scaled, calibrated=False).model(pixels)
    stem = tmp_path / "deploy" / "model"
    result = CliRunner().invoke(app, ["export", str(scaled), "-f", "all", "-o", str(stem)])
    assert result.exit_code == 0, result.output
    assert "calibrated temperature 0.37" in result.output

    onnx_path = stem.with_name("model.onnx")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {"images": pixels.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_logits), raw / t, rtol=1e-4, atol=1e-4)
    assert ExportSpec.from_metadata(json.loads(onnx_path.with_name("model.onnx.json").read_text())).temperature == t

    expected = (raw / t).softmax(dim=1)
    for suffix in (".onnx", ".torchscript.pt", ".safetensors", ".pt2"):
        answers = run_predict(stem.with_name("model" + suffix), files, topk=3, device="cpu", echo=lambda _l: None)
        for row, answer in zip(expected, answers, strict=True):
            assert [p.index for p in answer.predictions] == row.argsort(descending=True).tolist(), suffix
            got = [p.probability for p in answer.predictions]
            assert got == pytest.approx(row.sort(descending=True).values.tolist(), abs=1e-5), suffix


# --- tltool calibrate and train.calibrate --------------------------------------------------------------


def noisy_folder(root: Path) -> Path:
    """A calibration folder the model cannot get all right: a third of each class's images belong to the next."""
    make_dataset(root, classes=3, per_class=9, size=32, seed=5)
    for c in range(3):
        for i in range(3):
            (root / f"class_{c}" / f"{i:03d}.png").rename(root / f"class_{(c + 1) % 3}" / f"moved_{c}_{i}.png")
    return root


def test_calibrate_command_lowers_nll_and_keeps_argmax(
    calibrated: tuple[Path, Path, float], tmp_path: Path, cli: CliRunner
) -> None:
    plain, _scaled, _t = calibrated
    data = noisy_folder(tmp_path / "noisy")
    before = run_eval(plain, str(data), device_name="cpu")
    original = plain.read_bytes()
    out = tmp_path / "calibrated.pt"
    result = cli.invoke(
        app, ["calibrate", str(plain), "--data", str(data), "-o", str(out), "--device", "cpu", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["val_nll_after"] < report["val_nll_before"]
    assert report["val_nll_before"] == pytest.approx(before["loss"], rel=1e-5)
    assert report["images"] == 27 and report["warning"] is None
    assert plain.read_bytes() == original  # -o: the checkpoint itself untouched
    t = load_checkpoint(out).temperature
    assert t == report["temperature"]
    after = run_eval(out, str(data), device_name="cpu")
    assert after["loss"] == pytest.approx(report["val_nll_after"], rel=1e-5)  # eval applies the stored T
    assert after["confusion_matrix"] == before["confusion_matrix"]
    assert after["ece"] == pytest.approx(report["val_ece_after"], abs=1e-6)

    # In place, and again: refitted from the raw logits, "before" is the model as it was (with its T).
    again = cli.invoke(app, ["calibrate", str(out), "--data", str(data), "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert f"T was {t:.4g}" in again.output and load_checkpoint(out).temperature == pytest.approx(t, rel=1e-6)


def test_calibrate_bad_input_is_one_line_and_leaves_the_checkpoint(
    calibrated: tuple[Path, Path, float], tmp_path: Path, cli: CliRunner
) -> None:
    plain, _scaled, _t = calibrated
    original = plain.read_bytes()
    empty = tmp_path / "empty"
    (empty / "class_0").mkdir(parents=True)
    (empty / "class_0" / "notes.txt").write_text("no image here")
    result = cli.invoke(app, ["calibrate", str(plain), "--data", str(empty), "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert plain.read_bytes() == original

    nothing = tmp_path / "nothing"
    nothing.mkdir()
    result = cli.invoke(app, ["calibrate", str(plain), "--data", str(nothing), "-o", str(tmp_path / "o.pt")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.pt").exists()

    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    result = cli.invoke(app, ["calibrate", str(plain), "-o", str(notes), "--device", "cpu"])
    assert result.exit_code == 2 and "exists and is not a checkpoint" in result.output
    assert notes.read_text() == "keep me"

    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    foreign_bytes = foreign.read_bytes()
    result = cli.invoke(app, ["calibrate", str(foreign), "--device", "cpu"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "not a valid tltool checkpoint" in result.output
    assert foreign.read_bytes() == foreign_bytes


def test_train_calibrate_fits_t_on_the_val_split_at_the_end(tmp_path: Path, one_thread: None) -> None:
    train = make_dataset(tmp_path / "train", classes=3, per_class=6, size=32, seed=1)
    val = noisy_folder(tmp_path / "val")
    overrides = run_overrides(tmp_path / "run", train, "train.epochs=1", "train.calibrate=true", val=val)
    summary = finetune(load_config(None, overrides), quiet=True)
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    entries = written["calibration"]
    assert summary["calibration"] == entries and set(entries) == {"last.pt", "best.pt"}
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last.temperature == entries["last.pt"]["temperature"]
    assert entries["last.pt"]["images"] == 27
    assert entries["last.pt"]["val_nll_after"] < entries["last.pt"]["val_nll_before"]
    # The same T as fitting the checkpoint's raw val logits directly (what tltool calibrate does).
    raw = open_trained(tmp_path / "run" / "checkpoints" / "last.pt", calibrated=False)
    assert raw.model.temperature == 1.0
    refit = CliRunner().invoke(
        app, ["calibrate", str(tmp_path / "run" / "checkpoints" / "last.pt"), "-o", str(tmp_path / "r.pt"), "--json"]
    )
    assert refit.exit_code == 0, refit.output
    assert json.loads(refit.stdout)["temperature"] == pytest.approx(last.temperature, rel=1e-6)
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best.temperature == entries["best.pt"]["temperature"]
