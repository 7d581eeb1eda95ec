"""`tltool eval`, `predict`, `report`, `calibrate`: what a trained checkpoint (or an exported file) says."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from tltool.commands.common import CheckpointPath, Device, Threshold, WiseAlpha, user_errors
from tltool.device import check_device

commands = typer.Typer()


@commands.command("eval", epilog="Example: tltool eval runs/flowers/checkpoints/best.pt --data data/flowers/test")
def eval_command(
    checkpoint: CheckpointPath,
    data: Annotated[
        str | None,
        typer.Option(
            "--data", help="Folder of class sub-folders or a .csv/.tsv label file; default: the run's val split."
        ),
    ] = None,
    json_path: Annotated[str | None, typer.Option("--json", help="Also write the metrics to this JSON file.")] = None,
    device: Device = "auto",
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Default: the run's.")] = None,
    num_workers: Annotated[int | None, typer.Option("--num-workers", min=0, help="Default: the run's.")] = None,
    wise_alpha: WiseAlpha = None,
    threshold: Threshold = None,
) -> None:
    """Measure a checkpoint: loss, top-1/top-5, per-class precision/recall/F1, confusion matrix (of the EMA weights
    when the run monitored an EMA metric: the checkpoint's model is then the EMA, and the first line says so).
    A multilabel model: mAP, micro/macro F1, per-class AP and F1 at per-class thresholds chosen on the run's val
    split (or --threshold)."""
    with user_errors():
        check_device(device, "--device")
        from tltool.evaluate import format_report, run_eval

        metrics = run_eval(checkpoint, data, json_path, device, batch_size, num_workers, wise_alpha, threshold)
        wise = f" (WiSE-FT alpha {wise_alpha:g})" if wise_alpha is not None else ""
        weights = " (EMA weights)" if metrics["weights"] == "ema" else ""
        typer.echo(f"{checkpoint}{weights}{wise} on {metrics['data']}")
        typer.echo(format_report(metrics, metrics["class_names"]))
        if json_path:
            typer.echo(f"metrics written to {json_path}")


@commands.command(
    epilog="Example: tltool predict runs/flowers/checkpoints/best.onnx photos/ --topk 3   |   "
    "tltool predict best.pt 'photos/**/*.jpg' --json > predictions.json"
)
def predict(
    model: Annotated[
        str,
        typer.Argument(
            help="A tltool checkpoint (.pt) or a file tltool export wrote (.onnx .torchscript.pt .pt2 .safetensors).",
            show_default=False,
        ),
    ],
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Image files, folders (searched recursively) or globs ('photos/**/*.jpg').", show_default=False
        ),
    ],
    topk: Annotated[int, typer.Option("--topk", "-k", min=1, help="How many labels per image.")] = 3,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of the table.")] = False,
    csv_path: Annotated[
        str | None, typer.Option("--csv", help="Also write rows file,rank,label,probability to this file.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 32,
    device: Device = "auto",
    threshold: Threshold = None,
) -> None:
    """Label images with a checkpoint or an exported model: a table of the top-k labels and probabilities
    (a multilabel model: every label whose sigmoid reaches its threshold, with its probability).

    Unreadable images are reported on stderr and skipped; exit code 2 when none could be read.
    """
    with user_errors():
        check_device(device, "--device")
        from tltool.predict import check_some_readable, format_table, run_predict, to_json, write_csv

        results = run_predict(model, inputs, topk, batch_size, device, echo=lambda text: typer.echo(text, err=True),
                              threshold=threshold)  # fmt: skip
        table = to_json(results) if json_output else format_table(results)
        if table:
            typer.echo(table)
        if csv_path:
            write_csv(results, csv_path)
            typer.echo(f"wrote {csv_path}", err=True)
        check_some_readable(results)


@commands.command(epilog="Example: tltool report runs/flowers   (then open runs/flowers/report/report.html)")
def report(
    run_dir: Annotated[str, typer.Argument(help="A run directory (runs/<name>) written by tltool finetune.")],
    data: Annotated[
        str | None,
        typer.Option(
            "--data", help="Folder of class sub-folders or a .csv/.tsv label file; default: the run's val split."
        ),
    ] = None,
    device: Device = "auto",
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Default: the run's.")] = None,
    num_workers: Annotated[int | None, typer.Option("--num-workers", min=0, help="Default: the run's.")] = None,
) -> None:
    """Write report/ into a run: curves, confusion matrix, per-class bars, worst errors, and one HTML file."""
    with user_errors():
        check_device(device, "--device")
        from tltool.report import write_report

        path = write_report(run_dir, data=data, device=device, batch_size=batch_size, num_workers=num_workers)
        typer.echo(f"report written to {path}")


@commands.command(epilog="Example: tltool calibrate runs/flowers/checkpoints/best.pt --data data/flowers/val -o cal.pt")
def calibrate(
    checkpoint: CheckpointPath,
    data: Annotated[
        str | None,
        typer.Option("--data", help="Folder of class sub-folders to fit T on; default: the run's val split."),
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Write the calibrated checkpoint here; default: in place.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    device: Device = "auto",
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Default: the run's.")] = None,
    num_workers: Annotated[int | None, typer.Option("--num-workers", min=0, help="Default: the run's.")] = None,
) -> None:
    """Temperature scaling: fit one T on validation images (min NLL of logits / T) and store it in the checkpoint,
    which eval, predict and export then apply (probabilities change, the top-1 class does not)."""
    with user_errors():
        check_device(device, "--device")
        from tltool.calibration import run_calibrate

        echo = (lambda line: typer.echo(line, err=True)) if json_out else typer.echo
        result = run_calibrate(checkpoint, data, output, device, batch_size, num_workers, echo=echo)
        if json_out:
            typer.echo(json.dumps({"checkpoint": output or checkpoint, **result.to_dict()}, indent=2))
