"""Multi-label classification (`data.task: multilabel`): data, loss, metrics, thresholds, eval, resume, errors.

The dataset has two independent attributes per image, a colour (red | green) and a texture (striped | plain),
as a label file with two labels per row; a frozen backbone (random weights) and its feature cache learn both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tltool.session as session_module
from conftest import run_overrides
from tltool.checkpoint import load_checkpoint
from tltool.cli import app
from tltool.config import load_config
from tltool.data import scan_data, stratified_split
from tltool.errors import ConfigError
from tltool.multilabel import choose_thresholds
from tltool.multilabel import metrics as multilabel_metrics
from tltool.objective import build_objective, multilabel_bce, pos_weight_tensor
from tltool.train import finetune

COLOURS = {"red": (210, 50, 50), "green": (50, 190, 50)}


def make_multilabel(root: Path, per: int = 8, size: int = 24, seed: int = 0, delimiter: str = "|") -> Path:
    """root/labels.csv: `per` images of each (colour, texture) pair, labelled `colour|texture`."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows, i = ["path,label"], 0
    for colour, rgb in COLOURS.items():
        for texture in ("striped", "plain"):
            for _ in range(per):
                pixels = np.array(rgb, dtype=np.float64) + rng.normal(0, 20, (size, size, 3))
                if texture == "striped":
                    pixels[::4] = 20
                    pixels[1::4] = 20
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / "img" / f"{i:03d}.png")
                rows.append(f"img/{i:03d}.png,{colour}{delimiter}{texture}")
                i += 1
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


@pytest.fixture(scope="module")
def labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_multilabel(tmp_path_factory.mktemp("multilabel"))


def overrides(run_dir: Path, train: Path, *extra: str) -> list[str]:
    return run_overrides(run_dir, train, "data.task=multilabel", "checkpoint.monitor=val_map", *extra)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- data ------------------------------------------------------------------------------------------------


def test_label_file_gives_multi_hot_targets_and_a_split_by_label_set(labels: Path, tmp_path: Path) -> None:
    cfg = load_config(None, overrides(tmp_path / "r", labels))
    split = scan_data(cfg.data, cfg.run.seed)
    assert split.class_names == ["green", "plain", "red", "striped"]  # sorted names, each image has 2
    for path, target in split.train + split.val:
        assert isinstance(target, tuple) and sum(target) == 2.0
        row = int(Path(path).stem)
        colour = "red" if row < 16 else "green"
        texture = "striped" if row % 16 < 8 else "plain"
        assert [split.class_names[i] for i, v in enumerate(target) if v] == sorted([colour, texture])
    # 20% of each label set held out: 2 of each of the 4 (colour, texture) sets of 8
    sets = [target for _, target in split.val]
    assert len(sets) == 8 and all(sets.count(s) == 2 for s in set(sets))
    # data.classes reorders the multi-hot targets
    cfg = load_config(None, overrides(tmp_path / "r", labels, "data.classes=[red,green,striped,plain]"))
    reordered = scan_data(cfg.data, cfg.run.seed)
    first = dict(split.train + split.val)
    for path, target in reordered.train:
        names = {reordered.class_names[i] for i, v in enumerate(target) if v}
        assert names == {split.class_names[i] for i, v in enumerate(first[path]) if v}
    # an image whose label set is unique stays in train
    train, val = stratified_split([("a", (1.0, 0.0)), ("b", (0.0, 1.0)), ("c", (0.0, 1.0))], 0.5, 0)
    assert ("a", (1.0, 0.0)) in train and len(val) == 1


def test_delimiter_is_configurable_and_duplicates_count_once(tmp_path: Path) -> None:
    csv = make_multilabel(tmp_path / "d", per=3, delimiter=";")
    text = csv.read_text().replace("red;striped", "red;;striped;red")
    csv.write_text(text)
    cfg = load_config(None, overrides(tmp_path / "r", csv, "data.label_delimiter=;"))
    split = scan_data(cfg.data, cfg.run.seed)
    assert split.class_names == ["green", "plain", "red", "striped"]
    assert all(sum(target) == 2.0 for _, target in split.train + split.val)


# --- loss, metrics, thresholds: formulas on fixed numbers --------------------------------------------------


def test_bce_term_equals_its_formula() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 1.5, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    weight = torch.tensor([1.0, 2.0, 3.0])

    def by_hand(w: torch.Tensor) -> float:
        total = 0.0
        for n in range(2):
            for c in range(3):
                p = 1 / (1 + math.exp(-logits[n, c].item()))
                t = targets[n, c].item()
                total += -(w[c].item() * t * math.log(p) + (1 - t) * math.log(1 - p))
        return total / 6

    assert multilabel_bce(logits, targets).item() == pytest.approx(by_hand(torch.ones(3)), rel=1e-6)
    assert multilabel_bce(logits, targets, weight).item() == pytest.approx(by_hand(weight), rel=1e-6)
    # balanced: negatives / positives per class over the training images
    train = [(1.0, 0.0), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0)]
    assert pos_weight_tensor("balanced", ["a", "b"], train).tolist() == pytest.approx([1 / 3, 3.0])


def test_objective_of_a_multilabel_run_is_the_bce_term(labels: Path, tmp_path: Path) -> None:
    from tltool.models import build_model
    from tltool.objective import StepOutputs

    cfg = load_config(None, overrides(tmp_path / "r", labels, "train.class_weights=[1,2,3,4]"))
    model = build_model(cfg.model, cfg.data, 4).model
    objective = build_objective(cfg, model, ["a", "b", "c", "d"], [], torch.device("cpu"))
    assert objective.names == ["bce"]
    logits, targets = torch.randn(3, 4), torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1]])
    total, _ = objective(StepOutputs(logits, targets))
    assert total.item() == pytest.approx(multilabel_bce(logits, targets, torch.tensor([1.0, 2, 3, 4])).item())


def average_precision(scores: list[float], positives: list[int]) -> float:
    """AP by hand: rank by score (descending), average the precision at the rank of each positive."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, total = 0, 0.0
    for rank, i in enumerate(order, start=1):
        if positives[i]:
            hits += 1
            total += hits / rank
    return total / sum(positives)


def test_map_and_f1_equal_their_formulas_on_fixed_scores() -> None:
    probabilities = torch.tensor(
        [[0.9, 0.2, 0.6], [0.8, 0.7, 0.1], [0.3, 0.6, 0.4], [0.4, 0.1, 0.3], [0.7, 0.55, 0.2]], dtype=torch.float32
    )
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.float32)
    logits = torch.logit(probabilities.double()).float()
    out = multilabel_metrics(logits, targets)
    aps = [average_precision(probabilities[:, c].tolist(), targets[:, c].int().tolist()) for c in range(3)]
    assert out["per_class_ap"] == pytest.approx(aps, abs=1e-6)
    assert out["map"] == pytest.approx(sum(aps) / 3, abs=1e-6)
    hard = probabilities >= 0.5
    truth = targets.bool()
    tp = (hard & truth).sum(0).double()
    fp = (hard & ~truth).sum(0).double()
    fn = (~hard & truth).sum(0).double()
    f1 = 2 * tp / (2 * tp + fp + fn)
    assert out["per_class_f1"] == pytest.approx(f1.tolist(), abs=1e-6)
    assert out["f1_macro"] == pytest.approx(f1.mean().item(), abs=1e-6)
    assert out["f1_micro"] == pytest.approx((2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum())).item(), abs=1e-6)
    assert out["exact_match"] == pytest.approx((hard == truth).all(1).double().mean().item())
    # a class without positives has no AP and is left out of the mean
    targets[:, 2] = 0
    out = multilabel_metrics(logits, targets)
    assert out["per_class_ap"][2] is None and out["map"] == pytest.approx(sum(aps[:2]) / 2, abs=1e-6)


def test_chosen_thresholds_maximize_f1() -> None:
    probabilities = torch.tensor([[0.9, 0.3], [0.35, 0.8], [0.6, 0.2], [0.3, 0.25], [0.1, 0.7]])
    targets = torch.tensor([[1, 0], [1, 1], [0, 0], [1, 0], [0, 0]], dtype=torch.float32)
    chosen = choose_thresholds(probabilities, targets)

    def f1(c: int, t: float) -> float:
        hard, truth = probabilities[:, c] >= t, targets[:, c].bool()
        tp, fp, fn = (hard & truth).sum().item(), (hard & ~truth).sum().item(), (~hard & truth).sum().item()
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0

    for c in range(2):
        best = max(f1(c, t) for t in probabilities[:, c].tolist())
        assert f1(c, chosen[c]) == pytest.approx(best)
    # class 0: p >= 0.3 takes all three positives and one negative (F1 6/7); class 1: p >= 0.8, its one positive (F1 1)
    assert chosen == pytest.approx([0.3, 0.8])
    # no positive: 0.5
    assert choose_thresholds(probabilities, torch.zeros(5, 2)) == [0.5, 0.5]


# --- end to end --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(labels: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multilabel run: 3 epochs, frozen backbone (the feature cache), monitored by val_map."""
    out = tmp_path_factory.mktemp("mlrun") / "run"
    finetune(load_config(None, overrides(out, labels, "train.epochs=3")))
    return out


def test_trains_both_attributes_and_eval_reports_per_class_ap(labels: Path, run_dir: Path, tmp_path: Path, cli) -> None:
    rows = records(run_dir)
    assert rows[-1]["loss_terms"].keys() == {"bce"}
    for key in ("val_map", "val_f1_micro", "val_f1_macro"):
        assert 0.0 <= rows[-1][key] <= 1.0
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert checkpoint.best_metric == max(r["val_map"] for r in rows)  # checkpoint.monitor=val_map
    assert json.loads((run_dir / "summary.json").read_text())["monitor"] == "val_map"

    result = cli.invoke(app, ["eval", str(run_dir / "checkpoints" / "last.pt"), "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    assert "mAP" in result.output and "chosen on this val split" in result.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["multilabel"] and [row["class"] for row in metrics["per_class"]] == checkpoint.class_names
    for row in metrics["per_class"]:  # base rate of every label: 0.5
        assert row["ap"] > 0.8, row
    assert metrics["map"] == pytest.approx(sum(r["ap"] for r in metrics["per_class"]) / 4)
    # at 0.5 on the val split, eval gives the last epoch's record (acc1: exact match, acc5: per-label accuracy)
    result = cli.invoke(app, ["eval", str(run_dir / "checkpoints" / "last.pt"), "--threshold", "0.5",
                              "--json", str(tmp_path / "h.json")])  # fmt: skip
    at_half = json.loads((tmp_path / "h.json").read_text())
    assert at_half["acc1"] == pytest.approx(at_half["exact_match"])
    assert at_half["acc1"] == pytest.approx(rows[-1]["val_acc1"])
    assert at_half["acc5"] == pytest.approx(at_half["label_accuracy"])
    assert at_half["acc5"] == pytest.approx(rows[-1]["val_acc5"])
    assert at_half["map"] == pytest.approx(rows[-1]["val_map"], abs=1e-6)
    assert at_half["f1_micro"] == pytest.approx(rows[-1]["val_f1_micro"], abs=1e-6)
    # a given threshold, on another label file
    result = cli.invoke(app, ["eval", str(run_dir / "checkpoints" / "last.pt"), "--data", str(labels),
                              "--threshold", "0.5", "--json", str(tmp_path / "t.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "t.json").read_text())
    assert metrics["num_images"] == 32 and metrics["thresholds"] == [0.5] * 4


@pytest.mark.slow
def test_two_processes_give_the_one_process_metrics(labels: Path, tmp_path: Path) -> None:
    """torchrun (--nproc 2, batch 4 each, the feature cache) against one process at batch 8: the same steps, so
    the same losses, and mAP / F1 over the val images gathered from both ranks equal the single process's."""
    import os
    import subprocess
    import sys

    from conftest import write_config

    finetune(load_config(None, overrides(tmp_path / "one", labels, "data.batch_size=8")), quiet=True)
    config = write_config(tmp_path / "ddp.yaml", overrides(tmp_path / "two", labels, "data.batch_size=4"))
    command = [sys.executable, "-m", "tltool", "finetune", str(config), "--nproc", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env={**os.environ,
                            "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    for key in ("train_loss", "val_loss", "val_map", "val_f1_micro", "val_f1_macro", "val_acc1", "val_acc5"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-6), key
    # The thresholds kept at the end are chosen on the val logits gathered from both ranks: the same as one's.
    for name in ("last.pt", "best.pt"):
        kept = [load_checkpoint(tmp_path / run / "checkpoints" / name).thresholds for run in ("one", "two")]
        assert kept[0] is not None and kept[1] == pytest.approx(kept[0], abs=1e-5), name


def test_mid_epoch_resume_is_bitwise(labels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = ("train.epochs=2", "checkpoint.every_n_steps=1", "model.head_dropout=0.3", "train.class_weights=balanced")
    finetune(load_config(None, overrides(tmp_path / "straight", labels, *extra)))
    real_save = session_module.save_atomic
    saves = {"n": 0}

    class Crash(Exception):
        pass

    def crash(payload, path):
        real_save(payload, path)
        saves["n"] += 1
        if saves["n"] == 4:  # inside epoch 2 (3 steps an epoch)
            raise Crash()

    monkeypatch.setattr(session_module, "save_atomic", crash)
    with pytest.raises(Crash):
        finetune(load_config(None, overrides(tmp_path / "resumed", labels, *extra)))
    monkeypatch.setattr(session_module, "save_atomic", real_save)
    torch.manual_seed(999)
    finetune(load_config(None, overrides(tmp_path / "resumed", labels, *extra)), resume="auto")
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt").model
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt").model
    for key in a:
        assert torch.equal(a[key], b[key]), key
    straight, resumed = records(tmp_path / "straight"), records(tmp_path / "resumed")
    assert [r["val_map"] for r in straight] == [r["val_map"] for r in resumed]


def test_epoch_line_summary_and_tensorboard_show_map(run_dir: Path) -> None:
    from tltool.runlog import epoch_line, log_tensorboard

    record = records(run_dir)[-1]
    assert f"mAP {record['val_map']:.4f}" in epoch_line(record, 3, False)

    class Writer:
        tags: dict = {}

        def add_scalar(self, tag, value, step):
            self.tags[tag] = value

        def flush(self):
            pass

    writer = Writer()
    log_tensorboard(writer, record)
    assert writer.tags["multilabel/val_map"] == record["val_map"]
    assert writer.tags["multilabel/val_f1_macro"] == record["val_f1_macro"]


def predicted(output: str) -> dict[str, set[str]]:
    """file -> the labels of `tltool predict`'s table."""
    rows = [line.split() for line in output.splitlines()[1:] if line.strip()]
    return {row[0]: {cell for cell in row[1::2] if cell != "-"} for row in rows}


def test_predict_prints_labels_above_threshold_from_checkpoint_and_export(
    labels: Path, run_dir: Path, tmp_path: Path, cli
) -> None:
    from tltool.data import eval_transform, load_image
    from tltool.evaluate import val_thresholds
    from tltool.trained import open_trained

    checkpoint = run_dir / "checkpoints" / "last.pt"
    trained = open_trained(checkpoint)
    files = [str(labels.parent / "img" / f"{i:03d}.png") for i in (0, 9, 17, 30)]
    images = torch.stack([eval_transform(trained.preprocess)(load_image(f)) for f in files])
    with torch.inference_mode():
        probabilities = trained.model(images).sigmoid()
    chosen = torch.tensor(val_thresholds(trained))

    def expected(thresholds: torch.Tensor) -> dict[str, set[str]]:
        return {f: {trained.class_names[c] for c in range(4) if probabilities[i, c] >= thresholds[c]}
                for i, f in enumerate(files)}  # fmt: skip

    result = cli.invoke(app, ["predict", str(checkpoint), *files])
    assert result.exit_code == 0, result.output
    assert predicted(result.stdout) == expected(chosen)
    assert "label-1" in result.stdout
    for threshold in (0.3, 0.5, 0.99):
        result = cli.invoke(app, ["predict", str(checkpoint), *files, "--threshold", str(threshold)])
        assert predicted(result.stdout) == expected(torch.full((4,), threshold)), threshold
    # the probabilities printed are the sigmoids
    result = cli.invoke(app, ["predict", str(checkpoint), files[0], "--threshold", "0", "--json"])
    answers = json.loads(result.stdout)[0]["predictions"]
    assert {a["label"]: a["probability"] for a in answers} == pytest.approx(
        {name: probabilities[0, c].item() for c, name in enumerate(trained.class_names)}, abs=1e-6
    )
    # an export carries the task and the val-chosen thresholds, and predicts the same labels
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    result = cli.invoke(app, ["export", str(checkpoint), "-f", "onnx", "-o", str(out)])
    assert result.exit_code == 0, result.output
    metadata = json.loads(out.with_name("m.onnx.json").read_text())
    assert metadata["task"] == "multilabel" and metadata["thresholds"] == pytest.approx(chosen.tolist())
    result = cli.invoke(app, ["predict", str(out), *files])
    assert result.exit_code == 0, result.output
    assert predicted(result.stdout) == expected(chosen)
    assert one_line(
        cli.invoke(app, ["export", str(checkpoint), "-f", "onnx", "--softmax", "-o", str(tmp_path / "s.onnx")])
    )


def test_report_shows_per_class_ap_and_calibrate_refuses(run_dir: Path, tmp_path: Path, cli) -> None:
    pytest.importorskip("matplotlib")
    checkpoint = run_dir / "checkpoints" / ("best.pt" if (run_dir / "checkpoints" / "best.pt").exists() else "last.pt")
    result = cli.invoke(app, ["eval", str(checkpoint), "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "e.json").read_text())["per_class"]
    result = cli.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    page = (run_dir / "report" / "report.html").read_text()
    assert "mAP (macro)" in page and "chosen on this val split" in page
    for row in rows:  # the same per-class AP and threshold as tltool eval's
        assert f"<td>{row['class']}</td><td>{row['ap']:.4g}</td>" in page
        assert f"<td>{row['threshold']:.4f}</td>" in page
    assert sorted(p.name for p in (run_dir / "report").iterdir()) == ["curves.png", "report.html"]
    assert "multilabel" in one_line(cli.invoke(app, ["calibrate", str(checkpoint)]))


def test_baseline_fits_a_one_vs_rest_probe_chosen_by_held_out_map(labels: Path, tmp_path: Path, cli) -> None:
    from tltool.baseline import fit_logistic, holdout_split

    (tmp_path / "c.yaml").write_text("{}\n")
    items = overrides(tmp_path / "b", labels)
    result = cli.invoke(app, ["baseline", str(tmp_path / "c.yaml"), *items, "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert "val mAP" in result.output and "one-vs-rest" in result.output
    out = json.loads((tmp_path / "b.json").read_text())
    probe = out["linear_probe"]
    assert out["knn"] is None and out["nearest_class_mean"] is None
    assert probe["val_map"] > 0.8 and all("holdout_map" in row for row in probe["grid"])
    # the held-out fold is drawn per label set
    targets = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5 + [[1.0, 1.0]])
    fit, held = holdout_split(targets, 0.2, 0)
    assert sorted(tuple(r) for r in targets[held].tolist()) == [(0.0, 1.0), (1.0, 0.0)]
    # the fit minimizes mean BCE + l2/2 |W|^2: its gradient vanishes at the solution
    x = torch.randn(11, 3, generator=torch.Generator().manual_seed(0))
    weight, bias = fit_logistic(x, targets, 2, 0.1)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    loss = multilabel_bce(x @ weight + bias, targets) + 0.05 * weight.pow(2).sum()
    loss.backward()
    assert weight.grad.abs().max() < 1e-4 and bias.grad.abs().max() < 1e-4


def test_threshold_on_a_multiclass_model_is_one_line(tmp_path_factory: pytest.TempPathFactory, dataset: Path, cli):
    from conftest import trained_checkpoint

    checkpoint = str(trained_checkpoint("resnet18", tmp_path_factory))
    image = str(next(dataset.rglob("*.png")))
    assert "multiclass" in one_line(cli.invoke(app, ["predict", checkpoint, image, "--threshold", "0.5"]))
    assert "multiclass" in one_line(cli.invoke(app, ["eval", checkpoint, "--threshold", "0.5"]))


# --- bad input: one line, exit 2 ---------------------------------------------------------------------------


def finetune_cli(cli, tmp_path: Path, items: list[str]):
    (tmp_path / "c.yaml").write_text("{}\n")
    return cli.invoke(app, ["finetune", str(tmp_path / "c.yaml"), *items])


def one_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def config_problem(result) -> str:
    """A config error: exit 2, no traceback, the config's one problem on its own line (config.py's format)."""
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "has 1 problem" in lines[0] and len(lines) == 2, result.output
    return lines[1]


def test_empty_label_is_one_line(tmp_path: Path, cli) -> None:
    csv = make_multilabel(tmp_path / "d", per=3)
    csv.write_text(csv.read_text().replace("img/001.png,red|striped", "img/001.png,|"))
    line = one_line(finetune_cli(cli, tmp_path, overrides(tmp_path / "r", csv)))
    assert "empty label (line 3)" in line and "at least one class name" in line
    assert not (tmp_path / "r").exists()


def test_folder_dataset_is_one_line(tmp_path: Path, cli, dataset: Path) -> None:
    line = one_line(finetune_cli(cli, tmp_path, overrides(tmp_path / "r", dataset)))
    assert "multilabel needs a label file" in line and ".csv" in line


@pytest.mark.parametrize(
    ("key", "named"),
    [
        ("train.label_smoothing=0.1", "train.label_smoothing"),
        ("data.mixup_alpha=0.2", "data.mixup_alpha"),
        ("train.calibrate=true", "train.calibrate"),
        ("data.sampler=balanced", "data.sampler=balanced"),
    ],
)
def test_incompatible_keys_are_one_line(tmp_path: Path, cli, labels: Path, key: str, named: str) -> None:
    line = config_problem(finetune_cli(cli, tmp_path, overrides(tmp_path / "r", labels, key)))
    assert named in line and "multilabel" in line


def test_val_map_needs_multilabel_and_missing_torchmetrics_names_pip(
    tmp_path: Path, cli, dataset: Path, labels: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = run_overrides(tmp_path / "r", dataset, "checkpoint.monitor=val_map")
    assert "needs data.task: multilabel" in config_problem(finetune_cli(cli, tmp_path, items))
    monkeypatch.setitem(__import__("sys").modules, "torchmetrics", None)
    monkeypatch.setitem(__import__("sys").modules, "torchmetrics.functional", None)
    with pytest.raises(ConfigError, match=r"pip install 'tltool\[metrics\]'"):
        choose_thresholds(torch.ones(2, 2), torch.ones(2, 2))
    line = one_line(finetune_cli(cli, tmp_path, overrides(tmp_path / "r2", labels)))
    assert "needs torchmetrics" in line and "pip install" in line


def test_ema_of_a_multilabel_run_reports_and_monitors_val_map_ema(labels: Path, tmp_path: Path, cli) -> None:
    """train.ema_decay on a multilabel run: val_map_ema (and the F1s) every epoch, the EMA weights' mAP; with
    checkpoint.monitor=val_map_ema best.pt is the epoch of the best val_map_ema and holds the EMA weights."""
    out = tmp_path / "run"
    items = overrides(out, labels, "train.epochs=2", "train.ema_decay=0.5", "checkpoint.monitor=val_map_ema")
    finetune(load_config(None, items))
    rows = records(out)
    for row in rows:
        for key in ("val_map_ema", "val_f1_micro_ema", "val_f1_macro_ema"):
            assert 0.0 <= row[key] <= 1.0, (key, row)
    checkpoint = load_checkpoint(out / "checkpoints" / "best.pt")
    assert checkpoint.weights == "ema"
    assert checkpoint.best_metric == max(r["val_map_ema"] for r in rows)
    # val_map_ema is the mAP of the EMA weights: eval of best.pt (which holds them) at 0.5 gives that epoch's
    best = max(rows, key=lambda r: r["val_map_ema"])
    result = cli.invoke(app, ["eval", str(out / "checkpoints" / "best.pt"), "--threshold", "0.5",
                              "--json", str(tmp_path / "m.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m.json").read_text())["map"] == pytest.approx(best["val_map_ema"], abs=1e-6)


def test_val_map_ema_needs_multilabel_and_ema(tmp_path: Path, cli, dataset: Path, labels: Path) -> None:
    items = run_overrides(tmp_path / "r", dataset, "checkpoint.monitor=val_map_ema", "train.ema_decay=0.9")
    assert "val_map_ema needs data.task: multilabel" in config_problem(finetune_cli(cli, tmp_path, items))
    items = overrides(tmp_path / "r2", labels, "checkpoint.monitor=val_map_ema")
    assert "needs train.ema_decay" in config_problem(finetune_cli(cli, tmp_path, items))


def test_the_run_keeps_its_val_chosen_thresholds_in_its_checkpoints(tmp_path: Path, cli) -> None:
    """At the end of a multilabel run each checkpoint holds the per-class thresholds chosen on the val split for
    its weights (what val_thresholds computes from the images), so eval --data, predict and export decide the
    same way once the run's data is gone; a checkpoint without them (mid-run, older) still chooses them."""
    import dataclasses
    import shutil

    from tltool.evaluate import val_thresholds
    from tltool.trained import open_trained

    data = make_multilabel(tmp_path / "data", per=6, size=16, seed=3)
    run_dir = tmp_path / "run"
    summary = finetune(load_config(None, overrides(run_dir, data, "train.epochs=2")), quiet=True)
    assert set(summary["thresholds"]) == {"last.pt", "best.pt"}
    for name in ("last.pt", "best.pt"):
        trained = open_trained(run_dir / "checkpoints" / name)
        stored = trained.checkpoint.thresholds
        assert stored is not None and len(stored) == 4 and summary["thresholds"][name]["thresholds"] == stored
        unkept = dataclasses.replace(trained.checkpoint, thresholds=None)
        fresh = val_thresholds(dataclasses.replace(trained, checkpoint=unkept))
        assert stored == pytest.approx(fresh, abs=1e-6)
        assert val_thresholds(trained) == stored
    keep = tmp_path / "keep"
    keep.mkdir()
    files = [str(shutil.copy(data.parent / "img" / f"{i:03d}.png", keep)) for i in (0, 7, 13, 20)]
    before = cli.invoke(app, ["predict", str(run_dir / "checkpoints" / "best.pt"), *files, "--json"])
    assert before.exit_code == 0, before.output
    shutil.rmtree(data.parent)  # the run's train and val images are gone
    after = cli.invoke(app, ["predict", str(run_dir / "checkpoints" / "best.pt"), *files, "--json"])
    assert after.exit_code == 0, after.output
    assert json.loads(after.stdout) == json.loads(before.stdout)
    stripped = tmp_path / "old.pt"  # (as a checkpoint saved before the end of a run)
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    torch.save(dataclasses.replace(checkpoint, thresholds=None).to_dict(), stripped)
    result = cli.invoke(app, ["predict", str(stripped), *files])
    assert result.exit_code == 2 and "val" in result.output  # (choosing them needs the images: one line)
