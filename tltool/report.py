"""`tltool report RUN_DIR`: plots of a finished run and one self-contained HTML file to send to a colleague.

It reads the run directory (metrics.jsonl, summary.json, config.yaml, classes.json and the best checkpoint),
evaluates the checkpoint once on the run's val split (or `--data`), and writes `RUN_DIR/report/`:
`curves.png`, `confusion_matrix.png`, `per_class.png`, `errors.png`, `reliability.png` (calibration.py's
bins: accuracy against confidence) and `report.html`, which embeds them
as data URIs (no external file, script or font). Plots are drawn with matplotlib's Agg canvas and the
object API (no pyplot state, no display needed); matplotlib is the `plots` extra: `pip install tltool[plots]`.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tltool import __version__, files
from tltool.calibration import ECE_NEEDS, ReliabilityBin, reliability_bins
from tltool.data import Sample
from tltool.device import resolve_device
from tltool.errors import CheckpointError, ReportError
from tltool.evaluate import SampleOutputs, evaluate_trained
from tltool.plots import (
    confusion_figure,
    curves_figure,
    errors_figure,
    figure_png,
    per_class_figure,
    reliability_figure,
    require_matplotlib,
)
from tltool.trained import open_trained

REPORT_WRITE_FIX = "free disk space, or fix the permissions of the run directory (the run itself is untouched)"

if TYPE_CHECKING:
    pass

PLOTS = ("curves.png", "confusion_matrix.png", "per_class.png", "errors.png", "reliability.png")
MAX_ERRORS = 16  # images in errors.png (a 4 x 4 grid)


@dataclass
class RunFiles:
    """What a run directory holds that the report needs."""

    run_dir: Path
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None
    config_text: str
    class_names: list[str] | None
    checkpoint_path: Path


@dataclass
class Evaluation:
    """One pass of the checkpoint over the evaluation images: metrics as `tltool eval` has them, plus errors."""

    source: str
    metrics: dict[str, Any]
    errors: list[dict[str, Any]] = field(default_factory=list)
    reliability: list[ReliabilityBin] = field(default_factory=list)  # the confidence bins of the ECE


# --- reading the run ---------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}", "the run directory is damaged; re-run or restore it") from None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The per-epoch records of metrics.jsonl (blank lines skipped; a torn last line is an error)."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}", "the run directory is damaged; re-run or restore it") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ReportError(f"{path} line {number} is not JSON", "the run directory is damaged") from None
        if isinstance(record, dict) and "epoch" in record:
            records.append(record)
    return records


def read_run(run_dir: str | Path) -> RunFiles:
    """The files of a run directory, checked: a one-line ReportError/CheckpointError says what is missing."""
    run_dir = Path(run_dir)
    fix = "give the directory of a tltool finetune run (runs/<name>)"
    if not run_dir.exists():
        raise ReportError(f"run directory {run_dir} does not exist", fix)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a folder", fix)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ReportError(f"{run_dir} is not a tltool run (no metrics.jsonl)", fix)
    records = read_metrics(metrics_path)
    if not records:
        raise ReportError(f"{metrics_path} has no epoch yet", "report on the run after its first epoch")
    checkpoint_path = next(
        (p for p in (run_dir / "checkpoints" / "best.pt", run_dir / "checkpoints" / "last.pt") if p.is_file()), None
    )
    if checkpoint_path is None:
        raise CheckpointError(f"{run_dir / 'checkpoints'} has neither best.pt nor last.pt", fix)
    summary = _read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else None
    config_path = run_dir / "config.yaml"
    try:
        config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"cannot read {config_path}: {exc}", "the run directory is damaged") from None
    classes_path = run_dir / "classes.json"
    class_names = _read_json(classes_path) if classes_path.is_file() else None
    return RunFiles(run_dir, records, summary, config_text, class_names, checkpoint_path)


# --- evaluating the checkpoint -----------------------------------------------------------------------


def confident_errors(
    outputs: SampleOutputs, samples: Sequence[Sample], class_names: list[str], limit: int = MAX_ERRORS
) -> list[dict[str, Any]]:
    """The `limit` wrong predictions the model was most sure of, most confident first: path, classes, confidence.

    `outputs` is `evaluate`'s per-sample result over an indexed loader, so each row names its file even
    when an image failed to decode and was dropped.
    """
    assert outputs.indices is not None, "an indexed pass (evaluate_trained) gives each row's sample"
    confidence = outputs.probabilities().gather(1, outputs.predictions[:, None])[:, 0]
    wrong = (outputs.predictions != outputs.labels).nonzero()[:, 0]
    order = wrong[confidence[wrong].argsort(descending=True)][:limit]
    return [
        {
            "path": samples[int(outputs.indices[i])][0],
            "true": class_names[int(outputs.labels[i])],
            "predicted": class_names[int(outputs.predictions[i])],
            "confidence": float(confidence[i]),
        }
        for i in order.tolist()
    ]


def evaluate_run(
    run: RunFiles,
    data: str | None = None,
    device_name: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
) -> Evaluation:
    """The run's checkpoint on `data`, or on the val split the run used: `tltool eval`'s numbers, plus errors."""
    trained = open_trained(run.checkpoint_path, resolve_device(device_name))
    samples, source = trained.samples(data)
    if trained.multilabel:  # per-class AP and F1 at the val-chosen thresholds, as `tltool eval` prints them
        from tltool.evaluate import apply_thresholds, val_thresholds
        from tltool.multilabel import choose_thresholds

        metrics = evaluate_trained(trained, samples, batch_size, num_workers, per_sample=True)
        outputs = metrics["outputs"]
        if data is None:
            chosen, how = choose_thresholds(outputs.probabilities(), outputs.labels), "chosen on this val split"
        else:
            chosen, how = val_thresholds(trained, batch_size, num_workers), "chosen on the run's val split"
        apply_thresholds(metrics, chosen, how)
        metrics.pop("outputs")
        metrics["checkpoint_epoch"] = trained.checkpoint.epoch
        metrics["data"] = source
        return Evaluation(source, metrics)
    metrics = evaluate_trained(trained, samples, batch_size, num_workers, per_sample=True)
    outputs = metrics.pop("outputs")
    metrics["checkpoint_epoch"] = trained.checkpoint.epoch
    metrics["data"] = source
    bins = reliability_bins(outputs.probabilities(), outputs.labels, metrics["ece_bins"])
    return Evaluation(source, metrics, confident_errors(outputs, samples, trained.class_names), bins)


# --- HTML --------------------------------------------------------------------------------------------


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "–"
    return str(value)


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in data.items():
        if isinstance(value, dict):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_format(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.5rem 0; }
td, th { border: 1px solid #ddd; padding: 0.2rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } img { max-width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
.muted { color: #777; }
"""


def multilabel_sections(evaluation: Evaluation, images: dict[str, bytes]) -> list[str]:
    """A multilabel run's evaluation: mAP, F1, accuracies, the curves, then AP / F1 / threshold per class."""
    metrics = evaluation.metrics
    rows = [
        ("images", evaluation.source),
        ("number of images", metrics["num_images"]),
        ("mAP (macro)", f"{metrics['map']:.4f}"),
        ("F1 micro / macro", f"{metrics['f1_micro']:.4f} / {metrics['f1_macro']:.4f}"),
        ("exact match", f"{metrics['exact_match']:.2%}"),
        ("label accuracy", f"{metrics['label_accuracy']:.2%}"),
        ("thresholds", metrics["thresholds_from"]),
        ("loss (binary cross-entropy)", metrics["loss"]),
    ]
    class_rows = [(r["class"], r["ap"], f"{r['f1']:.3f}", f"{r['threshold']:.4f}", r["support"])
                  for r in metrics["per_class"]]  # fmt: skip
    return [
        _table(rows),
        "<h2>Training curves</h2>",
        _img(images["curves.png"], "loss, exact match and learning rate per epoch"),
        "<h2>Per class</h2>",
        _table(class_rows, ["class", "AP", "F1 at threshold", "threshold", "positives"]),
    ]


def report_html(run: RunFiles, evaluation: Evaluation, images: dict[str, bytes]) -> str:
    """One HTML page with the summary, the evaluation, every plot embedded, the worst errors and the config
    (a multilabel run: its mAP, F1 and per-class AP, `multilabel_sections`)."""
    metrics = evaluation.metrics
    summary = run.summary
    name = run.run_dir.resolve().name
    headline = []
    if summary:
        headline.append(f"{summary.get('backbone', '?')} ({summary.get('weights', '?')}), {summary.get('method', '')}")
    checkpoint = Path(metrics["checkpoint"]).name
    epoch = metrics.get("checkpoint_epoch")
    evaluated = f"{checkpoint}" + (f" (epoch {epoch})" if epoch is not None else "")
    summary_html = (
        _table([(key, value) for key, value in _flatten(summary)])
        if summary
        else '<p class="muted">no summary.json: the run has not finished (or was interrupted)</p>'
    )
    if metrics.get("multilabel"):
        body = [f"<h2>Evaluation of {html.escape(evaluated)}</h2>", *multilabel_sections(evaluation, images)]
        return _page(name, headline, body, summary_html, run)
    eval_rows = [
        ("checkpoint", evaluated),
        ("images", evaluation.source),
        ("number of images", metrics["num_images"]),
        ("top-1 accuracy", f"{metrics['acc1']:.2%}"),
        ("top-5 accuracy", f"{metrics['acc5']:.2%}"),
        ("loss", metrics["loss"]),
        (
            "expected calibration error",
            f"{metrics['ece']:.4f} ({metrics['ece_bins']} bins)" if metrics["ece"] is not None else ECE_NEEDS,
        ),
        ("temperature", metrics["temperature"] if metrics["temperature"] is not None else "not calibrated"),
    ]
    classes = run.class_names or metrics["class_names"]
    classes_html = f"<p>{len(classes)} classes: {html.escape(', '.join(classes))}</p>"
    class_rows = [
        (r["class"], f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"])
        for r in metrics["per_class"]
    ]
    error_rows = [(e["path"], e["true"], e["predicted"], f"{e['confidence']:.1%}") for e in evaluation.errors]
    body = [
        f"<h2>Evaluation of {html.escape(evaluated)}</h2>",
        _table(eval_rows),
        "<h2>Training curves</h2>",
        _img(images["curves.png"], "loss, accuracy and learning rate per epoch"),
        "<h2>Confusion matrix</h2>",
        _img(images["confusion_matrix.png"], "normalized confusion matrix"),
        "<h2>Per class</h2>",
        _img(images["per_class.png"], "precision, recall and F1 per class"),
        classes_html,
        _table(class_rows, ["class", "precision", "recall", "F1", "support"]),
        "<h2>Calibration</h2>",
        _img(images["reliability.png"], "reliability diagram: accuracy against confidence per bin"),
        "<h2>Most confidently wrong images</h2>",
        _img(images["errors.png"], "most confidently wrong images"),
        _table(error_rows, ["file", "true", "predicted", "confidence"]) if error_rows else "",
    ]
    return _page(name, headline, body, summary_html, run)


def _page(name: str, headline: list[str], body: list[str], summary_html: str, run: RunFiles) -> str:
    """The HTML document around a report's sections: title, summary, config, provenance."""
    written = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>tltool report: {html.escape(name)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(name)}</h1>",
        f'<p class="muted">{html.escape(" ".join(headline))}</p>' if headline else "",
        *body,
        "<h2>Summary</h2>",
        summary_html,
        "<h2>Config</h2>",
        f"<pre>{html.escape(run.config_text or '(no config.yaml)')}</pre>",
        f'<p class="muted">written by tltool {html.escape(__version__)} on {html.escape(written)} '
        f"from {html.escape(str(run.run_dir))}</p>",
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"


# --- the command -------------------------------------------------------------------------------------


def write_report(
    run_dir: str | Path,
    data: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
) -> Path:
    """Write RUN_DIR/report/ (four PNGs and report.html; a multilabel run: curves.png and report.html with its
    per-class AP) for a run; returns the path of report.html.

    Works on any run with at least one finished epoch and a checkpoint (best.pt, else last.pt), so
    `finetune` can call it at the end of a run and `tltool report` on an old one.
    """
    run = read_run(run_dir)
    require_matplotlib()  # before the (slow) evaluation
    out = run.run_dir / "report"
    page = out / "report.html"
    # Before the evaluation too: an unwritable report folder (read-only run, report/ a file) is one line now.
    files.check_writable(page, ReportError, REPORT_WRITE_FIX)
    evaluation = evaluate_run(run, data, device, batch_size, num_workers)
    class_names = evaluation.metrics["class_names"]
    best_epoch = run.summary.get("best_epoch") if run.summary else evaluation.metrics.get("checkpoint_epoch")
    if evaluation.metrics.get("multilabel"):  # (no confusion matrix, confidences or single-label errors)
        figures = {"curves.png": curves_figure(run.records, best_epoch)}
    else:
        figures = {
            "curves.png": curves_figure(run.records, best_epoch),
            "confusion_matrix.png": confusion_figure(evaluation.metrics["confusion_matrix"], class_names),
            "per_class.png": per_class_figure(evaluation.metrics["per_class"]),
            "errors.png": errors_figure(evaluation.errors),
            "reliability.png": reliability_figure(
                evaluation.reliability, evaluation.metrics["ece"], evaluation.metrics["temperature"]
            ),
        }
    images = {name: figure_png(figure) for name, figure in figures.items()}
    # Each file atomically (temp, fsync, rename): a full disk is one line and leaves the previous report's files.
    for name, png in images.items():
        files.write_atomic(out / name, lambda handle, png=png: handle.write(png), ReportError, REPORT_WRITE_FIX)
    files.write_text_atomic(page, report_html(run, evaluation, images), ReportError, REPORT_WRITE_FIX)
    return page
